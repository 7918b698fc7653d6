"""Majority voting over sampled answers (maj@k), with the tie rule stated.

Samples vote with their extracted answer (one without an answer abstains). Votes are grouped by the
task's canonical form of the answer: for MATH the numeric value of a number (`1/2`, `\\frac{1}{2}`, `0.5`
are one answer), else the normalised string. LLEMMA's vote pools any two answers SymPy finds equal, which
costs up to k² SymPy calls at k = 256; numbers are pooled here at one call per distinct answer, while
equal non-numeric expressions written differently (`x+1`, `1+x`) still vote apart. The answer with the
most votes wins; among answers with equally many votes, the one whose samples have the highest summed
log-probability wins (more total model confidence), and a remaining exact tie goes to the answer sampled
first.
"""
from __future__ import annotations

from typing import Callable, Sequence


def majority_vote(answers: Sequence[str | None], logprobs: Sequence[float],
                  canonical: Callable[[str], str] = lambda a: a) -> str | None:
    """The voted answer (as first sampled, not canonicalised) or None when no sample gave one."""
    if len(answers) != len(logprobs):
        raise ValueError(f"{len(answers)} answers but {len(logprobs)} log-probabilities")
    tally: dict[str, list] = {}  # canonical -> [votes, summed logprob, first index, first spelling]
    keys: dict[str, str] = {}  # answer -> canonical, computed once per distinct answer (MATH's is a SymPy call)
    for i, (answer, logprob) in enumerate(zip(answers, logprobs)):
        if answer is None:
            continue
        if answer not in keys:
            keys[answer] = canonical(answer)
        key = keys[answer]
        entry = tally.setdefault(key, [0, 0.0, i, answer])
        entry[0] += 1
        entry[1] += logprob
    if not tally:
        return None
    best = max(tally.values(), key=lambda e: (e[0], e[1], -e[2]))
    return best[3]
