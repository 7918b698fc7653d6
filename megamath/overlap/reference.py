"""The reference tool's algorithm in plain Python: the yardstick for tests and `perf/bench_overlap.py`.

wellecks/overlap builds, per test item, the set of its n-grams (`' '.join` of nltk's n-gram tuples over
`text.split()`), then for each corpus document the set of the document's n-grams, and intersects the
document's set with every test item's set. (The tool rebuilds each test item's set inside that loop,
once per document; here it is built once, which only makes this yardstick faster.)
"""
from __future__ import annotations

from typing import Iterable, Sequence

RefHit = tuple[int, int, int, int, tuple[str, ...]]
"""(document index, test item index, field index, n, the matching n-grams sorted)."""


def _ngram_set(text: str, n: int) -> set[str]:
    w = text.split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def overlap_ref(test_texts: Sequence[Sequence[str]], documents: Iterable[str], ns: Sequence[int]) -> list[RefHit]:
    """Every (document, test item, field, n) whose n-gram sets intersect, in document, item, field, n
    order. `test_texts[i][f]` is field f of test item i."""
    ns = sorted(set(ns))
    item_sets = {n: [[_ngram_set(text, n) for text in fields] for fields in test_texts] for n in ns}
    hits: list[RefHit] = []
    for d, document in enumerate(documents):
        found = []
        for n in ns:
            doc_set = _ngram_set(document, n)
            for i, fields in enumerate(item_sets[n]):
                for f, item_set in enumerate(fields):
                    common = doc_set.intersection(item_set)
                    if common:
                        found.append((d, i, f, n, tuple(sorted(common))))
        hits.extend(sorted(found))
    return hits
