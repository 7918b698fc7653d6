"""Weight gradients written (or added) by their matmul, the embedding's by its lookup and the norms' by their
kernel, straight into ZeRO-1's gradient buffer, without the hook.

Why: autograd hands a weight's gradient to ZeroOptimizer's post-accumulate hook as a fresh tensor, which the hook
copies into the flat buffer, or adds to it for a later micro-batch, converting bf16 to fp32 where the buffer is
fp32: per micro-batch one more write and one more read of every gradient, in the weight's dtype (in bf16 at Code
Llama 7B's width with 4 layers, whose linear weights are 0.94 B of its 1.07 B parameters, about 3.8 GB of memory
traffic, ~1.2 ms at an H100's ~3 TB/s: arithmetic, not a timing), and with bf16 weights a gradient rounded to
bf16 before the fp32 buffer sums it. Instead the matmul that computes the gradient writes it into the weight's
slot of the buffer (`torch.mm` with `out=`), or adds it there for a later micro-batch (beta 1: the GEMM reads
the sum so far and writes the new one), in the buffer's dtype: Megatron's `main_grad` and its
gradient-accumulation fusion. For bf16 weights and an fp32 buffer, CUDA's mixed-dtype GEMM (`out_dtype`
float32: bf16 operands, the product accumulated and stored in fp32) does it; where that is missing (a CPU, or a
torch without it, found by `mixed_dtype_gemm`) the same product of the operands' exact fp32 copies, on CPU, and
on CUDA the hook's path. The embedding table's gradient (`embedding`), whose autograd form is a dense table in
the weight's dtype of which a micro-batch touches a few thousand rows, is written the same way by a
deterministic kernel on CUDA (megamath.kernels.embedding_backward: each row's tokens summed in fp32), and the
norm weights' by the RMSNorm kernel's backward (`rms_norm`, `add_rms_norm`: the kernel hands its fp32 sum to the
slot, where autograd's path would round each micro-batch's sum to bf16 before the buffer adds it). With the
reference ops the norms take the hook, and so does a replicated KV projection's gradient (its rows only).

What takes which path (ZeroOptimizer's `_BufferSlot.claim` decides per gradient): with
optimizer.gradient_accumulation_fusion (the default) every gradient of a linear weight goes into the buffer by
its matmul (and the embedding's by its lookup, the norms' by their kernel); without it only the first of the
step, and only into a buffer of the weight's own dtype (which is then bit-identical to the hook's copy). A weight
with a gradient hook of its own (Tensor.register_hook: it must see the gradient), a bucket already sent,
grad_dtype auto's refused second gradient, and every weight nobody registered take autograd's path and the hook.

How: ZeroOptimizer registers a `GradSlot` per parameter (`register`); the model's linear layers call `linear`
(one weight) or `linears_into_buffer` (weights back to back in memory, fused_linear.py), which use this file's
autograd function wherever every weight has a slot. Its backward computes dX exactly as autograd's own backward
of F.linear does, and dW with the same operands (dX = dY·W, dW = dYᵀ·X over the flattened tokens), so a first
gradient into a buffer of the weight's dtype is bit-identical with and without it; only where dW lands differs.
The embedding calls `embedding`; the kernels' ops table (megamath.model.ops) names `rms_norm` and `add_rms_norm`.
The registry holds the parameters weakly (by id, checked against a weak reference), and nothing is stored on the
parameter tensors (ZeroOptimizer's rule: `to_empty` re-creates them). One consequence to know: with an optimizer
attached, `torch.autograd.grad` of a loss with respect to a linear weight returns None for it, the gradient
having gone into the buffer (megamath calls it only on tensors no optimizer holds: the kernel benchmarks).
"""
from __future__ import annotations

import functools
import weakref
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from megamath.parallel.back_to_back import adjacent_order, fused_view


class GradSlot(Protocol):
    """Where one parameter's gradient goes (ZeroOptimizer's buffer)."""

    def claim(self) -> tuple[torch.Tensor, bool] | None:
        """(view, add): the view (the parameter's shape) to write this gradient into (add False: the step's
        first) or to add it to (add True), or None when it must take autograd's path and the hook."""

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


def _registered_slots(weights: Sequence[torch.Tensor]) -> tuple[GradSlot, ...] | None:
    """Every weight's slot when each weight has one, else None."""
    slots = tuple(_slot(w) for w in weights)
    return None if any(s is None for s in slots) else slots


def _slots_for(weights: Sequence[torch.Tensor]) -> tuple[GradSlot, ...] | None:
    """Every weight's slot when this forward records a graph and each weight has one, else None."""
    if not _SLOTS or not torch.is_grad_enabled() or not all(w.requires_grad for w in weights):
        return None
    return _registered_slots(weights)


LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.cache
def mixed_dtype_gemm(device_type: str) -> bool:
    """Whether write_weight_gradient can take bf16/fp16 operands into an fp32 gradient on this kind of device.

    A CPU always can (the operands' fp32 copies). CUDA needs torch's `out_dtype` GEMMs, mm and baddbmm, whose
    baddbmm must add into its fp32 output in place: checked once per process on small integers, exact in every
    dtype involved, so that a torch build without them, or one that rounds, makes the optimizer keep the hook's
    path instead of failing inside a backward."""
    if device_type != "cuda":
        return True
    g = torch.arange(-6, 6, dtype=torch.bfloat16, device="cuda").view(4, 3)  # (tokens, out)
    x = torch.arange(-4, 4, dtype=torch.bfloat16, device="cuda").view(4, 2)  # (tokens, in)
    expected = g.t().double().mm(x.double())  # (out, in)
    out = torch.full((3, 2), 0.5, dtype=torch.float32, device="cuda")
    try:
        write_weight_gradient(out, g, x, add=True)
        added = torch.equal(out.double(), expected + 0.5)
        write_weight_gradient(out, g, x, add=False)
        return added and torch.equal(out.double(), expected)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def write_weight_gradient(out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, add: bool) -> None:
    """out (out, in) = gᵀ·x, or out += gᵀ·x with `add`: the weight gradient of y = x·Wᵀ from the flattened
    output gradient g (tokens, out) and input x (tokens, in), accumulated and stored in out's dtype.

    Same dtypes: autograd's matmul (mm with out=, or addmm_, whose GEMM adds the sum so far at its end). An
    fp32 out with bf16/fp16 operands: on CUDA the mixed-dtype GEMM (out_dtype float32; for the add, baddbmm over
    a batch of one, the one out_dtype GEMM that adds into an fp32 output); elsewhere the same product of the
    operands' fp32 copies, which bf16/fp16 values convert to exactly."""
    a = g.t()  # (out, tokens)
    if out.dtype != g.dtype and out.device.type == "cuda":
        if add:
            torch.baddbmm(out[None], a[None], x[None], out_dtype=out.dtype, out=out[None])
        else:
            torch.mm(a, x, out_dtype=out.dtype, out=out)
        return
    if out.dtype != g.dtype:
        a, x = a.to(out.dtype), x.to(out.dtype)
    if add:
        out.addmm_(a, x)
    else:
        torch.mm(a, x, out=out)


def _matrix(ordered: Sequence[torch.Tensor]) -> torch.Tensor:
    """One matrix as it is, several back to back as their fused_view."""
    return ordered[0] if len(ordered) == 1 else fused_view(ordered)


def _claims(slots: Sequence[GradSlot], weights: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, bool]] | None:
    """Every slot's (view, add), all writes or all adds; None where the gradients must take autograd's path: a
    weight with a gradient hook of its own (Tensor.register_hook: it must see the gradient, even one added
    after the forward) or a slot that declines."""
    if any(w._backward_hooks for w in weights):
        return None
    claims = [slot.claim() for slot in slots]
    if any(c is None for c in claims) or len({add for _, add in claims}) != 1:
        return None
    return claims


def _write_into(slots: Sequence[GradSlot], weights: Sequence[torch.Tensor], g: torch.Tensor, x: torch.Tensor) -> bool:
    """dW = gᵀx of `weights` (one, or several back to back in memory, in memory order; g (tokens, Σ out), x
    (tokens, in)) written or added by one matmul into their slots: True, or False (nothing done) where it must
    take autograd's path (`_claims`), or where the slots are not back to back."""
    claims = _claims(slots, weights)
    if claims is None:
        return False
    views = [view for view, _ in claims]
    if len(views) > 1 and adjacent_order(views) != list(range(len(views))):
        return False
    write_weight_gradient(_matrix(views), g, x, add=claims[0][1])  # (Σ out, in): into the buffer
    for slot in slots:
        slot.filled()
    return True


def weight_gradient_into_slots(weights: Sequence[torch.Tensor], g: torch.Tensor, x: torch.Tensor) -> bool:
    """For a backward that computes its weights' gradients itself (the sequence-parallel column projections,
    layers.py): dW = gᵀx written or added into the weights' slots (weights one, or back to back in memory in
    memory order; g (tokens, Σ out), x (tokens, in)); False, with nothing done, where autograd must take them."""
    slots = _registered_slots(weights)
    return slots is not None and _write_into(slots, weights, g, x)


class _LinearIntoBuffer(torch.autograd.Function):
    """y = x Wᵀ for W one weight or weights back to back in memory (in that order); the backward writes dW into
    the weights' slots when there are slots (not None) and all of them take it, else returns it to autograd
    (per weight, as views of one matmul's result)."""

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
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if ctx.slots is not None and _write_into(ctx.slots, ctx.weights, g, x2):
            return (grad_x, None, *[None] * len(ordered))
        grad_w = g.t().mm(x2)  # (Σ out, in): as autograd computes it
        parts = grad_w.split([w.shape[0] for w in ordered], dim=0) if len(ordered) > 1 else (grad_w,)
        return (grad_x, None, *parts)


def _dense_embedding_gradient(grad: torch.Tensor, ids: torch.Tensor, foreign: torch.Tensor | None,
                              rows: int) -> torch.Tensor:
    """The (rows, D) gradient autograd computes for `_lookup` (embedding_dense_backward, foreign rows zeroed)."""
    if foreign is not None:
        grad, ids = grad.masked_fill(foreign.unsqueeze(-1), 0.0), ids.masked_fill(foreign, 0)
    return torch.ops.aten.embedding_dense_backward(grad, ids, rows, -1, False)


def write_embedding_gradient(out: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor, foreign: torch.Tensor | None,
                             add: bool) -> None:
    """out (V, D) = the table gradient of `_lookup(ids, foreign, ·)` with output gradient grad (..., D), or
    out += it with `add`. On CUDA the deterministic kernel (megamath.kernels.embedding_backward: each row's
    tokens summed in fp32, one write of the table, or a read and write of the touched rows); elsewhere, into
    a buffer of the gradient's dtype, autograd's own computation, written or added (the hook's bits), and
    into fp32 from bf16/fp16 the kernel's reference (fp32 sums of exact copies)."""
    if out.device.type == "cuda" or out.dtype != grad.dtype:
        from megamath.kernels.embedding_backward import embedding_backward, embedding_backward_ref

        write = embedding_backward if out.device.type == "cuda" else embedding_backward_ref
        write(grad, ids if foreign is None else ids.masked_fill(foreign, -1), out, add)  # -1: no row
        return
    dense = _dense_embedding_gradient(grad, ids, foreign, out.shape[0])
    if add:
        out.add_(dense)
    else:
        out.copy_(dense)


def _lookup(ids: torch.Tensor, foreign: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """weight's rows at ids, zeros where `foreign` (ids another TP rank owns, filled with 0 to stay in range)."""
    if foreign is None:
        return F.embedding(ids, weight)
    return F.embedding(ids.masked_fill(foreign, 0), weight).masked_fill(foreign.unsqueeze(-1), 0.0)


class _EmbeddingIntoBuffer(torch.autograd.Function):
    """`_lookup`, whose backward writes the table's gradient into the weight's slot when the slot takes it, else
    returns autograd's dense gradient."""

    @staticmethod
    def forward(ctx, ids, foreign, slot, weight):
        ctx.slot, ctx.weight = slot, weight  # the parameter itself, to see hooks added after the forward
        ctx.save_for_backward(ids, foreign)
        return _lookup(ids, foreign, weight)  # (..., D)

    @staticmethod
    def backward(ctx, grad_out):
        ids, foreign = ctx.saved_tensors
        claims = _claims([ctx.slot], [ctx.weight])
        if claims is None:
            return None, None, None, _dense_embedding_gradient(grad_out, ids, foreign, ctx.weight.shape[0])
        (view, add), = claims
        write_embedding_gradient(view, grad_out, ids, foreign, add)
        ctx.slot.filled()
        return None, None, None, None


def embedding(ids: torch.Tensor, weight: torch.Tensor, foreign: torch.Tensor | None = None) -> torch.Tensor:
    """F.embedding(ids, weight) with rows zero where `foreign` (a bool mask like ids, or None), and the table's
    gradient written into the weight's slot where it has one."""
    slots = _slots_for([weight])
    return _lookup(ids, foreign, weight) if slots is None else _EmbeddingIntoBuffer.apply(ids, foreign, *slots,
                                                                                          weight)


def _norm_gradient_sink(slot: GradSlot, weight: torch.Tensor):
    """The norm kernels' `weight_grad_sink` for a weight with a slot: the weight's fp32 gradient written, or added,
    into the slot (rounded once, to the buffer's dtype) when the slot takes it (`_claims`), else left to autograd."""
    def sink(dweight: torch.Tensor) -> bool:  # (N,) fp32
        claims = _claims([slot], [weight])
        if claims is None:
            return False
        (view, add), = claims
        if add:
            view.add_(dweight)
        else:
            view.copy_(dweight)
        slot.filled()
        return True
    return sink


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The RMSNorm kernel (megamath.kernels.rms_norm.rms_norm), with the weight's gradient written into its slot
    where it has one."""
    from megamath.kernels.rms_norm import rms_norm as kernel

    slots = _slots_for([weight])
    return kernel(x, weight, eps, weight_grad_sink=None if slots is None else _norm_gradient_sink(*slots, weight))


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused residual add and RMSNorm kernel (megamath.kernels.rms_norm.add_rms_norm), with the weight's
    gradient written into its slot where it has one."""
    from megamath.kernels.rms_norm import add_rms_norm as kernel

    slots = _slots_for([weight])
    return kernel(residual, delta, weight, eps,
                  weight_grad_sink=None if slots is None else _norm_gradient_sink(*slots, weight))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), with the weight's gradient written into its slot where it has one."""
    slots = _slots_for([weight])
    return F.linear(x, weight) if slots is None else _LinearIntoBuffer.apply(x, slots, weight)


def linears_into_buffer(x: torch.Tensor, ordered: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (..., in) times the (Σ out, in) matrix of weights back to back in memory (in memory order), one matmul:
    (..., Σ out). Their gradients are written into their slots where every weight has one, else returned to
    autograd, each weight's rows of the one dW matmul (no copy)."""
    if not torch.is_grad_enabled() or not any(w.requires_grad for w in ordered):
        return F.linear(x, _matrix(ordered))  # nothing to differentiate: a plain matmul over the view
    return _LinearIntoBuffer.apply(x, _slots_for(ordered), *ordered)
