"""Where a step's time goes, by kind of kernel: a torch.profiler window summed into GEMMs, attention, norm,
rope, SwiGLU, cross-entropy, optimizer, copies, communication and the rest.

Why: an MFU figure alone does not say what to fix next, and a GPU session is short; a trace needs a viewer
and an hour. This table says it at a glance: the share of GEMMs (cuBLAS, already near peak), of attention,
of the memory-bound kernels, and how much of the step the device sat idle waiting on the host (launch
gaps, syncs), where (the longest gaps, by the kernels around them) and how long the host itself was
blocked. The trainer writes it beside each profiler trace; perf/bench_train.py puts it in its results.

Device time is each kernel's own time (on CPU: each op's self time), summed over the profiled steps and
divided by their number; `busy` is their sum, `wall` the host time of the window, the device synchronized
at its end. The profiler adds overhead of its own, so `wall` runs a little long.
"""
from __future__ import annotations

import re

from torch.autograd import DeviceType

# (kind, pattern over kernel or op names), first match wins: our own kernels by their exact names first,
# since `_rms_norm_fwd_kernel` also ends like attention's `_fwd_kernel`.
KINDS = (
    ("norm", r"rms_norm|layer_norm"),
    ("rope", r"rope"),
    ("swiglu", r"swiglu|silu"),
    ("cross-entropy", r"_ce_(forward|backward)|cross_entropy|log_softmax|nll_loss"),
    ("optimizer", r"adamw|_fused_adam|multi_tensor_apply"),
    ("attention", r"^_(fwd|bwd_dkdv|bwd_dq|bwd_preprocess)_kernel$|flash|fmha|sdpa|attention|scaled_dot"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("communication", r"nccl|gloo|all_reduce|allreduce|all_gather|reduce_scatter|broadcast"),
    ("copy / cast", r"copy|memcpy|memset|to_copy|fill|cat_|index"),
)


def kind_of(name: str) -> str:
    """The kind of a kernel or op name; `other` (elementwise, reductions) when no pattern matches."""
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def summarize(profiler, steps: int, cuda: bool, wall_s: float) -> dict:
    """A finished torch.profiler.profile of `steps` steps taking `wall_s` seconds, by kind: {"kinds": {kind:
    (ms per step, [(name, ms per step), ...] heaviest first)}, "busy_ms", "wall_ms" (per step), "device"}."""
    kinds: dict[str, tuple[float, list]] = {}
    for event in profiler.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue  # ops: their kernels are counted themselves
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us <= 0 or getattr(event, "is_user_annotation", False) or event.key.startswith("ProfilerStep"):
            continue  # record_function ranges (steps, phases) hold no work of their own
        kind, ms = kind_of(event.key), self_us / 1e3 / steps
        total, names = kinds.get(kind, (0.0, []))
        kinds[kind] = (total + ms, names + [(event.key, ms)])
    kinds = {k: (ms, sorted(names, key=lambda n: -n[1])) for k, (ms, names) in kinds.items()}
    result = {"kinds": kinds, "busy_ms": sum(ms for ms, _ in kinds.values()), "wall_ms": wall_s * 1e3 / steps,
              "device": "cuda" if cuda else "cpu"}
    if cuda:
        events = profiler.events()
        result["gaps"] = idle_gaps([(e.name, e.time_range.start, e.time_range.end) for e in events
                                    if e.device_type == DeviceType.CUDA], steps)
        # The host's time blocked in the runtime waiting for the device: the rest of the wall it was launching.
        result["host_wait_ms"] = sum(e.time_range.end - e.time_range.start for e in events
                                     if e.device_type == DeviceType.CPU and e.name.startswith(HOST_WAITS)) / 1e3 / steps
    return result


HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
"""Name prefixes of the CUDA runtime calls in which the host waits for the device (a copy to pageable host
memory, as a .tolist() makes, returns only once the stream has drained; cudaMemcpy covers its Async and
versioned names). A copy from pinned memory returns at once and adds next to nothing."""


def idle_gaps(kernels: list[tuple[str, float, float]], steps: int, top: int = 6, min_us: float = 10.0) -> dict:
    """Where the device waited between its kernels: (name, start µs, end µs) of each device activity, over
    `steps` steps. Returns {"idle_ms": idle time between the first start and the last end, per step; "waits":
    [(ms per step, count per step, the kernel before, the kernel after)] for the `top` heaviest pairs of
    neighbours, gaps under `min_us` left out}. A gap says the host had not yet launched the kernel after it:
    a sync, or host work (Python, launch overhead) slower than the kernels it launched."""
    idle_us, pairs = 0.0, {}
    reach, last = None, ""
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        if reach is not None and start - reach > 0:
            idle_us += start - reach
            if start - reach >= min_us:
                total, count = pairs.get((last, name), (0.0, 0))
                pairs[(last, name)] = (total + start - reach, count + 1)
        if reach is None or end > reach:
            reach, last = end, name
    waits = sorted(((us / 1e3 / steps, count / steps, before, after) for (before, after), (us, count) in pairs.items()),
                   key=lambda w: -w[0])
    return {"idle_ms": idle_us / 1e3 / steps, "waits": waits[:top]}


def breakdown_table(result: dict, title: str) -> list[str]:
    """Markdown lines: one row per kind, heaviest first, with its two heaviest kernels."""
    busy, wall = result["busy_ms"], result["wall_ms"]
    if not result["kinds"]:  # e.g. a machine where the profiler cannot read the GPU's activity (no CUPTI)
        return [f"{title}: the profiler recorded no {'kernels' if result['device'] == 'cuda' else 'ops'}; "
                "nothing to break down"]
    if result["device"] == "cuda":
        head = (f"{title}: device busy {busy:.1f} ms of a {wall:.1f} ms step ({100 * busy / wall:.0f} %; the rest is "
                "the device waiting on the host)")
        if "host_wait_ms" in result:
            head += (f"; the host waited {result['host_wait_ms']:.1f} ms per step in the runtime for the device, so "
                     f"spent {wall - result['host_wait_ms']:.1f} launching and in Python")
    else:
        head = f"{title}: CPU ops take {busy:.1f} ms of a {wall:.1f} ms step ({100 * busy / wall:.0f} %)"
    lines = [head, "", "| kind | ms per step | share of busy | heaviest |", "|---|---:|---:|---|"]
    for kind, (ms, names) in sorted(result["kinds"].items(), key=lambda item: -item[1][0]):
        heaviest = "; ".join(f"`{_short(name)}` {t:.2f}" for name, t in names[:2])
        lines.append(f"| {kind} | {ms:.2f} | {100 * ms / max(busy, 1e-12):.1f} % | {heaviest} |")
    gaps = result.get("gaps")
    if gaps and gaps["waits"]:
        lines += ["", f"Device idle between its first and last kernel: {gaps['idle_ms']:.2f} ms per step; the longest "
                  "waits (the host had not launched the kernel after):", "",
                  "| ms per step | gaps per step | after | before |", "|---:|---:|---|---|"]
        lines += [f"| {ms:.2f} | {count:g} | `{_short(before)}` | `{_short(after)}` |"
                  for ms, count, before, after in gaps["waits"]]
    return lines


def _short(name: str, width: int = 60) -> str:
    name = name.replace("|", "/").replace("`", "'")
    return name if len(name) <= width else name[:width - 3] + "..."
