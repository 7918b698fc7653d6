"""Training-step benchmark: megamath against Hugging Face Llama in one process, on one GPU, same input.

    python perf/bench_train.py                                  # Code Llama 7B width, 4 layers, S 4096, mb 1 and 2
    python perf/bench_train.py --layers 2 --seq-length 2048 --micro-batch 1 --no-compile
    python perf/bench_train.py --micro-batch 1 --grad-accum 4       # LLEMMA's recipe: accumulation over 4

Each system runs the whole training step, forward + backward + optimizer step, on the same random
tokens (seed 0), timed from before the forward to after a device synchronize at the step's end; the
median over --steps timed steps (after --warmup untimed ones) is reported. With --grad-accum K a step is K
micro-batches' forward and backward (each loss divided by K) and one optimizer step, for every system.

    megamath            Llama with the kernels (Triton) and `model.attention` settled as a run does,
                        bf16 weights, ZeRO-1 AdamW with fp32 master weights and moments (dp = 1; the gradient
                        buffer as `grad_dtype: auto` makes it: bf16 at one micro-batch per step, where nothing
                        is summed into it, else fp32, which the weight-gradient matmuls accumulate into)
    megamath-ref        the same with the plain-torch reference ops and PyTorch's SDPA attention
    hf-eager            transformers' LlamaForCausalLM (SDPA attention), fp32 weights under bf16 autocast,
                        torch.optim.AdamW(fused=True): the usual mixed-precision recipe, fp32 master
    hf-compiled         the same model through torch.compile
    megamath-overlap    megamath with `parallel.overlap_optimizer_step`: AdamW bucket by bucket (the training
                        default's 128 MiB buckets) on a side stream, under the next step's forward (measured
                        last, so that a run cut short by its time limit keeps the peers' rows)

Model FLOPs per token, for every system alike (ModelConfig.flops_per_token, Megatron's convention):
6·(L·(2h·h_q + 2h·h_kv + 3h·ffn) + V·h) + 6·L·S·h_q, i.e. causal attention counted at half of the full
S² (= 6·(L·(4h² + 3h·ffn) + V·h) + 6·L·S·h for multi-head attention, the anchors' formula). MFU = model
TFLOP/s / the GPU's dense bf16 peak (megamath.training.metrics.PEAK_TFLOPS; --peak-tflops overrides).
`vs ours` = the system's step time / megamath's (above 1: megamath is faster). `peak GiB` is the most
the system held allocated during its timed steps, less what was allocated before it was built. `plan GiB` is what
`megamath plan`'s memory model (megamath.planning.memory) predicts megamath's step allocates at its peak,
for this very shape (TP 1, DP 1, the optimizer's gradient dtype and buckets), less the allocator headroom
and runtime reserve that torch.cuda.max_memory_allocated does not see; on a GPU the run fails when it is
more than 10 % away from the measured peak.

After its timed steps, megamath runs --breakdown-steps more under torch.profiler, and the results end with its
kernels summed by kind (GEMM, attention, norm, ..., and the share of the step the device sat idle), how long
the host waited for the device and so how long it spent launching, and the longest idle gaps between kernels
by their neighbours: what to tune next, readable without a GPU (megamath.training.kernel_kinds).

Each row is printed, and the file rewritten, as soon as it is measured, so a run stopped by a time limit keeps
what it measured. A peer that is absent or fails is a row saying so; megamath's own step failing (or the
planner's 10 %) makes the exit status 1.

Without CUDA it runs a tiny smoke case on CPU (fp32, 2 layers, S 32) so the test suite can check that
the script works; its numbers are labelled as not a measurement and nothing is written unless --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from megamath.atomic_io import write_text_atomically
from megamath.model.attention import choose_attention
from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.model.ops import get_ops
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.planning.memory import RunShape, memory_items
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.parallel.zero_layout import resolve_grad_dtype
from megamath.training.config import ParallelConfig
from megamath.training.loop import train_step
from megamath.training.kernel_kinds import breakdown_table, summarize
from megamath.training.metrics import peak_tflops

REPO = Path(__file__).resolve().parents[1]
LR = 1e-4
BUCKET_MB = 0.0  # ZeroOptimizer's default: one bucket (dp 1 has nothing to overlap)
PLAN_TOLERANCE = 0.10


def model_config(args, gpu: bool) -> ModelConfig:
    if gpu:  # Code Llama 7B's width
        return ModelConfig.from_preset("codellama-7b", num_layers=args.layers, max_seq_length=args.seq_length)
    return ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                       max_seq_length=args.seq_length, rope_theta=1e6, kernels="reference")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_of_step(device: torch.device) -> None:
    """Where a timed step ends: its work on the main stream. What it left on a side stream (the overlapped
    optimizer's bucket updates) runs on under the next step's forward, as in training: a full device sync
    per step would drain it first and time the overlap away. measure() adds the last drain to the last step."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def micro_batches(tokens: torch.Tensor, grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of each micro-batch: tokens (K·b, S + 1) cut into K (b, S) pairs."""
    return [(t[:, :-1], t[:, 1:]) for t in tokens.chunk(grad_accum)]


def megamath_step(config: ModelConfig, device: torch.device, dtype: torch.dtype, tokens: torch.Tensor,
                  reference: bool, grad_accum: int = 1, overlap: bool = False) -> Callable[[], float]:
    if reference:  # plain torch throughout: the reference ops, and PyTorch's SDPA rather than a timed choice
        config = ModelConfig.from_dict({**config.to_dict(), "kernels": "reference", "attention": "sdpa"})
    state = ParallelState.single(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config).to(dtype).train()
    b, s = tokens.shape[0] // grad_accum, tokens.shape[1] - 1
    optimizer = ZeroOptimizer(model, state, OptimizerConfig(lr=LR), split_names=model.split_parameter_names(),
                              bucket_mb=ParallelConfig().bucket_mb if overlap else BUCKET_MB,
                              micro_batches=grad_accum, overlap_optimizer_step=overlap)  # as `megamath train`
    ops = get_ops(config.kernels, device)  # settled as a run settles it: after ZeRO has placed the weights
    choice = choose_attention(config.attention, ops, (b, s, config.num_heads, config.num_kv_heads, config.head_dim),
                              dtype, device, layout=model.layers[0].self_attn.qkv_layout(ops))
    # The choice, its timings and the tuned tiles, as a run logs them (on a GPU `auto` may pick SDPA).
    name = "megamath-ref" if reference else "megamath-overlap" if overlap else "megamath"
    print(f"{name}, micro-batch {b}: {choice.reason}", flush=True)
    if choice.tile_timings:  # each candidate's time at the model's own shape: what one GPU run teaches
        print(choice.tile_timings, flush=True)
    model.attention = choice.attention
    batch = micro_batches(tokens, grad_accum)
    return lambda: train_step(model, optimizer, batch, LR, state).loss


def planned_peak_gib(config: ModelConfig, micro_batch: int, seq: int, grad_accum: int = 1) -> float:
    """The planner's peak allocation for megamath's step in this benchmark (GiB; bf16 weights as on a GPU)."""
    grad_dtype = resolve_grad_dtype(OptimizerConfig(lr=LR).grad_dtype, True, 1, 1, grad_accum)  # as ZeroOptimizer
    shape = RunShape(tp=1, dp=1, micro_batch=micro_batch, grad_accum=grad_accum, seq_length=seq,
                     activation_checkpointing=config.activation_checkpointing, sequence_parallel=False,
                     grad_dtype=grad_dtype, bucket_mb=BUCKET_MB,
                     overlap_grad_reduce=False, overlap_param_gather=False)
    items = memory_items(config, shape)
    return (sum(items.values()) - items["allocator_headroom"] - items["runtime_reserve"]) / 2**30


def plan_check(rows: list[dict]) -> tuple[list[str], bool]:
    """Lines comparing the planner with megamath's measured peak, and whether each is within 10 %."""
    lines, ok = [], True
    for r in rows:
        if "plan_gib" not in r or "peak_gib" not in r or r["peak_gib"] != r["peak_gib"]:  # NaN: no CUDA
            continue
        off = r["plan_gib"] / r["peak_gib"] - 1
        within = abs(off) <= PLAN_TOLERANCE
        ok &= within
        lines.append(f"- planner, micro-batch {r['micro_batch']}: {r['plan_gib']:.2f} GiB predicted, "
                     f"{r['peak_gib']:.2f} GiB measured ({100 * off:+.1f} %): "
                     f"{'within' if within else 'FAILED, not within'} {100 * PLAN_TOLERANCE:.0f} %")
    return lines, ok


def hf_model(config: ModelConfig, device: torch.device):
    """transformers' LlamaForCausalLM of the same shape, fp32, SDPA attention, set up for training: no KV
    cache (LlamaConfig's use_cache=True would make every training forward build a DynamicCache)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_seq_length,
        rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa").to(device).train()


def hf_step(config: ModelConfig, device: torch.device, tokens: torch.Tensor, compiled: bool,
            grad_accum: int = 1) -> Callable[[], float]:
    model = hf_model(config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    batch = micro_batches(tokens, grad_accum)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        total = 0.0
        for x, y in batch:
            with amp:
                logits = forward(input_ids=x).logits  # (b, S, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)) / grad_accum
            loss.backward()
            total = total + loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)
    return step


def measure(build: Callable[[], Callable[[], float]], device: torch.device, warmup: int,
            steps: int, profile_steps: int = 0) -> tuple[list[float], float, list[str] | None]:
    """Step times in seconds (each to its main stream's end, see end_of_step), the peak memory the system itself
    allocated, GiB: the peak over the timed steps less what was allocated before it was built (the shared
    input tokens, anything an earlier system left behind); and with profile_steps, the table of those further
    steps' kernels by kind (megamath.training.kernel_kinds), profiled after the timed ones."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step = build()
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):  # back to back, as training runs them
        start = time.perf_counter()
        step()
        end_of_step(device)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    sync(device)  # the side streams' last work, charged to the last step: the steps' sum is all their work
    times[-1] += time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    if not profile_steps:
        return times, peak, None
    try:  # a profiler that fails costs the breakdown, never the row measured above
        return times, peak, breakdown_table(profile(step, device, profile_steps), f"{profile_steps} profiled steps")
    except Exception as err:
        return times, peak, [f"no breakdown: the profiler failed: {type(err).__name__}: {str(err)[:200]}"]


def profile(step: Callable[[], float], device: torch.device, steps: int) -> dict:
    """`steps` more steps under torch.profiler, summed by kernel kind."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, acc_events=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    return summarize(prof, steps, device.type == "cuda", wall)


def run_case(config: ModelConfig, micro_batch: int, args, device: torch.device,
             on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every system's row at this micro-batch; on_row(row) as soon as each is measured."""
    seq, k = args.seq_length, args.grad_accum
    tokens = torch.randint(0, config.vocab_size, (k * micro_batch, seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)  # (K·b, S + 1): K micro-batches of b sequences
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    systems: dict[str, Callable[[], Callable[[], float]]] = {
        "megamath": lambda: megamath_step(config, device, dtype, tokens, False, k),
        "megamath-ref": lambda: megamath_step(config, device, dtype, tokens, True, k),
        "hf-eager": lambda: hf_step(config, device, tokens, compiled=False, grad_accum=k),
    }
    if gpu and not args.no_compile:
        systems["hf-compiled"] = lambda: hf_step(config, device, tokens, compiled=True, grad_accum=k)
    elif gpu:  # left out on purpose: a row that says so, as an absent peer gets
        systems["hf-compiled"] = None
    systems["megamath-overlap"] = lambda: megamath_step(config, device, dtype, tokens, False, k, overlap=True)
    if not gpu:
        systems.pop("megamath-ref")  # on CPU megamath already runs the reference ops
    flops_per_token = config.flops_per_token(seq)
    peak = peak_tflops(device, args.peak_tflops)
    rows = []
    for name, build in systems.items():
        row = {"system": name, "micro_batch": micro_batch}
        if build is None:
            row["error"] = "absent: skipped (--no-compile)"
            rows.append(row)
            on_row(row)
            continue
        try:
            times, mem, breakdown = measure(build, device, args.warmup, args.steps,
                                        args.breakdown_steps if name == "megamath" else 0)
        except ImportError as err:
            row["error"] = f"absent ({err})"
        except Exception as err:  # a peer that fails is reported as such, never dropped or faked
            row["error"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        else:
            step_s = statistics.median(times)
            tokens_per_s = k * micro_batch * seq / step_s
            tflops = flops_per_token * tokens_per_s / 1e12
            row.update(step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, tflops=tflops,
                       mfu=tflops / peak if peak else None, peak_gib=mem)
            if name == "megamath":
                row["plan_gib"] = planned_peak_gib(config, micro_batch, seq, k)
            if breakdown is not None:
                row["breakdown"] = breakdown
            ours = next((r for r in rows + [row] if r["system"] == "megamath" and "step_ms" in r), None)
            if ours is not None:  # megamath runs first
                row["vs_ours"] = row["step_ms"] / ours["step_ms"]
        rows.append(row)
        on_row(row)
        if name == "hf-compiled":
            torch._dynamo.reset()  # its compiled graphs would keep the model's weights alive
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| system | micro-batch | step ms | tokens/s | model TFLOP/s | MFU | peak GiB | plan GiB | vs ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['micro_batch']} | {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        plan = f"{r['plan_gib']:.1f}" if "plan_gib" in r else ""
        lines.append(f"| {r['system']} | {r['micro_batch']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.1f} | {mfu} | {r['peak_gib']:.1f} | {plan} | "
                     f"{r.get('vs_ours', float('nan')):.2f} |")
    return lines


def breakdowns(rows: list[dict]) -> list[str]:
    """The profiled rows' kernels by kind, a section after the table."""
    lines = []
    for row in rows:
        if "breakdown" in row:
            lines += ["", f"## Kernels by kind: {row['system']}, micro-batch {row['micro_batch']}", "",
                      *row["breakdown"]]
    return lines


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def result_suffix(args, gpu: bool) -> str:
    """What the results file's name adds to train-DATE: every way this run differs from the default case, so
    that it never replaces that day's default table (the one `megamath plan` reads: planning/measured.py)."""
    parts = [f"accum{args.grad_accum}"] if args.grad_accum > 1 else []
    if gpu:
        parts += [f"L{args.layers}"] if args.layers != 4 else []
        parts += [f"S{args.seq_length}"] if args.seq_length != 4096 else []
        parts += ["mb" + "-".join(map(str, args.micro_batch))] if args.micro_batch and args.micro_batch != [1, 2] else []
        parts += ["nocompile"] if args.no_compile else []
        parts += [f"peak{args.peak_tflops:g}"] if args.peak_tflops else []
    return "".join(f"-{part}" for part in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=None, help="default 4096 on a GPU, 32 on CPU")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=None, help="default 1 2 on a GPU, 2 on CPU")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="K",
                        help="micro-batches per optimizer step, for every system (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 on a GPU, 1 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on a GPU, 2 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    parser.add_argument("--breakdown-steps", type=int, default=2, metavar="N",
                        help="profile N more steps of megamath and write its kernels by kind (default 2; 0: none)")
    parser.add_argument("--out", type=Path, default=None, help="folder for train-YYYY-MM-DD.md, "
                        "train-YYYY-MM-DD-accumK.md with --grad-accum K > 1 (GPU default: perf/results)")
    args = parser.parse_args(argv)
    if args.breakdown_steps < 0:
        parser.error(f"--breakdown-steps must be >= 0, got {args.breakdown_steps}")
    if args.grad_accum < 1:
        parser.error(f"--grad-accum must be >= 1, got {args.grad_accum}")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    args.seq_length = args.seq_length or (4096 if gpu else 32)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 2)
    config = model_config(args, gpu)
    what = (torch.cuda.get_device_name(device) if gpu else
            "CPU smoke run: tiny model, fp32 -- NOT a measurement, only a check that the benchmark runs")
    header = [f"# Training step, {datetime.date.today()}: {what}", "",
              f"torch {torch.__version__}, transformers {_version('transformers')}, triton {_version('triton')}; "
              f"model: L {config.num_layers}, h {config.hidden_size}, heads "
              f"{config.num_heads}/{config.num_kv_heads}, ffn {config.ffn_hidden_size}, vocab {config.vocab_size}, "
              f"S {args.seq_length}; {args.grad_accum} micro-batch(es) per optimizer step; median of {args.steps} "
              f"steps after {args.warmup} warm-up; model FLOPs/token "
              f"{config.flops_per_token(args.seq_length):.4g} (causal attention halved, same for every system); "
              f"peak {peak_tflops(device, args.peak_tflops) or 'n/a'} TFLOP/s", ""]
    out = args.out or (REPO / "perf" / "results" if gpu else None)
    path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"train-{datetime.date.today()}{result_suffix(args, gpu)}.md"
    rows = []

    def on_row(row: dict) -> None:
        """Print the row and rewrite the file at once (by rename: a kill or a full disk mid-write keeps the rows
        written before): a run stopped later (a time limit) keeps it."""
        rows.append(row)
        print(table([row])[-1], flush=True)
        if path is not None:
            write_text_atomically(path, "\n".join(header + table(rows) + breakdowns(rows)) + "\n")

    print("\n".join(header + table([])), flush=True)  # the column names, then each row as it is measured
    for micro_batch in args.micro_batch or ([1, 2] if gpu else [2]):
        run_case(config, micro_batch, args, device, on_row)
    checks, plan_ok = plan_check(rows)
    text = "\n".join(header + table(rows) + ([""] + checks if checks else []) + breakdowns(rows)) + "\n"
    print("\n".join(breakdowns(rows)), flush=True)
    print("\n".join([""] + checks) if checks else "", flush=True)
    if path is not None:
        write_text_atomically(path, text)
        print(f"written to {path}")
    failed = [r for r in rows if r["system"] == "megamath" and "error" in r]
    for r in failed:  # a peer may be absent or fail; megamath's own step must run
        print(f"megamath's step failed at micro-batch {r['micro_batch']}: {r['error']}", file=sys.stderr)
    if not plan_ok:
        print(f"the planner's memory model is more than {100 * PLAN_TOLERANCE:.0f} % off the measured peak",
              file=sys.stderr)
    return 1 if failed or not plan_ok else 0


if __name__ == "__main__":
    sys.exit(main())
