"""The training loop: build, resume, then `train_step` after `train_step`, with eval, metrics and checkpoints.

Order of one step (every rank, in lockstep):
    1. the scheduled lr of update `step` (1-based);
    2. grad_accum_steps forward/backward passes of this rank's micro-batches, each loss divided by the
       accumulation count (grads accumulate in the ZeRO-1 optimizer's flat buffer);
    3. the mean loss over micro-batches and DP ranks (a host sync); a non-finite loss skips the update;
    4. optimizer.step(lr): DP reduction, global grad norm, clipping, AdamW on the shard (a non-finite norm
       skips the update on every rank);
    5. metrics; validation every eval_every steps; a checkpoint every save_every steps, at the end, and
       when SIGTERM/SIGUSR1 asked the job to stop (saved at the end of the step, then a clean exit 0).

After max_consecutive_nonfinite skipped steps in a row the run stops with NonFiniteError; no checkpoint
is written after the last good one, so it stays the one to resume from.
"""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megamath.model.llama import Llama
from megamath.parallel.layers import allreduce_sequence_parallel_grads
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.training import checkpoint as ckpt
from megamath.training.config import TrainConfig, dump_config
from megamath.training.data import MicroBatch, TrainData
from megamath.training.metrics import MetricsLogger, format_summary
from megamath.training.reshard import load_checkpoint_any_tp
from megamath.training.schedule import lr_at

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm."""


@dataclass
class StepOutput:
    loss: float
    """Mean loss over this step's micro-batches and DP ranks (nan/inf when the update was skipped)."""
    grad_norm: float
    """Global gradient norm before clipping (nan when the loss was already non-finite)."""
    skipped: bool
    """True when no update was made."""


@dataclass
class TrainResult:
    step: int
    """Last completed step."""
    preempted: bool
    """True when a signal stopped the run early (a checkpoint of `step` was saved)."""
    summary: dict = field(default_factory=dict)
    """Throughput over the steps of this process (see metrics.MetricsLogger.summary)."""


# ---- one step ---------------------------------------------------------------------------------------------

def train_step(model: Llama, optimizer: ZeroOptimizer, micro_batches: list[MicroBatch], lr: float,
               state: ParallelState) -> StepOutput:
    """One optimizer update from this rank's micro-batches of the step."""
    optimizer.zero_grad(len(micro_batches))  # the count lets the last backward start the DP reductions
    loss_sum = torch.zeros((), dtype=torch.float32, device=state.device)
    for tokens, targets in micro_batches:  # tokens, targets: (b, S)
        _, loss = model(tokens, targets)  # () mean over the micro-batch's tokens
        (loss / len(micro_batches)).backward()  # grads accumulate in the optimizer's flat buffer
        loss_sum += loss.detach().float()
    if model.sequence_parallel:  # norm-weight grads cover this rank's sequence chunk: sum them over TP
        allreduce_sequence_parallel_grads(model.sequence_parallel_parameters(), state, optimizer)
    loss = mean_over_dp(loss_sum / len(micro_batches), state)  # a host sync
    if not math.isfinite(loss):
        return StepOutput(loss, math.nan, skipped=True)
    result = optimizer.step(lr)
    return StepOutput(loss, result.grad_norm, result.skipped)


def mean_over_dp(value: torch.Tensor, state: ParallelState) -> float:
    """The mean of a scalar over the DP group (TP ranks of a DP rank hold the same loss)."""
    if state.dp_group is not None:
        value = value.clone()
        dist.all_reduce(value, group=state.dp_group)
        value /= state.dp_size
    return float(value)


@torch.no_grad()
def evaluate(model: Llama, data: TrainData, state: ParallelState) -> dict[str, float]:
    """Mean validation loss of each validation set over its fixed samples (all DP ranks' share)."""
    model.eval()
    losses = {}
    for name in data.valid:
        batches = data.valid_batches(name)
        total = torch.zeros((), dtype=torch.float32, device=state.device)
        for tokens, targets in batches:
            total += model(tokens, targets)[1].float()
        losses[name] = mean_over_dp(total / len(batches), state)
    model.train()
    return losses


# ---- building ---------------------------------------------------------------------------------------------

def param_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.param_dtype)


def build_model(config: TrainConfig, state: ParallelState) -> Llama:
    """This TP rank's model on its device in the training dtype: seeded random init, or pretrained weights."""
    sp = config.parallel.sequence_parallel
    if config.init_from_hf:
        with torch.device("meta"):  # no time spent on an init the weights overwrite
            model = Llama(config.model, parallel=state, sequence_parallel=sp)
        model.to_empty(device=state.device)
        ckpt.load_pretrained(model, config.init_from_hf, state)
    else:
        torch.manual_seed(config.seed)  # the same on every rank: TP ranks slice one draw, DP ranks agree
        with torch.device(state.device):
            model = Llama(config.model, parallel=state, sequence_parallel=sp)
    return model.to(param_dtype(config, state.device)).train()


def build_optimizer(config: TrainConfig, model: Llama, state: ParallelState) -> ZeroOptimizer:
    """The ZeRO-1 optimizer over the model's parameters, bucketed and overlapped as config.parallel says."""
    par = config.parallel
    return ZeroOptimizer(model, state, config.optimizer, split_names=model.split_parameter_names(),
                         bucket_mb=par.bucket_mb, overlap_grad_reduce=par.overlap_grad_reduce,
                         overlap_param_gather=par.overlap_param_gather)


def seed_rngs(seed: int, rank: int) -> None:
    """Per-rank RNGs for anything stochastic after the init (none today; dropout would use them)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def resume_point(config: TrainConfig, run_dir: Path) -> Path | None:
    mode = config.checkpoint.resume
    if mode == "auto":
        return ckpt.latest_checkpoint(run_dir)
    if mode == "never":
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            raise ValueError(f"{run_dir} already holds checkpoints (latest: {latest.name}) and checkpoint.resume is "
                             "'never': resume with checkpoint.resume=auto or choose another run_dir")
        return None
    return Path(mode)


def _metadata(config: TrainConfig, step: int, lr: float, global_batch: int, nonfinite: int) -> dict:
    return {"consumed_samples": step * global_batch, "global_batch_size": global_batch,
            "schedule": {"lr": lr, "peak_lr": config.optimizer.lr, **vars(config.schedule)},
            "consecutive_nonfinite": nonfinite, "config": config.to_dict()}


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it at the end of each step (handlers only set a flag)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, state: ParallelState) -> bool:
        """True on every rank when any rank was signalled (they may see the signal at different steps)."""
        flag = self.signal_name is not None
        if not state.is_distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=state.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)


# ---- the run ----------------------------------------------------------------------------------------------

def train(config: TrainConfig, state: ParallelState) -> TrainResult:
    """Train per `config` on this process' share of the job; returns when done or preempted."""
    run_dir = Path(config.run_dir)
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    data = TrainData(config, state, config.data.cache_dir or run_dir / "index-cache")  # data errors first
    model = build_model(config, state)
    optimizer = build_optimizer(config, model, state)
    seed_rngs(config.seed, state.rank)
    step, nonfinite = 0, 0
    resume_from = resume_point(config, run_dir)
    if resume_from is not None:
        meta = load_checkpoint_any_tp(resume_from, model, optimizer, state)  # re-cut on another TP or DP size
        if meta["global_batch_size"] != data.global_batch_size:
            raise ValueError(f"checkpoint {resume_from} was trained with global batch {meta['global_batch_size']}, "
                             f"this run's is {data.global_batch_size} (micro_batch_size · grad_accum_steps · dp): "
                             "keep it equal on resume (adjust grad_accum_steps to the new DP size)")
        step, nonfinite = meta["step"], meta["consecutive_nonfinite"]
    tokens_per_step = data.global_batch_size * config.data.seq_length
    log = MetricsLogger(run_dir, state.rank, state.device, config.model.flops_per_token(config.data.seq_length),
                        state.world_size, tokens_per_step, config.train_steps, step + 1, config.log_every)
    if resume_from is not None:
        resharded = (f" (saved at tensor-parallel size {meta['tp_size']}, re-cut for {state.tp_size})"
                     if meta["tp_size"] != state.tp_size else "")
        log.say(f"resumed from {resume_from} at step {step}{resharded}")
    last_saved, preempted, lr = step, False, 0.0
    try:
        with PreemptionFlag() as flag:
            while step < config.train_steps:
                step += 1
                lr = lr_at(step, config.optimizer.lr, config.schedule)
                start = time.perf_counter()
                out = train_step(model, optimizer, data.micro_batches(step), lr, state)
                rec = log.record(step, out.loss, lr, out.grad_norm, out.skipped, time.perf_counter() - start,
                                 step * data.global_batch_size)
                nonfinite = nonfinite + 1 if out.skipped else 0
                if config.eval_every and step % config.eval_every == 0:
                    rec["val_loss"] = evaluate(model, data, state)
                log.write(rec)
                if out.skipped:
                    log.say(f"step {step}: non-finite loss {out.loss} / grad norm {out.grad_norm}: update skipped "
                            f"({nonfinite} in a row, limit {config.max_consecutive_nonfinite})")
                    if nonfinite >= config.max_consecutive_nonfinite:
                        kept = (f"The last checkpoint (step {last_saved}) is intact: resume from it" if last_saved
                                else "No checkpoint was saved yet: restart")
                        raise NonFiniteError(
                            f"{nonfinite} consecutive steps ({step - nonfinite + 1}..{step}) had a non-finite loss or "
                            f"gradient norm; stopping. {kept} with a lower learning rate or after checking the data "
                            "of those steps")
                preempted = flag.agreed(state)
                save_every = config.checkpoint.save_every
                if preempted or step == config.train_steps or (save_every and step % save_every == 0):
                    meta = _metadata(config, step, lr, data.global_batch_size, nonfinite)
                    ckpt.save_checkpoint(run_dir, step, model, optimizer, state, meta, config.checkpoint.keep)
                    last_saved = step
                if preempted:
                    log.say(f"stopping on {flag.signal_name or 'a peer rank’s signal'} after step {step}: "
                            f"checkpoint saved to {run_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(step)}")
                    break
        summary = log.summary()
        log.say(format_summary(summary))
    finally:
        log.close()
        optimizer.remove_hooks()
    return TrainResult(step, preempted, summary)
