"""Several projections of one input as ONE matmul, when their weights already lie back to back in memory.

Why: q, k and v (and Megatron's fused QKV) read the same input; one GEMM of width Hq+2·Hkv heads keeps a
GPU busier than three narrow ones, and the backward needs one GEMM for dX and one for dW instead of three
each. Megatron gets there with one fused parameter in a rank-interleaved layout, which every checkpoint
converter must then know about. megamath keeps q_proj / k_proj / v_proj as they are (names, shapes, Hugging
Face import/export and `megamath reshard` untouched and bit-exact) and fuses where the memory allows:
ZeRO-1's flat buffer stores a layer's v, k, q weights back to back (backward order), so on each TP rank
they already form one contiguous (Σ out, in) matrix. `grad_into_buffer.linears_into_buffer` multiplies by
that matrix without a copy and hands each parameter its rows of the one dW matmul (views, no copy), or
writes dW straight into ZeRO's gradient buffer.
Weights that are not adjacent (a plain model, a bucket boundary between them) take one matmul each.

The output (..., Σ out) goes on as slices, and its gradient must come back as one tensor. autograd's split
would concatenate the slices' gradients into a copy (gate/up at 7B width, S 4096, micro-batch 1: 180 MB
written and read again per layer and step). `join_last_dim` takes them as they stand when a kernel wrote
them as slices of one tensor in the output's layout (megamath.kernels' empty_siblings: SwiGLU's backward
does), and concatenates otherwise. RoPE stands between the q/k/v projection and attention: as an
`Epilogue` it rotates q and k in place in the fused output (and their gradients back, in the joined
gradient), so the attention kernel's gradients, written as slices of one tensor (flash_attention's
_grad_buffers), reach the matmul as they stand too.

The model fuses with its kernel ops (GPUs, and Triton's interpreter in the tests), not with the plain-torch
reference ops: one wide matmul sums in another order than three narrow ones, and the CPU reference runs
stay bit-identical to the unfused arithmetic that their tests pin.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from megamath.parallel.back_to_back import adjacent_order
from megamath.parallel.grad_into_buffer import linear, linears_into_buffer


def join_last_dim(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of y (..., Σ n_i) from its last-dim slices' gradients (..., n_i), in slice order: the
    tensor they are slices of when they tile one (last_dim_parent), without a copy, else their concatenation."""
    from megamath.kernels._layout import last_dim_parent  # here: the kernels import Triton, config parsing must not

    parent = last_dim_parent(grads)
    return torch.cat(grads, dim=-1) if parent is None else parent


class Epilogue(Protocol):
    """An in-place transform of a fused projection's outputs, and its transpose on their gradients.

    Both methods take the outputs (or gradients) in the order the caller named the weights, and overwrite
    them. The fused output is a fresh tensor no one else holds, so a transform whose input nobody needs
    afterwards (RoPE of q and k: megamath.model.llama.RoPEOnProjection) can run where it lies instead of
    writing, and autograd keeping, a transformed copy beside it.
    """

    def forward_(self, outputs: list[torch.Tensor]) -> None: ...

    def backward_(self, grads: list[torch.Tensor]) -> None: ...


def in_caller_order(parts: Sequence[torch.Tensor], order: list[int]) -> list[torch.Tensor]:
    """Parts given in memory order, put back in the order the caller named their weights (order[j]: the
    caller's index of the j-th part in memory, as adjacent_order gives it)."""
    out: list[torch.Tensor] = [None] * len(order)  # type: ignore[list-item]
    for i, part in zip(order, parts):
        out[i] = part
    return out


def split_output(y: torch.Tensor, order: list[int], sizes: list[int],
                 epilogue: Epilogue | None) -> list[torch.Tensor]:
    """The fused output y (..., Σ out) as its per-weight slices (views, in the caller's order; `sizes` in memory
    order), with the epilogue applied in place. y must be the fused matmul's own output: the matmul keeps its
    input and weight, never its output, for the backward, so the epilogue may overwrite it."""
    parts = in_caller_order(y.split(sizes, dim=-1), order)
    if epilogue is not None:
        epilogue.forward_(parts)
    return parts


def join_gradients(grads, order: list[int], sizes: list[int], epilogue: Epilogue | None) -> torch.Tensor:
    """split_output's backward: y's gradient from its slices' gradients (in the caller's order), joined without
    a copy where it can be (join_last_dim), with the epilogue's transpose applied in place."""
    grad = join_last_dim([grads[i] for i in order])
    if epilogue is not None:
        epilogue.backward_(in_caller_order(grad.split(sizes, dim=-1), order))
    return grad


class _SplitLastDim(torch.autograd.Function):
    """split_output as an autograd function (split_last_dim). A slice no loss reads gets zeros (autograd
    materializes them), hence a joining copy."""

    @staticmethod
    def forward(ctx, y, order, sizes, epilogue):
        ctx.order, ctx.sizes, ctx.epilogue = order, sizes, epilogue
        return tuple(split_output(y, order, sizes, epilogue))

    @staticmethod
    def backward(ctx, *grads):
        return join_gradients(grads, ctx.order, ctx.sizes, ctx.epilogue), None, None, None


def split_last_dim(y: torch.Tensor, order: list[int], sizes: list[int],
                   epilogue: Epilogue | None = None) -> list[torch.Tensor]:
    """split_output for the output y of an autograd matmul, whose gradient the backward joins from the
    slices' gradients (join_gradients: no copy where a kernel wrote them as slices of one tensor)."""
    return list(_SplitLastDim.apply(y, order, sizes, epilogue))


def linears(x: torch.Tensor, weights: list[torch.Tensor], epilogue: Epilogue | None = None) -> list[torch.Tensor]:
    """[F.linear(x, w) for w in weights], as one matmul when the weights are adjacent in memory.

    x (..., in) -> one (..., out_i) per weight; fused outputs are views of one (..., Σ out) tensor (their
    last dim is contiguous, which is all the rope and attention kernels ask of q, k, v). An `epilogue` needs
    the fused matmul (ValueError otherwise: check with adjacent_order first).
    """
    order = adjacent_order(weights)
    if order is None:
        if epilogue is not None:
            raise ValueError("linears: an epilogue needs the fused matmul, and these weights are not back to back")
        return [linear(x, w) for w in weights]
    ordered = [weights[i] for i in order]
    y = linears_into_buffer(x, ordered)  # (..., Σ out): one GEMM, whose dW goes into ZeRO's buffer where it can
    return split_last_dim(y, order, [w.shape[0] for w in ordered], epilogue)
