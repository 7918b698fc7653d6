"""Subcommands of the `megamath` CLI: each module declares its flags and calls the library."""
from __future__ import annotations

import functools


def leaves_process_group(run):
    """A subcommand's `run(args)` that leaves torchrun's process group however it ends (when this process
    joined one), so that a rank which fails does not exit with NCCL's watchdog or gloo's sockets still up."""
    @functools.wraps(run)
    def wrapped(args) -> int:
        try:
            return run(args)
        finally:
            import torch.distributed as dist  # here: parsing flags imports no torch

            if dist.is_initialized():
                dist.destroy_process_group()
    return wrapped
