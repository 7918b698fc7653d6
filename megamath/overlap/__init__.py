"""Train/test n-gram overlap: which test items appear in a training corpus (`megamath overlap`).

The rule is the reference tool's (wellecks/overlap, used for LLEMMA's analysis), so its numbers can be
reproduced:
  * a text's words are Python's `text.split()` with no argument: maximal runs of characters that are
    not whitespace by `str.isspace()` (ASCII space, \\t \\n \\v \\f \\r, \\x1c-\\x1f, and U+0085, U+00A0,
    U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000); so line breaks, runs of spaces and
    non-breaking spaces all separate words the same way, and leading or trailing whitespace is ignored;
  * nothing else is normalised: no lowercasing, no punctuation or LaTeX stripping, no Unicode
    normalisation (NFC/NFKC); zero-width space U+200B and BOM U+FEFF are not whitespace;
  * an n-gram is n consecutive words, compared exactly (the reference joins them with one space);
  * a test item (one field of one test record) hits a corpus document when the two share at least one
    n-gram; a test field with fewer than n words has no n-gram and can never hit.

The reference scans with Python sets per document; here the corpus goes through a C++ rolling hash
(`megamath._helpers.scan_candidates`) and each candidate's real n-gram text is compared with the test
n-grams, so a hash collision never becomes a hit. `reference.py` holds the plain-Python algorithm that
the tests and `perf/bench_overlap.py` compare against; `numpy_scan.py` the same scan vectorised in numpy,
measured slower than the C++ one and kept as its check.
"""
from megamath.overlap.ngrams import TestIndex, load_test_items, words
from megamath.overlap.reference import overlap_ref

__all__ = ["TestIndex", "load_test_items", "words", "overlap_ref"]
