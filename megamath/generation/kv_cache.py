"""The key/value cache of batched decoding, and the attention that reads it.

Why a separate attention path: a batch of prompts of different lengths is left-padded, so each row
has its own positions (the first real token of every row sits at position 0, as in Hugging Face's
`generate`) and its own padding to mask. The training kernels take one position offset for the whole
batch and a plain causal mask, so the cached path applies RoPE at a (B, S) position tensor and
attends with an explicit (B, S, T) mask through torch's scaled_dot_product_attention (fused kernels on
a GPU). Everything else in the forward (projections, norms, SwiGLU, tensor-parallel collectives) is the
model's own code.

Layout: slot t of row b holds the token fed at call step t; `valid[b, t]` is False for padding;
`positions[b, t]` counts the real tokens before it. Under tensor parallelism each rank caches its own
KV heads (B, T, Hkv/p, D).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_at(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x (B, S, H, D) at integer positions (B, S), in fp32 like `rope_ref`."""
    d = x.shape[-1]
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # on the CPU, as rope_ref: same bits
    inv_freq = (1.0 / (theta ** exponent)).to(x.device)  # (D/2,)
    angle = positions.float()[..., None] * inv_freq  # (B, S, D/2)
    emb = torch.cat([angle, angle], dim=-1)[:, :, None, :]  # (B, S, 1, D)
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * emb.cos() + rotated * emb.sin()).to(x.dtype)


class LayerCache:
    """One layer's keys and values (B, capacity, Hkv/p, D), allocated on first use."""

    def __init__(self, parent: "KVCache"):
        self.parent = parent
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: float,
               kv_index: torch.Tensor | None) -> torch.Tensor:
        """q (B, S, Hq, D), k/v (B, S, Hkv, D) of the new slots -> attention output (B, S, Hq, D).

        `kv_index`: the KV head each local query head reads, when a TP rank's query heads read KV heads
        unevenly (llama.Attention builds it once per device); None otherwise."""
        cache = self.parent
        b, s, hq, d = q.shape
        start, end = cache.length, cache.length + s
        if end > cache.capacity:
            raise ValueError(f"KV cache full: {end} slots needed, capacity {cache.capacity}")
        pos = cache.positions[:, start:end]  # (B, S)
        q, k = rope_at(q, pos, theta), rope_at(k, pos, theta)
        if self.k is None:
            shape = (b, cache.capacity) + tuple(k.shape[2:])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[:, start:end], self.v[:, start:end] = k, v
        keys, values = self.k[:, :end], self.v[:, :end]  # (B, T, Hkv, D)
        if kv_index is not None:  # TP rank whose query heads read KV heads unevenly (see llama.Attention)
            keys, values = keys.index_select(2, kv_index), values.index_select(2, kv_index)
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (B, H, S|T, D)
        mask = cache.mask(start, end)[:, None]  # (B, 1, S, T)
        try:  # query head j reads KV head j // (Hq / Hkv) without copying K/V per query head
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        except TypeError:  # torch < 2.5: no enable_gqa
            group = hq // keys.shape[1]
            o = F.scaled_dot_product_attention(q, keys.repeat_interleave(group, dim=1),
                                               values.repeat_interleave(group, dim=1), attn_mask=mask)
        return o.transpose(1, 2)  # (B, S, Hq, D)


class KVCache:
    """Keys and values of every layer plus each row's validity and positions; `capacity` slots per row."""

    def __init__(self, num_layers: int, batch: int, capacity: int, device: torch.device | str):
        self.capacity = capacity
        self.length = 0  # slots filled by completed forwards
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.layers = [LayerCache(self) for _ in range(num_layers)]

    def extend(self, valid: torch.Tensor) -> None:
        """Declare the next forward's slots: valid (B, S) bool, False for left padding."""
        s = valid.shape[1]
        start, end = self.length, self.length + s
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} slots needed, capacity {self.capacity}")
        before = self.valid[:, :start].sum(dim=1, keepdim=True)  # (B, 1) real tokens so far
        self.valid[:, start:end] = valid
        self.positions[:, start:end] = (before + valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def commit(self, s: int) -> None:
        """The forward over the declared s slots is done."""
        self.length += s

    def mask(self, start: int, end: int) -> torch.Tensor:
        """(B, S, T) bool: query slot i sees valid key slots j <= i, and always itself (a padding query
        would otherwise see nothing and turn NaN; its output is never read)."""
        q_slots = torch.arange(start, end, device=self.valid.device)[:, None]  # (S, 1)
        k_slots = torch.arange(end, device=self.valid.device)[None, :]  # (1, T)
        causal = k_slots <= q_slots  # (S, T)
        return (self.valid[:, None, :end] & causal) | (k_slots == q_slots)  # (B, S, T)
