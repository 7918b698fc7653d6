"""Which attention the model runs: megamath's flash-attention kernel, or PyTorch's SDPA, chosen per run.

`model.attention` is `megamath` (our Triton kernel on a GPU, its reference on CPU), `sdpa`
(`F.scaled_dot_product_attention`, with PyTorch's own choice among its backends: on an H100,
FlashAttention-2, cuDNN and memory-efficient attention), or `auto`. A run should never be slower because
of our kernel, nor because PyTorch's default backend is not the fastest for its shape, so `auto` is
settled once at start-up by `choose_attention`: on CUDA it times the forward and backward of our kernel
and of each SDPA backend on its own (`sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient`; one that cannot take
the inputs is skipped, one whose results differ from ours rejected, cuDNN under deterministic algorithms
not tried: `race`) for the run's own shape, keeps the fastest
(the timings are returned for the log) and runs an SDPA winner pinned to its backend; it takes SDPA
without timing when our kernel cannot take the shape (e.g. head_dim 80); elsewhere it keeps `megamath`,
whose CPU reference is the one the tests check against.

The race is run the way the model runs attention (`QKVLayout`, `projection_attention_step`): q, k and v
as head views of the projections' outputs, slices of one fused output where the model fuses them, and
their gradients joined back into it as the model's backward joins them. That is part of the cost: our
kernel writes dq, dk, dv as slices of one tensor, which the fused matmul takes as it stands, while SDPA's
gradients are separate tensors that the join concatenates: one copy of each per layer. (Only one: PyTorch's
cuDNN backward allocates each gradient with `empty_like` of its input, which for these strided views gives
dense strides in the views' own dimension order (torch 2.11 and 2.13), so the heads view's backward is a
view.) Timed on three separate contiguous tensors, as a kernel benchmark times it, SDPA would be spared the
copy the run then pays.

Whenever our Triton kernel may run on a GPU (`auto` or `megamath`), its tiles are first tuned for this GPU,
shape and layout (megamath.kernels.flash_attention_tuning), so that `auto` compares SDPA with our kernel at
its best.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megamath.model.config import ATTENTION_CHOICES
from megamath.model.ops import Ops
from megamath.parallel.fused_linear import split_last_dim


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None) -> torch.Tensor:
    """The flash_attention signature over F.scaled_dot_product_attention (GQA without repeating K/V).

    q (B, S, Hq, D), k and v (B, S, Hkv, D) -> (B, S, Hq, D).
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, S, D)
                                         is_causal=causal, scale=softmax_scale,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)  # (B, S, Hq, D)


SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
"""The SDPA backends `auto` races one by one, by the name a settled run records (model.attention)."""


@functools.lru_cache(maxsize=None)
def sdpa_backend_attention(name: str) -> Callable:
    """sdpa_attention pinned to one SDPA backend (SDPA_BACKENDS[name]); it raises where that backend cannot take
    the inputs. The backend is chosen in the forward, and autograd runs that backend's backward."""
    backend = SDPA_BACKENDS[name]

    def attend(q, k, v, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
        with sdpa_kernel(backend):
            return sdpa_attention(q, k, v, causal, softmax_scale)
    attend.__name__ = attend.__qualname__ = name.replace("-", "_") + "_attention"
    return attend


def heads_view(t: torch.Tensor, head_dim: int, sequence_first: bool) -> torch.Tensor:
    """A projection's output (B, S, H·D), or (S, B, H·D) sequence first, as the (B, S, H, D) view the
    attention kernels take."""
    t = t.view(*t.shape[:2], -1, head_dim)
    return t.transpose(0, 1) if sequence_first else t


@dataclass(frozen=True)
class QKVLayout:
    """How a layer hands q, k and v to attention (megamath.model.llama.Attention.qkv_layout)."""

    fused_order: tuple[int, ...] | None = None
    """q, k, v (0, 1, 2) in memory order when they are slices of one fused projection output
    (back_to_back.adjacent_order: ZeRO's buffer stores v, k, q, so (2, 1, 0)), or None: separate outputs."""
    sequence_first: bool = False
    """The projections' outputs are (S, B, ·) (sequence parallelism), which attention sees transposed."""

    def describe(self) -> str:
        where = "q/k/v slices of one projection" if self.fused_order is not None else "q/k/v separate"
        return where + (", sequence first" if self.sequence_first else "")


def projection_attention_step(attend: Callable, shape: tuple[int, int, int, int, int], dtype: torch.dtype,
                              device: torch.device, layout: QKVLayout, generator: torch.Generator | None = None
                              ) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """One forward + backward of `attend` on random projection outputs laid out as the model lays them out.

    shape = (B, S, Hq, Hkv, D). Returns the step (which clears and refills the projections' gradients, and
    returns the output and those gradients) and the projections, the leaves whose .grad the step fills:
    one (B, S, (Hq + 2·Hkv)·D) tensor when fused, else q, k, v outputs (B, S, H·D) ((S, B, ·) sequence
    first). The output gradient enters as the model's does, through the (B, S, Hq·D) reshape ahead of o_proj.
    """
    b, s, hq, hkv, d = shape
    n0, n1 = (s, b) if layout.sequence_first else (b, s)
    widths = (hq * d, hkv * d, hkv * d)  # q, k, v

    def rand(*size):
        return torch.randn(*size, device=device, dtype=dtype, generator=generator)

    if layout.fused_order is not None:
        order = list(layout.fused_order)
        leaves = [rand(n0, n1, sum(widths)).requires_grad_(True)]

        def projections():
            return split_last_dim(leaves[0], order, [widths[i] for i in order])
    else:
        leaves = [rand(n0, n1, w).requires_grad_(True) for w in widths]

        def projections():
            return leaves
    grad = rand(n0, n1, hq * d)

    def step() -> list[torch.Tensor]:
        for t in leaves:
            t.grad = None
        q, k, v = (heads_view(t, d, layout.sequence_first) for t in projections())  # (B, S, H, D)
        o = attend(q, k, v, causal=True)  # (B, S, Hq, D)
        o = o.transpose(0, 1) if layout.sequence_first else o
        o.reshape(n0, n1, -1).backward(grad)
        return [o.detach()] + [t.grad for t in leaves]  # what it computed, for checking (no copies)
    return step, leaves


@functools.lru_cache(maxsize=None)
def with_attention(ops: Ops, attention: str) -> Ops:
    """`ops` with its attention replaced by SDPA when `attention` is "sdpa" (PyTorch's choice of backend) or a
    settled "sdpa-<backend>" (SDPA_BACKENDS); "megamath" and "auto" (not yet settled) keep ours."""
    if attention not in ATTENTION_CHOICES and attention not in SDPA_BACKENDS:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)} (settled: also "
                         f"{', '.join(SDPA_BACKENDS)}), got {attention!r}")
    if attention == "sdpa":
        return dataclasses.replace(ops, flash_attention=sdpa_attention)
    if attention in SDPA_BACKENDS:
        return dataclasses.replace(ops, flash_attention=sdpa_backend_attention(attention))
    return ops


@dataclass(frozen=True)
class AttentionChoice:
    attention: str
    """"megamath", "sdpa", or the SDPA backend `auto` found fastest ("sdpa-cudnn", ...: SDPA_BACKENDS)."""
    timings_ms: dict
    """Median forward + backward time of each candidate that ran (empty when nothing was timed)."""
    reason: str
    """One line for the run's log."""
    tiles: object = None
    """The FlashAttentionBlocks our kernel was tuned to and now uses (a GPU with the Triton kernels), else None."""
    tile_timings: str = ""
    """Every tile candidate's timing, one per line (flash_attention_tuning.TunedBlocks.timings), when tuned."""


def _kernel_refusal(shape: tuple[int, int, int, int, int], dtype: torch.dtype) -> str | None:
    """Why our kernel cannot take q (B, S, Hq, D) with Hkv KV heads (e.g. head_dim 80), or None."""
    from megamath.kernels.flash_attention import check_inputs

    b, s, hq, hkv, d = shape
    try:
        check_inputs(*(torch.empty(b, s, h, d, dtype=dtype, device="meta") for h in (hq, hkv, hkv)))
    except ValueError as err:
        return str(err)
    return None


def choose_attention(setting: str, ops: Ops, shape: tuple[int, int, int, int, int], dtype: torch.dtype,
                     device: torch.device, repeats: int = 10, layout: QKVLayout = QKVLayout()) -> AttentionChoice:
    """Settle `model.attention` for a run whose attention inputs are q (B, S, Hq, D) with Hkv KV heads.

    shape = (B, S, Hq, Hkv, D), per rank (under TP: local heads); `layout`, how the model hands them over
    (the race runs them so). Explicit settings are kept as they are (with `megamath` on a GPU, our kernel's
    tiles are still tuned for the shape first).
    """
    if setting not in ATTENTION_CHOICES:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {setting!r}")
    b, s, hq, hkv, d = shape
    tiles, tuned = "", None
    refusal = _kernel_refusal(shape, dtype) if ops.backend == "triton" and setting != "sdpa" else None
    if refusal and setting == "auto":  # on a CPU too (Triton's interpreter), before the first forward meets it
        return AttentionChoice("sdpa", {}, f"attention: sdpa (auto: our kernel does not take this shape: {refusal})")
    if refusal:  # "megamath" asked for by name: refused at start-up, not at the first forward
        raise ValueError(refusal)
    if device.type == "cuda" and ops.backend == "triton" and setting != "sdpa":
        from megamath.kernels.flash_attention_tuning import tune_flash_attention  # Triton only on this path

        tuned = tune_flash_attention(b, s, hq, hkv, d, dtype, device, fused=layout.fused_order is not None,
                                     sequence_first=layout.sequence_first)  # the tiles for the run's own views
        tiles = "; " + tuned.summary()
    blocks, tile_timings = (tuned.blocks, tuned.timings()) if tuned is not None else (None, "")
    if setting != "auto":
        return AttentionChoice(setting, {}, f"attention: {setting} (set in the config){tiles}", blocks, tile_timings)
    if device.type != "cuda":
        return AttentionChoice("megamath", {}, "attention: megamath (auto: nothing to time off a GPU)")
    from megamath.kernels.flash_attention_tuning import cuda_time_ms

    timings, detail = race(ops, shape, dtype, device, layout, lambda step: cuda_time_ms(step, repeats))
    best = min(timings, key=timings.get)
    return AttentionChoice(best, timings, f"attention: {best} (auto, forward + backward at B {b} S {s} heads "
                                          f"{hq}/{hkv} D {d}, {layout.describe()}: {detail}){tiles}",
                           blocks, tile_timings)


def race(ops: Ops, shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device,
         layout: QKVLayout, time_ms: Callable[[Callable[[], None]], float]) -> tuple[dict, str]:
    """Our kernel (ops.flash_attention) and each SDPA backend, timed by time_ms(step) on the model's layout
    (projection_attention_step): ({name: ms} of those that ran, the log's detail naming the skipped and why).
    A backend that cannot take the inputs raises (RuntimeError) and is skipped; so is cuDNN's, whose backward
    is not deterministic, under torch.use_deterministic_algorithms. One whose output or gradients differ from
    our kernel's beyond bf16 rounding is rejected, never timed: a backend that accepts a case it gets wrong
    (grouped-query heads, say) must not win by being fast. Our kernel failing is an error."""
    candidates = {"megamath": ops.flash_attention, **{name: sdpa_backend_attention(name) for name in SDPA_BACKENDS}}
    timings, detail, ours = {}, [], None
    for name, attend in candidates.items():
        if name == "sdpa-cudnn" and torch.are_deterministic_algorithms_enabled():
            detail.append(f"{name} skipped (its backward is not deterministic)")
            continue
        generator = torch.Generator(device=device).manual_seed(0)  # the same inputs for each
        step, _ = projection_attention_step(attend, shape, dtype, device, layout, generator)
        try:
            with warnings.catch_warnings():  # a backend that cannot run says why in several warnings: one line here
                warnings.simplefilter("ignore")
                got = step()
                if ours is None:
                    ours = [t.clone() for t in got]
                elif not all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, ours)):
                    detail.append(f"{name} rejected (its results differ from megamath's)")
                    continue
                timings[name] = time_ms(step)
        except RuntimeError as err:  # this backend does not take these inputs (or this GPU)
            if name == "megamath":
                raise
            why = str(err).split(". ")[0].splitlines()[0][:100] if str(err).strip() else type(err).__name__
            detail.append(f"{name} skipped ({why})")
            continue
        detail.append(f"{name} {timings[name]:.3f} ms")
    return timings, ", ".join(detail)
