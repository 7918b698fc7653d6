"""The ops the model calls, resolved to Triton kernels or to their plain-torch references.

The model never imports a kernel module itself: it asks `get_ops(config.kernels, device)` on every
forward, so one model object can run the kernels on a GPU and the references on a CPU copy (which is
how the tests compare them). The two tables below, `_triton_ops` and `_reference_ops`, name every op's
function explicitly, so a reader follows the model to a kernel in one step (the norms in two: the kernels
through megamath.parallel.grad_into_buffer, which sends their weight's gradient into ZeRO-1's buffer).
Kernel modules import Triton, so each table imports them on first use (a config parser, or a tool that never
runs the model, never loads Triton; the references live in the kernel files, so a CPU run of the model loads
it too).

Signatures (all layouts are the model's, batch first):
    rms_norm(x (..., h), weight (h,), eps) -> (..., h)
    add_rms_norm(residual (..., h), delta (..., h), weight (h,), eps) -> (h, y): h = residual + delta and
        y = rms_norm(h), the pre-norm block's residual add and norm in one pass each way
    rope(q (B, S, Hq, D), k (B, S, Hkv, D), theta, position_offset) -> (q, k)   rotate-half (Llama)
    rope_(q, k, theta, position_offset, inverse=False) -> None   the same rotation in place, no autograd: the
        fused q/k/v projection's epilogue (llama.RoPEOnProjection); None where the model does not fuse (the
        references: their runs stay bit-identical to the unfused arithmetic)
    flash_attention(q (B, S, Hq, D), k, v (B, S, Hkv, D), causal=True, softmax_scale=None) -> (B, S, Hq, D)
    swiglu(gate (..., f), up (..., f)) -> silu(gate) * up
    cross_entropy(logits (N, V/p), targets (N,), ignore_index=-100, group=None, vocab_start=None,
                  vocab_size=None, expected_grad=None) -> mean over non-ignored;
        with a tensor-parallel `group` the logits are this rank's vocabulary slice (vocab-parallel), the ids
        [vocab_start, vocab_start + width) of vocab_size when given (a split p does not divide evenly);
        expected_grad: the gradient the caller will send into the loss, a hint that lets the kernel write
        the logits' gradient in its forward (exact whatever arrives; the references ignore it)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Ops:
    """One resolved set of ops; `backend` is "triton" or "reference"."""

    backend: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    flash_attention: Callable
    swiglu: Callable
    cross_entropy: Callable
    rope_: Callable | None = None


def resolve_backend(kernels: str, device: torch.device | str) -> str:
    """Map the config's `kernels` setting and the tensors' device to "triton" or "reference"."""
    device = torch.device(device)
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if kernels == "reference":
        return "reference"
    if kernels == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernels='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                             "to run Triton's interpreter on CPU, or use kernels='auto' or 'reference'")
        return "triton"
    raise ValueError(f"kernels must be one of auto, triton, reference, got {kernels!r}")


def _triton_ops() -> Ops:
    """The Triton kernels (each takes the same arguments as its reference)."""
    from megamath.kernels.cross_entropy import cross_entropy
    from megamath.kernels.flash_attention import flash_attention
    from megamath.kernels.rope import rope, rope_
    from megamath.kernels.swiglu import swiglu
    # megamath.kernels.rms_norm's rms_norm and add_rms_norm, with the weight's gradient into its slot of ZeRO-1's
    # buffer where it has one
    from megamath.parallel.grad_into_buffer import add_rms_norm, rms_norm

    def unchecked_cross_entropy(logits, targets, ignore_index=-100, group=None, vocab_start=None, vocab_size=None,
                                expected_grad=None):
        # No host-synchronising range check in the hot path: TrainData checks every batch's ids on the
        # host, and the kernel turns an out-of-range id into a NaN loss (a skipped step), never a number.
        return cross_entropy(logits, targets, ignore_index=ignore_index, group=group, check_targets=False,
                             vocab_start=vocab_start, vocab_size=vocab_size, expected_grad=expected_grad)

    return Ops("triton", rms_norm=rms_norm, add_rms_norm=add_rms_norm, rope=rope, flash_attention=flash_attention,
               swiglu=swiglu, cross_entropy=unchecked_cross_entropy, rope_=rope_)


def _reference_ops() -> Ops:
    """The plain-torch references beside the kernels; the vocabulary-parallel loss is megamath.parallel's."""
    from megamath.kernels.cross_entropy import cross_entropy_ref
    from megamath.kernels.flash_attention import flash_attention_ref
    from megamath.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
    from megamath.kernels.rope import rope_ref
    from megamath.kernels.swiglu import swiglu_ref
    from megamath.parallel.cross_entropy import vocab_parallel_cross_entropy_ref

    def cross_entropy(logits, targets, ignore_index=-100, group=None, vocab_start=None, vocab_size=None,
                      expected_grad=None):  # the hint is the kernel's: autograd's own backward needs none
        if group is None:
            return cross_entropy_ref(logits, targets, ignore_index=ignore_index)
        # unchecked, as the kernel in the training step (see _triton_ops): no host read
        return vocab_parallel_cross_entropy_ref(logits, targets, ignore_index=ignore_index, group=group,
                                                check_targets=False, vocab_start=vocab_start, vocab_size=vocab_size)

    return Ops("reference", rms_norm=rms_norm_ref, add_rms_norm=add_rms_norm_ref, rope=rope_ref,
               flash_attention=flash_attention_ref, swiglu=swiglu_ref, cross_entropy=cross_entropy)


_TABLES = {"triton": _triton_ops, "reference": _reference_ops}


@functools.lru_cache(maxsize=None)
def load_ops(backend: str) -> Ops:
    """The Ops of backend "triton" (the kernels) or "reference" (their plain-torch references)."""
    if backend not in _TABLES:
        raise ValueError(f"backend must be 'triton' or 'reference', got {backend!r}")
    return _TABLES[backend]()


def get_ops(kernels: str, device: torch.device | str) -> Ops:
    """The ops a forward on `device` should use under the config's `kernels` setting."""
    return load_ops(resolve_backend(kernels, device))
