"""Sequence parallelism keeps only each rank's chunk of a column-parallel input for the backward.

On 2 gloo ranks (TP 2, SP), the fused path (layers.column_parallel_inputs: one all-gather, the chunk
saved, gathered again in the backward) against the unfused one (gather once, each matmul saves the
gathered (B, S, h)): the loss and every gradient are bit-identical, and the bytes autograd keeps drop
by exactly (p - 1)/p of one gathered input per attention, MLP and LM head.
"""
import torch

from distributed import run_distributed
from megamath.model import llama as llama_module
from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.parallel.layers import ColumnParallelLinear, tp_region_input
from megamath.parallel.state import ParallelState

CONFIG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                     max_seq_length=32, kernels="reference")  # no other activation is (B, S, 32) at TP 2
B, S = 2, 8


def _unfused(x, layers, group, sequence_parallel, fuse=False, epilogue=None):
    assert epilogue is None  # the reference ops rotate q and k themselves
    x_tp = tp_region_input(x, group, sequence_parallel)  # (B, S, h), saved by every matmul below
    return [m(x_tp, input_is_tp_region=True) for m in layers]


def _unfused_column_forward(self, x, input_is_tp_region=False):
    """ColumnParallelLinear.forward as it was: gather, then a matmul that saves the gathered input."""
    if not input_is_tp_region:
        x = tp_region_input(x, self.group, self.sequence_parallel)  # (B, S, in)
    return torch.nn.functional.linear(x, self.weight)


def _run(state):
    torch.manual_seed(0)
    model = Llama(CONFIG, state, sequence_parallel=True)
    tokens = torch.randint(0, CONFIG.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
    storages = {}  # every distinct storage autograd keeps for the backward: its bytes

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, sum(storages.values())


def _worker(rank, world_size, out_dir):
    state = ParallelState.from_env(2)
    fused = _run(state)
    original, original_head = llama_module.column_parallel_inputs, ColumnParallelLinear.forward
    llama_module.column_parallel_inputs, ColumnParallelLinear.forward = _unfused, _unfused_column_forward
    try:
        unfused = _run(state)
    finally:
        llama_module.column_parallel_inputs, ColumnParallelLinear.forward = original, original_head
    torch.save({"fused": fused, "unfused": unfused}, out_dir / f"sp-{rank}.pt")


def test_fused_sequence_parallel_input_is_bit_exact_and_not_saved_whole(tmp_path):
    run_distributed(_worker, 2, tmp_path)
    for rank in range(2):
        saved = torch.load(tmp_path / f"sp-{rank}.pt")
        (loss_f, grads_f, bytes_f), (loss_u, grads_u, bytes_u) = saved["fused"], saved["unfused"]
        assert torch.equal(loss_f, loss_u)
        for name in grads_u:
            assert torch.equal(grads_f[name], grads_u[name]), (rank, name)
        # Per attention, MLP and LM head: the (B, S, h) fp32 gathered input no longer kept, its (B, S/2, h)
        # chunk kept instead (which the unfused path did not need: the norm's output is not saved otherwise).
        regions, p = 2 * CONFIG.num_layers + 1, 2
        assert bytes_u - bytes_f == regions * B * S * CONFIG.hidden_size * 4 * (1 - 1 / p), (bytes_u, bytes_f)
