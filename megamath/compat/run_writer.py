"""Another trainer's run continued in megamath: its checkpoint, with Adam's state, as a megamath run's checkpoint.

`megamath convert megatron-to-run` and `neox-to-run` read the trainer's files (megatron_run, neox_run) into a
`ForeignRun`: the iteration N, the global batch, Adam's step count and settings, and megamath's serial
tensors (weights, fp32 masters, exp_avg, exp_avg_sq), each made when it is written. Here that becomes
RUN_DIR/checkpoints/step_N (and `latest`), laid out for the config's tensor-parallel size and for the
data-parallel size its batch implies (global batch / (micro_batch_size · grad_accum_steps)), so that
`megamath train --config CONFIG` with run_dir RUN_DIR resumes from it at update N + 1: the masters (not the
bf16 weights), the moments and Adam's step count (its bias correction) carry over, besides the step, the
learning rate's place on the schedule and the data position (N × global batch samples, in the config's
data.sample_order). The config must describe the checkpoint's model and batch; a difference is refused by
name. The RNG states start as a fresh run seeds them (nothing draws random numbers after the
initialization). Each TP rank's whole optimizer state is held while its shards are written (12 bytes per
parameter / TP); the source is read once per TP rank written (a fused q/k/v or gate/up tensor once per part
cut from it), not once per DP rank.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megamath.model.config import ModelConfig
from megamath.model.model_folder import Deferred
from megamath.model.partition import check_tensor_parallel
from megamath.parallel.optimizer_config import GRAD_DTYPES
from megamath.parallel.zero_layout import bucket_numel_for, resolve_grad_dtype
from megamath.training.checkpoint import FORMAT
from megamath.training.config import TrainConfig
from megamath.training.reshard import fresh_rng_state, write_checkpoint_files, write_new_run, zero_shards
from megamath.training.schedule import lr_at

MODEL_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
              "rope_theta", "norm_eps")
"""What the config's model must share with the checkpoint's: its shape, and what its forward computes."""


@dataclasses.dataclass
class ForeignRun:
    """A trainer's checkpoint as megamath continues it."""

    trainer: str
    """"Megatron-LM" or "GPT-NeoX"."""
    order: str
    """The trainer's data.sample_order ("megatron", "neox")."""
    path: Path
    iteration: int
    global_batch: int
    consumed_samples: int | None
    """The samples the trainer counted as read (reported when it is not iteration × global batch)."""
    data_position: int
    """The sample the trainer would read next: Megatron-LM's consumed_train_samples (fewer than iteration ×
    global batch after a batch-size ramp), GPT-NeoX's iteration × global batch."""
    adam_step: int
    betas: tuple[float, float]
    eps: float
    optimizer_state: str
    """How the trainer stored the state, said in the report."""
    layout: str
    """The checkpoint's parallel layout, said in the report ("TP 2", "TP 2 × PP 4 × VP 2")."""
    model: ModelConfig
    """The checkpoint's model, its vocabulary trimmed to the config's."""
    weights: dict[str, Deferred]
    states: dict[str, dict[str, Deferred]]
    """"master", "exp_avg", "exp_avg_sq": megamath's serial tensors of each, by parameter name."""
    weights_dtype: torch.dtype
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunConversion:
    checkpoint: Path
    """The megamath checkpoint written (RUN_DIR/checkpoints/step_N)."""
    source: ForeignRun
    dp_size: int
    notes: list[str]


def check_model(model: ModelConfig, config: TrainConfig) -> None:
    differ = [f"model.{key} {getattr(config.model, key)} (config) vs {getattr(model, key)} (checkpoint)"
              for key in MODEL_KEYS if getattr(config.model, key) != getattr(model, key)]
    if differ:
        raise ValueError(f"the config describes another model than the checkpoint's: {'; '.join(differ)}")


def check_vocabulary(config: TrainConfig, padded: int | None) -> None:
    if isinstance(padded, int) and config.model.vocab_size > padded:
        raise ValueError(f"config model.vocab_size {config.model.vocab_size} exceeds the checkpoint's padded "
                         f"vocabulary {padded}")


def write_run(source: ForeignRun, run_dir: str | Path, config: TrainConfig) -> RunConversion:
    """Write `source` as megamath run `run_dir`'s checkpoint step_N, for `config`."""
    check_model(source.model, config)
    check_tensor_parallel(config.model, config.parallel.tp_size)
    iteration, batch = source.iteration, source.global_batch
    per_rank = config.micro_batch_size * config.grad_accum_steps
    if batch % per_rank:
        raise ValueError(f"the checkpoint's global batch {batch} is not a multiple of the config's micro_batch_size "
                         f"· grad_accum_steps = {per_rank}: no data-parallel size keeps the batch, and a resume "
                         "must keep it")
    if config.train_steps <= iteration:
        raise ValueError(f"config train_steps {config.train_steps} leaves nothing to train after iteration "
                         f"{iteration} (train_steps counts from the run's start, as the trainers' train iterations "
                         "do)")
    dp_size, tp = batch // per_rank, config.parallel.tp_size
    dtype = source.weights_dtype if config.param_dtype == "auto" else getattr(torch, config.param_dtype)
    grad = resolve_grad_dtype(config.optimizer.grad_dtype, dtype == torch.bfloat16, dp_size, tp,
                              config.grad_accum_steps)
    bucket_numel = bucket_numel_for(config.parallel.bucket_mb, GRAD_DTYPES[grad].itemsize)
    states = source.states

    def param_state(name: str) -> dict[str, torch.Tensor]:
        return {key: states[key][name].read() for key in ("master", "exp_avg", "exp_avg_sq")}

    def shards(names: list[str], tp_rank: int):
        return zero_shards(param_state, names, config.model, tp, tp_rank, dp_size, bucket_numel, source.adam_step,
                           dataclasses.asdict(config.optimizer), read_once=True)

    lr = lr_at(source.data_position / batch, config.optimizer.lr, config.schedule)  # (TrainData.schedule_position)
    meta = {"format": FORMAT, "step": iteration, "tp_size": tp, "dp_size": dp_size, "world_size": tp * dp_size,
            "consumed_samples": source.data_position, "global_batch_size": batch,
            "schedule": {"lr": lr, "peak_lr": config.optimizer.lr, **vars(config.schedule)},
            "consecutive_nonfinite": 0, "update_ok": True, "config": config.to_dict(),
            "converted_from": {"trainer": source.trainer, "path": str(Path(source.path).resolve()),
                               "iteration": iteration, "adam_step": source.adam_step,
                               "optimizer_state": source.optimizer_state,
                               "consumed_samples": source.consumed_samples}}
    notes = source.notes + _notes(source, config, run_dir)
    checkpoint = write_new_run(run_dir, iteration, lambda folder: write_checkpoint_files(
        folder, config.model, tp, dp_size, lambda name: source.weights[name].read().to(dtype), shards,
        lambda rank: fresh_rng_state(config.seed + rank), meta), "convert")
    return RunConversion(checkpoint, source, dp_size, notes)


def _notes(source: ForeignRun, config: TrainConfig, run_dir) -> list[str]:
    """What differs between the checkpoint's run and the config, said once each (nothing is refused here)."""
    notes = []
    ours = (config.optimizer.beta1, config.optimizer.beta2)
    if source.betas != ours or source.eps != config.optimizer.eps:
        notes.append(f"the checkpoint's Adam betas {source.betas} and eps {source.eps:g} differ from the config's "
                     f"{ours} and {config.optimizer.eps:g}: the run goes on with the config's")
    consumed, full = source.consumed_samples, source.iteration * source.global_batch
    if source.data_position != full:
        notes.append(f"its consumed samples {source.data_position:,} are fewer than iteration × global batch "
                     f"{full:,} (a batch-size ramp): the run reads on from sample {source.data_position:,} of the "
                     f"order, as {source.trainer} would; its steps count on from {source.iteration}, its learning "
                     f"rate from schedule position {source.data_position / source.global_batch:g}, not "
                     f"{source.iteration} (samples / global batch, as {source.trainer}'s scheduler counts)")
    elif isinstance(consumed, int) and consumed != full:
        notes.append(f"{source.trainer} counted {consumed:,} samples read, iteration × global batch is {full:,}: the "
                     f"run reads on from sample {full:,}, as {source.trainer}'s sampler goes on by iteration")
    iteration = source.iteration
    if source.adam_step != iteration:
        notes.append(f"Adam's step count is {source.adam_step}, the iteration {iteration} (iterations skipped, by "
                     "a loss scaler or on non-finite gradients): Adam goes on from its own count")
    if Path(config.run_dir).resolve() != Path(run_dir).resolve():
        notes.append(f"the config's run_dir is {config.run_dir}: set it to {run_dir} for `megamath train` to resume "
                     "from this checkpoint")
    if config.data.sample_order != source.order:
        notes.append(f"the config's data.sample_order is {config.data.sample_order}: the samples from here on are "
                     f"not the ones {source.trainer} would have read next (data.sample_order: {source.order} reads "
                     "on in its order)")
    return notes
