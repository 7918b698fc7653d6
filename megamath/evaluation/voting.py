"""Majority voting over sampled answers (maj@k), with the tie rule stated.

Samples vote with their extracted answer (one without an answer abstains). Votes are grouped by the
task's canonical form of the answer (normalised string: grouping by symbolic equality would cost k²
SymPy calls at LLEMMA's k = 256). The answer with the most votes wins; among answers with equally many
votes, the one whose samples have the highest summed log-probability wins (more total model confidence),
and a remaining exact tie goes to the answer sampled first.
"""
from __future__ import annotations

from typing import Callable, Sequence


def majority_vote(answers: Sequence[str | None], logprobs: Sequence[float],
                  canonical: Callable[[str], str] = lambda a: a) -> str | None:
    """The voted answer (as first sampled, not canonicalised) or None when no sample gave one."""
    if len(answers) != len(logprobs):
        raise ValueError(f"{len(answers)} answers but {len(logprobs)} log-probabilities")
    tally: dict[str, list] = {}  # canonical -> [votes, summed logprob, first index, first spelling]
    for i, (answer, logprob) in enumerate(zip(answers, logprobs)):
        if answer is None:
            continue
        key = canonical(answer)
        entry = tally.setdefault(key, [0, 0.0, i, answer])
        entry[0] += 1
        entry[1] += logprob
    if not tally:
        return None
    best = max(tally.values(), key=lambda e: (e[0], e[1], -e[2]))
    return best[3]
