"""sum_of_squares (the gradient norm's pass) against its fp64 reference at awkward lengths and dtypes."""
import pytest
import torch

from megamath.kernels.sum_of_squares import CHUNK, sum_of_squares, sum_of_squares_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 1023, 1025, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 17])
def test_matches_the_fp64_reference(n, dtype):
    """The squares are exact in fp64 and so is nearly every sum: only the order of fp64 additions differs."""
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype).to(DEVICE)
    ours, ref = sum_of_squares(x), sum_of_squares_ref(x)
    assert ours.dtype == torch.float64 and ours.shape == () and ours.device == x.device
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)


def test_a_range_inside_a_buffer_and_the_empty_range():
    """The optimizer passes views of its flat buffer at an offset (its ranges): only the view is read. Integers:
    the exact sum is known (the reference, a norm squared, is a rounding off it)."""
    buffer = torch.arange(-40.0, 2 * CHUNK, device=DEVICE)
    view = buffer[37:37 + CHUNK + 5]
    exact = sum(v * v for v in range(-3, CHUNK + 2))
    assert sum_of_squares(view).item() == exact
    assert sum_of_squares_ref(view).item() == pytest.approx(exact, rel=1e-15)
    assert sum_of_squares(buffer[:0]).item() == 0.0


def test_fp32_gradients_beyond_fp32_squares_stay_finite_and_non_finite_ones_show():
    """|g| = 1e25 is a finite fp32 gradient whose square only fp64 holds; a NaN or inf gradient gives a NaN or
    inf sum, which the optimizer's skip reads."""
    x = torch.zeros(CHUNK + 3, device=DEVICE)
    x[CHUNK + 1] = 1e25
    assert sum_of_squares(x).item() == pytest.approx(float(torch.tensor(1e25).double() ** 2), rel=1e-15)
    for bad, check in ((float("nan"), lambda v: v != v), (float("inf"), lambda v: v == float("inf"))):
        y = x.clone()
        y[5] = bad
        assert check(sum_of_squares(y).item())


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^sum_of_squares: x must be a contiguous 1-D buffer, got shape \(4, 4\)"):
        sum_of_squares(torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"^sum_of_squares: x must be a contiguous 1-D buffer, got shape \(8,\) "
                                         r"with strides \(2,\)$"):
        sum_of_squares(torch.zeros(16, device=DEVICE)[::2])
    with pytest.raises(TypeError, match=r"^sum_of_squares: x must be float32, bfloat16 or float16, got torch.int64$"):
        sum_of_squares(torch.zeros(4, dtype=torch.long, device=DEVICE))


def test_the_optimizers_norm_through_the_kernel(monkeypatch):
    """ZeroOptimizer's gradient norm with the kernel on every range (as on CUDA; the CPU runs the reference): the
    same norm and clip factor to fp64's rounding, over bf16 gradients in ranges at offsets of the buffer."""
    from megamath.model.config import ModelConfig
    from megamath.model.llama import Llama
    from megamath.parallel import zero
    from megamath.parallel.optimizer_config import OptimizerConfig
    from megamath.parallel.state import ParallelState

    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         ffn_hidden_size=48, max_seq_length=16, kernels="reference")
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for name, fn in (("kernel", sum_of_squares), ("reference", sum_of_squares_ref)):
        monkeypatch.setattr(zero, "_sum_of_squares_fn", lambda device, fn=fn: fn)
        torch.manual_seed(0)
        model = Llama(config).to(DEVICE, torch.bfloat16)
        opt = zero.ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(clip_grad=0.1),
                                 model.split_parameter_names(), bucket_mb=0.01, micro_batches=1)
        assert len(opt.ranges) > 4
        opt.zero_grad(1)
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        results[name] = opt.step(1e-3)
        opt.remove_hooks()
    assert results["kernel"].clip_coef < 1
    assert results["kernel"].grad_norm == pytest.approx(results["reference"].grad_norm, rel=1e-6)
    assert results["kernel"].clip_coef == pytest.approx(results["reference"].clip_coef, rel=1e-6)
