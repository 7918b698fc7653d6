"""One evaluation: a task's problems through the model, greedy (maj@1) and k sampled votes (maj@k).

Shared by `megamath eval` and evaluation during training. Each problem gives one result record:

    id, gold, <meta: level, type, kind>, prompt_truncated (tokens cut from the left),
    greedy (completion), greedy_answer, correct (greedy, i.e. maj@1),
    with k > 1 also: samples, answers, logprobs, vote, correct_maj (the vote's)

maj@1 is greedy decoding (LLEMMA's headline numbers); maj@k draws k samples at the given temperature and
top-p and votes (voting.py: most votes, ties to the higher summed log-probability).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from megamath.evaluation.tasks import Problem, Task
from megamath.evaluation.voting import majority_vote
from megamath.generation.batching import PromptCodec, complete
from megamath.generation.generate import SamplingParams


@dataclass
class EvalSettings:
    shots: int | None = None
    """Exemplars in the prompt (None: the task's default)."""
    maj: int = 1
    """k of maj@k; 1 runs greedy decoding only."""
    temperature: float = 0.6
    """Sampling temperature of the k votes (LLEMMA: 0.6)."""
    top_p: float = 0.95
    """Nucleus mass of the k votes (LLEMMA: 0.95)."""
    max_new_tokens: int | None = None
    """None: the task's default."""
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.maj < 1:
            raise ValueError(f"maj must be at least 1, got {self.maj}")
        if self.max_new_tokens is not None:  # 0 would read as "the task's default"
            SamplingParams(self.max_new_tokens)
        if self.maj > 1:  # the votes' settings, checked now: the votes run after the whole greedy pass
            SamplingParams(1, self.temperature, self.top_p)


def evaluate(model, codec: PromptCodec, task: Task, problems: list[Problem], settings: EvalSettings,
             progress: Callable[[int, int], None] | None = None, keys: list[int] | None = None) -> list[dict]:
    """The result record of each problem (see the module docstring); progress(problems, tokens) per batch.

    `keys` (default 0, 1, …) number the problems in the seeds: a share of a task keeps its global numbers.
    """
    shots = task.shots if settings.shots is None else settings.shots
    prompts = [task.prompt(p.question, shots) for p in problems]
    truncated = [codec.encode(p)[1] for p in prompts]
    max_new = settings.max_new_tokens or task.max_new_tokens
    keys = list(range(len(problems))) if keys is None else keys
    greedy = complete(model, codec, prompts, SamplingParams(max_new, 0.0, 1.0, task.stop), 1, settings.seed,
                      settings.batch_size, keys, progress)
    sampled = None
    if settings.maj > 1:
        params = SamplingParams(max_new, settings.temperature, settings.top_p, task.stop)
        sampled = complete(model, codec, prompts, params, settings.maj, settings.seed, settings.batch_size, keys,
                           progress)
    results = []
    for i, problem in enumerate(problems):
        text = greedy[i][0].text
        answer = task.extract(text)
        record = {"id": problem.id, "gold": problem.answer, **problem.meta, "prompt_truncated": truncated[i],
                  "greedy": text, "greedy_answer": answer, "correct": bool(task.correct(answer, problem.answer))}
        if sampled is not None:
            texts = [c.text for c in sampled[i]]
            answers = [task.extract(t) for t in texts]
            logprobs = [c.logprob for c in sampled[i]]
            vote = majority_vote(answers, logprobs, task.canonical)
            record.update(samples=texts, answers=answers, logprobs=logprobs, vote=vote,
                          correct_maj=bool(task.correct(vote, problem.answer)))
        results.append(record)
    return results


def summarize(results: list[dict], maj: int) -> dict:
    """{"problems", "maj1", "maj<k>" (k > 1)}: accuracies in [0, 1]."""
    n = len(results)
    summary = {"problems": n, "maj1": sum(r["correct"] for r in results) / n if n else 0.0}
    if maj > 1:
        summary[f"maj{maj}"] = sum(r["correct_maj"] for r in results) / n if n else 0.0
    return summary


def breakdown(results: list[dict], maj: int) -> dict[str, dict]:
    """Accuracies per group of the first grouping field the data has (MATH's level, demo-arith's kind)."""
    for key in ("level", "kind", "type"):
        if results and all(key in r for r in results):
            groups: dict[str, list[dict]] = {}
            for r in results:
                groups.setdefault(f"{key} {r[key]}", []).append(r)
            return {name: summarize(rows, maj) for name, rows in sorted(groups.items())}
    return {}


class Stopwatch:
    """Problems/s and tokens/s for the progress bar."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def rates(self, problems: int, tokens: int) -> dict:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"tok/s": f"{self.tokens / elapsed:.1f}"}
