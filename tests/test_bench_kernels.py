"""perf/bench_kernels.py's GPU set-up without a GPU: what it builds before timing anything must not abort the
whole benchmark (every peer's row lost) when one of our steps fails."""
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("_bench_kernels", REPO / "perf" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_tile_tuning_leaves_ours_on_default_tiles_and_the_peers_measured(monkeypatch, capsys):
    """The tiles are tuned while the cases are built, before any row: a failure there (e.g. the default tiles
    not launching on this GPU) used to end the run with no SDPA row either."""
    flash_attention = importlib.import_module("megamath.kernels.flash_attention")  # the module, not the function
    flash_attention_tuning = importlib.import_module("megamath.kernels.flash_attention_tuning")
    bench = load_bench(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("triton: out of resource: shared memory")
    monkeypatch.setattr(flash_attention_tuning, "tune_flash_attention", broken)
    calls = []
    monkeypatch.setattr(flash_attention, "use_blocks", lambda *args: calls.append(args))
    cases = bench.attention_cases(lambda q, k, v, causal: q, None, False, 64, "cuda")  # built, nothing run
    assert len(cases) == 2 and "tuning failed" in capsys.readouterr().out
    for case in cases:
        ours = next(impl for impl in case.impls if impl.ours)
        assert ours.name == "megamath (triton, default tiles: tuning failed)"
        assert {impl.name for impl in case.impls} >= {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient"}
        q = torch.zeros(1, 2, 32, 128)
        ours.fn(q, q, q)
        assert calls[-1] == (128, q.dtype, None)  # the default tiles, not another case's tuned ones
