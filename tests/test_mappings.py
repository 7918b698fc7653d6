"""Each TP communication function's forward and backward on 2 gloo ranks, against hand-computed results.

Inputs are small integers (exact in fp32), different on each rank: x_r = base + 100·r for the forward and
g_r = base·(r + 2) for the upstream gradient, so every sum, split and concatenation can be written down
and compared with torch.equal. One launch runs every function twice: through the portable collectives
(list all-gather, all-reduce + slice) and through the rank-major single-tensor collectives that NCCL uses,
when this torch's gloo has them.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from distributed import native_collectives_supported, run_and_load
from megamath.parallel import mappings
from megamath.parallel.mappings import (
    copy_to_tp, gather_from_sequence, gather_from_tp, reduce_from_tp, reduce_scatter_to_sequence, scatter_to_sequence,
)

P = 2
B, S, H = 2, 4, 3  # (B, S, h), and sequence first (S, B, h) for the sequence functions; S/p = 2
# name: (function, shape of x on each rank, shape of the upstream gradient on each rank)
CASES = {
    "copy_to_tp": (copy_to_tp, (B, S, H), (B, S, H)),
    "reduce_from_tp": (reduce_from_tp, (B, S, H), (B, S, H)),
    "scatter_to_sequence": (scatter_to_sequence, (S, B, H), (S // P, B, H)),
    "gather_from_sequence": (gather_from_sequence, (S // P, B, H), (S, B, H)),
    "reduce_scatter_to_sequence": (reduce_scatter_to_sequence, (S, B, H), (S // P, B, H)),
    "gather_from_tp": (gather_from_tp, (B, S, H), (B, S, P * H)),
}


def x_of(rank: int, shape) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) + 100 * rank


def g_of(rank: int, shape) -> torch.Tensor:
    return (torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) + 1) * (rank + 2)


def _worker(rank, world_size, out_dir):
    from megamath.parallel.state import ParallelState

    state = ParallelState.from_env(P)
    results = {"native_supported": native_collectives_supported(state.tp_group)}
    for mode in ("portable", "native"):
        if mode == "native" and not results["native_supported"]:
            continue
        os.environ[mappings.COLLECTIVES_ENV] = mode  # this process only: the test's own worker
        for name, (fn, x_shape, g_shape) in CASES.items():
            x = x_of(rank, x_shape).requires_grad_(True)
            y = fn(x, state.tp_group)
            y.backward(g_of(rank, g_shape))
            results[mode, name] = (y.detach(), x.grad)
        try:  # S = 3 does not split over 2 ranks: both ranks raise before any collective
            reduce_scatter_to_sequence(torch.zeros(3, B, H), state.tp_group)
        except ValueError as err:
            results[mode, "error"] = str(err)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("mappings")
    return run_and_load(_worker, P, out_dir)


def _expected(name: str, rank: int):
    """(forward output, input gradient) on `rank`, written out from each function's definition."""
    _, x_shape, g_shape = CASES[name]
    xs = [x_of(r, x_shape) for r in range(P)]
    gs = [g_of(r, g_shape) for r in range(P)]
    chunk = slice(rank * S // P, (rank + 1) * S // P)
    if name == "copy_to_tp":
        return xs[rank], sum(gs)
    if name == "reduce_from_tp":
        return sum(xs), gs[rank]
    if name == "scatter_to_sequence":
        return xs[rank][chunk], torch.cat(gs, dim=0)
    if name == "gather_from_sequence":
        return torch.cat(xs, dim=0), sum(gs)[chunk]
    if name == "reduce_scatter_to_sequence":
        return sum(xs)[chunk], torch.cat(gs, dim=0)
    if name == "gather_from_tp":
        return torch.cat(xs, dim=-1), gs[rank][..., rank * H:(rank + 1) * H]
    raise AssertionError(name)


def _check(results, mode):
    for rank in range(P):
        for name in CASES:
            y, grad = results[rank][mode, name]
            y_expected, grad_expected = _expected(name, rank)
            assert torch.equal(y, y_expected), f"{mode} {name} forward on rank {rank}"
            assert torch.equal(grad, grad_expected), f"{mode} {name} backward on rank {rank}"
        assert results[rank][mode, "error"] == ("sequence length 3 of a tensor of shape (3, 2, 3) is not divisible "
                                                "by the tensor-parallel size 2")


def test_forward_and_backward_portable_collectives(results):
    _check(results, "portable")


def test_forward_and_backward_rank_major_collectives(results):
    """The layout NCCL's all_gather_into_tensor / reduce_scatter_tensor need, exercised on gloo."""
    if not results[0]["native_supported"]:
        pytest.skip("this torch's gloo lacks reduce_scatter_tensor / all_gather_into_tensor (the NCCL path's "
                    "collectives); the portable path is tested above")
    _check(results, "native")


def test_no_group_is_the_identity():
    """group None: the input itself comes back, with no autograd node and no collective."""
    x = torch.randn(B, S, H, requires_grad=True)
    for fn, _, _ in CASES.values():
        assert fn(x, None) is x


def test_collectives_override_is_checked(monkeypatch):
    monkeypatch.setenv(mappings.COLLECTIVES_ENV, "fastest")
    with pytest.raises(ValueError, match=r"^MEGAMATH_COLLECTIVES must be auto, native or portable, got 'fastest'$"):
        mappings.native_collectives(None)


def _fresh_mappings():
    """A new copy of megamath.parallel.mappings, which picks its single-tensor collectives when imported."""
    spec = importlib.util.spec_from_file_location("_mappings_fresh", mappings.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("torch_names", ["2.11", "2.13"])
def test_single_tensor_collectives_use_the_names_this_torch_has(monkeypatch, torch_names):
    """torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to all_gather_single /
    reduce_scatter_single (the old names warn there); torch 2.11, a GPU image's, has only the old names. The
    suite runs on one torch, so each side is faked here."""
    import torch.distributed as dist

    calls = []
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single"):
        monkeypatch.setattr(dist, name, lambda out, x, group=None, async_op=False, name=name: calls.append(name),
                            raising=False)
    if torch_names == "2.11":
        monkeypatch.delattr(dist, "all_gather_single")
        monkeypatch.delattr(dist, "reduce_scatter_single")
    fresh = _fresh_mappings()
    x = torch.zeros(2)
    fresh.all_gather_into(torch.empty(4), x, None)
    fresh.reduce_scatter_into(torch.empty(1), x, None)
    assert calls == (["all_gather_into_tensor", "reduce_scatter_tensor"] if torch_names == "2.11"
                     else ["all_gather_single", "reduce_scatter_single"])
