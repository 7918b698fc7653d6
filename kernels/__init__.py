"""Triton kernels with autograd wrappers and a plain-torch reference (`<op>_ref`) beside each.

Installed as `megamath.kernels`; imports nothing else of megamath. Without a GPU, set
TRITON_INTERPRET=1 before importing this package to run the kernels in Triton's interpreter.
"""
from .adamw import adamw_step, adamw_step_ref
from .cross_entropy import cross_entropy, cross_entropy_ref
from .embedding_backward import embedding_backward, embedding_backward_ref
from .flash_attention import flash_attention, flash_attention_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import rope, rope_ref
from .sum_of_squares import sum_of_squares, sum_of_squares_ref
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "adamw_step", "adamw_step_ref",
    "cross_entropy", "cross_entropy_ref",
    "embedding_backward", "embedding_backward_ref",
    "flash_attention", "flash_attention_ref",
    "rms_norm", "rms_norm_ref",
    "rope", "rope_ref",
    "sum_of_squares", "sum_of_squares_ref",
    "swiglu", "swiglu_ref",
]
