"""Vocabulary-parallel cross_entropy on 2 gloo ranks equals the single-process loss and sliced gradient.

Each rank builds the same full (N, V) logits from one seed, keeps its contiguous column slice, and
compares against the serial kernel and cross_entropy_ref on the full matrix. Runs on CPU under the Triton
interpreter in both ranks, whatever the machine: what is tested here is the combination across ranks.
"""
import datetime
import os

import torch

from distributed import run_distributed

WORLD = 2
# (rows, vocabulary split evenly over the ranks, dtype); 2 x 501 makes each shard odd-sized.
CASES = [(7, 2 * 501, torch.float32), (129, 2 * 501, torch.bfloat16), (5, 2 * 4100, torch.float16)]


def _case_inputs(n_rows, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(n_rows, vocab, generator=g)).to(dtype)  # (N, V)
    targets = torch.randint(0, vocab, (n_rows,), generator=g)
    targets[0], targets[-1] = 0, vocab - 1  # first column of rank 0, last column of the last rank
    targets[2::4] = -100
    return logits, targets


def _loss_and_grad(fn, logits, targets, grad_loss, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, targets, **kwargs)
    loss.backward(grad_loss)
    return loss.detach(), logits.grad


def _worker(rank, world_size, init_file):
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels (and Triton) are imported in this process
    import torch.distributed as dist
    from kernel_tolerance import assert_close_3way

    from megamath.kernels.cross_entropy import cross_entropy, cross_entropy_ref

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(list(range(WORLD)))  # an explicit group, not only the default one
    try:
        for index, (n_rows, vocab, dtype) in enumerate(CASES):
            logits, targets = _case_inputs(n_rows, vocab, dtype, seed=100 + index)
            v_local = vocab // WORLD
            cols = slice(rank * v_local, (rank + 1) * v_local)
            n_valid = int((targets != -100).sum())
            grad_loss = torch.tensor(float(n_valid))  # rows' gradients of order 1

            loss_par, grad_par = _loss_and_grad(cross_entropy, logits[:, cols], targets, grad_loss, group=group)
            loss_one, grad_one = _loss_and_grad(cross_entropy, logits, targets, grad_loss)
            loss32, grad32 = _loss_and_grad(cross_entropy_ref, logits.float(), targets, grad_loss)
            loss_lo, grad_lo = _loss_and_grad(cross_entropy_ref, logits, targets, grad_loss)
            name = f"rank {rank} case {(n_rows, vocab, dtype)}"

            assert loss_par.shape == () and loss_par.dtype == torch.float32, name
            assert grad_par.shape == (n_rows, v_local) and grad_par.dtype == dtype, name
            # Same math as the serial kernel, only the logsumexp is summed in another order.
            torch.testing.assert_close(loss_par, loss_one, rtol=2e-6, atol=0, msg=f"{name}: loss vs serial")
            assert_close_3way(loss_par, loss32, loss_lo, atol=1e-5 * max(1.0, loss32.item()), name=f"{name} loss")
            assert_close_3way(grad_par, grad32[:, cols], grad_lo[:, cols], name=f"{name} grad")
            if dtype == torch.float32:
                torch.testing.assert_close(grad_par, grad_one[:, cols], rtol=0, atol=1e-6,
                                           msg=f"{name}: grad vs serial")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_matches_single_process(tmp_path):
    run_distributed(_worker, WORLD, str(tmp_path / "rendezvous"))  # forked ranks: no Python start, no imports
