"""swiglu matches swiglu_ref forward and backward within the three-way tolerance."""
import importlib

import pytest
import torch
from kernel_tolerance import assert_close_3way

from megamath.kernels.swiglu import swiglu, swiglu_bwd, swiglu_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    gate = scale * torch.randn(shape, generator=g)
    up = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    return gate.to(DEVICE, dtype), up.to(DEVICE, dtype), dy.to(DEVICE, dtype)


def _run(fn, gate, up, dy):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    out = fn(gate, up)
    out.backward(dy)
    return out.detach(), gate.grad, up.grad


def _check(gate, up, dy, label):
    out, dg, du = _run(swiglu, gate, up, dy)
    out32, dg32, du32 = _run(swiglu_ref, gate.float(), up.float(), dy.float())
    out_lo, dg_lo, du_lo = _run(swiglu_ref, gate, up, dy)
    for t in (out, dg, du):
        assert t.dtype == gate.dtype and t.shape == gate.shape
    assert_close_3way(out, out32, out_lo, name=f"out {label}")
    assert_close_3way(dg, dg32, dg_lo, name=f"dgate {label}")
    assert_close_3way(du, du32, du_lo, name=f"dup {label}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1000,), (3, 1000), (5, 129, 7), (3, 5, 1001)])
def test_matches_reference(shape, dtype):
    gate, up, dy = _inputs(shape, dtype, seed=sum(shape) * 3 + DTYPES.index(dtype))
    _check(gate, up, dy, f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_gate(dtype):
    """Gates far into both tails (sigmoid -> 0 or 1) give finite values and gradients."""
    gate, up, dy = _inputs((4, 257), dtype, seed=11, scale=30.0)
    _check(gate, up, dy, f"saturated {dtype}")
    out, dg, du = _run(swiglu, gate, up, dy)
    assert torch.isfinite(out).all() and torch.isfinite(dg).all() and torch.isfinite(du).all()


def test_non_contiguous_inputs():
    """Column slices of a fused (tokens, 2*ffn) projection, as a fused gate/up matmul would give."""
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(7, 2 * 33, generator=g).to(DEVICE)
    gate, up = fused[:, :33], fused[:, 33:]  # (7, 33) each, row stride 66
    dy = torch.randn(7, 33, generator=g).to(DEVICE).t().contiguous().t()  # column-major dy
    out, dg, du = _run(swiglu, gate, up, dy)
    out_r, dg_r, du_r = _run(swiglu_ref, gate.contiguous(), up.contiguous(), dy.contiguous())
    assert_close_3way(out, out_r, out_r, name="out non-contiguous")
    assert_close_3way(dg, dg_r, dg_r, name="dgate non-contiguous")
    assert_close_3way(du, du_r, du_r, name="dup non-contiguous")


@pytest.mark.parametrize("layout", ["contiguous", "transposed view"])
def test_halves_of_one_projection_get_gradients_as_halves_of_one_tensor(layout):
    """gate and up as the two halves of a fused (..., 2·f) projection (up first, as ZeRO lays the weights):
    dgate and dup are the halves of one new tensor in the same places, so the projection's backward takes it
    as its gradient as it stands. Halves whose rows are not evenly spaced (a transposed view) get two
    contiguous gradients instead. Values as swiglu_ref's either way."""
    g = torch.Generator().manual_seed(8)
    fused = torch.randn(4, 3, 2 * 33, generator=g).to(DEVICE)
    if layout == "transposed view":
        fused = fused.transpose(0, 1)  # (B, S, 2f) view of (S, B, 2f) memory
    up, gate = fused.split(33, dim=-1)
    dy = torch.randn(gate.shape, generator=g).to(DEVICE)
    dg, du = swiglu_bwd(dy, gate, up)
    if layout == "transposed view":
        assert dg.is_contiguous() and du.is_contiguous()
    else:
        assert dg.untyped_storage().data_ptr() == du.untyped_storage().data_ptr()
        assert dg.storage_offset() == du.storage_offset() + 33 and dg.stride() == gate.stride()
    _, dg_r, du_r = _run(swiglu_ref, gate.contiguous(), up.contiguous(), dy)
    assert_close_3way(dg, dg_r, dg_r, name=f"dgate {layout}")
    assert_close_3way(du, du_r, du_r, name=f"dup {layout}")


def test_int64_indexing_past_2_31_gives_the_same_results(monkeypatch):
    """The kernels index in int32 unless an index or offset reaches 2^31; with that limit lowered, a small fused
    projection takes the int64 path, forward and backward, with bit-identical results."""
    module = importlib.import_module("megamath.kernels.swiglu")  # the module, not the op it exports
    g = torch.Generator().manual_seed(9)
    fused = torch.randn(7, 2 * 33, generator=g).to(DEVICE, torch.bfloat16)
    up, gate = fused.split(33, dim=-1)
    dy = torch.randn(gate.shape, generator=g).to(DEVICE, torch.bfloat16)
    narrow = (module.swiglu_fwd(gate, up), *module.swiglu_bwd(dy, gate, up))
    monkeypatch.setattr(module, "_INT32_MAX", 64)
    assert module._wide(gate.numel(), 256, 33, 66)
    wide = (module.swiglu_fwd(gate, up), *module.swiglu_bwd(dy, gate, up))
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def test_int64_is_taken_exactly_when_an_index_or_offset_reaches_2_31():
    module = importlib.import_module("megamath.kernels.swiglu")
    assert not module._wide(2**31 - 4096, 4096, 4096, 4096)  # contiguous: the last index is 2^31 - 4097
    assert module._wide(2**31 - 4095, 4096, 4096, 4096)  # the last block's masked lanes reach 2^31
    rows = 2**18  # 2^30 elements of 4096-wide rows, each half of a fused (·, 8192) projection: up to 2^31 - 4097
    assert not module._wide(rows * 4096, 4096, 4096, 8192)
    assert module._wide(rows * 4096, 4096, 4096, 8192 + 16)  # rows further apart: the last offsets pass 2^31


def test_zero_dim():
    """0-d gate and up (one element, no row dim) work as in swiglu_ref, gradients included."""
    gate, up, dy = (t.reshape(()) for t in _inputs((1,), torch.float32, seed=13))
    _check(gate, up, dy, "0-d")


def test_empty():
    gate = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    up = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    out = swiglu(gate, up)
    out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8) and up.grad.shape == (0, 8)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError) as e:
        swiglu(torch.ones(2, 8, device=DEVICE), torch.ones(2, 7, device=DEVICE))
    assert str(e.value) == "swiglu: gate and up must have the same shape, got (2, 8) and (2, 7)"


def test_dtype_mismatch_rejected():
    with pytest.raises(TypeError) as e:
        swiglu(torch.ones(3, device=DEVICE), torch.ones(3, device=DEVICE, dtype=torch.bfloat16))
    assert str(e.value) == "swiglu: gate and up must have the same dtype, got torch.float32 and torch.bfloat16"


def test_float64_rejected_not_computed_in_fp32():
    gate = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="swiglu: inputs must be float32, bfloat16 or float16, got torch.float64"):
        swiglu(gate, gate.clone())


def test_integer_rejected():
    with pytest.raises(TypeError) as e:
        swiglu(torch.ones(3, device=DEVICE, dtype=torch.int32), torch.ones(3, device=DEVICE, dtype=torch.int32))
    assert str(e.value) == "swiglu: inputs must be float32, bfloat16 or float16, got torch.int32"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 1, 64), (7, 40)])
def test_row_strided_halves_of_a_fused_gate_up_output(shape, dtype):
    """gate and up as the two halves of one (..., 2f) matmul output: read in place, same results as copies."""
    g = torch.Generator().manual_seed(11)
    fused = torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    for up, gate in (fused.split(shape[-1], dim=-1), tuple(reversed(fused.split(shape[-1], dim=-1)))):
        assert not gate.is_contiguous() or shape[:-1] == (1,)
        out, dg, du = _run(swiglu, gate, up, dy)
        ref_out, ref_dg, ref_du = _run(swiglu, gate.contiguous(), up.contiguous(), dy)
        assert torch.equal(out, ref_out) and torch.equal(dg, ref_dg) and torch.equal(du, ref_du)
        assert out.is_contiguous() and dg.is_contiguous() and du.is_contiguous()


def test_unevenly_strided_inputs_are_copied_not_misread():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    gate, up = base.t()[:, :3], base.t()[:, 3:6]  # (8, 3) views with a column stride: not row-contiguous
    torch.testing.assert_close(swiglu(gate, up), swiglu_ref(gate, up))
