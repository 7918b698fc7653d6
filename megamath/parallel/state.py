"""Process-group state in one small object, built from torchrun's environment and passed explicitly.

Ranks are laid out tensor-parallel first: with TP = 2 and 8 ranks, the TP groups are [0, 1], [2, 3],
... (neighbours, so TP traffic stays inside a node) and the DP groups are [0, 2, 4, 6] and [1, 3, 5, 7].
No module globals: layers and the optimizer take the groups they use from this object.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from megamath.parallel.agreement import check_same_on_every_rank


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks and groups of one process. Groups are None when their size is 1."""

    world_size: int
    """All processes: tp_size × dp_size."""
    rank: int
    """This process' global rank."""
    tp_size: int
    """Tensor-parallel size: ranks that split each layer's weights."""
    tp_rank: int
    dp_size: int
    """Data-parallel size: ranks that see different micro-batches and share ZeRO-1 optimizer shards."""
    dp_rank: int
    device: torch.device
    tp_group: object = None
    dp_group: object = None

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelState":
        """One process, no torch.distributed: the serial baseline."""
        return cls(1, 0, 1, 0, 1, 0, torch.device(device))

    @classmethod
    def from_env(cls, tp_size: int = 1, backend: str | None = None, timeout_s: float = 600,
                 same_on_every_rank: Mapping | None = None) -> "ParallelState":
        """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and build groups.

        NCCL with one GPU per local rank when CUDA is available, gloo on CPU. Every group's collectives give
        up after `timeout_s` (a stalled peer is an error, not a silent wait). `same_on_every_rank` (the
        training config, a command's flags) is compared across ranks right after joining, before the groups are built from
        it: a rank launched with other settings stops the job with one line (megamath.parallel.agreement).
        """
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            if tp_size != 1:
                raise ValueError(f"tensor parallel size {tp_size} needs a distributed launch (torchrun)")
            return cls.single("cuda" if torch.cuda.is_available() else "cpu")
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        validate_sizes(world_size, tp_size)
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        if same_on_every_rank is not None:
            check_same_on_every_rank(same_on_every_rank, dist.group.WORLD, "settings",
                                     "launch every rank with the same command line, config file and overrides")
        timeout = datetime.timedelta(seconds=timeout_s)  # new_group's default is torch's 30 minutes, not ours
        dp_size = world_size // tp_size
        tp_group = dp_group = None
        # Every rank must create every group, in the same order.
        for start in range(0, world_size, tp_size):
            ranks = list(range(start, start + tp_size))
            group = dist.new_group(ranks, timeout=timeout) if tp_size > 1 else None
            if rank in ranks:
                tp_group = group
        for offset in range(tp_size):
            ranks = list(range(offset, world_size, tp_size))
            group = dist.new_group(ranks, timeout=timeout) if dp_size > 1 else None
            if rank in ranks:
                dp_group = group
        return cls(world_size, rank, tp_size, rank % tp_size, dp_size, rank // tp_size, device, tp_group, dp_group)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def world_group(self):
        """Every rank, for the collectives of megamath.parallel.mappings; None for a single process."""
        return dist.group.WORLD if self.is_distributed else None

    def dp_share(self, count: int) -> list[int]:
        """The numbers of `count` items (problems, prompts) this data-parallel rank's group takes: every
        dp_size-th from dp_rank. Their numbers, not their places in the share, seed their samples."""
        return list(range(count))[self.dp_rank::self.dp_size]


def validate_sizes(world_size: int, tp_size: int) -> None:
    """tp_size must be positive and divide the world size."""
    if tp_size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp_size}")
    if world_size % tp_size:
        raise ValueError(f"tensor parallel size {tp_size} does not divide the world size {world_size}")
