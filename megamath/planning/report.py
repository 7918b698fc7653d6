"""Plans as text: one itemised plan, or a ranking of the configurations a search found."""
from __future__ import annotations

from megamath.planning.hardware import ALLOCATOR_HEADROOM, GiB, RUNTIME_RESERVE_BYTES
from megamath.planning.plan import Plan, PlanRequest


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _shape_line(p: Plan) -> str:
    s = p.shape
    overlaps = (s.overlap_grad_reduce, s.overlap_param_gather)
    overlap = "on" if all(overlaps) else "partly" if any(overlaps) else "off"
    overlap += ", optimizer step overlapped" if s.overlap_optimizer_step else ""
    return (f"TP {s.tp} x DP {s.dp}, micro-batch {s.micro_batch} x accumulation {s.grad_accum} = "
            f"{s.micro_batch * s.grad_accum * s.dp:,} sequences ({p.tokens_per_step:,} tokens) per step; "
            f"checkpointing {_on(s.activation_checkpointing)}, SP {_on(s.sequence_parallel)}, "
            f"grads {s.grad_dtype}, buckets {s.bucket_mb:g} MiB, overlap {overlap}")


def format_plan(req: PlanRequest, p: Plan) -> str:
    s, m, t = p.shape, p.memory, p.time
    lines = [f"{req.model_name} on {req.gpus} x {req.gpu.name} ({req.gpus_per_node} per node), sequence length "
             f"{s.seq_length}", _shape_line(p), "", "memory per GPU                                         GiB"]
    rows = [("bf16 parameters", m["params"]),
            (f"gradient buffer ({s.grad_dtype})", m["grads"]),
            (f"fp32 master + 2 moments (1/{s.dp})", m["optimizer"]),
            (f"activations ({'checkpointed' if s.activation_checkpointing else 'all kept'})", m["activations"]),
            ("backward working set", m["backward_transient"]),
            ("logits and loss", m["logits_and_loss"]),
            ("communication buckets (in place)", m["comm_buckets"]),
            (f"allocator headroom ({ALLOCATOR_HEADROOM:.0%})", m["allocator_headroom"]),
            ("CUDA context + NCCL", m["runtime_reserve"])]
    lines += [f"  {name:<50}{value / GiB:>7.2f}" for name, value in rows]
    other = p.extra["activations_other_checkpointing"]
    lines.insert(-4, f"    {'(with' if not s.activation_checkpointing else '(without'} checkpointing: activations "
                     f"{other['activations'] / GiB:.2f}, working set {other['backward_transient'] / GiB:.2f})")
    verdict = (f"fits, {p.margin_bytes / GiB:.2f} GiB to spare" if p.fits
               else f"does NOT fit: {-p.margin_bytes / GiB:.2f} GiB over")
    lines.append(f"  {'total':<50}{p.total_bytes / GiB:>7.2f} of {p.capacity / GiB:.2f}: {verdict}")
    fpt = req.model.flops_per_token(s.seq_length)
    compute = f"compute ({fpt / 1e9:.1f} GFLOP/token, {p.efficiency:.0%} of {req.gpu.peak_tflops:g} TFLOP/s)"
    lines += ["", "step time                                                s",
              f"  {compute:<50}{t['compute']:>7.2f}",
              f"  {'TP collectives (exposed)':<50}{t['tp_comm']:>7.2f}",
              f"  {'DP reduce-scatter (exposed)':<50}{t['dp_reduce_scatter']:>7.2f}"
              f"  of {t['dp_reduce_scatter_unhidden']:.2f}",
              f"  {'DP all-gather (exposed)':<50}{t['dp_all_gather']:>7.2f}  of {t['dp_all_gather_unhidden']:.2f}",
              f"  {'optimizer step (exposed)':<50}{t['optimizer']:>7.2f}  of {t['optimizer_unhidden']:.2f}",
              f"  {'total':<50}{t['total']:>7.2f}",
              f"throughput {p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / p.gpus:,.0f} per GPU), MFU {p.mfu:.1%}"]
    if p.run_tokens is not None:
        lines.append(f"{p.run_tokens / 1e9:,.4g}B tokens: {p.run_seconds / 3600:,.1f} hours, {p.gpu_hours:,.0f} GPU-hours")
    return "\n".join(lines)


def format_ranking(req: PlanRequest, plans: list[Plan], top: int = 10) -> str:
    lines = [f"{len(plans)} configurations fit {req.model_name} on {req.gpus} x {req.gpu.name}; the fastest "
             f"{min(top, len(plans))}:",
             f"  {'TP':>3} {'micro':>5} {'accum':>5} {'ckpt':>4} {'SP':>3} {'GiB':>6} {'spare':>6} {'step s':>7} "
             f"{'tokens/s':>10} {'MFU':>6}" + (f" {'GPU-hours':>10}" if req.tokens else "")]
    for p in plans[:top]:
        s = p.shape
        lines.append(f"  {s.tp:>3} {s.micro_batch:>5} {s.grad_accum:>5} {_on(s.activation_checkpointing):>4} "
                     f"{_on(s.sequence_parallel):>3} {p.total_bytes / GiB:>6.1f} "
                     f"{p.margin_bytes / GiB:>6.1f} {p.time['total']:>7.2f} {p.tokens_per_s:>10,.0f} {p.mfu:>6.1%}"
                     + (f" {p.gpu_hours:>10,.0f}" if req.tokens else ""))
    return "\n".join(lines + ["", "the fastest, itemised:", format_plan(req, plans[0])])


def assumptions(req: PlanRequest) -> str:
    g = req.gpu
    return (f"assumptions: compute at {req.efficiency:.0%} of the dense bf16 peak ({req.efficiency_source}; "
            f"--efficiency overrides); NVLink all-reduce bus bandwidth {g.nvlink_gbs:g} GB/s, inter-node "
            f"{req.internode_gbs or g.internode_gbs:g} GB/s per GPU, ring latency {g.alpha_intra * 1e6:g}/"
            f"{g.alpha_inter * 1e6:g} us per hop; {RUNTIME_RESERVE_BYTES / GiB:g} GiB outside the allocator. "
            "Parameter, gradient and optimizer bytes are ZeroOptimizer's own buffer sizes; activations are a model "
            "(megamath/planning/memory.py).")
