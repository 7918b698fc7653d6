"""Triton kernels with autograd wrappers and a plain-torch reference (`<op>_ref`) beside each.

Installed as `megamath.kernels`; imports nothing else of megamath. Names resolve lazily so that
importing the package does not import Triton until a kernel is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "rms_norm": "rms_norm", "rms_norm_ref": "rms_norm",
    "rope": "rope", "rope_ref": "rope",
    "flash_attention": "flash_attention", "flash_attention_ref": "flash_attention",
    "swiglu": "swiglu", "swiglu_ref": "swiglu",
    "cross_entropy": "cross_entropy", "cross_entropy_ref": "cross_entropy",
    "adamw_step": "adamw", "adamw_step_ref": "adamw",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megamath.kernels' has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
