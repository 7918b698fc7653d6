"""rope matches rope_ref forward and backward; rope_ref itself matches an independent complex-number formula."""
import pytest
import torch
from kernel_tolerance import assert_close_3way

from megamath.kernels.rope import rope, rope_, rope_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, seq, q_heads, kv_heads, head_dim, theta, position_offset)
CONFIGS = [
    (3, 129, 4, 2, 64, 1e4, 0),  # Llemma 7B theta
    (3, 129, 4, 1, 128, 1e6, 0),  # Code Llama / Llemma 34B theta, multi-query k
    (3, 1, 4, 2, 128, 1e6, 37),  # one position (decoding), offset
    (1, 5, 4, 1, 64, 1e4, 16380),  # long context: angle reduction at ~16k rad
]


def _inputs(cfg, dtype, seed):
    batch, seq, hq, hk, dim = cfg[:5]
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) for shape in
               [(batch, seq, hq, dim), (batch, seq, hk, dim), (batch, seq, hq, dim), (batch, seq, hk, dim)]]
    return [t.to(DEVICE, dtype) for t in tensors]


def _run(fn, q, k, dq_out, dk_out, theta, offset):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_out, k_out = fn(q, k, theta, offset)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    return q_out.detach(), k_out.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_reference(cfg, dtype):
    theta, offset = cfg[5], cfg[6]
    q, k, dq_out, dk_out = _inputs(cfg, dtype, seed=CONFIGS.index(cfg) * 3 + DTYPES.index(dtype))
    got = _run(rope, q, k, dq_out, dk_out, theta, offset)
    ref32 = _run(rope_ref, q.float(), k.float(), dq_out.float(), dk_out.float(), theta, offset)
    ref_lo = _run(rope_ref, q, k, dq_out, dk_out, theta, offset)
    for name, out, want, want_lo in zip(["q_out", "k_out", "dq", "dk"], got, ref32, ref_lo):
        assert out.dtype == dtype and out.shape == want.shape, name
        assert_close_3way(out, want, want_lo, name=f"{name} {cfg} {dtype}")


def test_bf16_rounds_to_nearest_as_the_reference_does():
    """One rounding of the fp32 result to nearest even, as rope_ref's cast: within twice torch's error
    with no atol. (Stored with a plain cast, which Triton's CPU interpreter truncates,
    it had over twice torch's error, hidden by the bf16 atol of the test above.)"""
    q, k, dq_out, dk_out = _inputs((2, 33, 4, 2, 64, 1e4, 0), torch.bfloat16, seed=16)
    got = _run(rope, q, k, dq_out, dk_out, 1e4, 0)
    ref32 = _run(rope_ref, q.float(), k.float(), dq_out.float(), dk_out.float(), 1e4, 0)
    ref_lo = _run(rope_ref, q, k, dq_out, dk_out, 1e4, 0)
    for name, out, want, want_lo in zip(["q_out", "k_out", "dq", "dk"], got, ref32, ref_lo):
        assert_close_3way(out, want, want_lo, atol=0.0, name=f"{name} bf16")


def _rope_complex(x: torch.Tensor, theta: float, offset: int) -> torch.Tensor:
    """Independent formula in float64: the halves (i, i + d/2) as one complex number times e^{i angle}."""
    seq, dim = x.shape[1], x.shape[3]
    x64 = x.double()
    xc = torch.complex(x64[..., : dim // 2], x64[..., dim // 2:])  # (B, S, H, D/2)
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    angle = torch.arange(offset, offset + seq, dtype=torch.float64)[:, None] * inv_freq  # (S, D/2)
    rotated = xc * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def test_integer_tensor_position_offset():
    """A 0-d integer tensor offset (a cache length kept as a tensor) means the same positions as the int."""
    q, k = (t.to(DEVICE) for t in _inputs((1, 3, 2, 1, 64), torch.float32, seed=14)[:2])
    want = rope(q, k, 1e4, 5)
    got = rope(q, k, 1e4, torch.tensor(5))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_largest_supported_position_matches_reference():
    """The last positions below MAX_POSITION (angles ~2^19 rad) still reduce accurately in fp32; one past
    them, k * 2pi rounded and cos/sin were off by ~0.09 (see test_bad_inputs_raise)."""
    q, k, dq_out, dk_out = _inputs((1, 4, 2, 1, 64), torch.float32, seed=13)
    offset = (1 << 19) - 4
    got = _run(rope, q, k, dq_out, dk_out, 1e4, offset)
    want = _run(rope_ref, q, k, dq_out, dk_out, 1e4, offset)
    for name, a, b in zip(["q_out", "k_out", "dq", "dk"], got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("theta,offset", [(1e4, 0), (1e6, 100)])
def test_reference_matches_complex_formula(theta, offset):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 100, 3, 128, generator=g)
    k = torch.randn(2, 100, 1, 128, generator=g)
    q_out, k_out = rope_ref(q, k, theta, offset)
    # fp32 angles drift from float64 ones by ~1e-7 relative, i.e. ~3e-5 rad at position 200.
    torch.testing.assert_close(q_out.double(), _rope_complex(q, theta, offset), rtol=0, atol=5e-4)
    torch.testing.assert_close(k_out.double(), _rope_complex(k, theta, offset), rtol=0, atol=5e-4)


def test_strided_inputs_from_fused_qkv():
    """q and k as views of one (B, S, Hq + 2 Hk, D) projection give the same result as contiguous copies."""
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 7, 4 + 2 * 2, 64, generator=g).to(DEVICE, torch.bfloat16)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]  # strided over heads and positions
    q_before = q.clone()
    q_out, k_out = rope(q, k, 1e4, 3)
    q_want, k_want = rope(q.contiguous(), k.contiguous(), 1e4, 3)
    assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want)
    assert torch.equal(q, q_before), "rope must not write into its inputs"


def test_sequence_major_views_keep_their_memory_order():
    """(B, S, H, D) views of sequence-first memory (the model's layout under sequence parallelism): the same
    values as dense inputs, and the outputs and input gradients are sequence-major as well."""
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(7, 3, 4 + 2 * 2, 64, generator=g).to(DEVICE, torch.bfloat16)  # (S, B, Hq + 2 Hk, D)
    q, k = qkv[:, :, :4].transpose(0, 1), qkv[:, :, 4:6].transpose(0, 1)  # (B, S, ·, D) views
    dq_out, dk_out = (torch.randn(7, 3, h, 64, generator=g).to(DEVICE, torch.bfloat16).transpose(0, 1) for h in (4, 2))
    got = _run(rope, q, k, dq_out, dk_out, 1e4, 3)
    want = _run(rope, q.contiguous(), k.contiguous(), dq_out.contiguous(), dk_out.contiguous(), 1e4, 3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for t in got[:2]:  # q_out, k_out
        assert t.transpose(0, 1).is_contiguous(), t.stride()


@pytest.mark.parametrize("sequence_first", [False, True])
def test_in_place_rotation_is_ropes_and_its_inverse_ropes_backward(sequence_first):
    """rope_ on the q and k slices of one projection output (as the fused q/k/v projection applies it) writes
    exactly rope's outputs where q and k lie and leaves v alone; inverse=True writes exactly rope's input
    gradients into the output gradients."""
    g = torch.Generator().manual_seed(13)
    shape = (7, 3, 4 + 2 * 2, 64) if sequence_first else (3, 7, 4 + 2 * 2, 64)
    qkv = torch.randn(shape, generator=g).to(DEVICE, torch.bfloat16)
    grads = torch.randn(shape, generator=g).to(DEVICE, torch.bfloat16)
    view = (lambda t: t.transpose(0, 1)) if sequence_first else (lambda t: t)
    q, k, v = (view(t) for t in (qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]))  # (B, S, ·, D) views
    dq_out, dk_out = view(grads[:, :, :4]), view(grads[:, :, 4:6])
    q_want, k_want, dq_want, dk_want = _run(rope, q, k, dq_out, dk_out, 1e4, 3)
    v_before = v.clone()
    rope_(q, k, 1e4, 3)
    rope_(dq_out, dk_out, 1e4, 3, inverse=True)
    for got, want in ((q, q_want), (k, k_want), (v, v_before), (dq_out, dq_want), (dk_out, dk_want)):
        assert torch.equal(got, want)


def test_in_place_rotation_refuses_a_strided_head_dim():
    x = torch.randn(2, 3, 4, 32, device=DEVICE)[..., ::2]  # head_dim 16, elements two apart
    with pytest.raises(ValueError, match=r"rope_: q .* cannot be rotated in place"):
        rope_(x, x.contiguous(), 1e4, 0)


def test_heads_2_31_elements_apart_are_copied_not_read_at_wrapped_offsets():
    """Position 0 of a (B 1, H 3, S 2^26, D 16) tensor transposed to (B, S, H, D): heads lie S·D = 2^30
    elements apart, so the third is 2^31 past the first, beyond the kernel's int32 head offsets. Such
    views, as q or as the backward's dq_out, are copied (before, the offset wrapped: a crash or another
    tensor's memory read)."""
    try:  # 4 GiB of address space; only the few rows written below are ever touched
        big = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve 4 GiB of address space here: {e}")
    q_view, dq_view = (big.as_strided((1, 1, 3, 16), (3 * 2**30, 16, 2**30, 1), offset) for offset in (0, 16))
    q, k, dq_out, dk_out = _inputs((1, 1, 3, 1, 16), torch.float16, seed=15)
    q_view.copy_(q)
    dq_view.copy_(dq_out)
    for a, b in zip(rope(q_view, k, 1e4, 5), rope(q, k, 1e4, 5)):  # forward: q_view is read
        assert torch.equal(a, b)
    got = _run(rope, q, k, dq_view, dk_out, 1e4, 5)  # backward: dq_view is read
    want = _run(rope, q, k, dq_out, dk_out, 1e4, 5)
    for name, a, b in zip(["q_out", "k_out", "dq", "dk"], got, want):
        assert torch.equal(a, b), name


def test_unused_k_output_gives_zero_grad():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3, 2, 64, generator=g).to(DEVICE).requires_grad_(True)
    k = torch.randn(1, 3, 1, 64, generator=g).to(DEVICE).requires_grad_(True)
    q_out, _ = rope(q, k)
    q_out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    q_ref = q.detach().clone().requires_grad_(True)
    rope_ref(q_ref, k.detach())[0].sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_shape,k_shape,kwargs,message", [
    ((2, 3, 4, 64), (2, 3, 64), {},
     "rope expects q (batch, seq, q_heads, head_dim) and k (batch, seq, kv_heads, head_dim), "
     "got q (2, 3, 4, 64) and k (2, 3, 64)"),
    ((2, 3, 4, 64), (2, 5, 1, 64), {},
     "rope: q and k must share batch, seq and head_dim, got q (2, 3, 4, 64) and k (2, 5, 1, 64)"),
    ((2, 3, 4, 63), (2, 3, 1, 63), {}, "rope: head_dim must be even, got 63"),
    ((2, 3, 4, 64), (2, 3, 1, 64), {"position_offset": -1}, "rope: position_offset must be >= 0, got -1"),
    ((2, 3, 4, 64), (2, 3, 1, 64), {"theta": 0.0}, "rope: theta must be positive, got 0.0"),
    ((2, 3, 4, 64), (2, 3, 1, 64), {"theta": float("nan")}, "rope: theta must be positive, got nan"),
    ((2, 3, 4, 64), (2, 3, 1, 64), {"position_offset": 2.7}, "rope: position_offset must be an integer, got 2.7"),
    ((1, 3, 1, 64), (1, 3, 1, 64), {"position_offset": (1 << 19) - 2},
     "rope: positions 524286..524288 exceed the supported maximum 524287 (fp32 angle reduction)"),
])
def test_bad_inputs_raise(q_shape, k_shape, kwargs, message):
    with pytest.raises(ValueError) as err:
        rope(torch.zeros(q_shape, device=DEVICE), torch.zeros(k_shape, device=DEVICE), **kwargs)
    assert str(err.value) == message
