"""Work-arounds for Triton's CPU interpreter (TRITON_INTERPRET=1), shared by the kernels.

The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even, which doubles bf16 error
and breaks exact comparisons; kernels store through `cast_rne`, whose hand rounding is compiled in only
when the launcher says the interpreter is running. On a GPU the native conversion runs.
"""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def exact_bf16(dtype: torch.dtype) -> bool:
    """Round bf16 by hand only where the interpreter would truncate."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def cast_rne(x, dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
    """fp32 x -> dtype rounding to nearest even; by hand on the bits for bf16 when EXACT_BF16."""
    if EXACT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even on the dropped bits
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays a quiet NaN
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
