"""The time of one optimizer step: compute at a stated efficiency plus the communication left exposed.

Why this shape: at Llemma's scale a step is matmuls plus three kinds of communication, and only their
exposed parts add up. The model, with every constant from hardware.py:

compute    the FLOPs a step runs over peak × efficiency: per token ModelConfig.flops_per_token (Megatron's count,
           causal attention halved: the model FLOPs of MFU) plus, with activation checkpointing, each block's
           forward once more in the backward, but for its down projection (hardware_flops_per_token), × the
           tokens of one DP rank's step / tp. Forward : backward in proportion to their FLOPs (1 : 2 without
           recomputation; the recomputation belongs to the backward).
TP         per micro-batch, tp_collectives(): all-reduces of the (b, s, h) bf16 activations (under sequence
           parallelism all-gather + reduce-scatter pairs of the same bytes), ring α-β:
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


def recompute_flops_per_token(model: ModelConfig, seq_length: int) -> int:
    """FLOPs per token that activation checkpointing adds: every block's forward again, in the backward, up to
    the last tensor its backward needs. torch's checkpoint (non-reentrant, which the model uses) stops a
    block's recomputation there, at the down projection's input: the down projection and the MLP's output
    collective are not rerun, and the LM head is outside the checkpoints. So per layer the q, k, v, o, gate and
    up matmuls, 2 FLOPs per weight, and the causal attention's 2·S·h_q (flops_per_token's convention):

        2 · L · (2h·h_q + 2h·h_kv + 2h·ffn) + 2 · L · S · h_q

    not a whole forward (x 4/3 would charge 2·L·h·ffn + 2·V·h more per token; 6 % of the 34B's compute).
    """
    h, L, s = model.hidden_size, model.num_layers, seq_length
    q_width, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    return 2 * L * (2 * h * q_width + 2 * h * kv_width + 2 * h * model.ffn_hidden_size) + 2 * L * s * q_width


def hardware_flops_per_token(model: ModelConfig, seq_length: int, checkpointing: bool) -> int:
    """FLOPs per token a training step runs (HFU's count): the model FLOPs, plus the recomputation when on."""
    extra = recompute_flops_per_token(model, seq_length) if checkpointing else 0
    return model.flops_per_token(seq_length) + extra


def tp_collectives(model: ModelConfig, shape: RunShape) -> float:
    """One micro-batch's TP collectives of a (b, s, h) activation per rank, in all-reduces (an all-gather or a
    reduce-scatter of the whole tensor moves half an all-reduce's bytes):

    4L + 2      forward: the two row-parallel outputs of each block and the vocabulary-parallel embedding;
                backward: the two column-parallel inputs' gradients of each block and the LM head's
    + L + 1/2   under SP, where each becomes an all-gather + reduce-scatter pair of the same bytes: the
                backward all-gathers each column-parallel input again (2 per block and the LM head's, halves)
    + L         with checkpointing: the recomputed attention's output all-reduce (the MLP's is not rerun,
                recompute_flops_per_token); under SP + 3L/2: the attention's gather and reduce-scatter and
                the MLP's gather
    """
    L, sp = model.num_layers, shape.sequence_parallel
    count = 4 * L + 2 + (L + 0.5 if sp else 0)
    if shape.activation_checkpointing:
        count += 1.5 * L if sp else L
    return count


def step_seconds(model: ModelConfig, shape: RunShape, gpu: GPU, net: Network, layout: ZeroLayout,
                 efficiency: float) -> dict[str, float]:
    """The step's time items (seconds): compute, tp_comm, dp_reduce_scatter, dp_all_gather, optimizer (exposed
    parts), and total; plus the DP and optimizer totals, exposed or not, for reference."""
    tokens = shape.micro_batch * shape.seq_length * shape.grad_accum  # one DP rank's step
    step_flops = hardware_flops_per_token(model, shape.seq_length, shape.activation_checkpointing)
    compute = step_flops * tokens / shape.tp / (gpu.peak_tflops * 1e12 * efficiency)
    per_micro = compute / shape.grad_accum
    forward = per_micro * model.flops_per_token(shape.seq_length) / 3 / step_flops
    backward = per_micro - forward

    tp_comm = 0.0
    if shape.tp > 1:
        message = shape.micro_batch * shape.seq_length * model.hidden_size * PARAM_BYTES
        one = _ring(message, shape.tp, net.nvlink_gbs, net.alpha_intra, 2.0)
        tp_comm = shape.grad_accum * tp_collectives(model, shape) * one

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
