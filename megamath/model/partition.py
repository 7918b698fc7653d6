"""The Llama parameters by name: their serial shapes, and how tensor and sequence parallelism treat each one.

Which weights tensor parallelism splits, along which dim, and which are sequence-parallel is a property
of a parameter's *name* and the config, so it lives here as one table that depends on nothing but
`ModelConfig`. The model (its init), Hugging Face import, checkpoints, `megamath reshard`, ZeRO-1's
gradient norm and the sequence-parallel gradient sum all read it. Nothing is read from attributes hung on
parameter tensors: `nn.Module.to_empty`, `load_state_dict(assign=True)`, `torch.compile` or FSDP-style
wrappers replace those tensors and their attributes silently vanish (a TP run initialised from Hugging
Face weights once computed its gradient norm as if nothing were split).

The rules, p = tp_size (Megatron-LM's layout; see megamath.parallel.layers):
    q, gate, up                          dim 0 split: rank r holds rows [r·n/p, (r+1)·n/p)
    embed_tokens, lm_head                dim 0 split over a vocabulary V that p need not divide: rank r holds
                                         ceil(V/p) rows, the serial rows vocab_range(V, p, r) and zero rows
                                         after them (padding, on the last rank(s) only; see below)
    k, v                                 dim 0 split when p divides num_kv_heads, else replicated whole
    o, down                              dim 1 split
    norms                                replicated; sequence-parallel under SP (each rank's gradient
                                         covers only its sequence chunk and is summed over TP)

The vocabulary padding rule is `vocab_rows_per_rank` / `vocab_range` (defined in megamath.parallel.vocab_split,
below the layers that need it, and re-exported here); the layers, the loss, state dicts, reshard, generation
and the planner call it. `model.vocab_size` stays the true V everywhere a user sees it. Unlike Megatron-LM's
loader (which pads with copies of the last row and trains them, so the extra logits enter the softmax), the
padding rows are zero, never looked up, never multiplied into a logit (the LM head uses a view of its valid
rows), so they get zero gradients and keep zero Adam moments, and every serial tensor is made with them
stripped: a padded TP run computes what TP 1 computes.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamath.model.config import ModelConfig
from megamath.parallel.vocab_split import vocab_range, vocab_rows_per_rank  # the rule, re-exported here

_ROW_SPLIT = ("q_proj", "gate_proj", "up_proj")
_KV = ("k_proj", "v_proj")
_COLUMN_SPLIT = ("o_proj", "down_proj")


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is laid out over the tensor-parallel ranks."""

    shape: tuple[int, ...]
    """The serial (unsplit) shape."""
    partition_dim: int | None
    """The dim TP splits, or None where every TP rank holds the whole tensor."""
    sequence_parallel: bool
    """True for replicated weights applied to sequence chunks under SP: their gradients are summed over TP."""

    @property
    def tensor_parallel(self) -> bool:
        """True when the TP ranks hold different pieces (a gradient norm sums their squares over TP)."""
        return self.partition_dim is not None


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names, in Llama's own order, with their serial shapes (no model needs to be built)."""
    h, d, f, v = config.hidden_size, config.head_dim, config.ffn_hidden_size, config.vocab_size
    shapes = {"embed_tokens.weight": (v, h)}
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        shapes.update({  # the order of Llama.named_parameters() (the ZeRO flat layout follows it)
            prefix + "input_layernorm.weight": (h,),
            prefix + "self_attn.q_proj.weight": (config.num_heads * d, h),
            prefix + "self_attn.k_proj.weight": (config.num_kv_heads * d, h),
            prefix + "self_attn.v_proj.weight": (config.num_kv_heads * d, h),
            prefix + "self_attn.o_proj.weight": (h, config.num_heads * d),
            prefix + "post_attention_layernorm.weight": (h,),
            prefix + "mlp.gate_proj.weight": (f, h),
            prefix + "mlp.up_proj.weight": (f, h),
            prefix + "mlp.down_proj.weight": (h, f),
        })
    shapes.update({"norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


VOCAB_PARAMETERS = ("embed_tokens.weight", "lm_head.weight")
"""The parameters with one row per vocabulary id: split by vocab_range, padded on the last rank(s)."""


def vocab_tp_sizes(vocab_size: int, limit: int = 16) -> list[int]:
    """The TP sizes up to `limit` at which every rank owns at least one vocabulary id."""
    return [t for t in range(1, limit + 1) if (t - 1) * vocab_rows_per_rank(vocab_size, t) < vocab_size]


def check_tensor_parallel(config: ModelConfig, tp_size: int) -> None:
    """The sizes TP splits must be divisible by tp_size (KV heads need not: they are replicated); the
    vocabulary need not be (padded, vocab_range), as long as every rank owns at least one id."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp_size!r}")
    for field in ("num_heads", "ffn_hidden_size"):
        if getattr(config, field) % tp_size:
            raise ValueError(f"tensor-parallel size {tp_size} does not divide {field} {getattr(config, field)}")
    v = config.vocab_size
    if vocab_range(v, tp_size, tp_size - 1)[0] >= v:
        # A rank of padding only would hold an empty vocabulary slice: refused rather than supported, since
        # it takes a vocabulary smaller than about p² ids (never a real tokenizer's).
        fitting = ", ".join(str(t) for t in vocab_tp_sizes(v))
        raise ValueError(f"tensor-parallel size {tp_size} would leave TP rank {tp_size - 1} no vocabulary id of "
                         f"vocab_size {v} ({vocab_rows_per_rank(v, tp_size)} rows per rank): use a TP size at "
                         f"which every rank owns some ({fitting})")


def _projection(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""  # "layers.3.self_attn.q_proj.weight" -> "q_proj"


def tp_partition_dim(name: str, config: ModelConfig, tp_size: int) -> int | None:
    """The dim of serial tensor `name` that TP splits, or None where every rank holds all of it.

    At tp_size 1 the split weights keep their dim (a split into one piece), so the optimizer's flat layout
    and the norm's bookkeeping are the same function of the name at every TP size.
    """
    if name in VOCAB_PARAMETERS:
        return 0
    projection = _projection(name)
    if projection in _ROW_SPLIT:
        return 0
    if projection in _KV:
        return 0 if config.num_kv_heads % tp_size == 0 else None
    if projection in _COLUMN_SPLIT:
        return 1
    return None  # norms


def is_norm_weight(name: str) -> bool:
    return name == "norm.weight" or name.endswith("layernorm.weight")


def check_names_and_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str,
                           describe=str, join=", ".join) -> None:
    """`found` must hold exactly `expected`'s names with its shapes; errors say `what` and name the tensors
    (`describe` maps a name to the one the user sees, e.g. Hugging Face's)."""
    missing = [describe(n) for n in expected if n not in found]
    if missing:
        raise ValueError(f"{what} is missing tensors: {join(missing)}")
    unknown = sorted(describe(n) for n in found if n not in expected)
    if unknown:
        raise ValueError(f"{what} has unknown tensors: {join(unknown)}")
    wrong = [f"{describe(n)} {tuple(found[n])} (expected {shape})" for n, shape in expected.items()
             if tuple(found[n]) != shape]
    if wrong:
        raise ValueError(f"{what} tensors have wrong shapes: {join(wrong)}")


def local_shape(shape: tuple[int, ...], dim: int | None, tp_size: int) -> tuple[int, ...]:
    """A parameter's shape on one TP rank, padding included: ceil(n/p) along dim (n/p where p divides n, as
    check_tensor_parallel demands of every split dim but the vocabulary's)."""
    return shape if dim is None else shape[:dim] + (vocab_rows_per_rank(shape[dim], tp_size),) + shape[dim + 1:]


def partition_table(config: ModelConfig, tp_size: int = 1, sequence_parallel: bool = False) -> dict[str, ParamSpec]:
    """Every parameter's ParamSpec at this TP size (SP applies only when tp_size > 1), in Llama's order."""
    check_tensor_parallel(config, tp_size)
    sp = bool(sequence_parallel) and tp_size > 1
    return {name: ParamSpec(shape, tp_partition_dim(name, config, tp_size), sp and is_norm_weight(name))
            for name, shape in parameter_shapes(config).items()}


def local_shapes(config: ModelConfig, tp_size: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape on one rank of TP size tp_size, in Llama's order."""
    return {name: local_shape(spec.shape, spec.partition_dim, tp_size)
            for name, spec in partition_table(config, tp_size).items()}


def replicated_kv_heads(config: ModelConfig, tp_rank: int, tp_size: int) -> tuple[int, int, list[int] | None]:
    """When tp_size does not divide the KV heads: (first, count) of the KV heads this rank's query heads read
    (serial rule: query head j reads j // (Hq / Hkv)), and the local KV head of each local query head when
    they do not group evenly (e.g. Hq 6, Hkv 3, p 2: rank 0 reads 0, 0, 1), else None.

    The attention layer projects only those heads (and expands them by that list); the planner counts them.
    """
    q_local, group_size = config.num_heads // tp_size, config.num_heads // config.num_kv_heads
    kv_of_q = [(tp_rank * q_local + i) // group_size for i in range(q_local)]  # global KV head per local q
    first, n_kv = kv_of_q[0], kv_of_q[-1] - kv_of_q[0] + 1
    local = [k - first for k in kv_of_q]
    even = q_local % n_kv == 0 and local == [i // (q_local // n_kv) for i in range(q_local)]
    return first, n_kv, None if even else local
