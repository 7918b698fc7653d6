"""Run a function on several gloo processes the way torchrun would, for the parallel tests.

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
so the code under test joins through `ParallelState.from_env` exactly as in production. The function
must be importable (module level) and writes what the test checks into files under `out_dir`.

Under Triton's interpreter (every CPU run) the ranks are forked from the test session's forkserver
(tests/forked_script.py: a clean process that only imported torch and megamath, with the same
TRITON_INTERPRET=1), and each takes the caller's environment and folder as a spawned process would: a rank
then starts in ~0.1 s of CPU instead of ~2.5 s of Python start and imports, on CI's 2 CPUs shared by 2-4
ranks. Elsewhere (a GPU machine's session compiles kernels, its ranks interpret them) they are spawned.

The rendezvous store is the launcher's, as under torchrun (TORCHELASTIC_USE_AGENT_STORE): this process binds it
to a port the kernel picks and holds it while the ranks run, and every rank connects to it. Picking a free port
and leaving rank 0 to bind it later raced: between the two, any socket bound to port 0 or connecting out (the
gloo pairs and stores of the other xdist worker's jobs) could take it, and rank 0 failed with EADDRINUSE.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import time

import torch.multiprocessing as mp

from forked_script import PRELOAD


def _entry(rank: int, world_size: int, port: int, fn, args, env: dict, cwd: str) -> None:
    os.environ.clear()  # the caller's environment and folder now, as a spawned rank has them
    os.environ.update(env)
    os.chdir(cwd)
    faulthandler.enable()  # a crashing rank prints its Python stack, not only "terminated with signal"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
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
    from torch.distributed import TCPStore

    forked = os.environ.get("TRITON_INTERPRET") == "1"  # the forkserver's kernels are interpreted ones
    if forked:
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # if this call starts the server
    # Bound (port 0: the kernel's pick) before any rank starts, and held until every rank has ended.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    try:
        context = mp.start_processes(_entry, args=(world_size, store.port, fn, args, dict(os.environ), os.getcwd()),
                                     nprocs=world_size, join=False, start_method="forkserver" if forked else "spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish in {timeout_s:.0f} s")
    finally:
        del store


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
