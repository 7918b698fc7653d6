"""A Megatron-LM run continued in megamath: `megamath convert megatron-to-run CKPT RUN_DIR --config CONFIG`.

The checkpoint's weights and Adam state (megatron_optimizer, with megatron_buckets for the distributed
optimizer's default layout) are mapped to megamath's parameters as megatron-to-hf maps the weights
(megatron_llama: linear_qkv cut into q, k, v by query group, linear_fc1 into gate and up; the padded
vocabulary trimmed to the config's), then written as a megamath run by run_writer. Compared with
megatron-to-hf + init_from_hf + init_step, nothing is rounded to bf16 and Adam does not restart.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megamath.compat.megatron_checkpoint import read_megatron_checkpoint
from megamath.compat.megatron_llama import llama_config, llama_state_dict, training_dtype, zero_centered
from megamath.compat.megatron_optimizer import read_megatron_adam
from megamath.compat.run_writer import ForeignRun, RunConversion, check_model, check_vocabulary, write_run
from megamath.training.config import TrainConfig


def convert_megatron_to_run(src: str | Path, run_dir: str | Path, config: TrainConfig) -> RunConversion:
    """Write the Megatron-LM checkpoint at `src` as megamath run `run_dir`'s checkpoint, for `config`."""
    weights = read_megatron_checkpoint(src)
    if not isinstance(weights.iteration, int) or weights.iteration < 1:
        raise ValueError(f"{src}: a {weights.iteration!r} checkpoint has no iteration to continue from; start a run "
                         "from its weights instead (megatron-to-hf, then init_from_hf)")
    check_vocabulary(config, weights.args.get("padded_vocab_size"))
    model = llama_config(weights.args, config.model.vocab_size)
    check_model(model, config)  # before the optimizer state is read
    if "output" not in weights.tensors:
        raise ValueError(f"{src}: the checkpoint ties the output layer to the embedding (one parameter, one Adam "
                         "state); megamath trains them untied, so its optimizer state has no counterpart here")
    batch = weights.args.get("global_batch_size")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{src}: the checkpoint's args have no global_batch_size; the data position needs it")
    consumed = weights.args.get("consumed_train_samples", weights.iteration * batch)
    if not isinstance(consumed, int) or not 0 <= consumed <= weights.iteration * batch:
        raise ValueError(f"{src}: the checkpoint's args give consumed_train_samples {consumed!r}, not a count between "
                         f"0 and iteration × global batch {weights.iteration * batch}; the data position needs it")
    adam = read_megatron_adam(weights)
    shifted = zero_centered(weights.args)  # γ − 1 stored: the weights and masters take the 1 back, the moments not
    source = ForeignRun(
        "Megatron-LM", "megatron", Path(src), weights.iteration, batch, consumed, consumed, adam.step, adam.betas,
        adam.eps, adam.sharding, _layout(weights.args),
        model, llama_state_dict(weights, model, norms_plus_one=shifted),
        {key: llama_state_dict(found, model, norms_plus_one=shifted and key == "master")
         for key, found in adam.states.items()},
        training_dtype(weights) or torch.bfloat16)
    return write_run(source, run_dir, config)


def _layout(args: dict) -> str:
    """The source run's model-parallel layout, as the convert command reports it (e.g. "TP 2 × PP 4 × VP 2")."""
    sizes = [("TP", args.get("tensor_model_parallel_size") or 1), ("PP", args.get("pipeline_model_parallel_size") or 1),
             ("VP", args.get("virtual_pipeline_model_parallel_size") or 1)]
    return " × ".join(f"{name} {size}" for i, (name, size) in enumerate(sizes) if i == 0 or size > 1)
