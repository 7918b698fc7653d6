"""The Llama / Code Llama architecture: pre-norm blocks of GQA attention with RoPE and a SwiGLU MLP.

No biases, untied embedding and LM head, RMSNorm before each sub-block and once at the end. Parameter
names follow Hugging Face's `LlamaForCausalLM` minus its `model.` prefix (`embed_tokens`,
`layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, `layers.N.input_layernorm`, `norm`, `lm_head`),
so checkpoint conversion is a renaming. Every projection is its own `nn.Linear` so that tensor
parallelism can later swap each one for a column- or row-parallel layer; head counts are read from the
projections' widths for the same reason.

The elementwise and attention work goes through `ops.get_ops`, i.e. Triton kernels or their references.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from megamath.model.config import ModelConfig
from megamath.model.ops import Ops, get_ops


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², -1) + eps) · weight (weight starts at ones)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal grouped-query attention: Hq query heads share Hkv key/value heads (Hq / Hkv per group)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops, position_offset: int) -> torch.Tensor:
        b, s, _ = x.shape  # (B, S, h)
        q = self.q_proj(x).view(b, s, -1, self.head_dim)  # (B, S, Hq, D)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)  # (B, S, Hkv, D)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)  # (B, S, Hkv, D)
        q, k = ops.rope(q, k, self.rope_theta, position_offset)  # (B, S, Hq, D), (B, S, Hkv, D)
        o = ops.flash_attention(q, k, v, causal=True)  # (B, S, Hq, D); scale 1/sqrt(D)
        return self.o_proj(o.reshape(b, s, -1))  # (B, S, h)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        a = ops.swiglu(self.gate_proj(x), self.up_proj(x))  # (B, S, ffn)
        return self.down_proj(a)  # (B, S, h)


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(·)): pre-norm keeps the residual stream un-normalized."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ops: Ops, position_offset: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, ops), ops, position_offset)  # (B, S, h)
        return x + self.mlp(self.post_attention_layernorm(x, ops), ops)  # (B, S, h)


class Llama(nn.Module):
    """Decoder-only Llama; `Llama(ModelConfig.from_preset("tiny"))` trains with torch.optim.AdamW."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; o_proj and down_proj get init_std / sqrt(2L).

        Each block adds two outputs (attention's o_proj, the MLP's down_proj) to the residual stream,
        2L additions in all; scaling those projections by 1/sqrt(2L) keeps the stream's variance at
        initialization independent of depth (GPT-2 / Megatron's scaled init). Norm weights start at 1.
        """
        std = self.config.init_std
        scaled_std = std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, scaled_std)
            else:
                param.normal_(0.0, std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, position_offset: int = 0):
        """tokens (B, S) int -> logits (B, S, V), or (logits, loss) when targets (B, S) are given.

        The loss is the mean cross-entropy over targets != -100. `position_offset` shifts RoPE's
        positions (the first token sits at that position).
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
        ops = get_ops(self.config.kernels, tokens.device)
        x = self.embed_tokens(tokens)  # (B, S, h)
        checkpointing = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, ops, position_offset, use_reentrant=False)
            else:
                x = layer(x, ops, position_offset)  # (B, S, h)
        x = self.norm(x, ops)  # (B, S, h)
        logits = self.lm_head(x)  # (B, S, V)
        if targets is None:
            return logits
        loss = ops.cross_entropy(logits.view(b * s, -1), targets.reshape(b * s), ignore_index=-100)  # ()
        return logits, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups in Megatron's convention: decay the matrices, not the norm weights (1-D)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
