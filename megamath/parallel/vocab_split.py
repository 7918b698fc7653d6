"""How tensor parallelism splits a vocabulary that the TP size need not divide: the one rule.

A pretrained vocabulary (a Llama fine-tune's 32,001 ids) at TP 2 cannot be cut evenly. Each of the p ranks
holds ceil(V/p) rows of the vocabulary tensors; rank r's first rows are the serial ids [start, stop) below,
the rest zero padding (on the last rank(s) only), so the serial tensor is the ranks' rows concatenated and
cut to V. When p divides V this is the even split, rows [r·V/p, (r+1)·V/p).

It lives in megamath.parallel because the layers, the loss and the logits gather below the model package
need it; megamath.model.partition re-exports it for the model, state dicts, reshard, generation and the
planner, so every part calls these two functions.
"""
from __future__ import annotations


def vocab_rows_per_rank(vocab_size: int, tp_size: int) -> int:
    """Rows of embed_tokens / lm_head on each TP rank: ceil(V/p), V/p exactly when p divides V."""
    return -(-vocab_size // tp_size)


def vocab_range(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop): the vocabulary ids TP rank tp_rank owns, its first stop - start local rows.

    start = r·ceil(V/p), stop capped at V (both capped: a rank past V owns the empty [V, V)).
    """
    rows = vocab_rows_per_rank(vocab_size, tp_size)
    start = min(tp_rank * rows, vocab_size)
    return start, min(start + rows, vocab_size)
