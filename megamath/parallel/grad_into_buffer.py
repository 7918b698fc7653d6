"""Weight gradients written by their matmul straight into ZeRO-1's gradient buffer, without the hook's copy.

Why: autograd hands a weight's gradient to ZeroOptimizer's post-accumulate hook as a fresh tensor, which the hook
copies into the flat buffer: per step one more write and one more read of every gradient (in bf16 at Code Llama
7B's width with 4 layers, whose linear weights are 0.94 B of its 1.07 B parameters, about 3.8 GB of memory
traffic, ~1.2 ms at an H100's ~3 TB/s: arithmetic, not a timing). Where the buffer holds the weight's own dtype
(grad_dtype auto on one GPU with one micro-batch; fp32 weights anywhere) and the weight's slot still awaits its
first gradient of the step, the matmul that computes the gradient can write it there itself (`torch.mm` with
`out=`): Megatron's `main_grad` idea, without its fp32-accumulating GEMM. Later micro-batches' gradients, a
buffer of another dtype, a weight with a gradient hook of its own (Tensor.register_hook: it must see the
gradient) and every weight nobody registered take autograd's path and the hook, as before.

How: ZeroOptimizer registers a `GradSlot` per parameter (`register`); the model's linear layers call `linear`
(one weight) or `linears_into_buffer` (weights back to back in memory, fused_linear.py), which use this file's
autograd function wherever every weight has a slot. Its backward computes exactly what autograd's own backward
of F.linear computes, the same matmuls on the same operands (dX = dY·W, dW = dYᵀ·X over the flattened tokens),
so results are bit-identical with and without it; only where dW lands differs. The registry holds the
parameters weakly (by id, checked against a weak reference), and nothing is stored on the parameter tensors
(ZeroOptimizer's rule: `to_empty` re-creates them). One consequence to know: with an optimizer attached,
`torch.autograd.grad` of a loss with respect to a linear weight returns None for it, the gradient having gone
into the buffer (megamath calls it only on tensors no optimizer holds: the kernel benchmarks).
"""
from __future__ import annotations

import weakref
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from megamath.parallel.back_to_back import adjacent_order, fused_view


class GradSlot(Protocol):
    """Where one parameter's gradient goes (ZeroOptimizer's buffer)."""

    def claim(self) -> torch.Tensor | None:
        """The view (the parameter's shape) to write this step's first gradient into, or None when the
        gradient must take autograd's path (it is not the first, or the buffer is not ready for it)."""

    def filled(self) -> None:
        """The claimed view now holds the gradient (queued on the device): what the hook does after its copy."""


_SLOTS: dict[int, tuple[weakref.ref, GradSlot]] = {}
"""id(parameter) -> (a weak reference to it, its slot). Not a WeakKeyDictionary: it compares keys with ==,
which for tensors is elementwise. An entry goes when its parameter does (the reference's callback)."""


def register(param: torch.Tensor, slot: GradSlot) -> None:
    key = id(param)

    def forget(ref: weakref.ref) -> None:
        if _SLOTS.get(key, (None,))[0] is ref:  # not a later parameter that reuses the id
            del _SLOTS[key]
    _SLOTS[key] = (weakref.ref(param, forget), slot)


def unregister(param: torch.Tensor) -> None:
    entry = _SLOTS.get(id(param))
    if entry is not None and entry[0]() is param:
        del _SLOTS[id(param)]


def _slot(weight: torch.Tensor) -> GradSlot | None:
    entry = _SLOTS.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else None


def _slots_for(weights: Sequence[torch.Tensor]) -> tuple[GradSlot, ...] | None:
    """Every weight's slot when this forward records a graph and each weight has one, else None."""
    if not _SLOTS or not torch.is_grad_enabled() or not all(w.requires_grad for w in weights):
        return None
    slots = tuple(_slot(w) for w in weights)
    return None if any(s is None for s in slots) else slots


def _matrix(ordered: Sequence[torch.Tensor]) -> torch.Tensor:
    """One matrix as it is, several back to back as their fused_view."""
    return ordered[0] if len(ordered) == 1 else fused_view(ordered)


class _LinearIntoBuffer(torch.autograd.Function):
    """y = x Wᵀ for W one weight or weights back to back in memory (in that order); the backward writes dW into
    the weights' slots when all of them take it, else returns it to autograd (per weight, as views)."""

    @staticmethod
    def forward(ctx, x, slots, *ordered):
        ctx.slots, ctx.weights = slots, ordered  # the parameters themselves, to see hooks added after the forward
        ctx.save_for_backward(x, *ordered)
        return F.linear(x, _matrix(ordered))  # (..., Σ out)

    @staticmethod
    def backward(ctx, grad_y):
        x, *ordered = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, Σ out)
        grad_x = g.mm(_matrix(ordered)).view(*grad_y.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        # A gradient hook on a weight (Tensor.register_hook) must see the gradient: autograd's path for it.
        hooked = any(w._backward_hooks for w in ctx.weights)
        views = [None] if hooked else [slot.claim() for slot in ctx.slots]
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        claimed = all(v is not None for v in views)
        if claimed and (len(views) == 1 or adjacent_order(views) == list(range(len(views)))):  # one matmul fills them
            torch.mm(g.t(), x2, out=_matrix(views))  # (Σ out, in): straight into the buffer
            for slot in ctx.slots:
                slot.filled()
            return (grad_x, None, *[None] * len(ordered))
        grad_w = g.t().mm(x2)  # (Σ out, in): as autograd computes it
        parts = grad_w.split([w.shape[0] for w in ordered], dim=0) if len(ordered) > 1 else (grad_w,)
        return (grad_x, None, *parts)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), with the weight's gradient written into its slot where it has one."""
    slots = _slots_for([weight])
    return F.linear(x, weight) if slots is None else _LinearIntoBuffer.apply(x, slots, weight)


def linears_into_buffer(x: torch.Tensor, ordered: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """x (..., in) times the (Σ out, in) matrix of weights back to back in memory (in memory order), with their
    gradients written into their slots: (..., Σ out), or None when some weight has no slot."""
    slots = _slots_for(ordered)
    return None if slots is None else _LinearIntoBuffer.apply(x, slots, *ordered)
