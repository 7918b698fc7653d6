"""The three-way tolerance of flash-attention's tests, shared by every kernel test.

A kernel in low precision passes when its error against an fp32 reference is at most twice the error
of plain torch computing the same thing in the same low precision, plus a small atol: the dtype sets
the bar, so one rule serves fp32, bf16 and fp16.
"""
from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_close_3way(kernel_out, ref_fp32_out, torch_lowp_out, atol: float | None = None, name: str = "") -> None:
    """|kernel - ref_fp32| <= 2 * |torch_lowp - ref_fp32| + atol, elementwise (max over the tensor)."""
    atol = ATOL[kernel_out.dtype] if atol is None else atol
    ref = ref_fp32_out.float()
    kernel_err = (kernel_out.float() - ref).abs().max().item()
    torch_err = (torch_lowp_out.float() - ref).abs().max().item()
    bound = 2 * torch_err + atol
    assert kernel_err <= bound, (
        f"{name}: kernel error {kernel_err:.3e} > bound {bound:.3e} "
        f"(torch low-precision error {torch_err:.3e}, atol {atol:.1e})"
    )
