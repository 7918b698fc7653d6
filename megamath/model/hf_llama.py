"""Hugging Face's Llama, as megamath sees it: tensor names and `LlamaConfig` both ways, and name/shape checks.

HF's tensor names are "model." + ours, except `lm_head.weight`; weights are already in the rotate-half
RoPE layout on both sides, so conversion is renaming only (no transposes, no q/k permutation).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from megamath.model.config import ModelConfig
from megamath.model.partition import check_names_and_shapes, parameter_shapes
from megamath.model.safetensors_io import some_names

# Old HF checkpoints stored RoPE's inverse frequencies; they are recomputed from θ, never loaded.
IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SILU_NAMES = ("silu", "swish")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def from_hf_name(hf_name: str) -> str:
    return hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix("model.")


def hf_config_to_model_config(hf: dict) -> ModelConfig:
    """Map a Hugging Face LlamaConfig dict onto ModelConfig; refuse what this architecture cannot express."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"Hugging Face config: model_type must be 'llama', got {hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("Hugging Face config: tie_word_embeddings must be false "
                         "(megamath's Llama has an untied embedding and LM head)")
    if hf.get("hidden_act", "silu") not in _SILU_NAMES:  # transformers' ACT2FN maps both names to SiLU
        raise ValueError(f"Hugging Face config: hidden_act must be 'silu', got {hf['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(f"Hugging Face config: {key} must be false (megamath's Llama has no biases)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                           "num_hidden_layers") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face config: missing keys {', '.join(missing)}")
    heads = hf["num_attention_heads"]
    config = ModelConfig(  # validates the values' types first: the head_dim check divides them
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"], max_seq_length=hf.get("max_position_embeddings", 2048),
        rope_theta=rope_base(hf), norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02),
    )
    if hf.get("head_dim") not in (None, config.head_dim):
        raise ValueError(f"Hugging Face config: head_dim {hf['head_dim']} must equal hidden_size / "
                         f"num_attention_heads = {config.head_dim}")
    return config


def rope_base(hf: dict) -> float:
    """RoPE's θ as transformers reads the config, refusing RoPE scaling and contradictory keys.

    transformers 5 (configuration_utils / modeling_rope_utils: convert_rope_params_to_dict) takes
    `rope_scaling or rope_parameters` whole, then fills a missing rope_theta from the top-level one (else
    10⁴); 4.x reads only rope_scaling and the top-level rope_theta. A config whose legacy keys and
    rope_parameters say different things is read differently by the two (or says one thing and means
    another), so it is refused rather than guessed: a model converted with another RoPE than the one it
    was trained with only shows as slightly wrong logits.
    """
    legacy, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    for key, value in (("rope_scaling", legacy), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"Hugging Face config: {key} must be an object or null, got {value!r}")
    fallback = hf.get("rope_theta", 10000.0)

    def read(rope: dict) -> tuple[object, object]:  # (rope_type, rope_theta) as transformers standardizes them
        kind = rope["rope_type"] if "rope_type" in rope else rope.get("type", "default")
        return kind, rope.get("rope_theta", fallback)

    source = "rope_scaling" if legacy else "rope_parameters"
    rope_type, theta = read(legacy or params or {})
    if rope_type != "default":
        raise ValueError(f"Hugging Face config: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    if legacy and params and read(params) != (rope_type, theta):
        raise ValueError(f"Hugging Face config: rope_scaling {legacy} and rope_parameters {params} disagree "
                         "(transformers reads rope_scaling); make them match or drop one")
    if "rope_theta" in hf and theta != hf["rope_theta"]:
        raise ValueError(f"Hugging Face config: rope_theta {hf['rope_theta']} and {source}'s rope_theta {theta} "
                         f"disagree (transformers 5 reads {source}'s, 4.x the top-level one); make them match")
    return theta


def token_ids(data: dict, where: str) -> dict:
    """The special token ids `data` sets (bos/eos/pad: an id, a list of ids, or null), checked.

    Why: they are the tokenizer's, not the architecture's, so ModelConfig has no place for them; a model
    folder keeps them beside its config (model_folder.TOKEN_IDS_NAME) and an export writes them back,
    or a Llama 3 style eos list would come back as Llama 2's 2 and generation would never stop. Integers
    are kept as given (old Llama configs say pad -1 for none)."""
    ids = {k: data[k] for k in TOKEN_ID_KEYS if k in data}
    for key, value in ids.items():
        values = value if isinstance(value, list) and value else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}: {key} must be a token id, a list of them or null, got {value!r}")
    return ids


def model_config_to_hf_config(config: ModelConfig, dtype: torch.dtype, ids: dict | None = None) -> dict:
    """A LlamaConfig dict that transformers 4.x and 5.x both load (top-level rope_theta, torch_dtype);
    `ids` are the special token ids to write (token_ids), else Llama 2's bos 1 and eos 2."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_length,
        "rope_theta": config.rope_theta, "rope_scaling": None, "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, **(ids or {}),
    }


def check_tensors(found: dict[str, tuple[int, ...]], config: ModelConfig, describe: Callable[[str], str]) -> None:
    """Names and shapes must be exactly the model's; errors name the offending tensors (in file naming)."""
    check_names_and_shapes(found, parameter_shapes(config), "checkpoint", describe, some_names)
