"""The task registry: for each task, how to read its data, build its prompt, extract and check an answer.

    gsm8k        jsonl {"question", "answer" (solution ending "#### N")}; 8-shot chain of thought
    math         the MATH release (a folder of {"problem", "level", "type", "solution"} JSON files, read
                 recursively) or a jsonl of such records; Minerva's 4-shot prompt
    demo-arith   jsonl {"id", "kind", "prompt", "answer"} as `megamath demo-corpus` writes it; 0-shot

A problem's id is its record's id field, else its 0-based position in the jsonl file (in MATH's release
folder, the file's path): how `megamath overlap` names test items, so overlap-accuracy can join the two.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megamath.evaluation import demo_arith, gsm8k, minerva_math
from megamath.jsonl import is_text, read_jsonl_objects


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    """The gold final answer (already extracted from the solution)."""
    meta: dict = field(default_factory=dict)
    """Fields copied into the results (MATH's level and type, demo-arith's kind)."""


@dataclass(frozen=True)
class Task:
    name: str
    shots: int
    """Default number of exemplars."""
    max_new_tokens: int
    stop: tuple[str, ...]
    read: Callable[[Path], list[Problem]]
    prompt: Callable[[str, int], str]
    extract: Callable[[str], str | None]
    correct: Callable[[str | None, str], bool]
    canonical: Callable[[str], str]
    """The form answers are grouped by in the majority vote."""


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    return list(read_jsonl_objects(path, "data file"))


def _need(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"{where}: missing string field(s) {', '.join(missing)}")
    broken = [k for k in keys if not is_text(record[k])]
    if broken:
        raise ValueError(f"{where}: field(s) {', '.join(broken)} hold a lone surrogate escape (\\ud800-\\udfff), "
                         "not text")


def read_gsm8k(path: Path) -> list[Problem]:
    problems = []
    for n, record in _jsonl(path):
        _need(record, ("question", "answer"), f"{path}:{n}")
        try:
            gold = gsm8k.gold_answer(record["answer"])
        except ValueError as err:
            raise ValueError(f"{path}:{n}: {err}") from None
        problems.append(Problem(str(record.get("id", len(problems))), record["question"], gold))
    return problems


def _math_problem(record: dict, pid: str, where: str) -> Problem:
    _need(record, ("problem",), where)
    if isinstance(record.get("answer"), str):
        gold = record["answer"]
    else:
        _need(record, ("solution",), where)
        try:
            gold = minerva_math.gold_answer(record["solution"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    meta = {k: record[k] for k in ("level", "type", "subject") if k in record}
    return Problem(str(record.get("id", record.get("unique_id", pid))), record["problem"], gold, meta)


def read_math(path: Path) -> list[Problem]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise ValueError(f"{path}: no MATH problem files (*.json) found")
        problems = []
        for file in files:
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
            except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError: a file that is not UTF-8 text
                raise ValueError(f"{file}: invalid JSON ({getattr(err, 'msg', None) or err})") from None
            problems.append(_math_problem(record, str(file.relative_to(path).with_suffix("")), str(file)))
        return problems
    return [_math_problem(r, str(i), f"{path}:{n}") for i, (n, r) in enumerate(_jsonl(path))]


def read_demo_arith(path: Path) -> list[Problem]:
    problems = []
    for n, record in _jsonl(path):
        _need(record, ("id", "prompt", "answer"), f"{path}:{n}")
        problems.append(Problem(record["id"], record["prompt"], record["answer"], {"kind": record.get("kind")}))
    return problems


def _demo_prompt(question: str, shots: int) -> str:
    if shots:
        raise ValueError("demo-arith is zero-shot (its prompts are document prefixes): use --shots 0")
    return question


TASKS = {
    "gsm8k": Task("gsm8k", 8, 256, gsm8k.STOP, read_gsm8k, gsm8k.build_prompt, gsm8k.extract_answer,
                  gsm8k.is_correct, gsm8k.normalize_number),
    "math": Task("math", 4, 512, minerva_math.STOP, read_math, minerva_math.build_prompt,
                 minerva_math.extract_answer, minerva_math.is_equiv, minerva_math.canonical_answer),
    "demo-arith": Task("demo-arith", 0, 8, demo_arith.STOP, read_demo_arith, _demo_prompt,
                       demo_arith.extract_answer, demo_arith.is_correct, lambda a: str(int(a))),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
