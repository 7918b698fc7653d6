"""Weight gradients written (and, with gradient-accumulation fusion, added) by their matmul into ZeRO-1's buffer
(grad_into_buffer.py), the embedding's by its lookup and, with the kernels, the norms' by their kernel's backward:
the same bits as the hook's copy for a first gradient, fp32 sums of bf16 weights' gradients, no copy of their
gradients, and autograd's path wherever the buffer cannot take one.
(Multi-rank runs, overlap, TP and the fused q/k/v and gate/up matmuls take this path too: test_zero*.py,
test_tensor_parallel.py and test_fused_linear.py compare them with their references bit for bit.)"""
import gc
import itertools
from collections import Counter

import pytest
import torch

from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.parallel import grad_into_buffer
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=48,
                     max_seq_length=16, kernels="reference")
INTO_BUFFER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens")
"""The layers whose weight gradient is written into the buffer by its matmul (linears) or its lookup."""
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
"""The norm layers, whose weight gradient the RMSNorm kernel writes into the buffer (the reference ops: the hook)."""


def _model(kernels: str = "reference") -> Llama:
    return Llama(ModelConfig(**{**CONFIG.to_dict(), "kernels": kernels}))


def _into_buffer(names, kernels: str = "reference") -> set:
    """The parameters whose gradient goes into the buffer without the hook, under `kernels`."""
    layers = INTO_BUFFER + (NORMS if kernels == "triton" else ())
    return {n for n in names if n.split(".")[-2] in layers}


class _HookArrivals:
    """The parameters whose gradient reaches ZeroOptimizer's hook through autograd (in arrival order) inside a
    `with` block, i.e. not written into the buffer by their own matmul or lookup. Autograd runs every parameter's
    post-accumulate hooks either way, with `.grad` None where nothing was accumulated; create this before the
    optimizer, so that its hooks run before the optimizer's, which consume the gradient."""

    def __init__(self, model: torch.nn.Module):
        self.written, self.recording = [], False
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self._seen(name, p))

    def _seen(self, name: str, p: torch.Tensor) -> None:
        if self.recording and p.grad is not None:
            self.written.append(name)

    def __enter__(self):
        self.written, self.recording = [], True
        return self

    def __exit__(self, *exc):
        self.recording = False


def _steps(direct: bool, micro_batches: int = 1, dtype=torch.float32, grad_dtype: str = "auto", fusion: bool = False,
           kernels: str = "reference"):
    """Optimizer steps (three; two with the kernels, which run in Triton's interpreter here); with direct=False
    every parameter's slot is unregistered (the hook's copy). Returns the results and state, and per step the
    parameters the hook wrote into the buffer."""
    torch.manual_seed(0)
    model = _model(kernels).to(dtype)
    spy = _HookArrivals(model)
    config = OptimizerConfig(lr=1e-2, clip_grad=0.5, grad_dtype=grad_dtype, gradient_accumulation_fusion=fusion)
    opt = ZeroOptimizer(model, ParallelState.single(), config, model.split_parameter_names(),
                        micro_batches=micro_batches)
    if not direct:
        for p in model.parameters():
            grad_into_buffer.unregister(p)
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    results, hooked = [], []
    for _ in range(3 if kernels == "reference" else 2):
        opt.zero_grad(micro_batches)
        with spy:
            for x, y in zip(tokens[:, :-1].chunk(micro_batches), tokens[:, 1:].chunk(micro_batches)):
                (model(x, y)[1] / micro_batches).backward()
        hooked.append(spy.written)
        results.append(opt.step(1e-2))
    out = (results, opt.master.clone(), opt.exp_avg_sq.clone(), {n: v.clone() for n, v in model.state_dict().items()})
    opt.remove_hooks()
    return out, hooked


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_same_bits_as_the_hooks_copy_without_copying_linear_weights(micro_batches):
    """Without fusion, fp32 weights and buffer: each linear weight's first gradient of a step is written by its
    matmul, the embedding's by its lookup (with the reference ops the hook copies the norms'); later micro-batches
    add through the hook. Steps, masters, moments and weights: bit-identical to the hook's copy of every gradient."""
    (direct, direct_hooked), (hooked, all_hooked) = (_steps(d, micro_batches) for d in (True, False))
    assert direct[0] == hooked[0]
    for a, b in zip(direct[1:3], hooked[1:3]):
        assert torch.equal(a, b)
    assert all(torch.equal(direct[3][n], hooked[3][n]) for n in direct[3])
    names = set(direct[3])
    into_buffer = _into_buffer(names)
    for step in range(3):
        assert Counter(all_hooked[step]) == Counter({n: micro_batches for n in names})  # each micro-batch, each
        first = direct_hooked[step][:len(names - into_buffer)]  # the first micro-batch: every linear weight written
        assert set(first) == names - into_buffer  # by its matmul, the embedding by its lookup, the norms by the hook
        want = Counter({n: micro_batches - (n in into_buffer) for n in names})
        assert Counter(direct_hooked[step]) == want - Counter()


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_fusion_adds_every_micro_batchs_linear_gradient_in_the_matmul(kernels):
    """With gradient-accumulation fusion (the default), fp32 weights, two micro-batches: no linear weight's or embedding
    gradient (with the kernels, no gradient at all) reaches the hook in either micro-batch (the second is added by its
    matmul, lookup or norm kernel into the slot), and the steps follow the hook's (a GEMM adding into its output may
    round the sum once differently from an add after it)."""
    assert OptimizerConfig().gradient_accumulation_fusion
    (fused, fused_hooked), (hooked, _) = (_steps(d, 2, fusion=True, kernels=kernels) for d in (True, False))
    names = set(fused[3])
    into_buffer = _into_buffer(names, kernels)
    assert kernels == "reference" or into_buffer == names
    for step in range(len(fused[0])):
        assert Counter(fused_hooked[step]) == Counter({n: 2 for n in names - into_buffer})
    for a, b in zip(fused[0], hooked[0]):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6) and a.clip_coef == pytest.approx(b.clip_coef,
                                                                                                    rel=1e-6)
    for a, b in zip(fused[1:3], hooked[1:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_bf16_weights_sum_their_gradients_in_fp32_with_fusion(kernels):
    """bf16 weights into an fp32 buffer over two micro-batches. With fusion, no linear weight's or embedding gradient
    (with the kernels, no norm's either) goes through the hook, and after the first micro-batch their slots hold fp32
    products and sums (values no bf16 holds); without it the hook copies autograd's bf16 gradients and adds the
    second. Both agree within bf16's rounding."""
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    buffers = {}
    for fusion in (True, False):
        torch.manual_seed(0)
        model = _model(kernels).to(torch.bfloat16)
        spy = _HookArrivals(model)
        opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(grad_dtype="fp32",
                                                                           gradient_accumulation_fusion=fusion),
                            model.split_parameter_names(), micro_batches=2)
        assert opt.gradient_accumulation_fusion is fusion
        into_buffer = {n: p for n, p in model.named_parameters() if n in _into_buffer([n], kernels)}
        opt.zero_grad(2)
        with spy:
            for micro, (x, y) in enumerate(zip(tokens[:, :-1].chunk(2), tokens[:, 1:].chunk(2))):
                (model(x, y)[1] / 2).backward()
                if micro == 0:
                    for name, p in into_buffer.items():
                        first = opt.grad_view(p)
                        assert torch.equal(first, first.bfloat16().float()) is not fusion, name
        assert set(spy.written) & set(into_buffer) == (set() if fusion else set(into_buffer))
        buffers[fusion] = {n: opt.grad_view(p).clone() for n, p in into_buffer.items()}
        opt.remove_hooks()
    for name, fused in buffers[True].items():
        unfused = buffers[False][name]
        torch.testing.assert_close(fused, unfused, rtol=2 ** -7, atol=2 ** -7 * unfused.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_weight_gradient_accumulates_low_precision_operands_in_fp32(dtype):
    """The fused matmul at awkward sizes: gᵀx written, then gᵀx added, into fp32 are the exact sums to fp32's
    precision, several hundred times closer than the bf16/fp16-rounded products the hook would add."""
    generator = torch.Generator().manual_seed(3)
    g, x = (torch.randn(37, n, generator=generator).to(dtype) for n in (5, 11))  # (tokens, out), (tokens, in)
    exact = g.t().double().mm(x.double())  # (out, in)
    out = torch.full((5, 11), float("nan"))  # the write must ignore what the slot held
    grad_into_buffer.write_weight_gradient(out, g, x, add=False)
    grad_into_buffer.write_weight_gradient(out, g, x, add=True)
    rounded = g.t().mm(x).float() * 2
    fused_error, rounded_error = (out.double() - 2 * exact).abs().max(), (rounded.double() - 2 * exact).abs().max()
    assert fused_error <= 1e-6 * (2 * exact).abs().max() and fused_error * 200 < rounded_error
    same = torch.zeros(5, 11, dtype=dtype)
    grad_into_buffer.write_weight_gradient(same, g, x, add=False)  # a buffer of the operands' dtype: autograd's mm
    assert torch.equal(same, g.t().mm(x))


def test_a_buffer_of_another_dtype_takes_autograds_path_without_fusion(monkeypatch):
    """bf16 weights with an fp32 gradient buffer (grad_dtype fp32): without fusion, or where the device has no
    matmul that accumulates bf16 into fp32, no slot is offered and the hook converts and copies, as before."""
    def slots(config, **patch):
        torch.manual_seed(0)
        model = Llama(CONFIG).to(torch.bfloat16)
        opt = ZeroOptimizer(model, ParallelState.single(), config, model.split_parameter_names())
        offered = grad_into_buffer._slots_for(list(model.parameters())) is not None
        opt.remove_hooks()
        return offered, opt.gradient_accumulation_fusion

    assert slots(OptimizerConfig(grad_dtype="fp32", gradient_accumulation_fusion=False)) == (False, False)
    assert slots(OptimizerConfig(grad_dtype="fp32")) == (True, True)
    assert slots(OptimizerConfig(grad_dtype="bf16", gradient_accumulation_fusion=False)) == (True, False)
    assert grad_into_buffer.mixed_dtype_gemm("cpu")
    monkeypatch.setattr(grad_into_buffer, "mixed_dtype_gemm", lambda device_type: False)  # a torch without it
    assert slots(OptimizerConfig(grad_dtype="fp32")) == (False, False)


def test_fusion_setting_is_a_bool():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=rf"^OptimizerConfig.gradient_accumulation_fusion must be true or false, "
                                             rf"got {bad!r}$"):
            OptimizerConfig(gradient_accumulation_fusion=bad)


def test_bf16_weights_into_a_bf16_buffer_match_the_hook():
    """grad_dtype auto's one-GPU case (bf16 weights, one micro-batch: a bf16 buffer) on CPU: the same bits."""
    (direct, direct_hooked), (hooked, _) = (_steps(d, dtype=torch.bfloat16) for d in (True, False))
    assert direct[0] == hooked[0]
    assert torch.equal(direct[1], hooked[1]) and torch.equal(direct[2], hooked[2])
    assert not any(n.split(".")[-2] in INTO_BUFFER for step in direct_hooked for n in step)


def test_the_registry_lets_go_of_parameters():
    """remove_hooks unregisters its parameters; a parameter that goes away takes its entry with it (an id the
    next tensor reuses must not find a stale slot)."""
    before = len(grad_into_buffer._SLOTS)
    model = Llama(CONFIG)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
    assert len(grad_into_buffer._SLOTS) == before + len(list(model.parameters()))
    opt.remove_hooks()
    assert len(grad_into_buffer._SLOTS) == before
    weight = torch.nn.Parameter(torch.randn(4, 5))
    grad_into_buffer.register(weight, object())
    assert grad_into_buffer._slot(weight) is not None
    del weight
    gc.collect()
    assert len(grad_into_buffer._SLOTS) == before


def test_outside_autograd_or_without_a_slot_it_is_f_linear():
    x, w = torch.randn(3, 5), torch.nn.Parameter(torch.randn(4, 5))
    assert grad_into_buffer._slots_for([w]) is None
    with torch.no_grad():
        assert torch.equal(grad_into_buffer.linear(x, w), torch.nn.functional.linear(x, w))
    ids = torch.tensor([[3, 0], [1, 3]])
    assert torch.equal(grad_into_buffer.embedding(ids, w), torch.nn.functional.embedding(ids, w))
    foreign = ids == 3
    masked = grad_into_buffer.embedding(ids, w, foreign)
    assert torch.equal(masked[~foreign], w[ids[~foreign]]) and not masked[foreign].any()


@pytest.mark.parametrize("grad_dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32)])
def test_the_embedding_gradient_into_a_slot_is_autograds_or_its_fp32_sum(grad_dtype, out_dtype):
    """What the lookup writes, then adds, into a slot, with a vocabulary-parallel rank's foreign ids: autograd's
    own dense gradient (masked) where the slot has the gradient's dtype, the hook's bits; bf16 gradients into
    fp32, their fp32 sums, far closer to the exact ones than the bf16 gradient the hook would add."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 6, (3, 40), generator=generator)
    ids[0, :30] = 2  # one row summed 30+ times: a bf16 sum rounds visibly
    foreign = ids == 5
    grads = [torch.randn(3, 40, 7, generator=generator).to(grad_dtype) for _ in range(2)]
    out = torch.full((6, 7), float("nan"), dtype=out_dtype)
    grad_into_buffer.write_embedding_gradient(out, grads[0], ids, foreign, add=False)
    grad_into_buffer.write_embedding_gradient(out, grads[1], ids, foreign, add=True)
    dense = [grad_into_buffer._dense_embedding_gradient(g, ids, foreign, 6) for g in grads]
    exact = sum(torch.zeros(6, 7, dtype=torch.float64).index_add_(0, ids[~foreign], g[~foreign].double())
                for g in grads)
    assert not exact[5].any() and not out[5].any()  # the foreign ids' row
    if grad_dtype == out_dtype:
        assert torch.equal(out, dense[0].to(out_dtype) + dense[1])
    else:
        hooks = dense[0].float() + dense[1].float()  # the hook's copy and add of autograd's bf16 gradients
        ours_error, hooks_error = (out.double() - exact).abs().max(), (hooks.double() - exact).abs().max()
        assert ours_error < 1e-5 and ours_error * 50 < hooks_error


class _ListSlot:
    """A GradSlot that offers a view of its own buffer: written first, then added; or declines every gradient."""

    def __init__(self, n: int, dtype: torch.dtype, declines: bool = False):
        self.buffer, self.declines, self.fills = torch.full((n + 2,), float("nan"), dtype=dtype), declines, 0

    def claim(self):
        return None if self.declines else (self.buffer[1:-1], self.fills > 0)

    def filled(self):
        self.fills += 1


@pytest.mark.parametrize("declines", [False, True])
def test_a_norm_weight_gradient_into_its_slot_is_the_kernels_fp32_sum(declines):
    """A bf16 norm weight with a slot in an fp32 buffer: two backwards through the kernels write, then add, the
    kernel's fp32 sums into the slot (the weight's .grad stays None); a declining slot leaves autograd the usual bf16
    gradient. The kernels' own sink test (test_rms_norm.py) checks what the sum is."""
    generator = torch.Generator().manual_seed(3)
    x, delta = (torch.randn(2, 5, 24, generator=generator).bfloat16() for _ in range(2))
    weight = torch.nn.Parameter((1 + 0.1 * torch.randn(24, generator=generator)).bfloat16())
    slot = _ListSlot(24, torch.float32, declines)
    grad_into_buffer.register(weight, slot)
    sums = []
    from megamath.kernels.rms_norm import add_rms_norm, rms_norm

    def backward(y):  # y, or add_rms_norm's (h, y)
        (y[1] if isinstance(y, tuple) else y).float().square().sum().backward()

    for ours, kernel in ((grad_into_buffer.rms_norm, rms_norm), (grad_into_buffer.add_rms_norm, add_rms_norm)):
        args = (x,) if ours is grad_into_buffer.rms_norm else (x, delta)
        received = []
        backward(kernel(*args, weight.detach().requires_grad_(), weight_grad_sink=lambda g: received.append(g) or True))
        sums.append(received[0])
        backward(ours(*args, weight))
    grad_into_buffer.unregister(weight)
    if declines:
        assert slot.fills == 0 and torch.equal(weight.grad, sums[0].bfloat16() + sums[1].bfloat16())
    else:
        assert slot.fills == 2 and weight.grad is None and slot.buffer[[0, -1]].isnan().all()
        assert torch.equal(slot.buffer[1:-1], sums[0] + sums[1])
        assert not torch.equal(sums[0], sums[0].bfloat16().float())  # fp32 values, not their bf16 rounding


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_a_weight_with_its_own_gradient_hook_sees_its_gradient(kernels):
    """Tensor.register_hook on a weight, even added after the forward (as a NaN-injecting test does): the hook gets
    the gradient, and what it returns is what reaches the buffer (a linear, the embedding, a norm)."""
    torch.manual_seed(0)
    model = _model(kernels)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    seen = {}
    for layer in (model.lm_head, model.embed_tokens, model.layers[0].input_layernorm, model.norm):
        layer.weight.register_hook(lambda g, layer=layer: seen.setdefault(layer, []).append(g.clone()) or g * 2)
    loss.backward()
    for layer, grads in seen.items():
        assert len(grads) == 1 and grads[0].shape == layer.weight.shape
        assert torch.equal(opt.grad_view(layer.weight), grads[0] * 2)
    assert len(seen) == 4
    opt.remove_hooks()


def _sequence_parallel_worker(rank, world_size, out_dir):
    """TP 2 with sequence parallelism, fp32, two micro-batches: the column projections' backward computes their
    gradients itself (layers._GatherLinears: one matmul per projection with the reference ops, one for q/k/v and
    one for gate/up with the kernels); with fusion it writes and adds them into the buffer too. (Two KV heads, so
    that TP splits k and v: a replicated KV projection's gradient, of its rows only, takes the hook.)"""
    state = ParallelState.from_env(2)
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    out = {}
    for kernels, direct in itertools.product(("reference", "triton"), (True, False)):
        config = ModelConfig(**{**CONFIG.to_dict(), "num_kv_heads": 2, "kernels": kernels})
        torch.manual_seed(0)
        model = Llama(config, state, sequence_parallel=True)
        spy = _HookArrivals(model)
        opt = ZeroOptimizer(model, state, OptimizerConfig(), model.split_parameter_names(), micro_batches=2)
        if not direct:
            for p in model.parameters():
                grad_into_buffer.unregister(p)
        opt.zero_grad(2)
        with spy:
            for x, y in zip(tokens[:, :-1].chunk(2), tokens[:, 1:].chunk(2)):
                (model(x, y)[1] / 2).backward()
        grads = {n: opt.grad_view(p).clone() for n, p in model.named_parameters()}
        out[kernels, direct] = (Counter(spy.written), grads)
        opt.remove_hooks()
    torch.save(out, out_dir / f"sp{rank}.pt")


def test_sequence_parallel_projections_write_into_the_buffer(tmp_path):
    from distributed import run_distributed

    run_distributed(_sequence_parallel_worker, 2, tmp_path)
    for rank, kernels in itertools.product(range(2), ("reference", "triton")):
        out = torch.load(tmp_path / f"sp{rank}.pt")
        (direct_hooked, direct), (hooked, reference) = out[kernels, True], out[kernels, False]
        into_buffer = _into_buffer(reference, kernels)
        assert hooked == Counter({n: 2 for n in reference})  # the hook's path: every parameter, each micro-batch
        # no linear weight (q/k/v included), no embedding; with the kernels no norm either (all of them)
        assert direct_hooked == Counter({n: 2 for n in set(reference) - into_buffer})
        assert kernels == "reference" or not direct_hooked
        for name in reference:
            torch.testing.assert_close(direct[name], reference[name], rtol=1e-5, atol=1e-8, msg=(kernels, name))
