"""Initialise a model from pretrained weights: this TP rank's slices of a Hugging Face Llama or megamath model
folder (`init_from_hf`, and generation's loading of model folders).

Which slice a rank takes is the partition table's rule (megamath.model.partition), applied by name.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megamath.model.config import ModelConfig
from megamath.model.hf_llama import IGNORED_HF_TENSORS, check_tensors, hf_config_to_model_config, to_hf_name
from megamath.model.safetensors_io import CONFIG_NAME, SafetensorsReader, read_json
from megamath.model.tp_state_dict import tp_slice
from megamath.parallel.state import ParallelState


def load_pretrained(model: torch.nn.Module, directory: str | Path, state: ParallelState) -> None:
    """Copy a Hugging Face Llama (or megamath) checkpoint's weights into `model`, this TP rank's slices only.

    Tensors stream one at a time from memory-mapped safetensors, so a rank needs about one full tensor
    of extra memory. The checkpoint's shapes must be the model config's, and so must what shapes cannot
    show (check_architecture); other settings (rope_theta, norm_eps, max_seq_length) are the run's own:
    LLEMMA 7B started from Code Llama's weights with θ = 1e4.
    """
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        trainer = foreign_trainer(directory)
        if trainer:
            raise ValueError(f"init_from_hf: {directory} is a {trainer[0]} checkpoint: convert it with `megamath "
                             f"convert {trainer[1]} {directory} HF_DIR` and set init_from_hf: HF_DIR")
        raise FileNotFoundError(f"init_from_hf: {directory / CONFIG_NAME} not found (nor is {directory} a megamath "
                                "training run or step folder: no checkpoints/latest, no metadata.json)")
    saved = read_json(directory / CONFIG_NAME)
    is_hf = "model_type" in saved
    check_architecture(saved, is_hf, model.config, directory)
    file_name = to_hf_name if is_hf else (lambda n: n)
    reader = SafetensorsReader(directory)
    ours = {(n.removeprefix("model.") if is_hf and n != "lm_head.weight" else n): n for n in reader.names()
            if not IGNORED_HF_TENSORS.match(n)}
    check_tensors({n: reader.shape(f) for n, f in ours.items()}, model.config, file_name)
    tp = state.tp_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = reader.get(ours[name], param.dtype)  # cast_checked: a weight the dtype cannot hold is refused
            param.copy_(full if tp == 1 else tp_slice(full, name, model.config, tp, state.tp_rank))


def foreign_trainer(directory: Path) -> tuple[str, str] | None:
    """(trainer, convert direction) when `directory` looks like another trainer's checkpoint, by its file
    names only (the readers, in megamath.compat, build on the model package, not the other way round)."""
    if not directory.is_dir():
        return None
    names = {p.name for p in directory.iterdir()}
    if "latest_checkpointed_iteration.txt" in names or any(n.startswith("mp_rank_") and (directory / n).is_dir()
                                                         for n in names) or ".metadata" in names:
        return "Megatron-LM", "megatron-to-hf"
    if "mp_rank_00_model_states.pt" in names or any(n.startswith("layer_00-model_") for n in names) or \
            ("latest" in names and any(n.startswith("global_step") for n in names)):
        return "GPT-NeoX", "neox-to-hf"
    return None


def check_architecture(saved: dict, is_hf: bool, config: ModelConfig, directory: Path) -> None:
    """Refuse a checkpoint the run's model would compute differently with the very same tensor shapes: a
    Hugging Face config megamath's Llama cannot express (another activation, RoPE scaling, biases, tied
    embeddings), or another split of the same width into heads (32 x 128 and 64 x 64 fill one q_proj)."""
    try:
        theirs = hf_config_to_model_config(saved) if is_hf else ModelConfig.from_dict(saved)
    except (ValueError, TypeError) as err:
        raise ValueError(f"init_from_hf: {directory}: {err}") from None
    differ = [f"{key} {getattr(theirs, key)} (checkpoint) vs {getattr(config, key)} (this run)"
              for key in ("num_heads", "num_kv_heads") if getattr(theirs, key) != getattr(config, key)]
    if differ:
        raise ValueError(f"init_from_hf: {directory} splits attention into other heads than this run: "
                         f"{'; '.join(differ)}")
