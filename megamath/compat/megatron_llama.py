"""A Megatron-LM checkpoint as a Llama: `megamath convert megatron-to-hf CKPT OUT`.

Megatron-LM's own checkpoint arguments say what the model is; what megamath's Llama cannot express
(biases, LayerNorm, q/k norms, experts, interleaved or scaled RoPE, ...) is refused by the argument's
name. The weights map one to one, but for two fused tensors:
- `linear_qkv` holds, per query group, the group's query heads, then its key head, then its value head
  (heads/groups query heads per group); q, k and v are cut out of it;
- `linear_fc1` is [gate; up] (SwiGLU's first matmul): its halves are gate_proj and up_proj.
RoPE is rotate-half on both sides (Megatron-LM's default; `--rotary-interleaved` is refused), so no
weight is permuted. The output is a Hugging Face Llama folder, which `init_from_hf` starts a run from.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megamath.compat.megatron import SENTENCEPIECE_TYPES
from megamath.compat.megatron_flags import MODEL_CHANGES
from megamath.compat.megatron_checkpoint import MegatronWeights, read_megatron_checkpoint
from megamath.compat.tokenizer_ids import sentencepiece_token_ids
from megamath.model.config import ModelConfig
from megamath.model.model_folder import Deferred, save_state_as_hf
from megamath.model.partition import parameter_shapes
from megamath.model.safetensors_io import DEFAULT_MAX_SHARD_SIZE

_ARCHITECTURE = "megamath converts the Llama architecture only"


def _refuse(args: dict) -> None:
    """The checkpoint's arguments that describe a model other than Llama, each refused by name."""
    def arg(name, default=None):
        value = args.get(name, default)
        return default if value is None else value

    position = arg("position_embedding_type", "rope" if arg("use_rotary_position_embeddings", False) else None)
    wanted = (("position_embedding_type", position, "rope"), ("normalization", arg("normalization"), "RMSNorm"),
              ("swiglu", arg("swiglu", False), True), ("rotary_percent", arg("rotary_percent", 1.0), 1.0))
    for name, value, want in wanted:
        if value != want:
            raise ValueError(f"checkpoint args: {name} is {value!r}: {_ARCHITECTURE} ({name} {want!r})")
    for name in ("add_bias_linear", "add_qkv_bias", "qk_layernorm", "rotary_interleaved", "use_rope_scaling",
                 "apply_residual_connection_post_layernorm", "multi_latent_attention", "attention_output_gate"):
        if arg(name, False):
            raise ValueError(f"checkpoint args: {name} is set: {_ARCHITECTURE}")
    if arg("num_experts"):
        raise ValueError(f"checkpoint args: num_experts is {args['num_experts']!r}: {_ARCHITECTURE} (dense)")
    for name, (neutral, what) in MODEL_CHANGES.items():  # the flags `config from-megatron` refuses too
        value = arg(name)
        if value and str(value) not in neutral:
            raise ValueError(f"checkpoint args: {name} is {value!r}: {_ARCHITECTURE} (this model has {what})")
    if arg("rotary_seq_len_interpolation_factor", 1) != 1:
        raise ValueError("checkpoint args: rotary_seq_len_interpolation_factor is set: megamath computes Llama's "
                         "plain RoPE (no position interpolation)")
    heads, hidden = arg("num_attention_heads"), arg("hidden_size")
    if None in (heads, hidden, arg("num_layers"), arg("ffn_hidden_size")):
        raise ValueError("checkpoint args: num_layers, hidden_size, num_attention_heads and ffn_hidden_size are "
                         "all needed")
    if arg("kv_channels", hidden // heads) != hidden // heads:
        raise ValueError(f"checkpoint args: kv_channels {args['kv_channels']} differs from hidden_size / "
                         f"num_attention_heads = {hidden // heads}; megamath's head size is that quotient")


def llama_config(args: dict, vocab_size: int | None = None) -> ModelConfig:
    """megamath's ModelConfig of a checkpoint's arguments; `vocab_size` trims Megatron's padded vocabulary
    to the tokenizer's size (default: keep the padded size, as the checkpoint holds it)."""
    _refuse(args)
    padded = args.get("padded_vocab_size")
    if not padded:
        raise ValueError("checkpoint args: padded_vocab_size is missing")
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ValueError(f"--vocab-size {vocab_size}: must be between 1 and the checkpoint's padded vocabulary "
                         f"{padded}")
    heads = args["num_attention_heads"]
    eps = args.get("norm_epsilon") or args.get("layernorm_epsilon") or 1e-5  # the newer name, then the older
    return ModelConfig(
        vocab_size=vocab_size or padded, hidden_size=args["hidden_size"], num_layers=args["num_layers"],
        num_heads=heads, num_kv_heads=args.get("num_query_groups") if args.get("group_query_attention") else heads,
        ffn_hidden_size=args["ffn_hidden_size"],
        max_seq_length=args.get("max_position_embeddings") or args.get("seq_length") or 4096,
        rope_theta=float(args.get("rotary_base") or 10000), norm_eps=float(eps),
        init_std=float(args.get("init_method_std") or 0.02),
    )


def zero_centered(args: dict) -> bool:
    """Whether the norms are stored as γ − 1 (`--apply-layernorm-1p`; its newer name zero-centered gamma): the
    same model as a Llama's, whose norm weight is γ."""
    return bool(args.get("layernorm_zero_centered_gamma") or args.get("apply_layernorm_1p"))


def llama_state_dict(weights: MegatronWeights, config: ModelConfig, norms_plus_one: bool = False
                     ) -> dict[str, Deferred]:
    """megamath's Llama state dict (serial names and shapes) of a checkpoint's global weights, each tensor
    made when it is written (the rank files' slices are joined then, one tensor at a time). `norms_plus_one`
    turns zero-centered norm weights (and their fp32 masters; not Adam's moments, which a shift leaves as they
    are) into γ, added in float32."""
    t = weights.tensors
    if weights.num_layers != config.num_layers:
        raise ValueError(f"the checkpoint holds {weights.num_layers} layers, its args say num_layers "
                         f"{config.num_layers}")
    v, d = config.vocab_size, config.head_dim
    per_group = config.num_heads // config.num_kv_heads
    shapes = parameter_shapes(config)
    out: dict[str, Deferred] = {}

    def put(name: str, source: str, cut) -> None:
        out[name] = Deferred(shapes[name], t[source].dtype, lambda: cut(weights.tensor(source)))

    def norm(x):
        return (x.float() + 1).to(x.dtype) if norms_plus_one else x

    _check_sources(weights, config)

    def grouped(x):  # per query group: its query heads, its key head, its value head
        return x.reshape(config.num_kv_heads, per_group + 2, d, -1)
    put("embed_tokens.weight", "embedding", lambda x: x[:v])
    for i in range(config.num_layers):
        prefix, qkv = f"layers.{i}.", f"layers.{i}.qkv"
        put(prefix + "input_layernorm.weight", prefix + "input_norm", norm)
        put(prefix + "self_attn.q_proj.weight", qkv, lambda x: grouped(x)[:, :per_group].reshape(-1, x.shape[1]))
        put(prefix + "self_attn.k_proj.weight", qkv, lambda x: grouped(x)[:, per_group].reshape(-1, x.shape[1]))
        put(prefix + "self_attn.v_proj.weight", qkv, lambda x: grouped(x)[:, per_group + 1].reshape(-1, x.shape[1]))
        put(prefix + "self_attn.o_proj.weight", prefix + "proj", lambda x: x)
        put(prefix + "post_attention_layernorm.weight", prefix + "mlp_norm", norm)
        put(prefix + "mlp.gate_proj.weight", prefix + "fc1", lambda x: x.chunk(2, dim=0)[0])  # fc1 is [gate; up]
        put(prefix + "mlp.up_proj.weight", prefix + "fc1", lambda x: x.chunk(2, dim=0)[1])
        put(prefix + "mlp.down_proj.weight", prefix + "fc2", lambda x: x)
    put("norm.weight", "final_norm", norm)
    put("lm_head.weight", "output" if "output" in t else "embedding", lambda x: x[:v])  # tied: the embedding
    return out


def _check_sources(weights: MegatronWeights, config: ModelConfig) -> None:
    """Each global tensor's shape against the args' model, before anything is written."""
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    expected = {"input_norm": (h,), "mlp_norm": (h,), "qkv": ((config.num_heads + 2 * config.num_kv_heads) * d, h),
                "proj": (h, config.num_heads * d), "fc1": (2 * f, h), "fc2": (h, f), "final_norm": (h,)}
    padded = weights.args.get("padded_vocab_size")
    for name, value in weights.tensors.items():
        role = name.rsplit(".", 1)[-1]
        want = (padded, h) if role in ("embedding", "output") else expected[role]
        if tuple(value.shape) != want:
            raise ValueError(f"{name}: the checkpoint holds shape {tuple(value.shape)}, its args give {want} "
                             "(linear_qkv: (heads + 2 · query groups) · head_dim rows; linear_fc1: 2 · ffn rows)")


def training_dtype(weights: MegatronWeights) -> torch.dtype | None:
    """args.params_dtype (the norms may be stored in float32 beside bfloat16 weights), if the args have it."""
    dtype = weights.args.get("params_dtype")
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def convert_megatron_to_hf(src: str | Path, dst: str | Path, vocab_size: int | None = None,
                           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                           dtype: torch.dtype | None = None) -> tuple[ModelConfig, MegatronWeights, str]:
    """A Megatron-LM checkpoint -> a Hugging Face Llama folder; returns the model's config, what was read,
    and which special token ids were written."""
    weights = read_megatron_checkpoint(src)
    config = llama_config(weights.args, vocab_size)
    state = llama_state_dict(weights, config, norms_plus_one=zero_centered(weights.args))
    kind = weights.args.get("tokenizer_type")
    if kind in SENTENCEPIECE_TYPES:
        ids, said = sentencepiece_token_ids(weights.args.get("tokenizer_model"), "the args' tokenizer_model")
    else:
        ids, said = sentencepiece_token_ids(None, f"tokenizer_type {kind}")
    save_state_as_hf(state, config, dst, dtype or training_dtype(weights), max_shard_size, ids)
    return config, weights, said
