"""Weight gradients written by their matmul into ZeRO-1's buffer (grad_into_buffer.py): the same bits as the
hook's copy, no copy of a linear weight's gradient, and autograd's path wherever the buffer cannot take one.
(Multi-rank runs, overlap, TP and the fused q/k/v and gate/up matmuls take this path too: test_zero*.py,
test_tensor_parallel.py and test_fused_linear.py compare them with their references bit for bit.)"""
import gc
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.parallel import grad_into_buffer
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=48,
                     max_seq_length=16, kernels="reference")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


class _BufferCopies(TorchDispatchMode):
    """The parameters whose gradient the hook copies (or adds) into the optimizer's buffer during the block."""

    def __init__(self, opt: ZeroOptimizer):
        super().__init__()
        self.storage = opt.flat_grad.untyped_storage().data_ptr()
        base, size = opt.flat_grad.data_ptr(), opt.flat_grad.element_size()
        self.names = {base + slot.offset * size: slot.name for slot in opt.slots}
        self.written = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.add_.Tensor) and \
                args[0].untyped_storage().data_ptr() == self.storage:
            self.written.append(self.names[args[0].data_ptr()])
        return func(*args, **(kwargs or {}))


def _steps(direct: bool, micro_batches: int = 1, dtype=torch.float32, grad_dtype: str = "auto"):
    """Three optimizer steps; with direct=False every parameter's slot is unregistered (the hook's copy). Returns
    the results and state, and per step the parameters the hook wrote into the buffer."""
    torch.manual_seed(0)
    model = Llama(CONFIG).to(dtype)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(lr=1e-2, clip_grad=0.5, grad_dtype=grad_dtype),
                        model.split_parameter_names(), micro_batches=micro_batches)
    if not direct:
        for p in model.parameters():
            grad_into_buffer.unregister(p)
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    results, hooked = [], []
    for _ in range(3):
        opt.zero_grad(micro_batches)
        with _BufferCopies(opt) as spy:
            for x, y in zip(tokens[:, :-1].chunk(micro_batches), tokens[:, 1:].chunk(micro_batches)):
                (model(x, y)[1] / micro_batches).backward()
        hooked.append(spy.written)
        results.append(opt.step(1e-2))
    out = (results, opt.master.clone(), opt.exp_avg_sq.clone(), {n: v.clone() for n, v in model.state_dict().items()})
    opt.remove_hooks()
    return out, hooked


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_same_bits_as_the_hooks_copy_without_copying_linear_weights(micro_batches):
    """fp32 weights and buffer: each linear weight's first gradient of a step is written by its matmul (the hook
    copies only the embedding and the norms); later micro-batches add through the hook. Steps, masters, moments
    and weights: bit-identical to the hook's copy of every gradient."""
    (direct, direct_hooked), (hooked, all_hooked) = (_steps(d, micro_batches) for d in (True, False))
    assert direct[0] == hooked[0]
    for a, b in zip(direct[1:3], hooked[1:3]):
        assert torch.equal(a, b)
    assert all(torch.equal(direct[3][n], hooked[3][n]) for n in direct[3])
    names = set(direct[3])
    linear = {n for n in names if n.split(".")[-2] in LINEAR}
    for step in range(3):
        assert Counter(all_hooked[step]) == Counter({n: micro_batches for n in names})  # each micro-batch, each
        first = direct_hooked[step][:len(names - linear)]  # the first micro-batch: every linear weight written
        assert set(first) == names - linear  # by its matmul, the embedding and the norms by the hook
        assert Counter(direct_hooked[step]) == Counter({n: micro_batches - (n in linear) for n in names}) - Counter()


def test_a_buffer_of_another_dtype_takes_autograds_path():
    """bf16 weights with an fp32 gradient buffer (grad_dtype fp32): no slot is offered; the hook converts and
    copies, as before."""
    torch.manual_seed(0)
    model = Llama(CONFIG).to(torch.bfloat16)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(grad_dtype="fp32"), model.split_parameter_names())
    assert grad_into_buffer._slots_for(list(model.parameters())) is None
    opt.remove_hooks()
    model = Llama(CONFIG).to(torch.bfloat16)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(grad_dtype="bf16"), model.split_parameter_names())
    assert grad_into_buffer._slots_for(list(model.parameters())) is not None  # bf16 into bf16: offered
    opt.remove_hooks()


def test_bf16_weights_into_a_bf16_buffer_match_the_hook():
    """grad_dtype auto's one-GPU case (bf16 weights, one micro-batch: a bf16 buffer) on CPU: the same bits."""
    (direct, direct_hooked), (hooked, _) = (_steps(d, dtype=torch.bfloat16) for d in (True, False))
    assert direct[0] == hooked[0]
    assert torch.equal(direct[1], hooked[1]) and torch.equal(direct[2], hooked[2])
    assert not any(n.split(".")[-2] in LINEAR for step in direct_hooked for n in step)


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


def test_a_weight_with_its_own_gradient_hook_sees_its_gradient():
    """Tensor.register_hook on a weight, even added after the forward (as a NaN-injecting test does): the hook gets
    the gradient, and what it returns is what reaches the buffer."""
    torch.manual_seed(0)
    model = Llama(CONFIG)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss = model(tokens[:, :-1], tokens[:, 1:])[1]
    seen = []
    model.lm_head.weight.register_hook(lambda g: seen.append(g.clone()) or g * 2)
    loss.backward()
    assert len(seen) == 1 and seen[0].shape == model.lm_head.weight.shape
    assert torch.equal(opt.grad_view(model.lm_head.weight), seen[0] * 2)
    opt.remove_hooks()
