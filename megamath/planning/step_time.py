"""The time of one optimizer step: compute at a stated efficiency plus the communication left exposed.

Why this shape: at Llemma's scale a step is matmuls plus three kinds of communication, and only their
exposed parts add up. The model, with every constant from hardware.py:

compute    FLOPs per token (ModelConfig.flops_per_token: Megatron's count, causal attention) × tokens of
           one DP rank's step / tp, × 4/3 with activation checkpointing (one more forward), over
           peak × efficiency. Forward : backward = 1 : 2 (1 : 3 with recomputation inside the backward).
TP         per micro-batch, 4L + 1 collectives on the (b, s, h) bf16 activations (2 per block forward,
           2 backward, the vocabulary-parallel embedding), 2L more with recomputation; an all-reduce, or
           under sequence parallelism an all-gather + reduce-scatter pair of the same bytes, plus the
           backward's second all-gather of each column-parallel input (L + 1/2 more). Ring α-β:
           2 (t-1)/t · bytes / bw + 2 (t-1) α, inside a node (NVLink). Not overlapped: fully exposed.
DP         per step, ZeRO-1's reduce-scatter of each gradient bucket and all-gather of each parameter
           bucket, ring α-β per bucket: (d-1)/d · bytes / bw + (d-1) α, over the inter-node network when
           the job spans nodes, else NVLink. With overlap_grad_reduce the reduce-scatters hide behind the
           last micro-batch's backward except the last bucket's (the embedding's, produced last); with
           overlap_param_gather the all-gathers hide behind the next forward except the first bucket's.
optimizer  the gradient norm and AdamW over the rank's shard, memory-bound, over HBM bandwidth: per element
           the norm reads the gradient; AdamW reads the master, both moments (4 bytes each) and the gradient,
           writes the master, the moments and the bf16 weight: 26 bytes + twice the gradient buffer's (34 with
           fp32 gradients, 30 with bf16). With overlap_optimizer_step (and, under DP, overlap_param_gather,
           without which the step waits for its updates) only the norm and the first bucket's update and
           all-gather stay exposed: the other buckets' updates, then their all-gathers, fill the next forward,
           and what does not fit in it adds up. Optimistic: it ignores the HBM bandwidth the updates take from
           the forward's own memory-bound kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamath.model.config import ModelConfig
from megamath.parallel.zero_layout import GRAD_BYTES, ZeroLayout
from megamath.planning.hardware import GPU
from megamath.planning.memory import PARAM_BYTES, RunShape

OPTIMIZER_BYTES_PER_ELEMENT = 4 * 3 + 4 * 3 + 2
"""Besides the gradient: AdamW reads master, exp_avg, exp_avg_sq and writes them and the bf16 weight."""


@dataclass(frozen=True)
class Network:
    gpus_per_node: int
    nvlink_gbs: float
    internode_gbs: float
    alpha_intra: float
    alpha_inter: float


def _ring(bytes_: float, ranks: int, gbs: float, alpha: float, factor: float) -> float:
    """factor (ranks-1)/ranks · bytes / bandwidth + factor/1 · (ranks-1) · α; factor 2 for an all-reduce."""
    if ranks <= 1:
        return 0.0
    return factor * (ranks - 1) / ranks * bytes_ / (gbs * 1e9) + factor * (ranks - 1) * alpha


def step_seconds(model: ModelConfig, shape: RunShape, gpu: GPU, net: Network, layout: ZeroLayout,
                 efficiency: float) -> dict[str, float]:
    """The step's time items (seconds): compute, tp_comm, dp_reduce_scatter, dp_all_gather, optimizer (exposed
    parts), and total; plus the DP and optimizer totals, exposed or not, for reference."""
    tokens = shape.micro_batch * shape.seq_length * shape.grad_accum  # one DP rank's step
    recompute = 4 / 3 if shape.activation_checkpointing else 1.0
    compute = model.flops_per_token(shape.seq_length) * tokens * recompute / shape.tp / (
        gpu.peak_tflops * 1e12 * efficiency)
    per_micro = compute / shape.grad_accum
    forward = per_micro * (1 / 4 if shape.activation_checkpointing else 1 / 3)
    backward = per_micro - forward

    tp_comm = 0.0
    if shape.tp > 1:
        message = shape.micro_batch * shape.seq_length * model.hidden_size * PARAM_BYTES
        count = 4 * model.num_layers + 1 + (2 * model.num_layers if shape.activation_checkpointing else 0)
        if shape.sequence_parallel:  # the backward gathers each column-parallel input again: half an all-reduce
            count += model.num_layers + 0.5
        one = _ring(message, shape.tp, net.nvlink_gbs, net.alpha_intra, 2.0)
        tp_comm = shape.grad_accum * count * one

    spans_nodes = shape.tp * shape.dp > net.gpus_per_node
    bw, alpha = (net.internode_gbs, net.alpha_inter) if spans_nodes else (net.nvlink_gbs, net.alpha_intra)
    grad_b, param_b = GRAD_BYTES[shape.grad_dtype], PARAM_BYTES
    rs = [_ring((b.end - b.start) * grad_b, shape.dp, bw, alpha, 1.0) for b in layout.buckets]
    ag = [_ring((b.end - b.start) * param_b, shape.dp, bw, alpha, 1.0) for b in layout.buckets]
    rs_exposed = max(rs[-1], sum(rs) - backward) if shape.overlap_grad_reduce else sum(rs)
    norm = layout.shard_size * grad_b / (gpu.hbm_gbs * 1e9)
    adamw = [b.piece(shape.dp) * (OPTIMIZER_BYTES_PER_ELEMENT + grad_b) / (gpu.hbm_gbs * 1e9)
             for b in layout.buckets]
    if shape.overlap_optimizer_step and (shape.dp == 1 or shape.overlap_param_gather):
        # buckets[-1] holds the embedding, the forward's first: its update and gather are waited for at once;
        # the others' updates take the forward's cover first, their gathers what the updates leave of it.
        rest_adamw, rest_ag = sum(adamw[:-1]), sum(ag[:-1])
        optimizer = norm + adamw[-1] + max(0.0, rest_adamw - forward)
        ag_exposed = ag[-1] + max(0.0, rest_ag - max(0.0, forward - rest_adamw))
    else:
        optimizer = norm + sum(adamw)
        ag_exposed = max(ag[-1], sum(ag) - forward) if shape.overlap_param_gather else sum(ag)
    total = compute + tp_comm + rs_exposed + ag_exposed + optimizer
    return {"compute": compute, "tp_comm": tp_comm, "dp_reduce_scatter": rs_exposed, "dp_all_gather": ag_exposed,
            "optimizer": optimizer, "total": total, "dp_reduce_scatter_unhidden": sum(rs),
            "dp_all_gather_unhidden": sum(ag), "optimizer_unhidden": norm + sum(adamw)}
