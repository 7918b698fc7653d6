"""The training loop: build, resume, then `train_step` after `train_step`, with eval, metrics and checkpoints.

Order of one step (every rank, in lockstep):
    1. the scheduled lr of update `step` (1-based);
    2. grad_accum_steps forward/backward passes of this rank's micro-batches, each loss divided by the
       accumulation count (grads accumulate in the ZeRO-1 optimizer's flat buffer);
    3. the mean loss over micro-batches and DP ranks, on the device;
    4. optimizer.launch_step(lr): DP reduction, global grad norm, clipping, AdamW on the shard; a
       non-finite loss or norm skips the update on every rank, decided on the device; then the step's
       one device-to-host read (loss, norm, whether it was applied, clip factor);
    5. validation every eval_every steps;
    6. metrics, with the time of each phase (phases.py; on GPUs written a step later, but at once when a
       checkpoint follows, so that no checkpoint exists without its step's record);
    7. a checkpoint every save_every steps, at the end, and when the run stops early (preemption.py:
       SIGTERM/SIGUSR1, torchrun's agent gone, exit_after_minutes reached; or a step that is a multiple of
       exit_every), saved at the end of the step, then a clean exit 0; its time is in the next step's record.

After max_consecutive_nonfinite skipped steps in a row the run stops with NonFiniteError. No checkpoint
is written while the streak of skipped steps is non-zero (not even at the end or on preemption), and
pruning keeps the newest checkpoint saved right after a good update, so the last good state survives.
The whole run holds RUN_DIR's lock (run_guard.py); resume picks the newest intact checkpoint (resume.py).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megamath.evaluation.during_training import check_task_inputs, evaluate_tasks
from megamath.model.llama import Llama
from megamath.model.model_folder import hf_extras_record
from megamath.model.pretrained import load_pretrained
from megamath.parallel.sequence_parallel import allreduce_sequence_parallel_grads
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.training import checkpoint as ckpt
from megamath.training.attention_settle import settle_attention
from megamath.training.config import TrainConfig, dump_config
from megamath.training.data import MicroBatch, TrainData
from megamath.training.export import is_training_checkpoint
from megamath.training.held_out import evaluate, evaluate_start, mean_over_dp
from megamath.training.metrics import MetricsLogger, RunDescription, finite_or_none, format_summary, run_info
from megamath.training.phases import PhaseTimer, no_phase
from megamath.training.preemption import StopFlag
from megamath.training.profiling import StepProfiler
from megamath.training.reshard import load_checkpoint_any_tp
from megamath.training.resume import (check_resume_compatible, data_order_change, find_resume_checkpoint,
                                     resume_sample_offset, rewound_past, schedule_change, validation_change)
from megamath.training.run_guard import hold_run_dir
from megamath.training.schedule import decoupled_lr_at, lr_at
from megamath.training.warm_start import load_training_weights, training_hf_extras


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm."""


@dataclass
class StepOutput:
    loss: float
    """Mean loss over this step's micro-batches and DP ranks (nan/inf when it is what skipped the update; a
    non-finite gradient norm skips it with a finite loss)."""
    grad_norm: float
    """Global gradient norm before clipping (nan when the loss was already non-finite)."""
    skipped: bool
    """True when no update was made."""


@dataclass
class TrainResult:
    step: int
    """Last completed step."""
    preempted: bool
    """True when a signal stopped the run early (a checkpoint of `step` was saved, unless mid-streak of skipped
    steps)."""
    summary: dict = field(default_factory=dict)
    """Throughput over the steps of this process (see metrics.MetricsLogger.summary)."""


# ---- one step ---------------------------------------------------------------------------------------------

def train_step(model: Llama, optimizer: ZeroOptimizer, micro_batches: list[MicroBatch], lr: float,
               state: ParallelState, timer: PhaseTimer | None = None, decoupled_lr: float | None = None) -> StepOutput:
    """One optimizer update from this rank's micro-batches of the step (`timer` times its phases; `decoupled_lr`,
    the embedding's and LM head's learning rate when optimizer.decoupled_lr sets one)."""
    phase = timer.phase if timer is not None else no_phase
    with phase("optimizer"):  # the gradient buffer's memset is the optimizer's bookkeeping
        optimizer.zero_grad(len(micro_batches))  # the count lets the last backward start the DP reductions
        loss_sum = torch.zeros((), dtype=torch.float32, device=state.device)
    for tokens, targets in micro_batches:  # tokens, targets: (b, S)
        with phase("forward"):  # the loss kernel writes the logits' gradient for the backward below
            _, loss = model(tokens, targets, loss_grad=1.0 / len(micro_batches))  # () mean over its tokens
        with phase("backward"):
            (loss / len(micro_batches)).backward()  # grads accumulate in the optimizer's flat buffer
            loss_sum += loss.detach().float()
    with phase("grad_reduce"):  # the SP norm grads over TP and the loss over DP: small, but communication
        if model.sequence_parallel:  # norm-weight grads cover this rank's sequence chunk: sum them over TP
            allreduce_sequence_parallel_grads(model.sequence_parallel_parameters(), state, optimizer)
        loss = mean_over_dp(loss_sum / len(micro_batches), state)  # () on the device
        finite = torch.isfinite(loss)  # a non-finite loss skips the update on the device, like a non-finite norm
    stats = optimizer.launch_step(lr, timer, finite=finite, decoupled_lr=decoupled_lr)
    with phase("optimizer"):  # on a GPU the read waits for AdamW (for the norm only when AdamW is overlapped)
        loss_value, *figures = torch.cat([loss.view(1), stats]).tolist()  # the step's one device-to-host read
        result = optimizer.finish_step(figures)
    if not math.isfinite(loss_value):
        return StepOutput(loss_value, math.nan, skipped=True)
    return StepOutput(loss_value, result.grad_norm, result.skipped)


# ---- building ---------------------------------------------------------------------------------------------

DECOUPLED = ("embed_tokens.weight", "lm_head.weight")
"""The parameters optimizer.decoupled_lr sets the learning rate of (Megatron-LM's embedding and output layer)."""

def param_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.param_dtype)


def build_model(config: TrainConfig, state: ParallelState, pretrained: bool = True) -> Llama:
    """This TP rank's model on its device in the training dtype: seeded random init, or pretrained weights.

    pretrained=False (a resume, whose checkpoint overwrites every weight) leaves init_from_hf's weights
    unread: a later stage resumes even once the run it started from is gone, and reads nothing twice."""
    sp = config.parallel.sequence_parallel
    if config.init_from_hf:
        with torch.device("meta"):  # no time spent on an init the weights overwrite
            model = Llama(config.model, parallel=state, sequence_parallel=sp)
        model.to_empty(device=state.device)
        if pretrained and is_training_checkpoint(config.init_from_hf):  # a megamath run's weights, step 0
            load_training_weights(model, config.init_from_hf, state)  # (Megatron-LM's --finetune)
        elif pretrained:
            load_pretrained(model, config.init_from_hf, state)
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
                         overlap_param_gather=par.overlap_param_gather, micro_batches=config.grad_accum_steps,
                         overlap_optimizer_step=par.overlap_optimizer_step,
                         decoupled_names=DECOUPLED if config.optimizer.decoupled_lr is not None else ())


def seed_rngs(seed: int, rank: int) -> None:
    """Per-rank RNGs for anything stochastic after the init (none today; dropout would use them)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def resume_point(config: TrainConfig, run_dir: Path, state: ParallelState) -> Path | None:
    """The verified checkpoint to continue from (resume.py), or None for a fresh start."""
    def say(line: str) -> None:
        if state.rank == 0:
            print(line, flush=True)

    return find_resume_checkpoint(config.checkpoint.resume, run_dir, state, say)


def _metadata(config: TrainConfig, step: int, lr: float, global_batch: int,
              consumed: int, nonfinite: int, hf_extras: dict | None) -> dict:
    meta = {"consumed_samples": consumed, "global_batch_size": global_batch,
            "schedule": {"lr": lr, "peak_lr": config.optimizer.lr, **vars(config.schedule),
                         "decoupled_lr": config.optimizer.decoupled_lr,
                         "decoupled_min_lr": config.optimizer.decoupled_min_lr},
            "consecutive_nonfinite": nonfinite, "update_ok": nonfinite == 0, "config": config.to_dict()}
    return meta if hf_extras is None else {**meta, "hf_extras": hf_extras}


def hf_extras_of_run(config: TrainConfig, saved: dict | None) -> dict | None:
    """The special token ids and generation config the run's export gives back: those its checkpoint
    recorded, else (a fresh start, or a checkpoint from before the record) those of init_from_hf's folder."""
    if saved is not None and "hf_extras" in saved:
        return saved["hf_extras"]
    if not config.init_from_hf or (saved is not None and not Path(config.init_from_hf).exists()):
        return None  # (a resume whose starting point is gone: its checkpoints had no record either)
    if is_training_checkpoint(config.init_from_hf):
        return training_hf_extras(config.init_from_hf)
    return hf_extras_record(config.init_from_hf)


# ---- the run ----------------------------------------------------------------------------------------------

def train(config: TrainConfig, state: ParallelState) -> TrainResult:
    """Train per `config` on this process' share of the job; returns when done or preempted."""
    started = time.monotonic()  # exit_after_minutes counts from here, as Megatron-LM's from its start
    with hold_run_dir(Path(config.run_dir), state) as attempt:  # one training per run_dir
        return _train(config, state, attempt, started)


def _train(config: TrainConfig, state: ParallelState, attempt: str, started: float) -> TrainResult:
    run_dir = Path(config.run_dir)
    data = TrainData(config, state, config.data.cache_dir or run_dir / "index-cache")  # data errors first
    check_task_inputs(config.evaluation)  # and the evaluation's, not at its first eval_every step
    resume_from = resume_point(config, run_dir, state)
    model = build_model(config, state, pretrained=resume_from is None)  # a resume overwrites every weight
    optimizer = build_optimizer(config, model, state)
    seed_rngs(config.seed, state.rank)
    step, nonfinite = config.init_step, 0  # a fresh start: step 0, or where init_from_hf's run stopped
    if resume_from is not None:
        saved = ckpt.read_metadata(resume_from)
        check_resume_compatible(saved, config, resume_from)
        if state.rank == 0 and (warning := data_order_change(saved, config)):
            print(warning, flush=True)
        if state.rank == 0 and (warning := validation_change(saved, config, state.dp_size)):
            print(warning, flush=True)
        if state.rank == 0 and (warning := schedule_change(saved, config)):
            print(warning, flush=True)
        if state.rank == 0 and (note := rewound_past(run_dir, saved["step"])):
            print(note, flush=True)
        # verified by resume_point on every rank's behalf; re-cut on another TP or DP size
        meta = load_checkpoint_any_tp(resume_from, model, optimizer, state, verify=False)
        if meta["global_batch_size"] != data.global_batch_size:
            raise ValueError(f"checkpoint {resume_from} was trained with global batch {meta['global_batch_size']}, "
                             f"this run's is {data.global_batch_size} (micro_batch_size · grad_accum_steps · dp): "
                             "keep it equal on resume (adjust grad_accum_steps to the new DP size)")
        step, nonfinite = meta["step"], meta["consecutive_nonfinite"]
        data.sample_offset = resume_sample_offset(meta, data.global_batch_size, resume_from)
    attention = settle_attention(model, config, state, run_dir, param_dtype(config, state.device))
    if config.skip_train:  # Megatron-LM's --skip-train: the starting point's held-out losses, nothing trained
        if state.rank == 0:
            print(attention, flush=True)
        source = str(resume_from or config.init_from_hf or f"the random initialization (seed {config.seed})")
        return TrainResult(step, False, evaluate_start(model, data, config, state, step, source))
    hf_extras = hf_extras_of_run(config, saved if resume_from is not None else None)
    tokens_per_step = data.global_batch_size * config.data.seq_length
    flops_per_token = config.model.flops_per_token(config.data.seq_length)
    description = RunDescription(dump_config(config), run_info(
        state.world_size, state.tp_size, state.device, flops_per_token, tokens_per_step, config.data.seq_length,
        config.metrics.peak_tflops))
    log = MetricsLogger(run_dir, state, flops_per_token, tokens_per_step, config.train_steps, step + 1,
                        config.log_every, config.logging.tensorboard_path(run_dir), description,
                        wandb=config.logging.wandb, run_config=config.to_dict(),
                        peak_override=config.metrics.peak_tflops)
    timer = PhaseTimer(state.device)
    profiler = StepProfiler(config.profile.steps, config.profile.memory, run_dir, state.rank, state.device, timer,
                            settle=optimizer.finish_param_sync)
    if resume_from is not None:
        resharded = (f" (saved at tensor-parallel size {meta['tp_size']}, re-cut for {state.tp_size})"
                     if meta["tp_size"] != state.tp_size else "")
        log.say(f"resumed from {resume_from} at step {step}{resharded}")
    for line in data.split_lines + data.warnings:
        log.say(line)
    if config.data.sample_order != "megamath":
        trainer = {"megatron": "Megatron-LM", "neox": "GPT-NeoX"}[config.data.sample_order]
        log.say(f"data.sample_order {config.data.sample_order}: the training samples come in {trainer}'s order for "
                f"this blend, split, seed, seq_length and {config.train_steps} steps × "
                f"{data.global_batch_size} samples")
    if config.optimizer.grad_dtype == "auto":
        log.say(f"gradient buffer: {optimizer.grad_dtype} (grad_dtype auto at {str(optimizer.param_dtype)[6:]} "
                f"weights, {config.grad_accum_steps} micro-batch(es) per step, DP {state.dp_size}, TP {state.tp_size}: "
                "bf16 only where nothing is summed into it)")
    if optimizer.overlap_optimizer_step and len(optimizer.buckets) == 1:
        grad_mib = optimizer.numel * optimizer.flat_grad.element_size() / 2**20
        why, fix = (("parallel.bucket_mb 0", "set bucket_mb (e.g. 128)") if not config.parallel.bucket_mb else
                    (f"parallel.bucket_mb {config.parallel.bucket_mb:g} holds all {grad_mib:.3g} MiB of gradients",
                     f"set bucket_mb below {grad_mib:.3g}"))
        log.say(f"parallel.overlap_optimizer_step: one bucket ({why}), so the forward's first layer "
                f"waits for the whole update and nothing overlaps; {fix} to overlap it")
    if config.optimizer.gradient_accumulation_fusion and not optimizer.gradient_accumulation_fusion:
        log.say(f"gradient accumulation fusion: off, {str(optimizer.param_dtype)[6:]} weights into a "
                f"{optimizer.grad_dtype} buffer on {state.device.type} have no matmul that accumulates into it: "
                "the gradients go through the optimizer's hook")
    log.say(attention)
    last_saved, preempted, lr = (step if resume_from is not None else 0), False, 0.0
    if resume_from is None and step:
        log.say(f"init_step {step}: continuing the run of {config.init_from_hf} at step {step + 1} (learning rate, "
                f"data position and checkpoint names go on from there; the optimizer's moments start fresh)")
    opt = config.optimizer
    try:
        with StopFlag(config.exit_after_minutes, started) as flag:
            while step < config.train_steps:
                step += 1
                position = data.schedule_position(step)
                lr = lr_at(position, opt.lr, config.schedule)
                decoupled_lr = decoupled_lr_at(position, opt.lr, opt.decoupled_lr, opt.decoupled_min_lr,
                                               config.schedule)
                timer.start_step()  # (a no-op after the first step: the previous one opened it)
                profiler.begin(step)
                with timer.phase("data"):
                    micro_batches = data.micro_batches(step)
                out = train_step(model, optimizer, micro_batches, lr, state, timer, decoupled_lr)
                rec = log.record(step, out.loss, lr, out.grad_norm, out.skipped, data.consumed_after(step))
                if decoupled_lr is not None:
                    rec["decoupled_lr"] = decoupled_lr
                nonfinite = nonfinite + 1 if out.skipped else 0
                if config.eval_every and step % config.eval_every == 0:
                    with timer.phase("eval"):
                        rec["val_loss"] = {name: finite_or_none(value)  # JSON has no NaN
                                           for name, value in evaluate(model, data, state).items()}
                        rec.update(evaluate_tasks(model, config.evaluation, state, log.say))  # few-shot tasks
                if data.test and step == config.train_steps:  # Megatron-LM's test loss, at the end of training
                    with timer.phase("eval"):
                        rec["test_loss"] = {name: finite_or_none(value)
                                            for name, value in evaluate(model, data, state, data.test).items()}
                if out.skipped:
                    log.say(f"step {step}: non-finite loss {out.loss} / grad norm {out.grad_norm}: update skipped "
                            f"({nonfinite} in a row, limit {config.max_consecutive_nonfinite})")
                    if nonfinite >= config.max_consecutive_nonfinite:
                        log.write(rec, timer.end_step())
                        kept = (f"The last checkpoint (step {last_saved}) is intact: resume from it" if last_saved
                                else "No checkpoint was saved yet: restart")
                        raise NonFiniteError(
                            f"{nonfinite} consecutive steps ({step - nonfinite + 1}..{step}) had a non-finite loss or "
                            f"gradient norm; stopping. {kept} with a lower learning rate or after checking the data "
                            "of those steps")
                with timer.phase("sync"):  # a collective: mostly waiting for the slowest rank
                    preempted = flag.agreed(state)  # (called every step: a collective)
                at_interval = bool(config.exit_every) and step % config.exit_every == 0 and step < config.train_steps
                preempted = preempted or at_interval  # exit_every: the same step on every rank, nothing to agree
                save_every = config.checkpoint.save_every
                due = preempted or step == config.train_steps or (save_every and step % save_every == 0)
                save = due and not nonfinite
                if due and nonfinite:  # mid-streak: the last good checkpoint stays the newest
                    log.say(f"step {step}: no checkpoint during a streak of skipped steps; the last one is step "
                            f"{last_saved}")
                profiler.end(step)  # a window's trace is written in its last step, which is profiled anyway
                timing = timer.end_step()
                timer.start_step()  # steps are contiguous: the work between two steps is timed in the next one
                # The step's record reaches metrics.jsonl before its checkpoint is published, so a checkpoint
                # never exists without its step's line; the write and the save are timed in the next step's record.
                with timer.phase("log"):
                    log.write(rec, timing, flush=save)
                if save:
                    with timer.phase("checkpoint"):
                        meta = _metadata(config, step, lr, data.global_batch_size, data.consumed_after(step),
                                         nonfinite, hf_extras)
                        ckpt.save_checkpoint(run_dir, step, model, optimizer, state, meta, config.checkpoint.keep,
                                             attempt=attempt)
                    last_saved = step
                    if not preempted and step < config.train_steps:  # signalled during the save: stop on it now,
                        with timer.phase("sync"):  # not after another step and another save (the grace may not last)
                            preempted = flag.agreed(state)
                if preempted:
                    path = run_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(last_saved)
                    saved = (f"checkpoint saved to {path}" if last_saved == step else
                             f"resume from the last good checkpoint, {path}" if last_saved else
                             "no checkpoint was saved yet (none is during a streak of skipped steps): the next "
                             "run starts from scratch")
                    why = flag.reason or f"exit_every {config.exit_every}"  # (the flag's reason when it stopped the run)
                    log.say(f"stopping on {why} after step {step}: {saved}")
                    break
        summary = log.summary()
        log.say(format_summary(summary))
    except torch.cuda.OutOfMemoryError as err:
        raise profiler.out_of_memory(step, err) from err
    finally:
        profiler.close()
        log.close()
        optimizer.remove_hooks()
    return TrainResult(step, preempted, summary)
