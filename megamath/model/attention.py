"""Which attention the model runs: megamath's flash-attention kernel, or PyTorch's SDPA, chosen per run.

`model.attention` is `megamath` (our Triton kernel on a GPU, its reference on CPU), `sdpa`
(`F.scaled_dot_product_attention`, whose backends on an H100 include FlashAttention-2 and cuDNN), or
`auto`. A run should never be slower because of our kernel, so `auto` is settled once at start-up by
`choose_attention`: on CUDA it times the forward and backward of both for the run's own shape and keeps
the faster (the timings are returned for the log), or takes SDPA without timing when our kernel cannot
take the shape (e.g. head_dim 80); elsewhere it keeps `megamath`, whose CPU reference is the one the tests
check against. Whenever our Triton kernel may run on a GPU (`auto` or `megamath`),
its tiles are first tuned for this GPU and shape (megamath.kernels.flash_attention_tuning), so that
`auto` compares SDPA with our kernel at its best.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megamath.model.config import ATTENTION_CHOICES
from megamath.model.ops import Ops


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None) -> torch.Tensor:
    """The flash_attention signature over F.scaled_dot_product_attention (GQA without repeating K/V).

    q (B, S, Hq, D), k and v (B, S, Hkv, D) -> (B, S, Hq, D).
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, S, D)
                                         is_causal=causal, scale=softmax_scale,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)  # (B, S, Hq, D)


@functools.lru_cache(maxsize=None)
def with_attention(ops: Ops, attention: str) -> Ops:
    """`ops` with its attention replaced by SDPA when `attention` is "sdpa" ("auto" not yet settled: ours)."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    return dataclasses.replace(ops, flash_attention=sdpa_attention) if attention == "sdpa" else ops


@dataclass(frozen=True)
class AttentionChoice:
    attention: str
    """"megamath" or "sdpa"."""
    timings_ms: dict
    """Median forward + backward time of each candidate (empty when nothing was timed)."""
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
                     device: torch.device, repeats: int = 10) -> AttentionChoice:
    """Settle `model.attention` for a run whose attention inputs are q (B, S, Hq, D) with Hkv KV heads.

    shape = (B, S, Hq, Hkv, D), per rank (under TP: local heads). Explicit settings are kept as they are
    (with `megamath` on a GPU, our kernel's tiles are still tuned for the shape first).
    """
    if setting not in ATTENTION_CHOICES:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {setting!r}")
    b, s, hq, hkv, d = shape
    tiles, tuned = "", None
    if device.type == "cuda" and ops.backend == "triton" and setting != "sdpa":
        from megamath.kernels.flash_attention_tuning import tune_flash_attention  # Triton only on this path

        refusal = _kernel_refusal(shape, dtype)
        if refusal and setting == "auto":  # "megamath" set explicitly: the tuner raises it below
            return AttentionChoice("sdpa", {}, f"attention: sdpa (auto: our kernel does not take this shape: {refusal})")
        tuned = tune_flash_attention(b, s, hq, hkv, d, dtype, device)
        tiles = "; " + tuned.summary()
    blocks, tile_timings = (tuned.blocks, tuned.timings()) if tuned is not None else (None, "")
    if setting != "auto":
        return AttentionChoice(setting, {}, f"attention: {setting} (set in the config){tiles}", blocks, tile_timings)
    if device.type != "cuda":
        return AttentionChoice("megamath", {}, "attention: megamath (auto: nothing to time off a GPU)")
    from megamath.kernels.flash_attention_tuning import cuda_time_ms

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=generator).requires_grad_(True)
               for h in (hq, hkv, hkv))
    grad = torch.randn(b, s, hq, d, device=device, dtype=dtype, generator=generator)
    candidates = {"megamath": ops.flash_attention, "sdpa": sdpa_attention}
    timings = {}
    for name, attend in candidates.items():
        def step(attend=attend):
            q.grad = k.grad = v.grad = None
            attend(q, k, v, causal=True).backward(grad)
        timings[name] = cuda_time_ms(step, repeats)
    best = min(timings, key=timings.get)
    detail = ", ".join(f"{name} {ms:.3f} ms" for name, ms in timings.items())
    return AttentionChoice(best, timings, f"attention: {best} (auto, forward + backward at B {b} S {s} heads "
                                          f"{hq}/{hkv} D {d}: {detail}){tiles}", blocks, tile_timings)
