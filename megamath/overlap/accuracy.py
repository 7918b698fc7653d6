"""Accuracy on test problems that overlap the training corpus vs on those that do not (LLEMMA, sec. 5).

Inputs: the hits of `megamath overlap` (HITS.jsonl, `test_id` per line) and a results file of
`megamath eval` (RESULTS.jsonl), one line per problem with at least
    id       the problem's id, the same value `megamath overlap` writes as `test_id` (the test record's
             id field, else unique_id, else its 0-based position in the test file); compared as text, so 7
             and "7" match;
    correct  true/false (0/1 accepted);
    level    (MATH) the difficulty level, needed for `--by level`; `--by` takes any field name.
A problem is a hit when any hit line names it (any field and n unless `--field` / `--n` narrow it), as in
LLEMMA's analysis, which pooled the hits of problems and of solutions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megamath.jsonl import read_jsonl_objects


@dataclass(frozen=True)
class Hits:
    """The hit lines of a HITS.jsonl, read once: each line's test id (as text), field and n."""

    path: Path
    lines: list[tuple[str, object, object]]

    def ids(self, fields: Sequence[str] | None = None, ns: Sequence[int] | None = None) -> set[str]:
        """Ids of the test items named by the hit lines kept by the filters."""
        return {test_id for test_id, field, n in self.lines
                if (not fields or field in fields) and (not ns or n in ns)}


def read_hits(path: str | Path) -> Hits:
    lines = []
    for line_no, record in read_jsonl_objects(path):
        if "test_id" not in record:
            raise ValueError(f"{path}:{line_no}: no 'test_id' field: is this a HITS.jsonl of megamath overlap?")
        lines.append((str(record["test_id"]), record.get("field"), record.get("n")))
    return Hits(Path(path), lines)


def check_filters(hits: Hits, fields: Sequence[str] | None, ns: Sequence[int] | None) -> list[str]:
    """Refuse a --field or --n the overlap run did not check (its HITS.summary.json says which): such a filter
    keeps no hit line and the table would call every problem clean. Without the summary, the warnings for
    filters that no hit line matches (a field checked with no hit is a real zero, so not an error there).
    A summary whose hit_lines is not the file's line count is another run's (two runs into one output)."""
    from megamath.overlap.run import summary_path

    seen_fields = {field for _, field, _ in hits.lines}
    seen_ns = {n for _, _, n in hits.lines}
    path = summary_path(hits.path)
    checked = None
    if path.is_file():
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            checked = ([str(f) for f in summary["fields"]], [int(n) for n in summary["ns"]])
            if summary.get("hit_lines", len(hits.lines)) != len(hits.lines):
                checked = None  # another run's: two runs into one output each publish their two files whole
        except (ValueError, KeyError, TypeError):
            checked = None  # not a summary of megamath overlap: judge by the hit lines alone
        if checked is not None and not (seen_fields <= set(checked[0]) and seen_ns <= set(checked[1])):
            checked = None  # the summary of another run (this one stopped before writing its own)
    if checked is not None:
        for f in fields or ():
            if f not in checked[0]:
                names = ", ".join(repr(x) for x in checked[0])
                raise ValueError(f"--field {f!r}: the overlap run checked the fields {names} ({path.name})")
        for n in ns or ():
            if n not in checked[1]:
                raise ValueError(f"--n {n}: the overlap run checked n = {', '.join(map(str, checked[1]))} ({path.name})")
        return []
    warnings = []
    named = ", ".join(repr(x) for x in sorted(seen_fields, key=str))
    warnings += [f"no hit line has --field {f!r} (the hits name the fields {named})" for f in fields or ()
                 if f not in seen_fields and seen_fields]
    warnings += [f"no hit line has --n {n} (the hits hold n = {', '.join(map(str, sorted(seen_ns, key=str)))})"
                 for n in ns or () if n not in seen_ns and seen_ns]
    return warnings


@dataclass(frozen=True)
class Result:
    id: str
    correct: bool
    group: str | None


def read_results(path: str | Path, by: str | None = None) -> list[Result]:
    results, seen = [], set()
    for line_no, record in read_jsonl_objects(path):
        for name in ("id", "correct") + ((by,) if by else ()):
            if name not in record:
                needed = "id, correct" + (f" and {by}" if by else "")
                raise ValueError(f"{path}:{line_no}: no {name!r} field (overlap-accuracy needs {needed} on "
                                 "every line, as megamath eval writes them)")
        correct = record["correct"]
        if correct not in (True, False, 0, 1):  # 0/1 as well as booleans (True == 1 in Python)
            raise ValueError(f"{path}:{line_no}: 'correct' must be true/false (or 0/1), got {correct!r}")
        key = str(record["id"])
        if key in seen:
            raise ValueError(f"{path}:{line_no}: id {record['id']!r} appears twice")
        seen.add(key)
        results.append(Result(key, bool(correct), str(record[by]) if by else None))
    if not results:
        raise ValueError(f"{path}: no results")
    return results


@dataclass
class AccuracyRow:
    group: str
    hit_n: int = 0
    hit_correct: int = 0
    nonhit_n: int = 0
    nonhit_correct: int = 0

    def add(self, hit: bool, correct: bool) -> None:
        if hit:
            self.hit_n, self.hit_correct = self.hit_n + 1, self.hit_correct + correct
        else:
            self.nonhit_n, self.nonhit_correct = self.nonhit_n + 1, self.nonhit_correct + correct

    @property
    def hit_accuracy(self) -> float | None:
        return self.hit_correct / self.hit_n if self.hit_n else None

    @property
    def nonhit_accuracy(self) -> float | None:
        return self.nonhit_correct / self.nonhit_n if self.nonhit_n else None


def accuracy_by_hit(hit_ids: set[str], results: list[Result]) -> tuple[list[AccuracyRow], set[str]]:
    """Rows per group (sorted; 'all' last) and the hit ids that no result names."""
    rows: dict[str, AccuracyRow] = {}
    total = AccuracyRow("all")
    for r in results:
        hit = r.id in hit_ids
        total.add(hit, r.correct)
        if r.group is not None:
            rows.setdefault(r.group, AccuracyRow(r.group)).add(hit, r.correct)
    unmatched = hit_ids - {r.id for r in results}
    return [rows[g] for g in sorted(rows)] + [total], unmatched


def format_rows(rows: list[AccuracyRow], by: str | None) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    header = (by or "group", "hit n", "hit acc", "non-hit n", "non-hit acc")
    table = [(r.group, f"{r.hit_n:,}", pct(r.hit_accuracy), f"{r.nonhit_n:,}", pct(r.nonhit_accuracy)) for r in rows]
    widths = [max(len(t[i]) for t in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths)))
             for t in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
