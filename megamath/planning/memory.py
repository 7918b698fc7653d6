"""Per-GPU memory of one training configuration, item by item.

Why here and not in a spreadsheet: the large items (parameters, gradients, optimizer state) are the ZeRO-1
buffers, and their sizes come from the very functions ZeroOptimizer allocates with (zero_layout over
partition.py's per-rank shapes, zero_layout.buffer_bytes), so padding, buckets, replicated KV heads and
the dtype of the gradient buffer are counted exactly; tests compare them byte for byte with a live
optimizer. The activation items are a model of this trainer's Llama (what autograd keeps for the
backward, per token, bf16), stated below; tests/test_plan_activations.py holds it to within 1 % of the
bytes autograd really keeps on the kernel path (serial, and TP 2 with SP), which leaves the backward's
transients and the allocator to the GPU check (perf/bench_train.py).

Activations kept per token and layer (bytes; t = TP size, sp = t under sequence parallelism else 1,
h_q = heads · head_dim, kv = the local K/V width; when t does not divide the KV heads, the width of the heads
the rank's query heads read, one per query head where they do not group evenly, f = ffn size):
    2 · [ 2h/sp      the two RMSNorm inputs (the residual stream; split along the sequence under SP)
        + 2h/sp      the two norm outputs the column-parallel matmuls keep (under SP only the rank's
                     chunk: the gathered input is all-gathered again in the backward, layers._GatherLinears;
                     the attention's whole input where K/V heads are replicated, which takes the unfused path)
        + h_q/t + 2kv + h_q/t     q, k, v after RoPE and the attention output (FlashAttention; with
                     ZeRO's fused q/k/v matmul, its one output, rotated in place)
        + 3f/t ]     gate, up and their SwiGLU product
    + 4 · heads/t    FlashAttention's fp32 log-sum-exp
With activation checkpointing only each layer's input (2h/sp per token) is kept, and the layer being
recomputed in the backward holds the full set above for one layer at a time. The backward's working set
(the gradients of one layer's activations, twice that with recomputation) is counted as a transient.
Logits and loss: the (b, s, V/t) bf16 logits the cross-entropy kernel keeps, their gradient (at TP 1 written
in the forward, kept from then on; under TP made in the backward: the same peak), and per token the fp32
row max and log-sum the kernel keeps in place of a log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamath.model.config import ModelConfig
from megamath.model.partition import local_shape, partition_table, replicated_kv_heads, vocab_rows_per_rank
from megamath.parallel.zero_layout import GRAD_BYTES, ZeroLayout, bucket_numel_for, buffer_bytes, zero_layout
from megamath.planning.hardware import ALLOCATOR_HEADROOM, RUNTIME_RESERVE_BYTES

PARAM_BYTES = 2  # bf16 weights on GPUs (the trainer's param_dtype auto)


@dataclass(frozen=True)
class RunShape:
    """One way to run a model: everything that sizes a GPU's memory and its step."""

    tp: int
    dp: int
    micro_batch: int
    grad_accum: int
    seq_length: int
    activation_checkpointing: bool
    sequence_parallel: bool
    grad_dtype: str = "fp32"
    bucket_mb: float = 128.0
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    overlap_optimizer_step: bool = False


def zero_layout_for(model: ModelConfig, tp: int, dp: int, grad_dtype: str, bucket_mb: float) -> ZeroLayout:
    """The layout ZeroOptimizer builds for one TP rank of `model` (every TP rank's is the same size)."""
    table = partition_table(model, tp)
    # local_shape counts a padded vocabulary's ceil(V/p) rows: the padding is allocated (weights, gradients,
    # fp32 master and moments) even though it is never computed with.
    params = [(name, local_shape(spec.shape, spec.partition_dim, tp), spec.tensor_parallel)
              for name, spec in table.items()]
    return zero_layout(params, dp, bucket_numel_for(bucket_mb, GRAD_BYTES[grad_dtype]))


def zero_buffer_bytes(model: ModelConfig, shape: RunShape, param_bytes: int = PARAM_BYTES) -> dict[str, int]:
    """{"params", "grads", "optimizer"}: the bytes of ZeroOptimizer's flat buffers and fp32 shard on one GPU."""
    layout = zero_layout_for(model, shape.tp, shape.dp, shape.grad_dtype, shape.bucket_mb)
    return buffer_bytes(layout, param_bytes, GRAD_BYTES[shape.grad_dtype])


def _replicated_kv_heads(model: ModelConfig, tp: int) -> int:
    """K/V heads the attention keeps on the busiest rank when tp does not divide the KV heads: those its
    query heads read, or one per query head when they do not group evenly (the layer's own rule)."""
    q_local = model.num_heads // tp
    plans = (replicated_kv_heads(model, rank, tp) for rank in range(tp))
    return max(n_kv if expand is None else q_local for _, n_kv, expand in plans)


def _layer_bytes_per_token(model: ModelConfig, tp: int, sp: bool) -> float:
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q_local = model.num_heads * d / tp
    kv_split = model.num_kv_heads % tp == 0
    kv_local = (model.num_kv_heads // tp if kv_split else _replicated_kv_heads(model, tp)) * d
    seq_div = tp if sp else 1
    attn_in = h / seq_div if kv_split else h  # replicated K/V take the unfused path, which keeps the gathered input
    return 2 * (2 * h / seq_div + attn_in + h / seq_div + q_local + 2 * kv_local + q_local + 3 * f / tp) \
        + 4 * model.num_heads / tp


def activation_bytes(model: ModelConfig, shape: RunShape) -> dict[str, int]:
    """{"activations", "backward_transient", "logits_and_loss"} for one micro-batch on one GPU."""
    tokens = shape.micro_batch * shape.seq_length
    tp, sp = shape.tp, shape.sequence_parallel and shape.tp > 1
    seq_div = tp if sp else 1
    layer = _layer_bytes_per_token(model, tp, sp) * tokens
    h, L = model.hidden_size, model.num_layers
    final_norm = (2 * h / seq_div + 2 * h / seq_div) * tokens  # its input and the LM head's (a chunk under SP)
    if shape.activation_checkpointing:
        kept = L * 2 * h / seq_div * tokens + final_norm
        transient = 2 * layer  # the recomputed layer and the gradients of its activations
    else:
        kept = L * layer + final_norm
        transient = layer
    vocab_local = vocab_rows_per_rank(model.vocab_size, tp)  # memory: the widest rank's logits (no padding logits)
    logits = tokens * (2 * PARAM_BYTES * vocab_local + 8)
    return {"activations": int(kept), "backward_transient": int(transient), "logits_and_loss": int(logits)}


def memory_items(model: ModelConfig, shape: RunShape) -> dict[str, int]:
    """Every item of one GPU's peak memory, bytes, in the order a plan prints them."""
    items = zero_buffer_bytes(model, shape)
    items.update(activation_bytes(model, shape))
    items["comm_buckets"] = 0  # ZeRO's reduce-scatter and all-gather run in place on the flat buffers
    allocated = sum(items.values())
    items["allocator_headroom"] = int(ALLOCATOR_HEADROOM * allocated)
    items["runtime_reserve"] = RUNTIME_RESERVE_BYTES
    return items
