"""The Llama / Code Llama architecture: pre-norm blocks of GQA attention with RoPE and a SwiGLU MLP.

No biases, untied embedding and LM head, RMSNorm before each sub-block and once at the end. Parameter
names follow Hugging Face's `LlamaForCausalLM` minus its `model.` prefix (`embed_tokens`,
`layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, `layers.N.input_layernorm`, `norm`, `lm_head`),
so checkpoint conversion is a renaming. Head counts are read from the projections' widths, so the same
code runs whole or tensor-parallel.

Tensor parallelism (Megatron-LM's layout, p = tp_size, r = tp_rank; see megamath.parallel.layers):
    q, k, v, gate, up, lm_head   column-parallel: rank r holds rows [r·n/p, (r+1)·n/p) of the serial weight
    o, down                      row-parallel: rank r holds columns [r·n/p, (r+1)·n/p)
    embed_tokens                 vocab-parallel: rows [r·V/p, (r+1)·V/p)
    (embed_tokens and lm_head when p does not divide V: ceil(V/p) rows, vocab_range(V, p, r) then zeros)
    norms                        replicated
Attention heads split: rank r runs query heads [r·Hq/p, (r+1)·Hq/p). KV heads split the same way when
p divides Hkv; otherwise every rank holds all Hkv heads' k/v weights (replicated, the serial tensors
unchanged) and projects only the contiguous range of KV heads its query heads read. The vocabulary need not
be divisible by p: the last rank(s) hold zero padding rows that nothing reads (megamath.model.partition's
vocab_range; the LM head multiplies only its valid rows). The LM head's logits stay split, (B, S, V/p) per
rank ((B, S, stop - start) with padding), and the loss is the vocabulary-parallel cross-entropy over them,
told each rank's true vocabulary start. megamath.model.tp_state_dict turns a serial state dict into rank
r's and back, bit-exact.

Sequence parallelism (on top of TP): the residual stream is sequence first, (S, B, h) as in Megatron-LM,
so that the sequence collectives move contiguous memory (megamath.parallel.mappings); the norms and the
embedding's output hold an (S/p, B, h) chunk of the sequence; each attention / MLP all-gathers its input
and reduce-scatters its output. Only attention looks at the layout: it sees q, k, v as (B, S, H, D)
views of the (S, B, ·) projections (the kernels take strides and allocate in their inputs' order), and
the model's inputs and outputs stay batch first: tokens and targets (B, S) are read transposed, the
logits are returned as a (B, S, V/p) view. The norm weights' gradients are then partial per rank:
after the backward the training step sums `model.sequence_parallel_parameters()`' gradients over TP
(megamath.parallel.sequence_parallel.allreduce_sequence_parallel_grads; with the ZeRO optimizer the
gradients live in its flat buffer).

Which parameter is split along which dim, and which is sequence-parallel, is decided by name in
megamath.model.partition (`model.partition`), never by attributes on the parameter tensors, which
`to_empty` and other re-creations of parameters drop.

With no parallel state (or tp_size 1) every collective is the identity and the model is the serial one.
The elementwise and attention work goes through `ops.get_ops`, i.e. Triton kernels or their references.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

from megamath.model.config import ModelConfig
from megamath.model.attention import QKVLayout, heads_view, with_attention
from megamath.model.ops import Ops, get_ops
from megamath.model.partition import (
    VOCAB_PARAMETERS, ParamSpec, check_tensor_parallel, is_norm_weight, partition_table, replicated_kv_heads,
)
from megamath.parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, TPReplicatedLinear, VocabParallelEmbedding, VocabParallelLMHead,
    column_parallel_inputs, fuses, shard_tensor, tp_region_input,
)
from megamath.parallel.back_to_back import adjacent_order
from megamath.parallel.state import ParallelState


def swap_batch_seq(t: torch.Tensor, swap: bool) -> torch.Tensor:
    """Dims 0 and 1 swapped (a view) when `swap`, the stream being sequence first: (S, B, ...) <-> (B, S, ...).

    Its own inverse, so it both reads batch-first tensors (tokens, targets) into the sequence-first stream
    and shows sequence-first ones (q, k, v, logits) as the (B, S, ...) the kernels and callers expect.
    """
    return t.transpose(0, 1) if swap else t


@dataclass(frozen=True)
class RoPEOnProjection:
    """RoPE applied in place to the q and k slices of the fused q/k/v projection's output, and its transpose
    (the rotation by -angle) to their gradients: a fused_linear.Epilogue.

    Why: nothing needs q and k before RoPE. Rotated where they lie, autograd keeps the one (·, q+k+v) output
    for attention's backward; rotated into new tensors, it would keep those too, beside the output that v is
    a view of: Hq·D/p + Hkv·D/p values per token and layer, ~12 % of a Llama-7B layer's activations (2 GiB at
    S 4096, micro-batch 1), which the memory planner rightly does not count. And the attention kernel, writing
    dq, dk, dv as slices of one tensor laid out like the output, hands the matmul its gradient without a
    concatenating copy.
    """

    rope_: Callable
    theta: float
    position_offset: int
    head_dim: int
    sequence_first: bool

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, inverse: bool) -> None:
        q, k = (heads_view(t, self.head_dim, self.sequence_first) for t in (q, k))
        self.rope_(q, k, self.theta, self.position_offset, inverse=inverse)

    def forward_(self, outputs: list[torch.Tensor]) -> None:
        self._rotate(outputs[0], outputs[1], inverse=False)  # q, k (, v untouched)

    def backward_(self, grads: list[torch.Tensor]) -> None:
        self._rotate(grads[0], grads[1], inverse=True)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², -1) + eps) · weight (weight starts at ones).

    Under sequence parallelism each rank's weight gradient covers only its sequence chunk; the partition
    table (megamath.model.partition) names these weights, and the training step sums their gradients
    over TP (allreduce_sequence_parallel_grads).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None,
                ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) for h = residual + delta (residual itself when delta is None): the pre-norm block's
        residual add fused into its norm. Called as a module, so that forward pre-hooks (ZeroOptimizer's wait
        for the weight's all-gather) run before the weight is read."""
        if delta is None:
            return residual, ops.rms_norm(residual, self.weight, self.eps)
        return ops.add_rms_norm(residual, delta, self.weight, self.eps)


class Attention(nn.Module):
    """Causal grouped-query attention: Hq query heads share Hkv key/value heads (Hq / Hkv per group)."""

    def __init__(self, config: ModelConfig, parallel: ParallelState, sequence_parallel: bool = False):
        super().__init__()
        h, d, p = config.hidden_size, config.head_dim, parallel.tp_size
        self.head_dim = d
        self.rope_theta = config.rope_theta
        self.group, self.sequence_parallel = parallel.tp_group, sequence_parallel
        tp = dict(group=parallel.tp_group, sequence_parallel=sequence_parallel)
        self.q_proj = ColumnParallelLinear(h, config.num_heads * d, **tp)
        self.kv_replicated = config.num_kv_heads % p != 0
        kv_layer = TPReplicatedLinear if self.kv_replicated else ColumnParallelLinear
        self.k_proj = kv_layer(h, config.num_kv_heads * d, **tp)
        self.v_proj = kv_layer(h, config.num_kv_heads * d, **tp)
        self.o_proj = RowParallelLinear(config.num_heads * d, h, **tp)
        self.kv_rows, self.kv_expand = slice(None), None
        self._kv_index_by_device: dict[torch.device, torch.Tensor] = {}
        if self.kv_replicated:
            self._plan_replicated_kv(config, parallel.tp_rank, p)

    def _plan_replicated_kv(self, config: ModelConfig, tp_rank: int, p: int) -> None:
        """Which KV heads this rank's query heads read (partition.replicated_kv_heads): a contiguous range,
        whose rows of k/v alone are projected. When each of them serves the same number of consecutive local
        query heads, flash attention's GQA grouping applies as is; otherwise k and v are expanded to one head
        per local query head.
        """
        first, n_kv, expand = replicated_kv_heads(config, tp_rank, p)
        self.kv_rows = slice(first * self.head_dim, (first + n_kv) * self.head_dim)
        if expand is not None:
            self.kv_expand = expand

    def local_heads(self) -> tuple[int, int]:
        """(query heads, KV heads) that this rank's attention kernel sees."""
        hq = self.q_proj.weight.shape[0] // self.head_dim
        if self.kv_expand is not None:
            return hq, hq  # k and v are expanded to one head per local query head
        rows = self.kv_rows if self.kv_replicated else slice(0, self.k_proj.weight.shape[0])
        return hq, (rows.stop - rows.start) // self.head_dim

    def _fuses_qkv(self, ops: Ops) -> bool:
        """Whether the forward projects q, k, v with one matmul (with the kernels, weights back to back)."""
        return not self.kv_replicated and fuses([self.q_proj, self.k_proj, self.v_proj], ops.backend == "triton")

    def qkv_layout(self, ops: Ops) -> QKVLayout:
        """How the forward hands q, k, v to attention with these ops (what choose_attention races them on)."""
        order = None
        if self._fuses_qkv(ops):
            order = tuple(adjacent_order([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        return QKVLayout(order, self.sequence_parallel)

    def _kv_index(self, device: torch.device) -> torch.Tensor:
        """kv_expand as an index tensor on `device`, built once per device: a host-to-device copy in every
        forward would cost a copy and a stream sync each time. Not a buffer: to_empty would leave it garbage."""
        index = self._kv_index_by_device.get(device)
        if index is None:
            index = self._kv_index_by_device[device] = torch.tensor(self.kv_expand, device=device)
        return index

    def _project_kv(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kv_replicated:
            return proj(x, rows=self.kv_rows)
        return proj(x, input_is_tp_region=True)

    def forward(self, x: torch.Tensor, ops: Ops, position_offset: int, cache=None) -> torch.Tensor:
        """x (B, S, h) -> (B, S, h); under SP (S/p, B, h) -> (S/p, B, h), sequence first."""
        epilogue = None
        if self.kv_replicated:
            x = tp_region_input(x, self.group, self.sequence_parallel)  # (B, S, h); from (S/p, B, h) under SP
            q, k, v = self.q_proj(x, input_is_tp_region=True), self._project_kv(self.k_proj, x), \
                self._project_kv(self.v_proj, x)
        else:  # under SP: one all-gather, and the gathered (B, S, h) is not kept for the backward
            layers, fuse = [self.q_proj, self.k_proj, self.v_proj], ops.backend == "triton"
            if cache is None and ops.rope_ is not None and self._fuses_qkv(ops):
                epilogue = RoPEOnProjection(ops.rope_, self.rope_theta, position_offset, self.head_dim,
                                            self.sequence_parallel)
            q, k, v = column_parallel_inputs(x, layers, self.group, self.sequence_parallel, fuse, epilogue)
        n0, n1 = q.shape[:2]  # (B, S), or (S, B) under SP
        q, k, v = (heads_view(t, self.head_dim, self.sequence_parallel) for t in (q, k, v))  # (B, S, H/p, D)
        if cache is not None:  # decoding: per-row positions and past keys (megamath.generation.kv_cache)
            kv_index = self._kv_index(k.device) if self.kv_expand is not None else None
            o = cache.attend(q, k, v, self.rope_theta, kv_index)  # (B, S, Hq/p, D)
            return self.o_proj(o.reshape(n0, n1, -1))  # (B, S, h): no SP with a cache
        if epilogue is None:  # else already rotated, in place in the projection's output
            q, k = ops.rope(q, k, self.rope_theta, position_offset)  # (B, S, Hq/p, D), (B, S, Hkv/p, D)
        if self.kv_expand is not None:
            index = self._kv_index(k.device)
            k, v = k.index_select(2, index), v.index_select(2, index)  # (B, S, Hq/p, D)
        o = ops.flash_attention(q, k, v, causal=True)  # (B, S, Hq/p, D); scale 1/sqrt(D)
        o = swap_batch_seq(o, self.sequence_parallel).reshape(n0, n1, -1)  # (B, S, Hq·D/p), or (S, B, ·) under SP
        return self.o_proj(o)  # (B, S, h), or (S/p, B, h) under SP


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)); gate and up split by columns, down by rows."""

    def __init__(self, config: ModelConfig, parallel: ParallelState, sequence_parallel: bool = False):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.group, self.sequence_parallel = parallel.tp_group, sequence_parallel
        tp = dict(group=parallel.tp_group, sequence_parallel=sequence_parallel)
        self.gate_proj = ColumnParallelLinear(h, f, **tp)
        self.up_proj = ColumnParallelLinear(h, f, **tp)
        self.down_proj = RowParallelLinear(f, h, **tp)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        gate, up = column_parallel_inputs(x, [self.gate_proj, self.up_proj], self.group, self.sequence_parallel,
                                          fuse=ops.backend == "triton")  # one matmul inside ZeRO's buffer
        a = ops.swiglu(gate, up)  # (B, S, ffn/p); the kernel reads fused halves in place
        return self.down_proj(a)  # (B, S, h), or (S/p, B, h) under SP; a is (B, S, ffn/p) / (S, B, ffn/p)


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(·)): pre-norm keeps the residual stream un-normalized.

    The stream enters and leaves as a pair (residual, delta) whose sum is x: each norm adds the branch output
    that precedes it to the stream in the same pass (ops.add_rms_norm), so the block's last add is done by
    the next block's first norm (or the final norm), not here.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelState, sequence_parallel: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, parallel, sequence_parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config, parallel, sequence_parallel)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, ops: Ops, position_offset: int,
                cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, delta) in, x = residual + delta (delta None: x = residual); (residual, delta) out."""
        x, normed = self.input_layernorm(residual, delta, ops)  # (B, S, h) each
        attended = self.self_attn(normed, ops, position_offset, cache)  # (B, S, h)
        x, normed = self.post_attention_layernorm(x, attended, ops)
        return x, self.mlp(normed, ops)  # their sum is the block's output


class Llama(nn.Module):
    """Decoder-only Llama; `Llama(ModelConfig.from_preset("tiny"))` trains with torch.optim.AdamW.

    `Llama(config, parallel, sequence_parallel=True)` is rank parallel.tp_rank's tensor-parallel part.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, sequence_parallel: bool = False):
        super().__init__()
        parallel = parallel or ParallelState.single()
        check_tensor_parallel(config, parallel.tp_size)
        if parallel.tp_size > 1 and parallel.tp_group is None:
            raise ValueError(f"tensor-parallel size {parallel.tp_size} needs a tp_group")
        self.config = config
        self.parallel = parallel
        self.sequence_parallel = bool(sequence_parallel) and parallel.tp_size > 1
        sp = self.sequence_parallel
        self.partition: dict[str, ParamSpec] = partition_table(config, parallel.tp_size, sp)
        self.attention = config.attention
        """"megamath", "sdpa" or an SDPA backend ("sdpa-cudnn", ...) once a run has settled "auto"
        (megamath.model.attention.choose_attention)."""
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel.tp_group, sp)
        self.layers = nn.ModuleList(Block(config, parallel, sp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = VocabParallelLMHead(config.hidden_size, config.vocab_size, parallel.tp_group, sp)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; o_proj and down_proj get init_std / sqrt(2L).

        Each block adds two outputs (attention's o_proj, the MLP's down_proj) to the residual stream,
        2L additions in all; scaling those projections by 1/sqrt(2L) keeps the stream's variance at
        initialization independent of depth (GPT-2 / Megatron's scaled init). Norm weights start at 1.
        Under TP each split weight is drawn whole and sliced, in the serial order: a TP rank seeded like
        the serial model holds exactly the serial model's slices.
        """
        std = self.config.init_std
        scaled_std = std / math.sqrt(2 * self.config.num_layers)
        p, r = self.parallel.tp_size, self.parallel.tp_rank
        for name, param in self.named_parameters():
            spec = self.partition[name]
            if is_norm_weight(name):
                param.fill_(1.0)
                continue
            dim = spec.partition_dim
            full = param
            if p > 1 and dim is not None:
                full = param.new_empty(spec.shape)
            full.normal_(0.0, scaled_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)
            if full is not param:
                param.copy_(shard_tensor(full, dim, p, r, name, padded=name in VOCAB_PARAMETERS))  # padding: 0

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, position_offset: int = 0,
                cache=None, loss_grad: float | None = 1.0):
        """tokens (B, S) int -> logits (B, S, V), or (logits, loss) when targets (B, S) are given.

        The loss is the mean cross-entropy over targets != -100. `position_offset` shifts RoPE's
        positions (the first token sits at that position). Under TP every rank of the group gets the same
        tokens and targets; the logits are this rank's vocabulary slice (B, S, V/p), columns
        [r·V/p, (r+1)·V/p), or (B, S, stop - start) for vocab_range's ids when p does not divide V
        (`megamath.parallel.layers.gather_vocab_logits` joins them), the loss is the full-vocabulary loss,
        the same on every rank.

        `cache` (a `megamath.generation.kv_cache.KVCache`, generation only) holds the keys and values of
        earlier calls and each row's positions; `position_offset` is then the number of slots already
        filled, and only the last position's logits (B, 1, V/p) are computed: decoding needs no more, and
        a long prompt's (B, S, V) logits would be the step's largest tensor.

        `loss_grad`: the gradient the caller will send back into the loss (1.0 for `loss.backward()`, 1/k for
        `(loss / k).backward()`; None: unknown). The loss kernel then writes the logits' gradient in its
        forward pass over them, one pass fewer; another gradient still gets the exact result, at the cost of
        that pass (see kernels.cross_entropy's `expected_grad`).
        """
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must be an integer tensor of shape (batch, seq), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        b, s = tokens.shape
        if position_offset < 0 or position_offset + s > self.config.max_seq_length:
            raise ValueError(f"positions {position_offset}..{position_offset + s - 1} exceed max_seq_length "
                             f"{self.config.max_seq_length}")
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}")
        if cache is not None and (targets is not None or self.sequence_parallel):
            raise ValueError("a KV cache is for generation: no targets, no sequence parallelism")
        if self.sequence_parallel and s % self.parallel.tp_size:
            raise ValueError(f"sequence parallelism needs the sequence length {s} to be divisible by the "
                             f"tensor-parallel size {self.parallel.tp_size}")
        ops = with_attention(get_ops(self.config.kernels, tokens.device), self.attention)
        sequence_first = self.sequence_parallel
        x = self.embed_tokens(swap_batch_seq(tokens, sequence_first))  # (B, S, h), or (S/p, B, h) under SP
        delta = None  # the stream is x + delta (Block's docstring)
        checkpointing = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, delta = layer(x, delta, ops, position_offset, cache.layers[i])  # (B, S, h) each
            elif checkpointing:  # one tensor kept per layer, as without the fused add: the sum goes in
                x = x if delta is None else x + delta
                x, delta = torch.utils.checkpoint.checkpoint(layer, x, None, ops, position_offset,
                                                             use_reentrant=False)
            else:
                x, delta = layer(x, delta, ops, position_offset)  # (B, S, h), or (S/p, B, h) under SP
        if cache is not None:
            x, delta = x[:, -1:], None if delta is None else delta[:, -1:]  # (B, 1, h)
        _, x = self.norm(x, delta, ops)  # (B, S, h), or (S/p, B, h) under SP
        logits = self.lm_head(x)  # (B, S, V/p), or (S, B, V/p) under SP
        if targets is None:
            return swap_batch_seq(logits, sequence_first)  # (B, S, V/p)
        targets = swap_batch_seq(targets, sequence_first)  # in the logits' order
        loss = self._cross_entropy(ops, logits.view(b * s, -1), targets.reshape(b * s), loss_grad)  # ()
        return swap_batch_seq(logits, sequence_first), loss  # (B, S, V/p), a view under SP

    def _cross_entropy(self, ops: Ops, logits: torch.Tensor, targets: torch.Tensor,
                       loss_grad: float | None = None) -> torch.Tensor:
        """Mean over targets != -100 of logits (N, V/p); vocabulary-parallel over the TP group when p > 1,
        where this rank's columns are the ids [lm_head.vocab_start, vocab_stop) (not rank · width: with
        padding the last rank's logits are narrower)."""
        if self.parallel.tp_size == 1:
            return ops.cross_entropy(logits, targets, ignore_index=-100, group=None, expected_grad=loss_grad)
        return ops.cross_entropy(logits, targets, ignore_index=-100, group=self.parallel.tp_group,
                                 vocab_start=self.lm_head.vocab_start, vocab_size=self.config.vocab_size,
                                 expected_grad=loss_grad)

    def split_parameter_names(self) -> set[str]:
        """Names of the parameters TP splits (each TP rank holds a different piece), from the partition table."""
        return {name for name, spec in self.partition.items() if spec.tensor_parallel}

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are partial per TP rank under SP (the norm weights), by the table."""
        return [p for name, p in self.named_parameters() if self.partition[name].sequence_parallel]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups in Megatron's convention: decay the matrices, not the norm weights (1-D)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
