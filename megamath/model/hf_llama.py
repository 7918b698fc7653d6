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
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Hugging Face config: hidden_act must be 'silu', got {hf['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(f"Hugging Face config: {key} must be false (megamath's Llama has no biases)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                           "num_hidden_layers") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face config: missing keys {', '.join(missing)}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"Hugging Face config: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    heads = hf["num_attention_heads"]
    config = ModelConfig(  # validates the values' types first: the head_dim check divides them
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"], max_seq_length=hf.get("max_position_embeddings", 2048),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02),
    )
    if hf.get("head_dim") not in (None, config.head_dim):
        raise ValueError(f"Hugging Face config: head_dim {hf['head_dim']} must equal hidden_size / "
                         f"num_attention_heads = {config.head_dim}")
    return config


def model_config_to_hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """A LlamaConfig dict that transformers 4.x and 5.x both load (top-level rope_theta, torch_dtype)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_length,
        "rope_theta": config.rope_theta, "rope_scaling": None, "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
    }


def check_tensors(found: dict[str, tuple[int, ...]], config: ModelConfig, describe: Callable[[str], str]) -> None:
    """Names and shapes must be exactly the model's; errors name the offending tensors (in file naming)."""
    check_names_and_shapes(found, parameter_shapes(config), "checkpoint", describe, some_names)
