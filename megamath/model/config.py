"""The Llama model's shape and runtime switches as one validated dataclass, plus named presets.

Everything that sizes a tensor lives here, so parameter counts and FLOPs can be computed without
building the model (a 34B model's FLOPs are needed by the trainer's MFU log long before its weights
fit anywhere).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KERNEL_CHOICES = ("auto", "triton", "reference")
ATTENTION_CHOICES = ("auto", "megamath", "sdpa")


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    """Rows of the embedding and of the LM head (Code Llama's tokenizer: 32,016; Llama 2's: 32,000)."""
    hidden_size: int = 128
    """Width h of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks L."""
    num_heads: int = 4
    """Query heads; head_dim = hidden_size / num_heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); equal to num_heads for plain multi-head attention."""
    ffn_hidden_size: int = 352
    """Inner width of the SwiGLU MLP (gate_proj and up_proj output size)."""
    max_seq_length: int = 512
    """Longest position (sequence length + position offset) the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base θ: 1e4 for Llama 2, 1e6 for Code Llama (long-context base)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon added to the mean square."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization (output projections are scaled down, see llama.py)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of storing them (memory for ~1/3 more compute)."""
    kernels: str = "auto"
    """Which ops run: "triton" kernels, plain-torch "reference" ops, or "auto" (Triton on CUDA, references on CPU)."""
    attention: str = "auto"
    """Attention: "megamath" (our flash-attention kernel under `kernels`), "sdpa" (PyTorch's
    scaled_dot_product_attention), or "auto": whichever of the two is faster for the run's shape on its
    GPU, timed once at start-up and logged (megamath off a GPU). See megamath.model.attention."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "ffn_hidden_size", "max_seq_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
                raise ValueError(f"ModelConfig.{name} must be a positive integer below 2**63, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
            if value == float("inf"):
                raise ValueError(f"ModelConfig.{name} must be finite, got {value!r}")
            setattr(self, name, float(value))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads {self.num_heads} is not divisible by "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim {self.head_dim} (hidden_size / num_heads) must be even for RoPE")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"ModelConfig.activation_checkpointing must be true or false, "
                             f"got {self.activation_checkpointing!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"ModelConfig.kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"ModelConfig.attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # ---- serialization ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Strict: an unknown key is an error (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hint = (" (this looks like a Hugging Face config.json; convert it with "
                    "`megamath convert hf-to-megamath`)" if "model_type" in data else "")
            raise ValueError(f"ModelConfig: unknown keys {', '.join(unknown)}{hint}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {', '.join(unknown)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ---- napkin math ----------------------------------------------------------------------------------

    def _matmul_params_per_layer(self) -> int:
        """Weights of the 7 matmuls of a block: q, o (h × h), k, v (h × h_kv), gate, up, down (h × ffn)."""
        h, q_width, kv_width = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * h * q_width + 2 * h * kv_width + 3 * h * self.ffn_hidden_size

    def num_params(self) -> int:
        """Exact parameter count: embedding + L blocks (7 matmuls, 2 norms) + final norm + untied LM head."""
        h = self.hidden_size
        per_layer = self._matmul_params_per_layer() + 2 * h
        return 2 * self.vocab_size * h + self.num_layers * per_layer + h

    def flops_per_token(self, seq_length: int) -> int:
        """Training FLOPs (forward + backward) per token, Megatron's convention:

            6 · (L · (2h·h_q + 2h·h_kv + 3h·ffn) + V·h) + 6 · L · S · h_q

        with h_q = num_heads · head_dim and h_kv = num_kv_heads · head_dim. The first term is
        2 FLOPs per multiply-add times 3 (backward = 2 × forward) over every matmul weight: q, k, v, o,
        gate, up, down and the LM head (the embedding is a gather, not a matmul). The second is the
        attention scores Q·Kᵀ and the weighted sum P·V, 2 · 2·S·h_q forward per token and layer,
        halved for the causal mask, times 3. For multi-head attention (h_q = h_kv = h) this is
        6·(L·(4h² + 3h·ffn) + V·h) + 6·L·S·h, the formula of the H100 anchors. Norms, RoPE, softmax
        and SwiGLU's elementwise work are not counted.

        V is the true vocabulary even when tensor parallelism pads it (p not dividing V): Megatron counts its
        padded vocabulary, but megamath never multiplies the padding rows (the LM head uses its valid rows
        only), so counting them would credit MFU with work not done.
        """
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        matmul = self.num_layers * self._matmul_params_per_layer() + self.vocab_size * self.hidden_size
        attention = self.num_layers * seq_length * self.num_heads * self.head_dim
        return 6 * matmul + 6 * attention


PRESETS: dict[str, ModelConfig] = {
    # Trains on a CPU in seconds; the vocabulary covers the demo tokenizer (at most 1,024 pieces).
    "tiny": ModelConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        ffn_hidden_size=352, max_seq_length=512, rope_theta=10000.0),
    # LLEMMA 7B = Code Llama 7B's shape; LLEMMA trained at 4,096 tokens with θ = 1e4 (its RoPE base).
    "llemma-7b": ModelConfig(vocab_size=32016, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                             ffn_hidden_size=11008, max_seq_length=4096, rope_theta=1e4),
    # Code Llama 34B: grouped-query attention (8 KV heads) and Llama 2's 32,000-piece vocabulary.
    "llemma-34b": ModelConfig(vocab_size=32000, hidden_size=8192, num_layers=48, num_heads=64, num_kv_heads=8,
                              ffn_hidden_size=22016, max_seq_length=4096, rope_theta=1e6),
    "codellama-7b": ModelConfig(vocab_size=32016, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                                ffn_hidden_size=11008, max_seq_length=4096, rope_theta=1e6),
}
