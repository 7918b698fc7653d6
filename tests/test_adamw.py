"""adamw_step and adamw_step_ref track torch.optim.AdamW over several steps; the bf16 copy is exact."""
import pytest
import torch

from megamath.kernels.adamw import adamw_step, adamw_step_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)  # lr large enough that a wrong update shows
STEPS = 4


def _state(n, seed):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(n, generator=g).to(DEVICE)
    grads = [torch.randn(n, generator=g).to(DEVICE) * (0.1 + i) for i in range(STEPS)]  # magnitudes vary by step
    return params, grads


def _torch_adamw(params0, grads, weight_decay, grad_scale):
    """torch.optim.AdamW (single-tensor path) fed the same scaled fp32 grads."""
    p = params0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=weight_decay, foreach=False, fused=False)
    for grad in grads:
        p.grad = grad.float() * grad_scale
        opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


def _ours(fn, params0, grads, weight_decay, grad_scale, lowp=False):
    p = params0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    p_lowp = torch.empty(p.numel(), dtype=torch.bfloat16, device=DEVICE) if lowp else None
    for step, grad in enumerate(grads, start=1):
        fn(p, grad, m, v, weight_decay=weight_decay, step=step, params_lowp=p_lowp, grad_scale=grad_scale, **HP)
        if lowp:
            assert torch.equal(p_lowp, p.to(torch.bfloat16)), f"params_lowp != bf16(params) after step {step}"
    return p, m, v


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("n", [1, 1001, 4099])
def test_matches_torch_adamw(n, weight_decay, grad_dtype):
    params0, grads = _state(n, seed=n + int(weight_decay * 10))
    grads = [g.to(grad_dtype) for g in grads]
    want = _torch_adamw(params0, grads, weight_decay, 1.0)
    for fn in (adamw_step, adamw_step_ref):
        got = _ours(fn, params0, grads, weight_decay, 1.0)
        for name, a, b in zip(("params", "exp_avg", "exp_avg_sq"), got, want):
            _assert_close(a, b, f"{fn.__name__} {name} n={n} wd={weight_decay} {grad_dtype}")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_grad_scale(as_tensor):
    """The clipping coefficient multiplies the grads before the moments see them (float or device tensor)."""
    params0, grads = _state(1001, seed=7)
    grads = [g.to(torch.bfloat16) for g in grads]
    want = _torch_adamw(params0, grads, 0.1, 0.37)
    scale = torch.tensor(0.37, device=DEVICE) if as_tensor else 0.37
    got = _ours(adamw_step, params0, grads, 0.1, scale)
    for name, a, b in zip(("params", "exp_avg", "exp_avg_sq"), got, want):
        _assert_close(a, b, f"grad_scale {name}")
    # And it is not a no-op: unscaled grads give visibly different moments.
    unscaled = _ours(adamw_step, params0, grads, 0.1, 1.0)
    assert not torch.allclose(unscaled[1], got[1])


@pytest.mark.parametrize("fn", [adamw_step, adamw_step_ref], ids=["kernel", "ref"])
def test_nan_grad_scale_tensor_writes_nothing(fn):
    """A NaN device scale is the optimizer's on-device skip: params, moments and the bf16 copy stay as they were."""
    params0, grads = _state(1001, seed=8)
    p, m, v = params0.clone(), torch.rand_like(params0), torch.rand_like(params0)
    p_lowp = torch.zeros(p.numel(), dtype=torch.bfloat16, device=DEVICE)
    before = [t.clone() for t in (p, m, v, p_lowp)]
    fn(p, grads[0], m, v, weight_decay=0.1, step=3, params_lowp=p_lowp,
       grad_scale=torch.tensor(float("nan"), device=DEVICE), **HP)
    for name, a, b in zip(("params", "exp_avg", "exp_avg_sq", "params_lowp"), (p, m, v, p_lowp), before):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("n", [1, 1001, 4099])
def test_params_lowp_is_exact_bf16_of_params(n):
    params0, grads = _state(n, seed=100 + n)
    got = _ours(adamw_step, params0, grads, 0.1, 1.0, lowp=True)  # asserts exactness after every step
    want = _torch_adamw(params0, grads, 0.1, 1.0)
    _assert_close(got[0], want[0], "params with params_lowp")


def test_bf16_rounding_ties_go_to_even():
    """Values exactly halfway between two bf16 numbers round to the even one, as params.to(bf16) does."""
    base = torch.tensor([1.0, 1.0078125, 3.0, -1.0, 2.0 ** -100, 65504.0], device=DEVICE)
    halfway = (base.view(torch.int32) | 0x8000).view(torch.float32)  # set the first dropped bit
    params = torch.cat([base, halfway, halfway + 1e-7 * halfway.abs()])
    p_lowp = torch.empty(params.numel(), dtype=torch.bfloat16, device=DEVICE)
    zeros = torch.zeros_like(params)
    # lr = 0 and no decay: the step leaves params unchanged and only writes the bf16 copy.
    adamw_step(params, zeros, zeros.clone(), zeros.clone(), lr=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
               weight_decay=0.0, step=1, params_lowp=p_lowp)
    assert torch.equal(p_lowp, params.to(torch.bfloat16))


def test_fp16_params_lowp():
    params0, grads = _state(513, seed=3)
    p, m, v = params0.clone(), torch.zeros(513, device=DEVICE), torch.zeros(513, device=DEVICE)
    p16 = torch.empty(513, dtype=torch.float16, device=DEVICE)
    adamw_step(p, grads[0], m, v, weight_decay=0.0, step=1, params_lowp=p16, **HP)
    assert torch.equal(p16, p.half())


_DEV = torch.zeros(1, device=DEVICE).device  # "cuda:0", not "cuda", as the message prints it


def _buffers(n=8):
    return [torch.zeros(n, device=DEVICE) for _ in range(4)]


@pytest.mark.parametrize("mutate, exc, message", [
    (lambda b: b.__setitem__(1, torch.zeros(7, device=DEVICE)), ValueError,
     "adamw_step: grads has 7 elements but params has 8"),
    (lambda b: b.__setitem__(2, torch.zeros(16, device=DEVICE)[::2]), ValueError,
     "adamw_step: exp_avg must be a contiguous 1-D buffer, got shape (8,) with strides (2,)"),
    (lambda b: b.__setitem__(0, torch.zeros(2, 4, device=DEVICE)), ValueError,
     "adamw_step: params must be a contiguous 1-D buffer, got shape (2, 4) with strides (4, 1)"),
    (lambda b: b.__setitem__(3, torch.zeros(8, device=DEVICE, dtype=torch.bfloat16)), TypeError,
     "adamw_step: exp_avg_sq must be float32, got torch.bfloat16"),
    (lambda b: b.__setitem__(1, torch.zeros(8, device=DEVICE, dtype=torch.float64)), TypeError,
     "adamw_step: grads must be float32, bfloat16 or float16, got torch.float64"),
])
def test_bad_buffers_rejected(mutate, exc, message):
    bufs = _buffers()
    mutate(bufs)
    with pytest.raises(exc) as e:
        adamw_step(*bufs, weight_decay=0.0, step=1, **HP)
    assert str(e.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=0), "adamw_step: step must be an int >= 1 (1-based), got 0"),
    (dict(step=1.0), "adamw_step: step must be an int >= 1 (1-based), got 1.0"),
    (dict(beta2=1.0), "adamw_step: betas must be in [0, 1), got (0.9, 1.0)"),
    (dict(lr=-1.0), "adamw_step: lr must be >= 0, got -1.0"),
    (dict(weight_decay=-0.1), "adamw_step: weight_decay must be >= 0, got -0.1"),
    (dict(params_lowp=torch.zeros(8, device=DEVICE)),
     "adamw_step: params_lowp must be bfloat16 or float16, got torch.float32"),
    (dict(lr=torch.tensor(1e-3, device=DEVICE)),
     "adamw_step: lr must be a Python float, got a tensor; only grad_scale may be a device tensor"),
    (dict(weight_decay=torch.tensor(0.1, device=DEVICE)),
     "adamw_step: weight_decay must be a Python float, got a tensor; only grad_scale may be a device tensor"),
    (dict(grad_scale=torch.ones(2, device=DEVICE)),
     f"adamw_step: a tensor grad_scale must hold one element on {_DEV}, got shape (2,) on {_DEV}"),
])
def test_bad_arguments_rejected(kwargs, message):
    args = dict(HP, weight_decay=0.0, step=1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as e:
        adamw_step(*_buffers(), **args)
    assert str(e.value) == message


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.5, 0.6, 0.9])
def test_first_moment_is_torchs_lerp_on_both_sides_of_one_half(beta1):
    """torch's lerp switches form at weight 0.5; with beta1 0 the kernel's one form lost a gradient smaller
    than the old moment's rounding step (exp_avg 0 instead of 1e-8: no update at all)."""
    hp = dict(lr=1e-3, beta1=beta1, beta2=0.0, eps=1e-8, weight_decay=0.0, step=1)
    results = []
    for fn in (adamw_step, adamw_step_ref):
        p, m, v = torch.ones(5), torch.ones(5), torch.zeros(5)
        g = torch.tensor([1e-8, -3e-9, 0.5, 7.0, 1e-30])
        fn(p, g, m, v, **hp)
        results.append((p, m))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)  # the moment: the same bits
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)  # and so the update
