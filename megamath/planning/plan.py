"""`megamath plan`: size a run before launching it: memory per GPU, step time, tokens/s, MFU, GPU-hours.

Why: which TP size, micro-batch and activation checkpointing fit an A100-40GB, and how long 200B tokens
take, are otherwise found by trial and error on the cluster. A plan is memory.py (the ZeRO buffers' real
sizes + an activation model) and step_time.py (FLOPs at a stated efficiency + α-β communication),
evaluated for one configuration or for every configuration of a search, ranked by throughput.

Search (when --tp or --micro-batch is missing): TP over the divisors of the GPUs per node that the model
allows (heads and FFN divisible; a vocabulary it does not divide is padded, vocab_split.vocab_range) and that
divide the GPU count, micro-batches 1..64, activation checkpointing and sequence parallelism both ways
unless their flag fixes them on (SP only where TP divides the sequence length). Without
--grad-accum the accumulation is the one whose global batch is closest to 4M tokens (LLEMMA's).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from megamath.model.config import ModelConfig
from megamath.model.partition import check_tensor_parallel
from megamath.parallel.zero_layout import resolve_grad_dtype
from megamath.planning.hardware import GPU, GiB
from megamath.planning import measured
from megamath.planning.measured import compute_efficiency
from megamath.planning.memory import RunShape, activation_bytes, memory_items, zero_layout_for
from megamath.planning.step_time import Network, step_seconds

TARGET_BATCH_TOKENS = 1024 * 4096  # LLEMMA's 4M-token batches: 1,024 sequences of 4,096 tokens
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class PlanRequest:
    model: ModelConfig
    model_name: str
    gpu: GPU
    gpus: int
    gpus_per_node: int = 8
    tp: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    seq_length: int = 4096
    activation_checkpointing: bool | None = None
    """True: on; None: searched (off when tp and micro_batch are both given)."""
    sequence_parallel: bool | None = None
    tokens: float | None = None
    grad_dtype: str = "auto"
    """optimizer.grad_dtype: "fp32", "bf16", or "auto", resolved for each candidate layout (resolve_grad_dtype)."""
    bucket_mb: float = 128.0
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    overlap_optimizer_step: bool = False
    efficiency: float | None = None
    """Fraction of the bf16 peak; None: measured (perf/results) or the GPU's stated default, see measured.py."""
    internode_gbs: float | None = None
    results_dir: Path | None = None
    """Where bench_train's measured training steps are looked up (None: this checkout's perf/results)."""
    efficiency_source: str = field(init=False, default="")
    """Where the efficiency came from (set from `efficiency` and `results_dir`)."""

    def __post_init__(self) -> None:
        for name in ("gpus", "gpus_per_node", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node > self.gpus:
            self.gpus_per_node = self.gpus
        if self.tp is not None:
            check_tensor_parallel(self.model, self.tp)
            if self.gpus % self.tp:
                raise ValueError(f"--tp {self.tp} does not divide --gpus {self.gpus}")
            if self.gpus_per_node % self.tp:  # TP groups are consecutive ranks: one would straddle two nodes
                raise ValueError(f"--tp {self.tp} does not divide --gpus-per-node {self.gpus_per_node}: a TP group "
                                 "must sit in one node (its all-reduces need NVLink)")
        if self.sequence_parallel and self.tp is not None and self.tp > 1 and self.seq_length % self.tp:
            raise ValueError(f"--seq-length {self.seq_length} is not divisible by --tp {self.tp}: sequence "
                             "parallelism splits each sequence over the TP group")
        if self.seq_length > self.model.max_seq_length:
            raise ValueError(f"--seq-length {self.seq_length} exceeds the model's max_seq_length "
                             f"{self.model.max_seq_length}")
        for name in ("micro_batch", "grad_accum"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            raise ValueError(f"--efficiency must be in (0, 1], got {self.efficiency}")
        if self.tokens is not None and not 0 < self.tokens < math.inf:  # inf: Infinity in --json, not JSON
            raise ValueError(f"--tokens must be positive and finite, got {self.tokens}")
        if self.internode_gbs is not None and not 0 < self.internode_gbs < math.inf:  # 0 fell back to the default
            raise ValueError(f"--internode-gbs must be positive and finite, got {self.internode_gbs}")
        resolved = compute_efficiency(self.gpu, self.efficiency, self.results_dir or measured.RESULTS_DIR)
        self.efficiency, self.efficiency_source = resolved.value, resolved.source


@dataclass
class Plan:
    shape: RunShape
    memory: dict[str, int]
    capacity: int
    time: dict[str, float]
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    efficiency: float
    gpus: int
    run_tokens: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def margin_bytes(self) -> int:
        """Capacity minus need: positive fits with this much to spare, negative misses by this much."""
        return self.capacity - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0

    @property
    def run_seconds(self) -> float | None:
        return None if self.run_tokens is None else self.run_tokens / self.tokens_per_s

    @property
    def gpu_hours(self) -> float | None:
        return None if self.run_tokens is None else self.run_seconds / 3600 * self.gpus

    def to_dict(self) -> dict:
        return {"shape": dataclasses.asdict(self.shape), "memory_bytes": self.memory, "total_bytes": self.total_bytes,
                "capacity_bytes": self.capacity, "fits": self.fits, "margin_bytes": self.margin_bytes,
                "step_seconds": self.time, "tokens_per_step": self.tokens_per_step, "tokens_per_s": self.tokens_per_s,
                "mfu": self.mfu, "efficiency": self.efficiency, "gpus": self.gpus, "run_tokens": self.run_tokens,
                "run_hours": None if self.run_seconds is None else self.run_seconds / 3600,
                "gpu_hours": self.gpu_hours, **self.extra}


def _grad_accum(req: PlanRequest, micro: int, dp: int) -> int:
    if req.grad_accum is not None:
        return req.grad_accum
    return max(1, round(TARGET_BATCH_TOKENS / (micro * dp * req.seq_length)))


def evaluate(req: PlanRequest, tp: int, micro: int, checkpointing: bool, sp: bool) -> Plan:
    """The plan of one configuration."""
    dp = req.gpus // tp
    grad_accum = _grad_accum(req, micro, dp)
    grad_dtype = resolve_grad_dtype(req.grad_dtype, True, dp, tp, grad_accum)  # the plan's weights are bf16
    shape = RunShape(tp=tp, dp=dp, micro_batch=micro, grad_accum=grad_accum,
                     seq_length=req.seq_length, activation_checkpointing=checkpointing,
                     sequence_parallel=sp and tp > 1, grad_dtype=grad_dtype, bucket_mb=req.bucket_mb,
                     overlap_grad_reduce=req.overlap_grad_reduce, overlap_param_gather=req.overlap_param_gather,
                     overlap_optimizer_step=req.overlap_optimizer_step)
    gpu = req.gpu
    efficiency = req.efficiency
    net = Network(req.gpus_per_node, gpu.nvlink_gbs, req.internode_gbs or gpu.internode_gbs, gpu.alpha_intra,
                  gpu.alpha_inter)
    layout = zero_layout_for(req.model, tp, dp, grad_dtype, req.bucket_mb)
    time = step_seconds(req.model, shape, gpu, net, layout, efficiency)
    tokens_per_step = shape.micro_batch * shape.grad_accum * dp * shape.seq_length
    tokens_per_s = tokens_per_step / time["total"]
    mfu = req.model.flops_per_token(req.seq_length) * tokens_per_s / req.gpus / (gpu.peak_tflops * 1e12)
    other = activation_bytes(req.model, dataclasses.replace(shape, activation_checkpointing=not checkpointing))
    return Plan(shape, memory_items(req.model, shape), gpu.memory_bytes, time, tokens_per_step, tokens_per_s, mfu,
                efficiency, req.gpus, req.tokens, extra={"activations_other_checkpointing": other})


def _tp_choices(req: PlanRequest) -> list[int]:
    if req.tp is not None:
        return [req.tp]
    out = []
    for tp in range(1, req.gpus_per_node + 1):
        if req.gpus_per_node % tp or req.gpus % tp:
            continue
        try:
            check_tensor_parallel(req.model, tp)
        except ValueError:
            continue
        out.append(tp)
    return out


def _sp_choices(req: PlanRequest, tp: int) -> list[bool]:
    """Sequence parallelism at this TP size: off at TP 1, and only where TP divides the sequence (the model
    splits it into TP equal chunks); both ways unless the request fixes it on."""
    if tp == 1:
        return [False]
    possible = [False, True] if req.seq_length % tp == 0 else [False]
    return [sp for sp in possible if sp] if req.sequence_parallel else possible


def plan(req: PlanRequest) -> list[Plan]:
    """One plan when TP and micro-batch are given; else every searched configuration that fits, fastest first.

    Raises ValueError when a search finds nothing that fits.
    """
    if req.tp is not None and req.micro_batch is not None:
        return [evaluate(req, req.tp, req.micro_batch, bool(req.activation_checkpointing),
                         bool(req.sequence_parallel))]
    candidates = []
    for tp in _tp_choices(req):
        for micro in ([req.micro_batch] if req.micro_batch is not None else MICRO_BATCHES):
            for ckpt in ([True] if req.activation_checkpointing else [False, True]):
                for sp in _sp_choices(req, tp):
                    candidates.append(evaluate(req, tp, micro, ckpt, sp))
    fitting = [p for p in candidates if p.fits]
    if not fitting:
        best = max(candidates, key=lambda p: p.margin_bytes)
        where = "at any TP size" if req.tp is None else f"at TP {req.tp}"
        head = (f"micro-batch {req.micro_batch} of {req.model_name} does not fit on {req.gpu.name} {where}"
                if req.micro_batch is not None else f"nothing fits {req.model_name} on {req.gpu.name} {where}")
        s = best.shape
        raise ValueError(f"{head}: the smallest needs "
                         f"{best.total_bytes / GiB:.1f} GiB of {best.capacity / GiB:.1f} (TP {s.tp}, micro-batch "
                         f"{s.micro_batch}, checkpointing {'on' if s.activation_checkpointing else 'off'}, SP "
                         f"{'on' if s.sequence_parallel else 'off'})")
    return sorted(fitting, key=lambda p: -p.tokens_per_s)
