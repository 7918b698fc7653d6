"""Opt-in: the converters and the test-time writers against files Megatron-LM and GPT-NeoX wrote themselves.

The trainers are not dependencies and their files are not committed, so these run where
MEGAMATH_TRAINER_FILES names a folder that tests/fixtures/megatron/write_fixtures.py,
write_index_fixtures.py and tests/fixtures/neox/write_fixtures.py wrote (their docstrings say how); the
layouts themselves are tested in every run on checkpoints trainer_checkpoints writes. Here: the converted
model computes the trainer's own float32 logits; trainer_checkpoints, given that model, writes the
trainer's tensors back element for element (so the everyday tests' files are the trainers' layout); and
megamath's one-epoch GPT sample order is Megatron-LM's GPTDataset's.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from foreign_checkpoints import CHECKPOINTS, convert, trainer_files
from megamath.compat.megatron_torch_dist import DistCheckpoint
from megamath.compat.pickle_guard import guarded_load
from megamath.data import sample_index as si
from megamath.generation.loading import load_model

WRITERS = {  # the writer trainer_checkpoints uses for each, with the trainer's layout of that file
    name: write for name, (_, _, write) in CHECKPOINTS.items()}


def _converted(name: str, tmp_path):
    convert("megatron-to-hf" if name.startswith("megatron") else "neox-to-hf", trainer_files(name), tmp_path / "hf")
    return load_model(tmp_path / "hf", device="cpu", kernels="reference")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_converted_model_computes_the_trainers_own_logits(name, tmp_path):
    model = _converted(name, tmp_path)
    reference = load_file(trainer_files(name) / f"{name.split('/')[0]}_logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(reference["input_ids"]), reference["logits"], rtol=1e-5, atol=1e-5)


def _tensors(folder, name: str) -> dict[str, dict]:
    """Every model tensor of a checkpoint, by file (torch_dist: by key)."""
    if name.endswith("torch_dist_tp2"):
        checkpoint = DistCheckpoint(folder / "iter_0000010")
        return {"dist": {k: checkpoint.read(k) for k in checkpoint.tensor_keys()}}
    found = {}
    for path in sorted(folder.rglob("*.pt")):
        state = guarded_load(path)
        if "module" in state:  # DeepSpeed's model states (None beside pipeline layer files)
            parts = {"module": state["module"]} if state["module"] is not None else {}
        elif "args" in state:  # Megatron-LM's model_optim_rng.pt: model, or model0 … with virtual stages
            parts = {k: v for k, v in state.items() if k.startswith("model")}
        else:  # a GPT-NeoX pipeline layer file: the layer's state dict itself
            parts = {"layer": state}
        found.update({f"{path.relative_to(folder)}:{part}": tensors for part, tensors in parts.items()})
    return found


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_test_time_writers_write_the_trainers_own_tensors(name, tmp_path):
    model = _converted(name, tmp_path)
    WRITERS[name](model, tmp_path / "ours")
    theirs, ours = _tensors(trainer_files(name), name), _tensors(tmp_path / "ours", name)
    assert theirs.keys() == ours.keys()
    for part, tensors in theirs.items():
        assert tensors.keys() == ours[part].keys(), part
        for key, value in tensors.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == ours[part][key].dtype and torch.equal(value, ours[part][key]), (part, key)


def test_one_epochs_gpt_indices_equal_megatron_lms():
    """For a dataset read in one epoch, the document, sample and shuffle indices are those Megatron-LM's own
    GPTDataset built (write_index_fixtures.py), so such a run reads Megatron-LM's samples in its order."""
    fixture = np.load(trainer_files("megatron/gpt_indices.npz"))
    cases = sorted({k.rsplit("_", 2)[0] for k in fixture if k != "sizes"})
    assert len(cases) == 3
    for case in cases:
        seq_length, num_samples, seed = (int(part[1:]) for part in case.split("_"))
        ours = si.build_gpt_indices(fixture["sizes"], np.arange(len(fixture["sizes"])), num_samples, seq_length, seed)
        for name in ("doc_idx", "sample_idx", "shuffle_idx"):
            assert np.array_equal(ours[name], fixture[f"{case}_{name}"].astype(np.int64)), (case, name)
