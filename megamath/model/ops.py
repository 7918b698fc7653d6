"""The five ops the model calls, resolved to Triton kernels or to their plain-torch references.

The model never imports a kernel module itself: it asks `get_ops(config.kernels, device)` on every
forward, so one model object can run the kernels on a GPU and the references on a CPU copy (which is
how the tests compare them). Kernel modules import Triton, so they are imported lazily, on the first
forward that needs them.

Signatures (all layouts are the model's, batch first):
    rms_norm(x (..., h), weight (h,), eps) -> (..., h)
    rope(q (B, S, Hq, D), k (B, S, Hkv, D), theta, position_offset) -> (q, k)   rotate-half (Llama)
    flash_attention(q (B, S, Hq, D), k, v (B, S, Hkv, D), causal=True, softmax_scale=None) -> (B, S, Hq, D)
    swiglu(gate (..., f), up (..., f)) -> silu(gate) * up
    cross_entropy(logits (N, V), targets (N,), ignore_index=-100, group=None) -> mean over non-ignored
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

OP_NAMES = ("rms_norm", "rope", "flash_attention", "swiglu", "cross_entropy")


@dataclass(frozen=True)
class Ops:
    """One resolved set of ops; `backend` is "triton" or "reference"."""

    backend: str
    rms_norm: Callable
    rope: Callable
    flash_attention: Callable
    swiglu: Callable
    cross_entropy: Callable


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


@functools.lru_cache(maxsize=None)
def load_ops(backend: str) -> Ops:
    """Import the kernels (backend "triton") or their `<op>_ref` references (backend "reference")."""
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be 'triton' or 'reference', got {backend!r}")
    suffix = "" if backend == "triton" else "_ref"
    resolved = {}
    for name in OP_NAMES:
        # Each op lives in the kernel module of the same name. Import that module, not the package
        # attribute: once `megamath.kernels.rms_norm` (the module) is imported, the package attribute
        # `rms_norm` is the module, no longer the function.
        try:
            module = importlib.import_module(f"megamath.kernels.{name}")
            resolved[name] = getattr(module, name + suffix)
        except (AttributeError, ImportError) as err:
            raise ImportError(f"megamath.kernels.{name}.{name + suffix} is not available ({err})") from err
    return Ops(backend=backend, **resolved)


def get_ops(kernels: str, device: torch.device | str) -> Ops:
    """The ops a forward on `device` should use under the config's `kernels` setting."""
    return load_ops(resolve_backend(kernels, device))
