"""perf/bench_kernels.py's GPU set-up without a GPU: what it builds before timing anything must not abort the
whole benchmark (every peer's row lost) when one of our steps fails; and the results file it rewrites after
each op keeps its rows through a full disk."""
import argparse
import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from disk_full import file_size_limit

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


def test_a_full_disk_while_an_op_is_written_keeps_the_ops_written_before(tmp_path, monkeypatch):
    """kernels-DATE.md is rewritten after each op so that a cut-off run keeps its rows; it was rewritten in place,
    so a full disk (or a kill) in the rewrite cut them."""
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "environment", lambda: "a stand-in GPU")
    monkeypatch.setattr(bench, "measure_ceilings", lambda: (1000.0, 100.0))
    monkeypatch.setattr(bench, "cases", lambda *args, **kwargs: ["rms_norm", "rope"])
    monkeypatch.setattr(bench, "table", lambda rows: [f"{len(rows)} rows:", *(f"| {row} |" for row in rows)])
    written = []

    def run_case(case, ceilings):  # the second op's rows are measured after the first's were written: disk full
        if case == "rope":
            written.append(next(tmp_path.glob("kernels-*.md")).read_bytes())
            limit.enter_context(file_size_limit(len(written[0])))
        return [f"{case} row"]
    monkeypatch.setattr(bench, "run_case", run_case)
    with contextlib.ExitStack() as limit, pytest.raises(OSError) as failed:
        bench.gpu_main(argparse.Namespace(ops="rms_norm,rope", out=str(tmp_path), no_compile=True, shrink=1))
    assert next(tmp_path.glob("kernels-*.md")).read_bytes() == written[0] and b"| rms_norm row |" in written[0]
    assert len(list(tmp_path.iterdir())) == 1  # no temporary
    assert "could not write" in str(failed.value) and "File too large" in str(failed.value), failed.value


@pytest.mark.parametrize("fault", ["none", "ours failed", "ours missing", "peer failed"])
def test_the_status_fails_when_our_kernel_fails_or_is_missing_not_when_a_peer_does(tmp_path, monkeypatch, fault):
    """The GPU check reads this status: it was 0 with our kernel erroring (a row saying so) or not importable
    (no row at all), so a broken attention kernel passed the check."""
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "environment", lambda: "a stand-in GPU")
    monkeypatch.setattr(bench, "measure_ceilings", lambda: (1000.0, 100.0))

    def cases(ops, use_compile, shrink=1, dev="cuda", missing=None):
        if fault == "ours missing":
            missing.append("rope")
        return ["rms_norm"]
    monkeypatch.setattr(bench, "cases", cases)

    def run_case(case, ceilings):
        ours = bench.Row(case, "megamath", "fwd", "4x4", ours=True)
        peer = bench.Row(case, "liger", "fwd", "4x4", ours=False)
        ours.ms = peer.ms = ours.rate = peer.rate = ours.floor_ms = peer.floor_ms = ours.extra_mib = peer.extra_mib = 1.0
        ours.unit = peer.unit = "GB/s"
        if fault == "ours failed":
            ours.status = "error: CompilationError: boom"
        if fault == "peer failed":
            peer.status = "error: RuntimeError: peer"
        return [ours, peer]
    monkeypatch.setattr(bench, "run_case", run_case)
    args = argparse.Namespace(ops="rms_norm,rope", out=str(tmp_path), no_compile=True, shrink=1)
    assert bench.gpu_main(args) == (1 if fault.startswith("ours") else 0)
    # a subset of ops without compile is named in the file: never over the day's full table
    assert [p.name for p in tmp_path.iterdir()] == [f"kernels-{bench.datetime.date.today()}-rms_norm-rope-nocompile.md"]


def test_the_cross_entropy_rows_run_what_they_name(monkeypatch):
    """Each cross-entropy row's callable, built as the GPU run builds it (here on CPU tensors, the kernels under
    Triton's interpreter, 16 rows of the anchors' 32016-wide vocabulary): ours with and without the gradient
    hint, and with the forward at each other launch, give the reference's loss and gradient, so a GPU run
    times the arithmetic it names."""
    bench = load_bench(monkeypatch)
    xent = importlib.import_module("megamath.kernels.cross_entropy")
    (case,) = bench.cross_entropy_cases(xent.cross_entropy, xent.cross_entropy_ref, False, 512, "cpu")
    logits, targets = case.make()
    upcast = logits.float().requires_grad_()
    want = torch.autograd.grad(xent.cross_entropy_ref(upcast, targets), upcast)[0]  # (16, 32016) fp32
    ours = [impl for impl in case.impls if impl.name.startswith("megamath")]
    assert [impl.name for impl in ours] == ["megamath (triton)", "megamath, no gradient hint"] + [
        f"megamath (triton), forward {block} columns x {warps} warps" for block, warps in bench.CE_FORWARD_LAUNCHES]
    default = xent._forward_launch
    for impl in ours:
        x = logits.detach().clone().requires_grad_()
        loss = impl.fn(x, targets)
        (grad,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(loss, xent.cross_entropy_ref(logits.float(), targets), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.float(), want, rtol=1e-2, atol=1e-9)  # bf16 rounding of each entry
        assert xent._forward_launch is default  # a launch row puts the default back


def test_the_embedding_backward_rows_run_what_they_name(monkeypatch):
    """Each embedding_backward row's callable, built as the GPU run builds it, on a small table (CPU, the kernel
    under Triton's interpreter): written, then added, ours is the reference's fp32 sums bit for bit, index_add_
    within fp32 rounding, the hook's path within the bf16 rounding of its dense gradient."""
    bench = load_bench(monkeypatch)
    module = importlib.import_module("megamath.kernels.embedding_backward")
    cases = bench.embedding_backward_cases(module.embedding_backward, module.embedding_backward_ref, False, 64, "cpu")
    assert [case.shape.split()[-1] for case in cases] == ["written", "added"]
    generator = torch.Generator().manual_seed(0)
    grad, ids = torch.randn(50, 24, generator=generator).bfloat16(), torch.randint(0, 9, (50,), generator=generator)
    start = torch.randn(12, 24, generator=generator)
    for case in cases:
        add = case.shape.endswith("added")
        want = module.embedding_backward_ref(grad, ids, start.clone(), add)
        ran = [impl for impl in case.impls if impl.fn is not None]
        assert [impl.name for impl in ran] == ["megamath (triton, sorted rows)", "autograd bf16 + hook copy/add",
                                               "index_add_ fp32 (atomics)", "eager (embedding_backward_ref)"]
        for impl in ran:
            out = start.clone()
            impl.fn(grad, ids, out)
            if "hook" in impl.name:
                torch.testing.assert_close(out, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
            elif "atomics" in impl.name:  # each row added to the table in turn: fp32 rounding differs
                torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(out, want), impl.name


def test_the_rms_norm_backward_launch_rows_time_the_backward_and_leave_the_default(monkeypatch):
    """Each launch row of the RMSNorm backward, built as the GPU run builds it (CPU tensors, the interpreter,
    32 rows of width 4096), computes the backward under its own launch and puts the default launch back after,
    also when the kernel fails."""
    bench, module, case = _rms_norm_launch_case(monkeypatch, -1, "backward", "BWD_LAUNCHES")
    default = module._bwd_launch
    dy, x2, w, rstd = case.make()
    want = module.rms_norm_bwd(dy, x2, w, rstd)
    seen = []
    monkeypatch.setattr(module, "_rms_norm_bwd_kernel", _Recording(module._rms_norm_bwd_kernel, seen))
    for impl, launch in zip(case.impls, bench.BWD_LAUNCHES):
        got = impl.fn(dy, x2, w, rstd)
        assert seen.pop() == launch[0]  # the row's num_warps reached the kernel
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the interpreter runs 8 programs whatever the launch
        assert module._bwd_launch is default
    monkeypatch.setattr(module, "_rms_norm_bwd_kernel", None)  # a launch that fails
    with pytest.raises(TypeError):
        case.impls[1].fn(dy, x2, w, rstd)
    assert module._bwd_launch is default


def _rms_norm_launch_case(monkeypatch, index: int, direction: str, launches: str):
    """(the benchmark module, megamath.kernels.rms_norm, the case of RMSNorm's `direction` kernel alone at each of
    the benchmark's `launches`, the first one ours), as the GPU run builds it at 32 rows of width 4096."""
    bench = load_bench(monkeypatch)
    module = importlib.import_module("megamath.kernels.rms_norm")
    case = bench.rms_norm_cases(module.rms_norm, module.rms_norm_ref, False, 512, "cpu")[index]
    assert case.shape == f"32x4096 bf16, {direction} kernel alone" and list(case.work) == ["step"]
    assert [impl.ours for impl in case.impls] == [True] + [False] * (len(getattr(bench, launches)) - 1)
    return bench, module, case


class _Recording:
    """A Triton kernel whose launches record their num_warps."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["num_warps"])
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_the_rope_backward_kernel_row_rotates_back(monkeypatch):
    """The rope row that times the backward's launch alone computes the backward: the rotation by -angle, which
    undoes the forward (CPU, the interpreter, the anchors' shape cut to 8 positions)."""
    bench = load_bench(monkeypatch)
    module = importlib.import_module("megamath.kernels.rope")
    (_, case) = bench.rope_cases(module.rope, module.rope_ref, False, 512, "cpu")
    assert case.shape == "q32/k8 S=8 B=4 D=128, backward kernel alone" and list(case.work) == ["step"]
    q, k = (t.float() for t in case.make())
    back = case.impls[0].fn(*module.rope(q, k, 1e4, 0))
    for got, want in zip(back, (q, k)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_rms_norm_forward_launch_rows_run_the_forward_at_their_warps(monkeypatch):
    """Each forward launch row (CPU, the interpreter, 32 rows of width 4096) gives the default launch's output,
    its num_warps reaches the kernel, and the default is back after each row."""
    bench, module, case = _rms_norm_launch_case(monkeypatch, -2, "forward", "FWD_WARPS")
    default = module._num_warps
    assert default(4096) == bench.FWD_WARPS[0]  # the first row is the default launch
    x, w = case.make()
    want = module.rms_norm_fwd(x, w, 1e-5)
    seen = []
    monkeypatch.setattr(module, "_rms_norm_fwd_kernel", _Recording(module._rms_norm_fwd_kernel, seen))
    for impl, warps in zip(case.impls, bench.FWD_WARPS):
        got = impl.fn(x, w)
        assert seen.pop() == warps and module._num_warps is default
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
