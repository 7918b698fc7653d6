"""The planner's step time counts the work the trainer really does: FLOPs with and without activation
checkpointing, and the tensor-parallel collectives of one micro-batch.

FLOPs: torch's FlopCounterMode over one training forward and backward of the tiny model on the reference
ops, whose attention multiplies the whole S x S score matrix: halved here, as Megatron's convention (and the
FlashAttention kernel, which skips the masked blocks) has it. With checkpointing, torch's checkpoint stops
recomputing a block at the last tensor its backward needs (the down projection's input), so a block's
recomputed forward has no down projection: charging a whole forward more (x 4/3) overstated the step.

Collectives: two gloo ranks at TP 2 count every all-reduce, all-gather and reduce-scatter of a (b, s, h)
activation (an all-gather or a reduce-scatter is half an all-reduce's bytes), with and without sequence
parallelism and checkpointing.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distributed import run_distributed
from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.planning.hardware import get_gpu
from megamath.planning.memory import RunShape, zero_layout_for
from megamath.planning.step_time import Network, hardware_flops_per_token, step_seconds, tp_collectives

MODEL = dict(vocab_size=320, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             max_seq_length=64, kernels="reference", attention="megamath")
B, S = 2, 32


def _shape(tp: int, sp: bool, checkpointing: bool) -> RunShape:
    return RunShape(tp=tp, dp=1, micro_batch=B, grad_accum=1, seq_length=S, activation_checkpointing=checkpointing,
                    sequence_parallel=sp)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_planned_flops_are_what_a_training_step_multiplies(checkpointing):
    config = ModelConfig(**MODEL, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = Llama(config)
    tokens = torch.randint(0, config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if "bmm" not in str(op))
    scores = sum(n for op, n in counts.items() if "bmm" in str(op))  # Q·Kᵀ and P·V over the whole S x S
    measured = (matmuls + scores / 2) / (B * S)
    assert measured == hardware_flops_per_token(config, S, checkpointing)

    gpu = get_gpu("h100-80gb")
    net = Network(8, gpu.nvlink_gbs, gpu.internode_gbs, gpu.alpha_intra, gpu.alpha_inter)
    layout = zero_layout_for(config, 1, 1, "fp32", 128.0)
    time = step_seconds(config, _shape(1, False, checkpointing), gpu, net, layout, 0.5)
    assert time["compute"] == pytest.approx(measured * B * S / (gpu.peak_tflops * 1e12 * 0.5))


def _collectives_worker(rank, world_size, out_dir):
    """Count one micro-batch's collectives of (b, s, h) activations per (sp, checkpointing), in all-reduces."""
    from megamath.parallel import layers, mappings
    from megamath.parallel.state import ParallelState

    calls = []
    all_reduce, all_gather, reduce_scatter = mappings.all_reduce, mappings.all_gather, mappings.reduce_scatter
    inside = []  # gloo's reduce-scatter is an all-reduce: count the reduce-scatter only

    def counted_all_reduce(x, group):
        if not inside:
            calls.append((1.0, x.nbytes))
        return all_reduce(x, group)

    def counted_all_gather(x, dim, group):
        calls.append((0.5, x.nbytes * mappings.group_size(group)))  # the gathered bytes
        return all_gather(x, dim, group)

    def counted_reduce_scatter(x, dim, group):
        calls.append((0.5, x.nbytes))
        inside.append(1)
        try:
            return reduce_scatter(x, dim, group)
        finally:
            inside.pop()

    for module in (mappings, layers):
        for name, fn in (("all_reduce", counted_all_reduce), ("all_gather", counted_all_gather),
                         ("reduce_scatter", counted_reduce_scatter)):
            if hasattr(module, name):
                setattr(module, name, fn)
    counts = {}
    state = ParallelState.from_env(2)
    for sp in (False, True):
        for checkpointing in (False, True):
            config = ModelConfig(**MODEL, activation_checkpointing=checkpointing)
            torch.manual_seed(0)
            model = Llama(config, state, sequence_parallel=sp).to(torch.bfloat16)
            tokens = torch.randint(0, config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
            calls.clear()
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            message = B * S * config.hidden_size * 2
            assert all(n == message or n <= message / 8 for _, n in calls), calls  # else: the loss's statistics
            counts[(sp, checkpointing)] = sum(weight for weight, n in calls if n == message)
    torch.save(counts, out_dir / f"collectives-{rank}.pt")


def test_planned_tp_collectives_are_what_a_micro_batch_runs(tmp_path):
    run_distributed(_collectives_worker, 2, tmp_path)
    config = ModelConfig(**MODEL)
    for rank in range(2):
        counts = torch.load(tmp_path / f"collectives-{rank}.pt")
        for (sp, checkpointing), measured in counts.items():
            assert tp_collectives(config, _shape(2, sp, checkpointing)) == measured, (rank, sp, checkpointing)
