"""Kernel benchmarks: each megamath kernel against every peer present, measured in the same run.

    python perf/bench_kernels.py [--ops rms_norm,rope,...] [--no-compile] [--out DIR]

On a GPU, per op and pass (shapes and conventions of shared/anchors/README.md):
  time        median of CUDA-event timings (`triton.testing.do_bench`)
  achieved    GB/s (bytes below / time) or TFLOP/s (FLOPs below / time)
  floor       the napkin minimum: bytes / measured copy bandwidth, or FLOPs / measured bf16 matmul
              rate; both ceilings are measured at the start of the run (2 GiB d2d copy counting read +
              write; 8192^3 bf16 matmul on random data)
  vs ours     peer time / our time (above 1: ours is faster)
  extra MiB   torch.cuda.max_memory_allocated beyond what was allocated before the call (outputs and
              gradients included)
Peers: torch eager (the op's `_ref`), `torch.compile` of the ref, F.rms_norm, SDPA per backend (flash,
cuDNN, efficient), our CUDA C++ RMSNorm, Liger-Kernel, flash-attn, apex. One that is not importable is
listed as absent, one that fails as error: nothing is faked. The table is printed and written to
`perf/results/kernels-YYYY-MM-DD.md` (or --out).

Without CUDA it runs a correctness-only pass at tiny shapes (kernels under TRITON_INTERPRET=1 against
their refs, three-way tolerance) and says that timings need a GPU.

Bytes and FLOPs (bf16 = 2 bytes): rms_norm fwd reads x, writes y; bwd reads x, dy, writes dx; with the
residual add, fwd reads x and delta, writes h and y, bwd reads h, dy and dh, writes dx. rope reads
and writes q and k (fwd and bwd alike). attention causal fwd FLOPs = 4·B·H·S²·D / 2, bwd = 2.5 × fwd.
swiglu fwd reads gate, up, writes out; bwd reads gate, up, dout, writes dgate, dup. cross-entropy fwd+bwd
reads the logits and writes their gradient (the least any of them can do; ours reads each row a second
time right after the first, from cache where the rows in flight fit it, as Liger-Kernel's does). adamw
reads p, g, m, v and writes p, m, v (fp32: 28 B/param). sum_of_squares (the gradient norm's pass) reads the
gradient buffer once (the fp64 reference first copies it to fp64: 18 B per bf16 element instead of 2).
embedding_backward reads the tokens' bf16 output gradients and ids, and writes the whole fp32 table (the
step's first micro-batch) or reads and writes only the rows the tokens touch (a later one).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from megamath.atomic_io import write_text_atomically

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "perf" / "results"
OPS = ("rms_norm", "rope", "flash_attention", "swiglu", "cross_entropy", "adamw_step", "sum_of_squares",
       "embedding_backward")
KERNEL_MODULE = {"rms_norm": "rms_norm", "rope": "rope", "flash_attention": "flash_attention", "swiglu": "swiglu",
                 "cross_entropy": "cross_entropy", "adamw_step": "adamw", "sum_of_squares": "sum_of_squares",
                 "embedding_backward": "embedding_backward"}


def kernel(name: str):
    """(kernel, ref) from megamath.kernels, or None when the kernel file is missing or broken."""
    try:
        module = importlib.import_module(f"megamath.kernels.{KERNEL_MODULE[name]}")
        return getattr(module, name), getattr(module, f"{name}_ref")
    except (ImportError, AttributeError) as e:
        print(f"[skip] {name}: kernel not available ({type(e).__name__}: {e})")
        return None


def optional(module: str, attr: str):
    """A peer's entry point, or None when its package is not importable here."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - an optional peer may fail to import in many ways
        return None


# ----------------------------------------------------------------------------------------------- model
@dataclass
class Impl:
    """One implementation of an op: `fn(*inputs)`; `make` overrides the op's inputs (another layout)."""
    name: str
    fn: Callable | None
    make: Callable | None = None
    ours: bool = False
    absent: str = ""


@dataclass
class Case:
    """One op at one shape: inputs (the first n_diff are differentiated) and the work of each pass."""
    op: str
    shape: str
    make: Callable[[], tuple]
    n_diff: int
    work: dict  # pass -> (amount, "B" or "FLOP"); passes: "fwd", "bwd", "fwd+bwd" (scalar loss), "step"
    impls: list[Impl] = field(default_factory=list)


@dataclass
class Row:
    op: str
    impl: str
    pas: str
    shape: str
    status: str = "ok"
    ms: float = float("nan")
    rate: float = float("nan")
    unit: str = ""
    floor_ms: float = float("nan")
    extra_mib: float = float("nan")
    ours: bool = False


# ------------------------------------------------------------------------------------------ measuring
def time_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def measure_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), as the anchors measure them."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255).repeat(2)  # 2 GiB
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / (time_ms(lambda: a @ b) * 1e-3) / 1e12
    return copy_gbps, tflops


def pass_fn(case: Case, impl: Impl, pas: str):
    """The closure timed for one pass, and the tensors it keeps alive."""
    inputs = (impl.make or case.make)()
    diff = [t.requires_grad_() for t in inputs[: case.n_diff]]
    if pas == "fwd":
        return lambda: impl.fn(*inputs)
    if pas == "step":  # an optimizer step: in place, no autograd
        return lambda: impl.fn(*inputs)
    if pas == "fwd+bwd":
        return lambda: torch.autograd.grad(impl.fn(*inputs), diff)
    out = impl.fn(*inputs)  # "bwd": time the backward alone on a retained graph
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, diff, grads, retain_graph=True)


def run_case(case: Case, ceilings: tuple[float, float]) -> list[Row]:
    rows = []
    for pas, (amount, kind) in case.work.items():
        for impl in case.impls:
            row = Row(case.op, impl.name, pas, case.shape, ours=impl.ours)
            rows.append(row)
            if impl.fn is None:
                row.status = f"absent{': ' + impl.absent if impl.absent else ''}"
                continue
            fn = None
            try:
                fn = pass_fn(case, impl, pas)
                row.ms = time_ms(fn)
                row.extra_mib = peak_extra_mib(fn)
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
            finally:
                del fn
                torch.cuda.empty_cache()
            if kind == "B":
                row.rate, row.unit, row.floor_ms = amount / row.ms / 1e6, "GB/s", amount / ceilings[0] / 1e6
            else:
                row.rate, row.unit, row.floor_ms = amount / row.ms / 1e9, "TFLOP/s", amount / ceilings[1] / 1e9
            print(f"  {case.op:15s} {impl.name:26s} {pas:8s} {row.ms:9.3f} ms  {row.status}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ ops
def compiled(ref, enable: bool) -> Impl:
    if not enable:
        return Impl("torch.compile(ref)", None, absent="skipped (--no-compile)")
    return Impl("torch.compile(ref)", torch.compile(ref, dynamic=False))


def _randn(dev):
    return lambda *shape, dtype=torch.bfloat16: torch.randn(*shape, device=dev, dtype=dtype)


# One builder per op (each its own scope, so the closures below bind this op's names).
def rms_norm_cases(rms_norm, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    randn, m, n = _randn(dev), 16384 // shrink, 4096
    nbytes = m * n * 2
    is_available = optional("megamath.kernels.rms_norm_cuda", "is_available")
    cuda_fn = optional("megamath.kernels.rms_norm_cuda", "rms_norm_cuda") if is_available and is_available() else None
    apex_fn = optional("apex.normalization.fused_layer_norm", "fused_rms_norm_affine")
    liger = optional("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    return [Case("rms_norm", f"{m}x{n} bf16", lambda: (randn(m, n), 1 + 0.1 * randn(n)), 2,
                 {"fwd": (2 * nbytes, "B"), "bwd": (3 * nbytes, "B")}, [
        Impl("megamath (triton)", lambda x, w: rms_norm(x, w, 1e-5), ours=True),
        Impl("megamath CUDA C++", cuda_fn and (lambda x, w: cuda_fn(x, w, 1e-5)), absent="extension not built"),
        Impl("eager (rms_norm_ref)", lambda x, w: ref(x, w, 1e-5)),
        compiled(ref, use_compile),
        Impl("F.rms_norm", lambda x, w: F.rms_norm(x, (n,), w, 1e-5)),
        Impl("liger", liger and (lambda x, w: liger.apply(x, w, 1e-5, 0.0, "llama"))),
        Impl("apex", apex_fn and (lambda x, w: apex_fn(x, w, (n,), 1e-5))),
    ]), add_rms_norm_case(rms_norm, use_compile, m, n, dev), rms_norm_fwd_launch_case(m, n, dev),
        rms_norm_bwd_launch_case(m, n, dev)]


FWD_WARPS = (8, 4, 16, 32)
"""num_warps of the RMSNorm forward to time (megamath.kernels.rms_norm._num_warps picks the first at width 4096):
the forward ran 3 % behind Liger-Kernel's, at the same launch, on the H200."""


def rms_norm_fwd_launch_case(m: int, n: int, dev: str) -> Case:
    """The forward kernel alone (no autograd) at each of FWD_WARPS."""
    module = importlib.import_module("megamath.kernels.rms_norm")
    randn, nbytes = _randn(dev), m * n * 2

    def at(warps):
        def run(x, w):
            with mock.patch.object(module, "_num_warps", lambda block: warps):
                return module.rms_norm_fwd(x, w, 1e-5)
        return run

    return Case("rms_norm", f"{m}x{n} bf16, forward kernel alone", lambda: (randn(m, n), 1 + 0.1 * randn(n)), 0,
                {"step": (2 * nbytes, "B")},
                [Impl(f"megamath (triton) {warps} warps", at(warps), ours=i == 0) for i, warps in enumerate(FWD_WARPS)])


BWD_LAUNCHES = ((16, 2), (8, 2), (16, 4), (32, 1))
"""(num_warps, programs per SM) of the RMSNorm backward to time (megamath.kernels.rms_norm._bwd_launch picks the
first at width 4096): which one fills the GPU best is measured."""


def rms_norm_bwd_launch_case(m: int, n: int, dev: str) -> Case:
    """The backward kernel alone (no autograd) at each launch of BWD_LAUNCHES: the launch that sets the default,
    and, against the autograd row, what the host spends around the kernel."""
    module = importlib.import_module("megamath.kernels.rms_norm")
    randn, nbytes = _randn(dev), m * n * 2

    def make():
        x, w = randn(m, n), 1 + 0.1 * randn(n)
        _, x2, rstd = module.rms_norm_fwd(x, w, 1e-5)
        return randn(m, n), x2, w, rstd

    def at(launch):
        def run(dy, x2, w, rstd):
            with mock.patch.object(module, "_bwd_launch", lambda block: launch):
                return module.rms_norm_bwd(dy, x2, w, rstd)
        return run

    return Case("rms_norm", f"{m}x{n} bf16, backward kernel alone", make, 0, {"step": (3 * nbytes, "B")}, [
        Impl(f"megamath (triton) {warps} warps, {per_sm} per SM", at((warps, per_sm)), ours=i == 0)
        for i, (warps, per_sm) in enumerate(BWD_LAUNCHES)])


def add_rms_norm_case(rms_norm, use_compile: bool, m: int, n: int, dev: str) -> Case:
    """The pre-norm block's residual add and norm: (h, y) = (x + delta, rms_norm(h)), fused or not."""
    module = importlib.import_module("megamath.kernels.rms_norm")
    randn, nbytes = _randn(dev), m * n * 2

    def unfused(x, delta, w):  # what the block ran before: the add's h, then the norm kernel reading it back
        h = x + delta
        return h, rms_norm(h, w, 1e-5)
    return Case("rms_norm", f"{m}x{n} bf16 + residual add", lambda: (randn(m, n), randn(m, n), 1 + 0.1 * randn(n)),
                3, {"fwd": (4 * nbytes, "B"), "bwd": (4 * nbytes, "B")}, [
        Impl("megamath add_rms_norm (triton)", lambda x, d, w: module.add_rms_norm(x, d, w, 1e-5), ours=True),
        Impl("megamath: torch add, then rms_norm", unfused),
        Impl("eager (add_rms_norm_ref)", lambda x, d, w: module.add_rms_norm_ref(x, d, w, 1e-5)),
        compiled(module.add_rms_norm_ref, use_compile),
    ])


def rope_cases(rope, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    randn, (b, s, hq, hk, d) = _randn(dev), (4, 4096 // shrink, 32, 8, 128)
    nbytes = 2 * 2 * b * s * (hq + hk) * d
    liger = optional("liger_kernel.ops.rope", "LigerRopeFunction")

    def liger_inputs():  # liger's layout is (B, H, S, D); cos/sin (1, S, D) built outside the timing
        inv = 1.0 / 1e4 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
        emb = torch.arange(s, device=dev, dtype=torch.float32)[:, None] * inv[None]
        emb = torch.cat([emb, emb], -1)[None]  # (1, S, D)
        return randn(b, hq, s, d), randn(b, hk, s, d), emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)

    return [Case("rope", f"q{hq}/k{hk} S={s} B={b} D={d}", lambda: (randn(b, s, hq, d), randn(b, s, hk, d)), 2,
                 {"fwd": (nbytes, "B"), "bwd": (nbytes, "B")}, [
        Impl("megamath (triton)", lambda q, k: rope(q, k, 1e4, 0), ours=True),
        Impl("eager (rope_ref, fp32)", lambda q, k: ref(q, k, 1e4, 0)),
        compiled(ref, use_compile),
        Impl("liger", liger and (lambda q, k, cos, sin: liger.apply(q, k, cos, sin)), make=liger_inputs),
    ]), rope_launch_case(b, s, hq, hk, d, dev)]


def rope_launch_case(b: int, s: int, hq: int, hk: int, d: int, dev: str) -> Case:
    """The backward's kernel launch alone (the rotation by -angle into new tensors, no autograd): against the
    autograd row, what the host spends around the kernel."""
    module, randn = importlib.import_module("megamath.kernels.rope"), _randn(dev)
    return Case("rope", f"q{hq}/k{hk} S={s} B={b} D={d}, backward kernel alone",
                lambda: (randn(b, s, hq, d), randn(b, s, hk, d)), 0, {"step": (2 * 2 * b * s * (hq + hk) * d, "B")}, [
        Impl("megamath (triton)", lambda dq, dk: module._rope_launch(dq, dk, 1e4, 0, -1.0), ours=True)])


def attention_cases(attn, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flash_attn_func = optional("flash_attn", "flash_attn_func")
    randn, (b, s, d) = _randn(dev), (4, 4096 // shrink, 128)
    out = []
    for hq, hk in ((32, 32), (32, 8)):
        flops = 4 * b * hq * s * s * d / 2

        def sdpa(backend, gqa=hq != hk):
            def fn(q, k, v):  # SDPA's native layout (B, H, S, D)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return fn

        def bshd(hq=hq, hk=hk):
            return randn(b, s, hq, d), randn(b, s, hk, d), randn(b, s, hk, d)

        def bhsd(hq=hq, hk=hk):
            return randn(b, hq, s, d), randn(b, hk, s, d), randn(b, hk, s, d)

        ours, label = (lambda q, k, v: attn(q, k, v, True)), "megamath (triton)"
        if dev == "cuda":  # ours as a run uses it: tiles tuned on this GPU for this shape at start-up
            from megamath.kernels import flash_attention_tuning
            from megamath.kernels.flash_attention import use_blocks

            try:  # before any row: a failure here must not take every peer's row with it
                tiles = flash_attention_tuning.tune_flash_attention(b, s, hq, hk, d, torch.bfloat16, dev)
            except Exception as e:  # noqa: BLE001 - reported, ours then runs its default tiles
                print(f"attention B={b} S={s} H={hq}/{hk}: tuning failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}); ours runs its default tiles", flush=True)
                blocks, label = None, "megamath (triton, default tiles: tuning failed)"
            else:
                print(f"attention B={b} S={s} H={hq}/{hk}: {tiles.summary()}\n{tiles.timings()}", flush=True)
                blocks, label = tiles.blocks, "megamath (triton, tuned tiles)"

            def ours(q, k, v, blocks=blocks):
                use_blocks(d, q.dtype, blocks)  # this case's tiles (the other case tuned its own); None: defaults
                return attn(q, k, v, True)

        out.append(Case("attention", f"B={b} S={s} H={hq}/{hk} D={d} causal", bshd, 3,
                        {"fwd": (flops, "FLOP"), "bwd": (2.5 * flops, "FLOP")}, [
            Impl(label, ours, ours=True),
            Impl("sdpa-flash", sdpa(SDPBackend.FLASH_ATTENTION), make=bhsd),
            Impl("sdpa-cudnn", sdpa(SDPBackend.CUDNN_ATTENTION), make=bhsd),
            Impl("sdpa-efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION), make=bhsd),
            Impl("flash-attn", flash_attn_func and (lambda q, k, v: flash_attn_func(q, k, v, causal=True))),
            Impl("eager (flash_attention_ref)", lambda q, k, v: ref(q, k, v, True)),
        ]))
    return out


def swiglu_cases(swiglu, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    randn, m, n = _randn(dev), 16384 // shrink, 11008
    nbytes = m * n * 2
    liger = optional("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    return [Case("swiglu", f"{m}x{n} bf16", lambda: (randn(m, n), randn(m, n)), 2,
                 {"fwd": (3 * nbytes, "B"), "bwd": (5 * nbytes, "B")}, [
        Impl("megamath (triton)", swiglu, ours=True),
        Impl("eager (swiglu_ref)", ref),
        compiled(ref, use_compile),
        Impl("liger", liger and liger.apply),
    ])]


def cross_entropy_cases(xent, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    randn, n, v = _randn(dev), 8192 // shrink, 32016
    liger = optional("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction")

    # Newer Liger-Kernel (0.8.5) takes a class-weight tensor third, older ones do not; apply() takes no keywords.
    weight = (None,) if liger and "weight" in inspect.signature(liger.forward).parameters else ()

    def liger_xent(x, t):
        loss = liger.apply(x, t, *weight)
        return loss[0] if isinstance(loss, tuple) else loss

    return [Case("cross_entropy", f"{n}x{v} bf16", lambda: (randn(n, v), torch.randint(0, v, (n,), device=dev)), 1,
                 {"fwd+bwd": (2 * n * v * 2, "B")}, [
        # As the training step calls it: ids checked on the data side (no host read here) and the loss's
        # gradient (1.0 from the scalar loss, as the fwd+bwd pass sends) named, so the forward writes it.
        Impl("megamath (triton)", lambda x, t: xent(x, t, check_targets=False, expected_grad=1.0), ours=True),
        # Without the hint (the backward reads the logits again, as under TP): what the hint saves, measured.
        Impl("megamath, no gradient hint", lambda x, t: xent(x, t, check_targets=False)),
        Impl("eager (cross_entropy_ref, fp32)", ref),
        compiled(ref, use_compile),
        Impl("F.cross_entropy (bf16)", F.cross_entropy),
        Impl("liger", liger and liger_xent),
    ] + [Impl(f"megamath (triton), forward {block} columns x {warps} warps", forward_at((block, warps)))
         for block, warps in CE_FORWARD_LAUNCHES])]


CE_FORWARD_LAUNCHES = ((4096, 16), (8192, 32), (2048, 8))
"""(BLOCK_V, num_warps) of the cross-entropy forward to time beside the default
(megamath.kernels.cross_entropy._forward_launch), each with the gradient hint as the training step runs it."""


def forward_at(launch):
    """Our cross-entropy as the training step calls it, its forward at `launch`."""
    module = importlib.import_module("megamath.kernels.cross_entropy")

    def run(x, t):
        with mock.patch.object(module, "_forward_launch", lambda n_cols: launch):
            return module.cross_entropy(x, t, check_targets=False, expected_grad=1.0)
    return run


def adamw_cases(adamw_step, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    randn, n = _randn(dev), 100_000_000 // shrink
    hp = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)

    def flat():  # params, grads, exp_avg, exp_avg_sq: flat fp32 as in a ZeRO-1 shard
        return randn(n, dtype=torch.float32), randn(n, dtype=torch.float32), torch.zeros(n, device=dev), \
            torch.zeros(n, device=dev)

    def torch_optim(**flags):
        def make():
            p = torch.nn.Parameter(randn(n, dtype=torch.float32))
            p.grad = randn(n, dtype=torch.float32)
            return (torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **flags),)
        return make

    def with_copy(step):  # the bf16 model copy written after the step, as a trainer must
        def fn(opt, lowp):
            step(opt)
            lowp.copy_(opt.param_groups[0]["params"][0].detach())
        return fn

    def torch_optim_lowp(**flags):
        return lambda: (*torch_optim(**flags)(), torch.empty(n, device=dev, dtype=torch.bfloat16))

    shape = f"{n / 1e6:g}M params fp32"
    return [
        Case("adamw", shape, flat, 0, {"step": (28 * n, "B")}, [
            Impl("megamath (triton)", lambda p, g, m, v: adamw_step(p, g, m, v, **hp), ours=True),
            Impl("eager (adamw_step_ref)", lambda p, g, m, v: ref(p, g, m, v, **hp)),
            Impl("torch AdamW fused", lambda opt: opt.step(), make=torch_optim(fused=True)),
            Impl("torch AdamW foreach", lambda opt: opt.step(), make=torch_optim(foreach=True)),
        ]),
        Case("adamw", shape + " + bf16 copy", lambda: (*flat(), torch.empty(n, device=dev, dtype=torch.bfloat16)), 0,
             {"step": (30 * n, "B")}, [
            Impl("megamath (triton)", lambda p, g, m, v, lp: adamw_step(p, g, m, v, **hp, params_lowp=lp), ours=True),
            Impl("torch AdamW fused + copy_", with_copy(lambda opt: opt.step()), make=torch_optim_lowp(fused=True)),
        ]),
    ]


def sum_of_squares_cases(sum_of_squares, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    """The gradient norm's pass over a ZeRO-1 buffer, bf16 (grad_dtype auto on one GPU) and fp32. Peers: the fp64
    norm the optimizer ran before (eager and compiled), and torch's fp32 norm (no copy, but fp32 sums)."""
    n = 500_000_000 // shrink
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        shape = f"{n / 1e6:g}M {str(dtype)[6:]}"
        out.append(Case("sum_of_squares", shape, lambda dtype=dtype: (torch.randn(n, device=dev, dtype=dtype),), 0,
                        {"fwd": (n * dtype.itemsize, "B")}, [
            Impl("megamath (triton, fp64 sums)", sum_of_squares, ours=True),
            Impl("eager (fp64 norm ** 2)", ref),
            compiled(ref, use_compile),
            Impl("torch fp32 norm ** 2", lambda x: torch.linalg.vector_norm(x, dtype=torch.float32) ** 2),
        ]))
    return out


def embedding_backward_cases(embedding_backward, ref, use_compile: bool, shrink: int, dev: str) -> list[Case]:
    """The embedding table's gradient into ZeRO-1's fp32 buffer from bf16 output gradients, at Code Llama 7B's
    vocabulary and width and one 4096-token micro-batch (ids uniform over the vocabulary), for the step's first
    micro-batch (the table written) and a later one (added). Peers: what the hook's path runs (autograd's dense
    bf16 gradient, then the hook's copy or add), eager and compiled; index_add_ of the fp32 rows into the buffer
    (atomics: fast, but its sums are not reproducible); the plain-torch reference."""
    vocab, width, n = 32016, 4096, 4096 // shrink
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    touched = ids.unique().numel()

    def make():
        return torch.randn(n, width, device=dev, dtype=torch.bfloat16), ids.to(dev), torch.zeros(vocab, width,
                                                                                              device=dev)

    def hook_path(add: bool):
        def fn(grad, ids, out):
            dense = torch.ops.aten.embedding_dense_backward(grad, ids, out.shape[0], -1, False)  # (V, D) bf16
            return out.add_(dense) if add else out.copy_(dense)
        return fn

    def atomics(add: bool):
        def fn(grad, ids, out):
            return (out if add else out.zero_()).index_add_(0, ids, grad.float())
        return fn

    out = []
    for add in (False, True):
        table = touched * width * 8 if add else vocab * width * 4
        out.append(Case("embedding_backward", f"{n} tokens, {vocab}x{width} fp32 {'added' if add else 'written'}",
                        make, 0, {"step": (n * width * 2 + n * 8 + table, "B")}, [
            Impl("megamath (triton, sorted rows)", lambda g, i, o, add=add: embedding_backward(g, i, o, add),
                 ours=True),
            Impl("autograd bf16 + hook copy/add", hook_path(add)),
            Impl("torch.compile(hook path)", torch.compile(hook_path(add), dynamic=False)) if use_compile else
            Impl("torch.compile(hook path)", None, absent="skipped (--no-compile)"),
            Impl("index_add_ fp32 (atomics)", atomics(add)),
            Impl("eager (embedding_backward_ref)", lambda g, i, o, add=add: ref(g, i, o, add)),
        ]))
    return out


BUILDERS = {"rms_norm": rms_norm_cases, "rope": rope_cases, "flash_attention": attention_cases,
            "swiglu": swiglu_cases, "cross_entropy": cross_entropy_cases, "adamw_step": adamw_cases,
            "sum_of_squares": sum_of_squares_cases, "embedding_backward": embedding_backward_cases}


def cases(ops: list[str], use_compile: bool, shrink: int = 1, dev: str = "cuda",
          missing: list[str] | None = None) -> list[Case]:
    """The anchors' shapes; `shrink` divides the token (or parameter) count for a quick smoke run. Ops whose
    kernel cannot be imported are appended to `missing`."""
    out = []
    for op in ops:
        k = kernel(op)
        if k is not None:
            out += BUILDERS[op](*k, use_compile, shrink, dev)
        elif missing is not None:
            missing.append(op)
    return out


# --------------------------------------------------------------------------------------------- report
def table(rows: list[Row]) -> list[str]:
    ours = {}
    for r in rows:
        if r.ours and r.status == "ok":
            ours.setdefault((r.op, r.shape, r.pas), r.ms)
    lines = ["| op | shape | pass | impl | ms | achieved | floor ms | floor/time | vs ours | extra MiB | status |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.op} | {r.shape} | {r.pas} | {r.impl} | | | | | | | {r.status} |")
            continue
        mine = ours.get((r.op, r.shape, r.pas))
        vs = "—" if r.ours or mine is None else f"{r.ms / mine:.2f}x"
        lines.append(f"| {r.op} | {r.shape} | {r.pas} | {r.impl} | {r.ms:.3f} | {r.rate:.1f} {r.unit} | "
                     f"{r.floor_ms:.3f} | {100 * r.floor_ms / r.ms:.0f}% | {vs} | {r.extra_mib:.1f} | ok |")
    return lines


def environment() -> str:
    import triton
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"triton {triton.__version__}")


def result_suffix(args) -> str:
    """What the results file's name adds to kernels-DATE: a subset of ops, --shrink or --no-compile, so that
    such a run (the GPU check's attention-only one) never replaces that day's full table."""
    ops = args.ops.split(",")
    parts = ["-".join(ops)] if sorted(ops) != sorted(OPS) else []
    parts += [f"shrink{args.shrink}"] if args.shrink > 1 else []
    parts += ["nocompile"] if args.no_compile else []
    return "".join(f"-{part}" for part in parts)


def gpu_main(args) -> int:
    ops = args.ops.split(",")
    env = environment()
    print(f"device: {env}", flush=True)
    copy_gbps, tflops = measure_ceilings()
    print(f"ceilings: d2d copy {copy_gbps:.1f} GB/s (read+write), bf16 matmul 8192^3 {tflops:.1f} TFLOP/s", flush=True)
    today = datetime.date.today().isoformat()
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels-{today}{result_suffix(args)}.md"
    header = [f"# Kernel benchmarks, {today}", "", f"- device: {env}",
              f"- ceilings (this run): d2d copy {copy_gbps:.1f} GB/s read+write; bf16 matmul 8192^3 {tflops:.1f} TFLOP/s",
              "- time: median of `triton.testing.do_bench`; floor: bytes / copy ceiling or FLOPs / matmul ceiling; "
              "vs ours: peer time / our time (above 1: ours is faster); extra MiB: peak allocation beyond the "
              "inputs (outputs and gradients included)",
              "- bytes and FLOPs: perf/bench_kernels.py's docstring (the conventions of shared/anchors/README.md)", ""]
    rows: list[Row] = []
    missing: list[str] = []
    for case in cases(ops, not args.no_compile, args.shrink, missing=missing):
        rows += run_case(case, (copy_gbps, tflops))
        # after each op, so a cut-off run keeps its rows; by rename, so a kill or full disk mid-write keeps them too
        write_text_atomically(path, "\n".join(header + table(rows)) + "\n")
    print("\n".join(table(rows)))
    print(f"wrote {path}")
    # Peers may be absent or fail; our own kernels must be there and run (the GPU check reads this status).
    failures = [f"{op}: kernel not available" for op in missing]
    failures += [f"{r.op} {r.shape} {r.pas}: {r.status}" for r in rows if r.ours and r.status != "ok"]
    for failure in failures:
        print(f"FAILED (ours): {failure}", file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------ CPU correctness
def cpu_main(args) -> int:
    """Tiny shapes, kernels under Triton's interpreter, each against its ref with the three-way rule."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO / "tests"))
    from kernel_tolerance import assert_close_3way

    def check(name, fn, ref, make, n_diff):
        """Forward outputs and gradients of fn vs ref on fp32-upcast inputs and on the same inputs."""
        def run(f, inputs):
            inputs = [t.detach().clone().requires_grad_(i < n_diff) for i, t in enumerate(inputs)]
            out = f(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            gen = torch.Generator().manual_seed(0)
            grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
            return list(outs) + list(torch.autograd.grad(outs, inputs[:n_diff], grads))
        inputs = make()
        upcast = [t.float() if t.is_floating_point() else t for t in inputs]
        for i, (a, b, c) in enumerate(zip(run(fn, inputs), run(ref, upcast), run(ref, inputs))):
            assert_close_3way(a, b, c, name=f"{name} output/grad {i}")

    torch.manual_seed(0)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, dtype=dtype)  # noqa: E731
    ops = args.ops.split(",")
    failures = 0
    for op in ops:
        k = kernel(op)
        if k is None:
            continue
        fn, ref = k
        try:
            for dtype in (torch.float32, torch.bfloat16):
                if op == "rms_norm":
                    check(op, fn, ref, lambda: (r(5, 100, dtype=dtype), 1 + 0.1 * r(100, dtype=dtype)), 2)
                elif op == "rope":
                    check(op, fn, ref, lambda: (r(2, 7, 4, 16, dtype=dtype), r(2, 7, 2, 16, dtype=dtype)), 2)
                elif op == "flash_attention":
                    check(op, fn, ref, lambda: tuple(r(1, 17, h, 16, dtype=dtype) for h in (4, 2, 2)), 3)
                elif op == "swiglu":
                    check(op, fn, ref, lambda: (r(5, 100, dtype=dtype), r(5, 100, dtype=dtype)), 2)
                elif op == "cross_entropy":
                    t = torch.randint(0, 50, (7,))
                    t[3] = -100
                    check(op, fn, ref, lambda: (r(7, 50, dtype=dtype), t), 1)
                elif op == "sum_of_squares":
                    x = r(3 * 16384 + 17, dtype=dtype)
                    want = ref(x)  # fp64: the same squares from bf16 and its fp32 upcast; only the sum's order differs
                    assert_close_3way(fn(x), ref(x.float()), want, atol=1e-12 * want.item(), name="sum_of_squares")
                elif op == "embedding_backward":
                    g, ids = r(40, 24, dtype=dtype), torch.randint(-1, 31, (40,))  # -1 and 30: foreign ids
                    start = r(30, 24, dtype=torch.float32)
                    for add in (False, True):
                        mine, theirs, upcast = start.clone(), start.clone(), start.clone()
                        fn(g, ids, mine, add)
                        ref(g, ids, theirs, add)
                        ref(g.float(), ids, upcast, add)  # the same fp32 sums: bf16 converts exactly
                        assert_close_3way(mine, upcast, theirs, name=f"embedding_backward add={add}")
                elif op == "adamw_step" and dtype == torch.float32:
                    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
                    bufs = [r(1000, dtype=torch.float32), r(1000, dtype=torch.float32),
                            r(1000, dtype=torch.float32), r(1000, dtype=torch.float32).abs()]
                    mine, theirs = [t.clone() for t in bufs], [t.clone() for t in bufs]
                    fn(*mine, **hp)
                    ref(*theirs, **hp)
                    for name, a, b in zip(("params", "exp_avg", "exp_avg_sq"), mine[:1] + mine[2:], theirs[:1] + theirs[2:]):
                        assert_close_3way(a, b, b, name=f"adamw {name}")
            what = {"adamw_step": "one step matches", "sum_of_squares": "the sum matches",
                    "embedding_backward": "the written and added tables match"}.get(
                op, "forward and backward match")
            print(f"[ok]   {op}: {what} {op}_ref ({'fp32' if op == 'adamw_step' else 'fp32, bf16'})")
        except AssertionError as e:
            failures += 1
            print(f"[FAIL] {op}: {e}")
    cuda_available = optional("megamath.kernels.rms_norm_cuda", "is_available")
    print(f"[skip] rms_norm_cuda: {'needs a CUDA GPU' if cuda_available else 'module missing'}")
    print("timings need a GPU: this was the CPU correctness pass only (tiny shapes, Triton interpreter)")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (saves minutes)")
    parser.add_argument("--out", default="", help="folder for kernels-YYYY-MM-DD.md (default perf/results; a subset "
                        "of ops, --shrink or --no-compile is named in the file's name)")
    parser.add_argument("--shrink", type=int, default=1, help="divide token/parameter counts by this (smoke runs)")
    parser.add_argument("--cpu", action="store_true", help="run the CPU correctness pass even with a GPU")
    args = parser.parse_args(argv)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        parser.error(f"unknown ops: {', '.join(sorted(unknown))}")
    if args.cpu or not torch.cuda.is_available():
        return cpu_main(args)
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
