"""What each Triton kernel asks of an A100 and an H100, read from the compiler on a machine without a GPU.

    python perf/kernel_resources.py                       # every kernel, sm_80 and sm_90a
    python perf/kernel_resources.py --only flash_attention --arch 90 --out perf/results

Every kernel is compiled by the real launch code (megamath.kernels' launchers, called on CPU tensors of
the default training case: Code Llama 7B's width, S 4096, micro-batch 1) for each target, and each
compiled program is reported with its shared memory, registers per thread, the blocks one SM holds at
once (occupancy), spilled bytes, the tensor-core instruction its dots use (`mma` on Ampere, `wgmma` on
Hopper) and its widest global access.
Attention is compiled at its default tiles and at every tile set the start-up tuner may try.

Why: GPU time is scarce, and a tile set that cannot launch (shared memory or registers over the GPU's
limit), spills registers, or leaves Hopper's wgmma unused is visible in the compiler's output before any
GPU time is spent. Nothing here is a timing: it says what will not run or will run badly, never how fast.
The figures are this machine's Triton's; another Triton version compiles differently.

The exit status is 1 when a configuration a run launches by default (rows marked `default`) cannot
launch, 2 when this machine cannot compile for the GPU (Triton without its NVIDIA back end, or
TRITON_INTERPRET=1 set). Spills and Hopper dots without wgmma are signs of slowness, printed for the
default rows but not fatal; tuning candidates with any problem are listed only (the tuner skips a
candidate that fails to launch and times the rest).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SHARED_LIMIT = {80: 166912, 90: 232448}
"""Largest shared memory one block may opt into, in bytes: 163 KiB on an A100, 227 KiB on an H100."""
REGISTER_FILE = 65536
"""32-bit registers per SM (both GPUs): registers per thread x threads per block must fit."""
SM_SHARED = {80: 167936, 90: 233472}
"""Shared memory per SM, in bytes (164 and 228 KiB); each resident block also takes 1 KiB of it."""
MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 2048, 32
ARCH_NAMES = {80: "sm_80 (A100)", 90: "sm_90a (H100)"}


@dataclass
class Compiled:
    """One compiled program: a kernel at one configuration for one GPU."""

    case: str
    kernel: str
    config: str
    arch: int
    default: bool
    shared_bytes: int
    registers: int
    spill_bytes: int
    threads: int
    tensor_cores: str
    """'wgmma', 'mma', 'wgmma+mma' (some dots of each) or '-' (no dot)."""
    widest_access_bits: int
    tma: bool = False
    """Whether it copies tiles with the tensor memory accelerator (Hopper's cp.async.bulk.tensor)."""
    error: str = ""
    """Why it did not compile, if it did not (the other figures are then 0)."""

    def blocks_per_sm(self) -> int:
        """Blocks of this program one SM holds at once (occupancy): what registers, shared memory and
        threads allow. Registers are handed out per warp in units of 256. 0 when it cannot launch."""
        if self.error:
            return 0
        warps = self.threads // 32
        registers_per_warp = -(-self.registers * 32 // 256) * 256
        limits = [MAX_BLOCKS_PER_SM, MAX_THREADS_PER_SM // self.threads,
                  REGISTER_FILE // max(1, registers_per_warp * warps)]
        if self.shared_bytes:
            limits.append(SM_SHARED[self.arch] // (self.shared_bytes + 1024))
        return min(limits) if not self.cannot_launch() else 0

    def cannot_launch(self) -> list[str]:
        """Why the GPU would refuse this program at launch (empty when it fits)."""
        if self.error:
            return [f"does not compile: {self.error}"]
        found = []
        if self.shared_bytes > SHARED_LIMIT[self.arch]:
            found.append(f"shared memory {self.shared_bytes / 1024:.0f} KiB over the "
                         f"{SHARED_LIMIT[self.arch] / 1024:.0f} KiB limit")
        if self.registers * self.threads > REGISTER_FILE:
            found.append(f"{self.registers} registers x {self.threads} threads over the register file")
        return found

    def slow_signs(self) -> list[str]:
        """What runs, but slower than it could: spilled registers, Hopper dots on Ampere's instruction."""
        found = [f"spills {self.spill_bytes} B"] if self.spill_bytes else []
        if self.arch >= 90 and "mma" in self.tensor_cores.split("+"):
            found.append("dots without wgmma on Hopper")
        return found


# ------------------------------------------------------------------------------ compiling without a GPU
class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target GPU, and nothing is ever launched."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself assembles with (its helper's signature and result vary between versions)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(arch)
    except TypeError:  # versions whose get_ptxas() takes no architecture
        tool = get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes) from ptxas -v, the assembler Triton itself uses."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as source:
        source.write(ptx)
    try:
        name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={name}", source.name, "-o", os.devnull],
                              capture_output=True, text=True)
    finally:
        os.unlink(source.name)
    log = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if done.returncode or not registers:
        raise RuntimeError(f"ptxas failed for {name}: {log.strip().splitlines()[-1] if log.strip() else done.returncode}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2)) if spills else 0


def _widest_access_bits(ptx: str) -> int:
    """Bits moved by the widest global load or asynchronous global->shared copy of one thread."""
    widest = 0
    for vector, bits in re.findall(r"ld\.global(?:\.[a-z_:0-9]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        widest = max(widest, int(vector or 1) * int(bits))
    for size in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9:]+)* \[[^\]]+\], \[[^\]]+\], (\d+)", ptx):
        widest = max(widest, 8 * int(size))
    return widest


def _tensor_cores(ttgir: str) -> str:
    """The instruction families of the program's dots: 'wgmma', 'mma', both ('wgmma+mma'), or '-'."""
    versions = set(re.findall(r"nvidia_mma<\{versionMajor = (\d)", ttgir))
    return "+".join(name for version, name in (("3", "wgmma"), ("2", "mma")) if version in versions) or "-"


def _config_label(function, constants: dict, warps: int, stages: int) -> str:
    """The kernel's integer constexprs and launch shape, e.g. 'BLOCK_M 64 BLOCK_N 64 HEAD_DIM 128 w4 s3'.
    (Triton also folds integer arguments equal to 1 into constants; those are not the kernel's choice.)"""
    sizes = [f"{function.params[path[0]].name} {value}" for path, value in constants.items()
             if function.params[path[0]].is_constexpr and isinstance(value, int) and not isinstance(value, bool)]
    return " ".join(sizes + [f"w{warps}", f"s{stages}"])


class KernelCompiler:
    """Runs launch code with Triton's launch replaced by an ahead-of-time compile for `arch`."""

    def __init__(self):
        self.compiled: list[Compiled] = []
        self._case = ""
        self._default = False
        self._arch = 0
        self._functions = set()

    def run(self, case: str, launch: Callable[[], object], arch: int, default: bool) -> None:
        from triton import knobs
        from triton.runtime import driver

        self._case, self._default, self._arch = case, default, arch
        for function in self._functions:  # binders cache the target they were created for
            function.device_caches.clear()
        # Not reset afterwards: this is a one-shot tool, and without a GPU there is no driver to go back to.
        driver.set_active(_CompileOnlyDriver(arch))
        knobs.runtime.jit_cache_hook = self._compile
        try:
            launch()
        finally:
            knobs.runtime.jit_cache_hook = None

    def _compile(self, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        """Triton's cache hook: compile for the target and record; True tells Triton not to launch."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        self._functions.add(fn.jit_function)
        source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        options = {name: compile[name] for name in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
        row = dict(case=self._case, kernel=fn.name, arch=self._arch, default=self._default,
                   config=_config_label(fn.jit_function, compile["constants"], compile["num_warps"],
                                        compile["num_stages"]), threads=32 * compile["num_warps"])
        try:
            kernel = triton.compile(source, target=GPUTarget("cuda", self._arch, 32), options=options)
            registers, spills = _ptxas_report(kernel.asm["ptx"], self._arch)
        except Exception as err:  # a compiler error is a finding about this configuration, not the tool's end
            message = str(err).strip().splitlines()
            self.compiled.append(Compiled(**row, shared_bytes=0, registers=0, spill_bytes=0, tensor_cores="-",
                                          widest_access_bits=0,
                                          error=f"{type(err).__name__}: {message[0] if message else ''}"[:200]))
            return True
        self.compiled.append(Compiled(
            **row, shared_bytes=int(kernel.metadata.shared), registers=registers, spill_bytes=spills,
            tensor_cores=_tensor_cores(kernel.asm["ttgir"]), widest_access_bits=_widest_access_bits(kernel.asm["ptx"]),
            tma="cp.async.bulk.tensor" in kernel.asm["ptx"]))
        return True


# ------------------------------------------------------------------------- the launches, default case
MODEL_PRESET, SEQ = "codellama-7b", 4096
"""Code Llama 7B's width at S 4096, micro-batch 1: the training benchmark's default case."""


def _default_shape() -> tuple[int, int, int, int, int]:
    """(hidden, heads, head_dim, ffn, vocab) of the preset, as the model defines them."""
    from megamath.model.config import ModelConfig

    m = ModelConfig.from_preset(MODEL_PRESET)
    return m.hidden_size, m.num_heads, m.head_dim, m.ffn_hidden_size, m.vocab_size


def _cases() -> list[tuple[str, str, bool, Callable[[], object]]]:
    """(op, case label, launched by default, launch) for every kernel configuration worth compiling. A label
    ending in " TMA" needs Hopper (sm_90a): the tuner never tries it on an A100."""
    import torch

    # By module path: the package re-exports each op under its module's name.
    adamw_module, ce_module, fa, tuning, rms_module, rope_module, swiglu_module, squares_module, table_module = (
        importlib.import_module(f"megamath.kernels.{name}") for name in
        ("adamw", "cross_entropy", "flash_attention", "flash_attention_tuning", "rms_norm", "rope", "swiglu",
         "sum_of_squares", "embedding_backward"))

    bf16, tokens = torch.bfloat16, SEQ
    hidden, heads, dim, ffn, vocab = _default_shape()

    def rms_norm(add: bool):
        def launch():  # with `add`, the residual add fused in both ways (the model's pre-norm blocks)
            x, w = torch.empty(tokens, hidden, dtype=bf16), torch.empty(hidden, dtype=bf16)
            _, x2, rstd = rms_module.rms_norm_fwd(x, w, 1e-5, delta=x if add else None)
            rms_module.rms_norm_bwd(x, x2, w, rstd, dres=x if add else None)
        return launch

    def rope():
        qkv = torch.empty(1, SEQ, 3 * heads, dim, dtype=bf16)  # views of a fused projection, as the model
        rope_module._rope_launch(qkv[:, :, :heads], qkv[:, :, heads:2 * heads], 10000.0, 0, 1.0)

    def swiglu():
        gate_up = torch.empty(tokens, 2 * ffn, dtype=bf16)
        gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
        swiglu_module.swiglu_bwd(swiglu_module.swiglu_fwd(gate, up), gate, up)

    def cross_entropy(expected_grad):
        def launch():
            logits = torch.empty(tokens, vocab, dtype=bf16, requires_grad=True)
            targets = torch.zeros(tokens, dtype=torch.int64)
            ce_module.cross_entropy(logits, targets, check_targets=False, expected_grad=expected_grad).backward()
        return launch

    def adamw(grad_dtype):
        def launch():
            n = 1 << 24
            master, m, v = (torch.empty(n) for _ in range(3))
            adamw_module.adamw_step(master, torch.empty(n, dtype=grad_dtype), m, v, lr=1e-4, beta1=0.9, beta2=0.95,
                                    eps=1e-8, weight_decay=0.1, step=1, params_lowp=torch.empty(n, dtype=bf16),
                                    grad_scale=torch.ones(1))
        return launch

    def sum_of_squares(grad_dtype):
        return lambda: squares_module.sum_of_squares(torch.empty(1 << 24, dtype=grad_dtype))

    def embedding_backward(add):
        def launch():  # bf16 output gradients into the fp32 buffer's slot of the table
            grad, ids = torch.empty(tokens, hidden, dtype=bf16), torch.zeros(tokens, dtype=torch.int64)
            table_module.embedding_backward(grad, ids, torch.empty(vocab, hidden), add)
        return launch

    def attention(head_dim, dtype, blocks, forward=True, backward=True):
        def launch():
            q = torch.empty(1, SEQ, heads, head_dim, dtype=dtype)
            scale = head_dim ** -0.5
            o, lse = fa.flash_attention_fwd(q, q, q, True, scale, blocks) if forward else (q, torch.empty(0))
            if backward:
                fa.flash_attention_bwd(q, q, q, q, o, torch.empty(1, heads, SEQ), True, scale, blocks)
        return launch

    cases = [("rms_norm", "rms_norm", True, rms_norm(False)),
             ("rms_norm", "rms_norm + residual add", True, rms_norm(True)), ("rope", "rope", True, rope),
             ("swiglu", "swiglu", True, swiglu),
             ("cross_entropy", "cross_entropy", True, cross_entropy(1.0)),  # training: the gradient in the forward
             ("cross_entropy", "cross_entropy without a gradient hint", True, cross_entropy(None)),  # TP, eval
             ("adamw", "adamw", True, adamw(torch.float32)),
             ("adamw", "adamw bf16 grads", True, adamw(bf16)),  # grad_dtype auto's buffer on one GPU
             ("sum_of_squares", "sum_of_squares", True, sum_of_squares(torch.float32)),  # the gradient norm's pass
             ("sum_of_squares", "sum_of_squares bf16 grads", True, sum_of_squares(bf16)),
             ("embedding_backward", "embedding_backward written", True, embedding_backward(False)),  # 1st micro-batch
             ("embedding_backward", "embedding_backward added", True, embedding_backward(True))]  # later ones
    for head_dim in (dim, 64):  # the model's, and the common smaller one
        default = fa.flash_attention_blocks(head_dim, interpret=False, dtype=bf16, tuned=False)
        cases.append(("flash_attention", f"attention D{head_dim} default tiles", True,
                      attention(head_dim, bf16, default)))
        for fields, candidates, forward in ((tuning._FORWARD_FIELDS, tuning.FORWARD_CANDIDATES, True),
                                            (tuning._BACKWARD_FIELDS, tuning.BACKWARD_CANDIDATES, False)):
            for values in candidates[1:]:  # the first candidate is the default, compiled above
                blocks = dataclasses.replace(default, **dict(zip(fields, values)))
                label = f"attention D{head_dim} {'forward' if forward else 'backward'} candidate {tuning._label(values)}"
                cases.append(("flash_attention", label, False,
                              attention(head_dim, bf16, blocks, forward=forward, backward=not forward)))
    fp32_tiles = fa.flash_attention_blocks(dim, interpret=False, dtype=torch.float32, tuned=False)
    cases.append(("flash_attention", f"attention fp32 D{dim} (checks only)", False,
                  attention(dim, torch.float32, fp32_tiles)))
    return cases


# ---------------------------------------------------------------------------------------------- report
def _table(rows: list[Compiled]) -> str:
    lines = ["| case | kernel | config | GPU | shared KiB | registers | blocks/SM | spills B | tensor cores | widest access "
             "| problems |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        case = r.case + (" (default)" if r.default else "")
        lines.append(f"| {case} | {r.kernel} | {r.config} | {ARCH_NAMES[r.arch]} | {r.shared_bytes / 1024:.1f} | "
                     f"{r.registers} | {r.blocks_per_sm()} | {r.spill_bytes} | {r.tensor_cores} | {r.widest_access_bits} bit"
                     f"{' + TMA' if r.tma else ''} | "
                     f"{'; '.join(r.cannot_launch() + r.slow_signs()) or 'none'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities to compile for (default 80,90)")
    parser.add_argument("--only", default="", help="comma-separated ops (rms_norm, rope, swiglu, cross_entropy, "
                                                   "adamw, sum_of_squares, embedding_backward, flash_attention); default all")
    parser.add_argument("--match", default="", help="only cases whose label contains this text, e.g. 'attention D128'")
    parser.add_argument("--defaults-only", action="store_true", help="skip the tuner's candidate tiles")
    parser.add_argument("--out", default="", help="also write kernel-resources-YYYY-MM-DD-tritonVERSION.md into this folder")
    parser.add_argument("--json", default="", help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_resources: unset TRITON_INTERPRET; the interpreter compiles nothing for a GPU", file=sys.stderr)
        return 2
    try:
        arches = [int(a) for a in args.arch.split(",")]
        unknown = [a for a in arches if a not in SHARED_LIMIT]
        if unknown:
            raise ValueError(f"unknown --arch {unknown[0]}")
    except ValueError as err:
        print(f"kernel_resources: {err}; choose from {sorted(SHARED_LIMIT)}", file=sys.stderr)
        return 2
    try:
        import triton
        from triton import knobs
        import triton.backends.nvidia.compiler  # noqa: F401  (the NVIDIA back end is present)
        knobs.runtime.jit_cache_hook  # noqa: B018  (Triton >= 3.4 calls it before compiling)
    except (ImportError, AttributeError) as err:
        print(f"kernel_resources: this Triton cannot compile for NVIDIA GPUs here ({err})", file=sys.stderr)
        return 2

    cases = _cases()
    hidden, heads, dim, ffn, vocab = _default_shape()
    ops = {op for op, *_ in cases}
    wanted = set(args.only.split(",")) if args.only else ops
    if wanted - ops:
        print(f"kernel_resources: unknown --only {sorted(wanted - ops)[0]}; choose from {sorted(ops)}", file=sys.stderr)
        return 2
    compiler = KernelCompiler()
    for arch in arches:
        for op, label, default, launch in cases:
            needs_hopper = label.endswith(" TMA") and arch < 90
            if op in wanted and args.match in label and (default or not args.defaults_only) and not needs_hopper:
                compiler.run(label, launch, arch, default)

    ptxas_version = subprocess.run([_ptxas_path(max(arches)), "--version"], capture_output=True, text=True)
    ptxas = ptxas_version.stdout.strip().splitlines()[-1] if ptxas_version.stdout.strip() else "unknown"
    report = "\n".join([
        f"# Kernel resources, {datetime.date.today().isoformat()} (compiled, not run: no timings)",
        "",
        f"Triton {triton.__version__}, ptxas {ptxas}; default case: {MODEL_PRESET}'s width (hidden {hidden}, {heads} "
        f"heads, head_dim {dim}, FFN {ffn}, vocab {vocab}), S {SEQ}, micro-batch 1, bf16. Limits: shared memory per block "
        + ", ".join(f"{ARCH_NAMES[a]} {SHARED_LIMIT[a] / 1024:.0f} KiB" for a in arches)
        + f", {REGISTER_FILE} registers per SM. `(default)` rows are what a run launches untuned.",
        "",
        _table(compiler.compiled),
        ""])
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # Named by Triton's version too: another version allocates registers differently (the GPU image's differs).
        (out / f"kernel-resources-{datetime.date.today().isoformat()}-triton{triton.__version__}.md").write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps([{**dataclasses.asdict(r), "blocks_per_sm": r.blocks_per_sm()}
                                               for r in compiler.compiled], indent=1))
    for r in compiler.compiled:
        if r.default and (r.cannot_launch() or r.slow_signs()):
            print(f"{'cannot launch' if r.cannot_launch() else 'slow'}: {r.kernel} ({r.case}, {ARCH_NAMES[r.arch]}): "
                  f"{'; '.join(r.cannot_launch() + r.slow_signs())}", file=sys.stderr)
    return 1 if any(r.default and r.cannot_launch() for r in compiler.compiled) else 0


if __name__ == "__main__":
    sys.exit(main())
