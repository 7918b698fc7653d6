"""A Megatron-LM run continued in megamath: `megamath convert megatron-to-run CKPT RUN_DIR --config CONFIG`.

The checkpoint becomes a megamath training checkpoint, RUN_DIR/checkpoints/step_N (N the iteration), laid
out for the config's tensor-parallel size and for the data-parallel size its batch implies (global batch /
(micro_batch_size · grad_accum_steps)); `megamath train --config CONFIG` with run_dir RUN_DIR resumes from
it at update N + 1. What carries over:
- the fp32 masters and Adam's moments (megatron_optimizer, with megatron_buckets for the distributed
  optimizer's default layout), mapped to megamath's parameters as the weights
  are (megatron_llama: linear_qkv cut into q, k, v by query group, linear_fc1 into gate and up; the padded
  vocabulary trimmed to the config's), and Adam's step count, so its bias correction goes on;
- the step, the learning rate's place on the schedule and the data position (N × global batch samples, in
  the config's data.sample_order: `megatron` reads on in Megatron-LM's order).
The config must describe the checkpoint's model and batch; a difference in shape, RoPE base, norm epsilon
or global batch is refused by name. The RNG states start as a fresh run seeds them (nothing draws random
numbers after the initialization). Compared with megatron-to-hf + init_from_hf + init_step, nothing is
rounded to bf16 and Adam does not restart.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megamath.compat.megatron_checkpoint import MegatronWeights, read_megatron_checkpoint
from megamath.compat.megatron_llama import llama_config, llama_state_dict, training_dtype
from megamath.compat.megatron_optimizer import MegatronAdam, read_megatron_adam
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
class RunConversion:
    checkpoint: Path
    """The megamath checkpoint written (RUN_DIR/checkpoints/step_N)."""
    weights: MegatronWeights
    adam: MegatronAdam
    dp_size: int
    notes: list[str]


def convert_megatron_to_run(src: str | Path, run_dir: str | Path, config: TrainConfig) -> RunConversion:
    """Write the Megatron-LM checkpoint at `src` as megamath run `run_dir`'s checkpoint, for `config`."""
    weights = read_megatron_checkpoint(src)
    if not isinstance(weights.iteration, int) or weights.iteration < 1:
        raise ValueError(f"{src}: a {weights.iteration!r} checkpoint has no iteration to continue from; start a run "
                         "from its weights instead (megatron-to-hf, then init_from_hf)")
    model = _model_config(weights, config)
    check_tensor_parallel(model, config.parallel.tp_size)
    if "output" not in weights.tensors:
        raise ValueError(f"{src}: the checkpoint ties the output layer to the embedding (one parameter, one Adam "
                         "state); megamath trains them untied, so its optimizer state has no counterpart here")
    adam = read_megatron_adam(weights)
    iteration, batch = weights.iteration, _global_batch(weights, config, src)
    dp_size = batch // (config.micro_batch_size * config.grad_accum_steps)
    if config.train_steps <= iteration:
        raise ValueError(f"config train_steps {config.train_steps} leaves nothing to train after iteration "
                         f"{iteration} (train_steps counts from the run's start, as --train-iters does)")
    notes = _notes(weights, adam, config, run_dir)
    states = {key: llama_state_dict(found, model) for key, found in adam.states.items()}
    tensors = llama_state_dict(weights, model)
    dtype = _weights_dtype(weights, config)
    grad = resolve_grad_dtype(config.optimizer.grad_dtype, dtype == torch.bfloat16, dp_size,
                              config.parallel.tp_size, config.grad_accum_steps)
    bucket_numel = bucket_numel_for(config.parallel.bucket_mb, GRAD_DTYPES[grad].itemsize)
    tp = config.parallel.tp_size

    def param_state(name: str) -> dict[str, torch.Tensor]:
        return {"master": states["master"][name].read(), "exp_avg": states["exp_avg"][name].read(),
                "exp_avg_sq": states["exp_avg_sq"][name].read()}

    def shards(names: list[str], tp_rank: int):
        return zero_shards(param_state, names, model, tp, tp_rank, dp_size, bucket_numel, adam.step,
                           dataclasses.asdict(config.optimizer), read_once=True)

    meta = {"format": FORMAT, "step": iteration, "tp_size": tp, "dp_size": dp_size, "world_size": tp * dp_size,
            "consumed_samples": iteration * batch, "global_batch_size": batch,
            "schedule": {"lr": lr_at(iteration, config.optimizer.lr, config.schedule), "peak_lr": config.optimizer.lr,
                         **vars(config.schedule)},
            "consecutive_nonfinite": 0, "update_ok": True, "config": config.to_dict(),
            "converted_from": {"trainer": "Megatron-LM", "path": str(Path(src).resolve()), "iteration": iteration,
                               "adam_step": adam.step, "optimizer_state": adam.sharding,
                               "consumed_train_samples": weights.args.get("consumed_train_samples")}}
    checkpoint = write_new_run(run_dir, iteration, lambda folder: write_checkpoint_files(
        folder, model, tp, dp_size, lambda name: tensors[name].read().to(dtype), shards,
        lambda rank: fresh_rng_state(config.seed + rank), meta), "convert")
    return RunConversion(checkpoint, weights, adam, dp_size, notes)


def _model_config(weights: MegatronWeights, config: TrainConfig):
    """The checkpoint's model with the config's vocabulary (at most the padded one), which must be the config's."""
    padded = weights.args.get("padded_vocab_size")
    if isinstance(padded, int) and config.model.vocab_size > padded:
        raise ValueError(f"config model.vocab_size {config.model.vocab_size} exceeds the checkpoint's padded "
                         f"vocabulary {padded}")
    model = llama_config(weights.args, config.model.vocab_size)
    differ = [f"model.{key} {getattr(config.model, key)} (config) vs {getattr(model, key)} (checkpoint)"
              for key in MODEL_KEYS if getattr(config.model, key) != getattr(model, key)]
    if differ:
        raise ValueError(f"the config describes another model than the checkpoint's: {'; '.join(differ)}")
    return config.model


def _global_batch(weights: MegatronWeights, config: TrainConfig, src) -> int:
    batch = weights.args.get("global_batch_size")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{src}: the checkpoint's args have no global_batch_size; the data position needs it")
    per_rank = config.micro_batch_size * config.grad_accum_steps
    if batch % per_rank:
        raise ValueError(f"the checkpoint's global batch {batch} is not a multiple of the config's micro_batch_size "
                         f"· grad_accum_steps = {per_rank}: no data-parallel size keeps the batch, and a resume "
                         "must keep it")
    return batch


def _weights_dtype(weights: MegatronWeights, config: TrainConfig) -> torch.dtype:
    """The model files' dtype: the config's param_dtype, or (auto) the checkpoint's params_dtype. (The masters
    are the weights a resume loads; the model files only need the run's dtype.)"""
    if config.param_dtype != "auto":
        return getattr(torch, config.param_dtype)
    return training_dtype(weights) or torch.bfloat16


def _notes(weights: MegatronWeights, adam: MegatronAdam, config: TrainConfig, run_dir) -> list[str]:
    """What differs between the checkpoint's run and the config, said once each (nothing is refused here)."""
    notes = []
    ours = (config.optimizer.beta1, config.optimizer.beta2)
    if adam.betas != ours or adam.eps != config.optimizer.eps:
        notes.append(f"the checkpoint's Adam betas {adam.betas} and eps {adam.eps:g} differ from the config's "
                     f"{ours} and {config.optimizer.eps:g}: the run goes on with the config's")
    consumed, iteration = weights.args.get("consumed_train_samples"), weights.iteration
    batch = weights.args["global_batch_size"]
    if isinstance(consumed, int) and consumed != iteration * batch:
        notes.append(f"its consumed_train_samples {consumed:,} is not iteration × global batch "
                     f"{iteration * batch:,} (a batch-size ramp?): the run reads on from sample {iteration * batch:,} "
                     "of the order")
    if adam.step != iteration:
        notes.append(f"Adam's step count is {adam.step}, the iteration {iteration} (iterations skipped by the "
                     "loss scaler): Adam goes on from its own count")
    if Path(config.run_dir).resolve() != Path(run_dir).resolve():
        notes.append(f"the config's run_dir is {config.run_dir}: set it to {run_dir} for `megamath train` to resume "
                     "from this checkpoint")
    if config.data.sample_order != "megatron":
        notes.append(f"the config's data.sample_order is {config.data.sample_order}: the samples from here on are "
                     "not the ones Megatron-LM would have read next (data.sample_order: megatron reads on in its "
                     "order)")
    return notes
