"""AdamW's settings for ZeRO-1, apart from the optimizer so that parsing a training config imports no kernels."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRAD_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRAD_DTYPE_SETTINGS = ("auto", *GRAD_DTYPES)
"""optimizer.grad_dtype's values: a buffer dtype, or "auto" (megamath.parallel.zero_layout.resolve_grad_dtype)."""


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate; the training loop passes the scheduled lr to each `step(lr)`."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay (0.95, as LLEMMA and most LLM pretraining use)."""
    eps: float = 1e-8
    """Added to sqrt(v̂) in AdamW's denominator."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to parameters with 2 or more dimensions only (not norm weights)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off (the norm is still computed)."""
    grad_dtype: str = "auto"
    """dtype of the flat gradient buffer. "fp32" (Megatron's default): 4 bytes per parameter; micro-batch
    gradients accumulate and are DP-summed in fp32, rounded once. "bf16": 2 bytes per parameter and half the
    reduce-scatter's bytes, but every micro-batch's add and the DP sum round to bf16. "auto": "fp32", except
    where nothing is summed into the buffer (bf16 weights, one micro-batch, one GPU), where "bf16" holds
    autograd's bf16 gradient as it is (zero_layout.resolve_grad_dtype). (Bucket sizes and the overlap of
    communication are `parallel.bucket_mb` / `overlap_grad_reduce` / `overlap_param_gather`.)"""
    decoupled_lr: float | None = None
    """Peak learning rate of the embedding and the LM head alone (Megatron-LM's --decoupled-lr), on the same
    warmup and decay as the others, down to decoupled_min_lr; null: `lr`, like every parameter."""
    decoupled_min_lr: float | None = None
    """The floor of decoupled_lr's schedule (--decoupled-min-lr); null: the other parameters' floor,
    schedule.min_lr_ratio × lr, as Megatron-LM takes --min-lr."""
    gradient_accumulation_fusion: bool = True
    """Megatron's `--gradient-accumulation-fusion` (its default; `--no-gradient-accumulation-fusion` is false
    here). True: every gradient of a linear weight is written, or added, by its weight-gradient matmul straight
    into the buffer, accumulated in the buffer's dtype: bf16 weights into an fp32 buffer get an fp32 product,
    not one rounded to bf16 first, and later micro-batches are summed by the matmul, not by an add after it
    (megamath.parallel.grad_into_buffer). Slightly different bits from false, which writes by the matmul only
    the first gradient of a weight whose buffer has its own dtype (exactly what the hook's copy would hold) and
    hands every other one to the hook as a tensor in the weight's dtype."""

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"OptimizerConfig.{name} must be a number >= 0, got {value!r}")
            setattr(self, name, float(value))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"OptimizerConfig.{name} must be in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        # Finite values and sane ranges: an infinite or zero learning rate would run to the end and save
        # checkpoints of a model that never trained.
        ranges = {"lr": (0.0, 1.0, False), "eps": (0.0, 1.0, False), "weight_decay": (0.0, math.inf, True),
                  "clip_grad": (0.0, math.inf, True)}
        for name, (low, high, low_ok) in ranges.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high):
                bounds = (f"in {'[' if low_ok else '('}{low:g}, {high:g}]" if math.isfinite(high)
                          else f"{'>=' if low_ok else '>'} {low:g} and finite")
                raise ValueError(f"OptimizerConfig.{name} must be {bounds}, got {value!r}")
        for name in ("decoupled_lr", "decoupled_min_lr"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0 or (name == "decoupled_lr" and value == 0):
                bounds = "(0, 1]" if name == "decoupled_lr" else "[0, 1]"
                raise ValueError(f"OptimizerConfig.{name} must be a learning rate in {bounds} or null, got {value!r}")
            setattr(self, name, float(value))
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ValueError("OptimizerConfig.decoupled_min_lr is set but decoupled_lr is not: it is the floor of "
                             "decoupled_lr's schedule")
        if self.decoupled_min_lr is not None and self.decoupled_min_lr > self.decoupled_lr:
            raise ValueError(f"OptimizerConfig.decoupled_min_lr {self.decoupled_min_lr:g} is above decoupled_lr "
                             f"{self.decoupled_lr:g}: the floor of a decay")
        if not isinstance(self.gradient_accumulation_fusion, bool):
            raise ValueError(f"OptimizerConfig.gradient_accumulation_fusion must be true or false, "
                             f"got {self.gradient_accumulation_fusion!r}")
        if self.grad_dtype not in GRAD_DTYPE_SETTINGS:
            raise ValueError(f"OptimizerConfig.grad_dtype must be one of {', '.join(GRAD_DTYPE_SETTINGS)}, "
                             f"got {self.grad_dtype!r}")
