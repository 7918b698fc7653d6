"""q, k, v (and gate, up) as one matmul where ZeRO-1's flat buffer already stores them back to back."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamath.kernels.swiglu import swiglu
from megamath.model import Llama, ModelConfig
from megamath.parallel import grad_into_buffer
from megamath.parallel.back_to_back import adjacent_order
from megamath.parallel.fused_linear import join_last_dim, linears
from megamath.parallel.layers import column_parallel_inputs
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer

CONFIG = ModelConfig(vocab_size=64, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, ffn_hidden_size=64,
                     max_seq_length=32)


def test_adjacent_weights_make_one_matmul_with_the_same_values_and_gradients():
    buffer = torch.randn(40 * 12, generator=torch.Generator().manual_seed(0)).requires_grad_(False)
    # v, k, q back to back (ZeRO's backward order), handed over as q, k, v
    v, k, q = (t.view(-1, 12) for t in buffer.split([8 * 12, 8 * 12, 24 * 12]))
    weights = [w.clone().requires_grad_(True) for w in (q, k, v)]
    adjacent = [w.detach().requires_grad_(True) for w in (q, k, v)]  # views into one buffer, leaves
    assert adjacent_order(adjacent) == [2, 1, 0] and adjacent_order(weights) is None
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    fused, separate = linears(x, adjacent), linears(x, weights)
    assert [t.shape for t in fused] == [(3, 5, 24), (3, 5, 8), (3, 5, 8)]
    grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2 + i)) for i, t in enumerate(fused)]
    torch.autograd.backward(fused, grads)
    torch.autograd.backward(separate, grads)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(adjacent, weights):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


class _Cats(TorchDispatchMode):
    """Records the width (last dim) of every tensor aten.cat makes."""

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default:
            self.widths.append(out.shape[-1])
        return out


@pytest.mark.parametrize("sequence_major", [False, True])
def test_join_takes_slices_of_one_tensor_as_they_stand(sequence_major):
    y = torch.randn(4, 3, 10).transpose(0, 1) if sequence_major else torch.randn(3, 4, 10)
    joined = join_last_dim(list(y.split([2, 3, 5], dim=-1)))
    assert joined.data_ptr() == y.data_ptr() and joined.stride() == y.stride() and joined.shape == y.shape


def test_join_concatenates_what_is_not_one_tensor():
    y = torch.randn(3, 4, 10)
    cases = {
        "separate tensors": [t.clone() for t in y.split([2, 3, 5], dim=-1)],
        "slices out of order": list(reversed(y.split([5, 3, 2], dim=-1))),
        "slices of a wider tensor": list(y[..., :9].split([2, 3, 4], dim=-1)),
        "slices of different rows": [y[0, :, :5], y[1, :, 5:]],
    }
    for name, parts in cases.items():
        joined = join_last_dim(parts)
        assert joined.data_ptr() != y.data_ptr(), name
        torch.testing.assert_close(joined, torch.cat(parts, dim=-1), rtol=0, atol=0, msg=name)


def test_swiglu_hands_the_fused_gate_up_matmul_its_gradient_without_a_copy():
    """gate and up from one matmul: SwiGLU's backward writes dgate and dup as the halves of one tensor, which
    the matmul's backward takes as it stands: no concatenation, and the gradients of the unfused path."""
    gen = torch.Generator().manual_seed(4)
    buffer = torch.randn(2 * 24 * 12, generator=gen)
    up, gate = buffer.view(2, 24, 12).unbind(0)  # back to back in ZeRO's (backward) order
    adjacent = [w.detach().requires_grad_(True) for w in (gate, up)]
    separate = [w.detach().clone().requires_grad_(True) for w in adjacent]
    x, dy = torch.randn(3, 5, 12, generator=gen), torch.randn(3, 5, 24, generator=gen)
    with _Cats() as cats:
        swiglu(*linears(x, adjacent)).backward(dy)
    assert cats.widths == []
    swiglu(*linears(x, separate)).backward(dy)
    for a, b in zip(adjacent, separate):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_an_epilogue_without_one_fused_matmul_is_refused():
    """RoPE in place needs the one fused output; weights that are not back to back (a model without ZeRO's
    buffer) take three matmuls, so the model rotates q and k itself, and a caller asking otherwise is told."""
    attn = Llama(CONFIG).layers[0].self_attn
    layers, x = [attn.q_proj, attn.k_proj, attn.v_proj], torch.randn(2, 3, CONFIG.hidden_size)
    with pytest.raises(ValueError, match="column_parallel_inputs: an epilogue needs one fused matmul"):
        column_parallel_inputs(x, layers, None, False, fuse=True, epilogue=object())
    with pytest.raises(ValueError, match="linears: an epilogue needs the fused matmul"):
        linears(x, [m.weight for m in layers], epilogue=object())


def test_zero_lays_each_layers_q_k_v_and_gate_up_back_to_back():
    model = Llama(CONFIG)
    ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
    for layer in model.layers:
        attn = layer.self_attn
        assert adjacent_order([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) is not None
        assert adjacent_order([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]) is not None


def test_model_with_kernels_fuses_and_matches_the_reference_ops(monkeypatch):
    """The Triton path (interpreted on CPU) takes the fused matmul inside ZeRO's buffer; same loss and grads, and
    no concatenating copy: RoPE runs in place in the q/k/v output, and the attention and SwiGLU kernels write
    their gradients as slices of one tensor laid out like it."""
    calls = []  # the weights of each matmul of more than one (fp32 weights: each dW goes into ZeRO's buffer)
    into_buffer = grad_into_buffer._LinearIntoBuffer.apply
    monkeypatch.setattr(grad_into_buffer._LinearIntoBuffer, "apply",
                        lambda x, slots, *w: (len(w) > 1 and calls.append(len(w))) or into_buffer(x, slots, *w))
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    results = {}
    for kernels in ("reference", "triton"):
        torch.manual_seed(0)
        model = Llama(ModelConfig(**{**CONFIG.to_dict(), "kernels": kernels}))
        opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
        opt.zero_grad()
        with _Cats() as cats:
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
            loss.backward()
        results[kernels] = (loss.detach(), {n: opt.grad_view(p).clone() for n, p in model.named_parameters()})
        opt.remove_hooks()
    assert calls == [3, 2] * CONFIG.num_layers  # q/k/v and gate/up as one matmul each, kernel path only
    assert cats.widths == []  # kernel run: the q/k/v and gate/up gradients reach their matmuls as they stand
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["triton"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_recomputes_the_in_place_rope_bit_exactly():
    """The recomputed forward rotates a fresh projection output again: the same loss and gradients, bit for bit."""
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Llama(ModelConfig(**{**CONFIG.to_dict(), "kernels": "triton",
                                     "activation_checkpointing": checkpointing}))
        opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        results.append((loss.detach(), {n: opt.grad_view(p).clone() for n, p in model.named_parameters()}))
        opt.remove_hooks()
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def _sp_worker(rank, world_size, out_dir):
    from megamath.parallel import layers

    state = ParallelState.from_env(2)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    calls = []
    view = layers.fused_view
    layers.fused_view = lambda ws: calls.append(len(ws)) or view(ws)
    results = {}
    for kernels in ("reference", "triton"):
        torch.manual_seed(0)
        model = Llama(ModelConfig(**{**CONFIG.to_dict(), "kernels": kernels}), state, sequence_parallel=True)
        opt = ZeroOptimizer(model, state, OptimizerConfig(), model.split_parameter_names())
        opt.zero_grad()
        with _Cats() as cats:
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
            loss.backward()
        results[kernels] = (loss.detach(), {n: opt.grad_view(p).clone() for n, p in model.named_parameters()})
        opt.remove_hooks()
    torch.save({"results": results, "calls": calls, "cat_widths": cats.widths}, out_dir / f"sp{rank}.pt")


def test_sequence_parallel_fuses_q_k_v_too(tmp_path):
    """TP 2 with SP: the gathered input meets one fused matmul per layer (forward and backward) on the kernel
    path; loss and gradients match the reference ops' unfused path; the q/k/v and gate/up gradients need no
    joining copy (only the sequence collectives' own joins of width h remain)."""
    from distributed import run_distributed

    run_distributed(_sp_worker, 2, tmp_path)
    for rank in range(2):
        saved = torch.load(tmp_path / f"sp{rank}.pt")
        assert saved["calls"] == [3, 2] * CONFIG.num_layers + [2, 3] * CONFIG.num_layers  # fwd, then bwd
        qkv = (CONFIG.num_heads + 2 * CONFIG.num_kv_heads) * CONFIG.head_dim // 2  # one rank's q/k/v width
        assert not {qkv, CONFIG.ffn_hidden_size} & set(saved["cat_widths"])  # gradients joined as they stand
        (ref_loss, ref_grads), (loss, grads) = saved["results"]["reference"], saved["results"]["triton"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
