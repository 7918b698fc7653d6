"""Serial state dicts to tensor-parallel ranks' and back, bit-exact, by the partition table's rules.

The vocabulary tensors (embed_tokens, lm_head) of a V that p does not divide are split with zero padding
(partition.vocab_range); merging checks that padding is zero and strips it (merge_shards says why).
"""
from __future__ import annotations

import torch

from megamath.model.config import ModelConfig
from megamath.model.partition import (
    VOCAB_PARAMETERS, check_names_and_shapes, check_tensor_parallel, local_shapes, tp_partition_dim,
)
from megamath.parallel.layers import merge_shards, shard_tensor


def tp_slice(full: torch.Tensor, name: str, config: ModelConfig, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank tp_rank's piece of parameter `name`'s serial tensor (a new tensor; replicated: a copy; the
    vocabulary's: padded with zero rows on the last rank(s) when tp_size does not divide V)."""
    dim = tp_partition_dim(name, config, tp_size)
    return full.clone() if dim is None else shard_tensor(full, dim, tp_size, tp_rank, name,
                                                         padded=name in VOCAB_PARAMETERS)


def tp_merge(pieces: list[torch.Tensor], name: str, config: ModelConfig) -> torch.Tensor:
    """Parameter `name`'s serial tensor from TP ranks 0 … p-1's pieces of it (split ones only), the
    vocabulary's padding checked to be zero and stripped."""
    dim = tp_partition_dim(name, config, len(pieces))
    return merge_shards(pieces, dim, size=config.vocab_size if name in VOCAB_PARAMETERS else None, name=name)


def _check_names(tensors: dict, expected: dict, what: str) -> None:
    check_names_and_shapes({n: tuple(t.shape) for n, t in tensors.items()}, expected, what)


def shard_state_dict(full: dict[str, torch.Tensor], config: ModelConfig, tp_size: int,
                     tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank tp_rank's state dict from the serial one (new tensors; replicated ones copied whole)."""
    check_tensor_parallel(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is out of range for tensor-parallel size {tp_size}")
    _check_names(full, local_shapes(config, 1), "serial state dict")
    return {name: tp_slice(tensor, name, config, tp_size, tp_rank) for name, tensor in full.items()}


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The serial state dict from TP ranks 0 … p-1's; replicated tensors must agree bit for bit."""
    tp_size = len(shards)
    check_tensor_parallel(config, tp_size)
    local = local_shapes(config, tp_size)
    for rank, shard in enumerate(shards):
        _check_names(shard, local, f"TP rank {rank}'s state dict")
    merged = {}
    for name in shards[0]:  # the model's order
        dim = tp_partition_dim(name, config, tp_size)
        if dim is not None:
            merged[name] = tp_merge([shard[name] for shard in shards], name, config)
            continue
        for rank in range(1, tp_size):
            if not torch.equal(shards[rank][name], shards[0][name]):
                raise ValueError(f"replicated tensor {name} differs between TP ranks 0 and {rank}")
        merged[name] = shards[0][name].clone()
    return merged
