"""rms_norm matches rms_norm_ref forward and backward (dx, dweight) within the three-way tolerance."""
import pytest
import torch
from kernel_tolerance import assert_close_3way

from megamath.kernels.rms_norm import rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g)
    w = 1.0 + 0.1 * torch.randn(n, generator=g)
    dy = torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), dy.to(DEVICE, dtype)


def _run(fn, x, w, dy, eps):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _check(shape, dtype, seed, eps=1e-5):
    x, w, dy = _inputs(shape, dtype, seed)
    y, dx, dw = _run(rms_norm, x, w, dy, eps)
    y32, dx32, dw32 = _run(rms_norm_ref, x.float(), w.float(), dy.float(), eps)
    y_lo, dx_lo, dw_lo = _run(rms_norm_ref, x, w, dy, eps)
    assert y.dtype == dtype and y.shape == x.shape
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dw.dtype == dtype and dw.shape == w.shape
    # dweight sums over rows: scale the fp32 atol with the magnitude of the sum.
    dw_atol = None if dtype != torch.float32 else 1e-5 * max(1.0, dw32.abs().max().item())
    assert_close_3way(y, y32, y_lo, name=f"y {shape} {dtype}")
    assert_close_3way(dx, dx32, dx_lo, name=f"dx {shape} {dtype}")
    assert_close_3way(dw, dw32, dw_lo, atol=dw_atol, name=f"dweight {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1000), (5, 4096), (2, 3, 129), (129, 1), (129, 1000)])
def test_matches_reference(shape, dtype):
    _check(shape, dtype, seed=sum(shape) * 3 + DTYPES.index(dtype))


def test_width_16384_fp32():
    _check((3, 16384), torch.float32, seed=1)


def test_eps_and_large_scale_inputs():
    """A different eps reaches the kernel, and inputs far from unit scale normalize the same way."""
    x, w, dy = _inputs((4, 257), torch.float32, seed=3)
    x = x * 1e3
    y = rms_norm(x, w, eps=1e-2)
    assert_close_3way(y, rms_norm_ref(x, w, eps=1e-2), rms_norm_ref(x, w, eps=1e-2), name="eps")
    small = torch.full((2, 8), 1e-3, device=DEVICE)
    ones = torch.ones(8, device=DEVICE)
    # mean(x²) = 1e-6 is comparable to eps, so eps visibly changes the result.
    assert not torch.allclose(rms_norm(small, ones, eps=1e-6), rms_norm(small, ones, eps=1e-2))


def test_non_contiguous_input():
    """A transposed x (last-dim stride != 1) gives the same values and gradients as a contiguous copy."""
    x, w, _ = _inputs((64, 6), torch.float32, seed=4)
    xt = x.t()  # (6, 64), stride (1, 6)
    dy = torch.randn(6, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    y, dx, dw = _run(rms_norm, xt, w[:1].expand(64).contiguous(), dy, 1e-5)
    y_ref, dx_ref, dw_ref = _run(rms_norm_ref, xt.contiguous(), w[:1].expand(64).contiguous(), dy, 1e-5)
    assert_close_3way(y, y_ref, y_ref, name="y non-contiguous")
    assert_close_3way(dx, dx_ref, dx_ref, name="dx non-contiguous")
    assert_close_3way(dw, dw_ref, dw_ref, name="dw non-contiguous")


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_non_contiguous_weight(layout):
    """A weight that is a strided or broadcast view (stride 2 or 0) is read by value, not by offset, and
    its gradient reaches the tensor it views."""
    x, _, dy = _inputs((3, 40), torch.float32, seed=7)
    wide = 1.0 + 0.1 * torch.randn(80, generator=torch.Generator().manual_seed(8)).to(DEVICE)

    def run(fn):
        base = wide.clone().requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        w = base[::2] if layout == "strided" else base[:1].expand(40)  # (40,), stride 2 or 0
        y = fn(xx, w, 1e-5)
        y.backward(dy)
        return y.detach(), xx.grad, base.grad

    y, dx, dw = run(rms_norm)
    y_ref, dx_ref, dw_ref = run(lambda xx, w, eps: rms_norm_ref(xx, w.contiguous(), eps))
    assert_close_3way(y, y_ref, y_ref, name=f"y {layout} weight")
    assert_close_3way(dx, dx_ref, dx_ref, name=f"dx {layout} weight")
    assert_close_3way(dw, dw_ref, dw_ref, atol=1e-4, name=f"dw {layout} weight")


def test_fp32_weight_with_bf16_input():
    """Mixed dtypes: output and dx keep x's dtype, dweight keeps the weight's."""
    x, w, dy = _inputs((5, 300), torch.bfloat16, seed=6)
    w32 = w.float()
    y, dx, dw = _run(rms_norm, x, w32, dy, 1e-5)
    y_lo, dx_lo, dw_lo = _run(rms_norm_ref, x, w32, dy, 1e-5)
    y32, dx32, dw32 = _run(rms_norm_ref, x.float(), w32, dy.float(), 1e-5)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert_close_3way(y, y32, y_lo, name="y mixed")
    assert_close_3way(dx, dx32, dx_lo, name="dx mixed")
    assert_close_3way(dw, dw32, dw_lo, atol=1e-2, name="dw mixed")


def test_empty_rows():
    x = torch.empty(0, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros(16, device=DEVICE))


def test_empty_width():
    """A zero-width last dim gives an empty output and empty gradients, as rms_norm_ref does."""
    x = torch.empty(3, 0, device=DEVICE, requires_grad=True)
    w = torch.ones(0, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == rms_norm_ref(x, w).shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == (0,)


def test_bad_weight_shape():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError) as e:
        rms_norm(x, torch.ones(7, device=DEVICE))
    assert str(e.value) == "rms_norm: weight must have shape (8,) to match x's last dim, got (7,)"


def test_integer_input_rejected():
    with pytest.raises(TypeError) as e:
        rms_norm(torch.ones(2, 8, dtype=torch.int64, device=DEVICE), torch.ones(8, device=DEVICE))
    assert str(e.value) == "rms_norm: x must be a floating-point tensor, got torch.int64"


def test_complex_weight_rejected():
    with pytest.raises(TypeError) as e:
        rms_norm(torch.ones(2, 8, device=DEVICE), torch.ones(8, dtype=torch.complex64, device=DEVICE))
    assert str(e.value) == "rms_norm: weight must be a real tensor, got torch.complex64"


def test_too_wide_rejected():
    with pytest.raises(ValueError) as e:
        rms_norm(torch.ones(1, 65537, device=DEVICE), torch.ones(65537, device=DEVICE))
    assert str(e.value) == "rms_norm: row width 65537 exceeds the supported maximum 65536"


# ---- add_rms_norm: the residual add fused in ---------------------------------------------------------

def _run_add(fn, residual, delta, w, dh, dy, eps=1e-5):
    """(h, y) and the gradients of residual, delta and w, with gradients arriving at both outputs (dh None: h
    unused, as the last norm's)."""
    residual, delta, w = (t.detach().clone().requires_grad_(True) for t in (residual, delta, w))
    h, y = fn(residual, delta, w, eps)
    torch.autograd.backward([y] if dh is None else [h, y], [dy] if dh is None else [dh, dy])
    return h.detach(), y.detach(), residual.grad, delta.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1000), (2, 3, 129), (129, 1)])
@pytest.mark.parametrize("h_used", [True, False])
def test_add_rms_norm_matches_the_add_then_the_norm(shape, dtype, h_used):
    """h is the add rounded as torch rounds it (bit for bit), y the norm of that h; the gradients of both inputs
    are the norm's dx plus the gradient arriving at h, rounded once (autograd's sum of the two rounds twice)."""
    residual, w, dy = _inputs(shape, dtype, seed=sum(shape) + DTYPES.index(dtype))
    delta, _, dh = _inputs(shape, dtype, seed=sum(shape) + 7)
    dh = dh if h_used else None
    from megamath.kernels.rms_norm import add_rms_norm, add_rms_norm_ref

    ours = _run_add(add_rms_norm, residual, delta, w, dh, dy)
    upcast = _run_add(add_rms_norm_ref, residual.float(), delta.float(), w.float(), None if dh is None else dh.float(),
                      dy.float())
    lowp = _run_add(add_rms_norm_ref, residual, delta, w, dh, dy)
    assert torch.equal(ours[0], residual + delta) and ours[0].dtype == dtype
    assert torch.equal(ours[2], ours[3])  # one gradient for both summands
    for i, name in enumerate(("h", "y", "d residual", "d delta", "d weight")):
        # fp32: gradients scale the atol with their size (dweight sums rows; a width-1 row's dx is a
        # cancellation amplified by rstd, here added to dh)
        atol = None if dtype != torch.float32 or i < 2 else 1e-5 * max(1.0, upcast[i].abs().max().item())
        assert_close_3way(ours[i], upcast[i], lowp[i], atol=atol, name=f"{name} {shape}")


def test_add_rms_norm_rejects_a_delta_unlike_the_residual():
    from megamath.kernels.rms_norm import add_rms_norm

    x, w, _ = _inputs((2, 8), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"^add_rms_norm: delta must match residual's shape, dtype and device, got "
                                         r"\(2, 4\) torch.float32 on .* for \(2, 8\) torch.float32 on "):
        add_rms_norm(x, x[:, :4], w)
    with pytest.raises(ValueError, match=r"^add_rms_norm: delta must match .* got \(2, 8\) torch.bfloat16"):
        add_rms_norm(x, x.bfloat16(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("taken", [False, True])
def test_a_weight_gradient_sink_gets_the_fp32_sum(dtype, add, taken):
    """weight_grad_sink is called once per backward with the weight's gradient as the programs' fp32 sum: what
    autograd gets rounded to the weight's dtype (bit for bit), and with bf16 weights far closer to the exact sum.
    Taken (True), autograd gets None for the weight; declined, the usual gradient. dx is the same either way."""
    from megamath.kernels.rms_norm import add_rms_norm

    x, w, dy = _inputs((37, 129), dtype, seed=11)
    delta, _, dh = _inputs((37, 129), dtype, seed=12)
    plain = _run_add(add_rms_norm, x, delta, w, dh, dy) if add else _run(rms_norm, x, w, dy, 1e-5)
    received = []

    def sink(dweight):
        received.append(dweight.clone())
        return taken

    def with_sink(*args):
        return (add_rms_norm if add else rms_norm)(*args, weight_grad_sink=sink)
    ours = _run_add(with_sink, x, delta, w, dh, dy) if add else _run(with_sink, x, w, dy, 1e-5)
    (dweight,) = received
    assert dweight.dtype == torch.float32 and dweight.shape == w.shape
    assert torch.equal(dweight.to(dtype), plain[-1])
    assert ours[-1] is None if taken else torch.equal(ours[-1], plain[-1])
    assert all(torch.equal(a, b) for a, b in zip(ours[:-1], plain[:-1]))  # y (h), dx: unchanged
    if dtype == torch.bfloat16:
        h = (x + delta if add else x).float()
        exact = (dy.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).double()).sum(0)
        ours_error, rounded_error = (dweight.double() - exact).abs().max(), (plain[-1].double() - exact).abs().max()
        assert ours_error * 20 < rounded_error


def test_a_sink_sees_zeros_for_no_rows():
    x, w, dy = _inputs((0, 16), torch.float32, seed=0)
    received = []
    _run(lambda *args: rms_norm(*args, weight_grad_sink=lambda g: received.append(g) or True), x, w, dy, 1e-5)
    assert len(received) == 1 and torch.equal(received[0], torch.zeros(16, device=DEVICE))
