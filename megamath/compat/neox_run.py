"""A GPT-NeoX run continued in megamath: `megamath convert neox-to-run CKPT RUN_DIR --config CONFIG`.

LLEMMA's own trainer: the weights and DeepSpeed's ZeRO optimizer state (neox_optimizer) are mapped to
megamath's parameters as neox-to-hf maps the weights (neox_checkpoint: query_key_value cut as the run's
GPT-NeoX version lays it out, the MLP's w1/w3/w2 or linear1 halves; norms replicated over TP averaged), then
written as a megamath run by run_writer. The iteration is the folder's (global_stepN); the global batch is
the config's train_batch_size, else micro-batch × gradient accumulation × the DP size of the ZeRO files.
Compared with neox-to-hf + init_from_hf + init_step, nothing is rounded to bf16 and Adam does not restart.
"""
from __future__ import annotations

import re
from pathlib import Path

from megamath.compat.neox_checkpoint import llama_config, llama_state_dict, read_neox_checkpoint
from megamath.compat.neox_optimizer import read_neox_adam
from megamath.compat.run_writer import ForeignRun, RunConversion, check_model, check_vocabulary, write_run
from megamath.training.config import TrainConfig


def convert_neox_to_run(src: str | Path, run_dir: str | Path, config: TrainConfig) -> RunConversion:
    """Write the GPT-NeoX checkpoint at `src` as megamath run `run_dir`'s checkpoint, for `config`."""
    checkpoint = read_neox_checkpoint(src)
    step = re.fullmatch(r"global_step(\d+)", checkpoint.folder.name)
    if step is None or int(step.group(1)) < 1:
        raise ValueError(f"{checkpoint.folder}: not a global_stepN folder with N >= 1, so no iteration to continue "
                         "from; start a run from its weights instead (neox-to-hf, then init_from_hf)")
    embedding = next(ranks for ranks in checkpoint.modules.values() if "word_embeddings.weight" in ranks[0])
    check_vocabulary(config, sum(r["word_embeddings.weight"].shape[0] for r in embedding))
    model, notes = llama_config(checkpoint, config.model.vocab_size)
    check_model(model, config)  # before the optimizer state is read
    adam = read_neox_adam(checkpoint)
    states = {}
    for key, found in adam.states.items():
        states[key], _ = llama_state_dict(found, model)
    weights, more = llama_state_dict(checkpoint, model)
    neox = checkpoint.config
    micro = neox.get("train_micro_batch_size_per_gpu") or 1
    batch = neox.get("train_batch_size") or micro * (neox.get("gradient_accumulation_steps") or 1) * adam.dp_size
    source = ForeignRun(
        "GPT-NeoX", "neox", Path(src), int(step.group(1)), int(batch), checkpoint.global_samples,
        int(step.group(1)) * int(batch), adam.step, adam.betas, adam.eps, f"DeepSpeed ZeRO, DP {adam.dp_size}",
        f"TP {len(embedding)}", model, weights, states, weights["embed_tokens.weight"].dtype, notes=notes + more)
    return write_run(source, run_dir, config)
