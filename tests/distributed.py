"""Run a function on several gloo processes the way torchrun would, for the parallel tests.

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
so the code under test joins through `ParallelState.from_env` exactly as in production. The function
must be importable (module level) and writes what the test checks into files under `out_dir`.

Under Triton's interpreter (every CPU run) the ranks are forked from the test session's forkserver
(tests/forked_script.py: a clean process that only imported torch and megamath, with the same
TRITON_INTERPRET=1), and each takes the caller's environment and folder as a spawned process would: a rank
then starts in ~0.1 s of CPU instead of ~2.5 s of Python start and imports, on CI's 2 CPUs shared by 2-4
ranks. Elsewhere (a GPU machine's session compiles kernels, its ranks interpret them) they are spawned.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import time

import torch.multiprocessing as mp

from forked_script import PRELOAD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, env: dict, cwd: str) -> None:
    os.environ.clear()  # the caller's environment and folder now, as a spawned rank has them
    os.environ.update(env)
    os.chdir(cwd)
    faulthandler.enable()  # a crashing rank prints its Python stack, not only "terminated with signal"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from interpreter_speedup import install  # the ranks run kernels under the interpreter too

        install()
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300) -> None:
    """Call fn(rank, world_size, *args) in world_size fresh processes; re-raise the first failure.

    A rank stuck in a collective (its peers failed or skipped it) would hang the suite: past timeout_s
    every process is killed and the test fails instead.
    """
    forked = os.environ.get("TRITON_INTERPRET") == "1"  # the forkserver's kernels are interpreted ones
    if forked:
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # if this call starts the server
    context = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, dict(os.environ), os.getcwd()),
                                 nprocs=world_size, join=False, start_method="forkserver" if forked else "spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in {timeout_s:.0f} s")


def run_and_load(fn, world_size: int, out_dir) -> list:
    """run_distributed(fn, world_size, out_dir), then what each rank saved to out_dir/rank{r}.pt, in rank order."""
    import torch

    run_distributed(fn, world_size, out_dir)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def native_collectives_supported(group) -> bool:
    """Whether this torch's gloo has the single-tensor all-gather and reduce-scatter that NCCL runs use
    (called on every rank of `group` together: each probe is a collective)."""
    import torch
    import torch.distributed as dist

    p = dist.get_world_size(group)
    try:
        dist.reduce_scatter_tensor(torch.empty(1), torch.zeros(p), group=group)
        dist.all_gather_into_tensor(torch.empty(p), torch.zeros(1), group=group)
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False
