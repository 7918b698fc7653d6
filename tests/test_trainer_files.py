"""Opt-in: the converters and the test-time writers against files Megatron-LM and GPT-NeoX wrote themselves.

The trainers are not dependencies and their files are not committed, so these run where
MEGAMATH_TRAINER_FILES names a folder that tests/fixtures/megatron/write_fixtures.py,
write_index_fixtures.py and tests/fixtures/neox/write_fixtures.py wrote (their docstrings say how); the
layouts themselves are tested in every run on checkpoints trainer_checkpoints writes. Here: the converted
model computes the trainer's own float32 logits; trainer_checkpoints, given that model, writes the
trainer's tensors back element for element (so the everyday tests' files are the trainers' layout);
Megatron-LM's Adam state, from either of its optimizers, lands on each parameter's elements; and megamath's
one-epoch GPT sample order is Megatron-LM's GPTDataset's.
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


@pytest.mark.parametrize("name", ["megatron/buckets_tp2_pp2_dp2", "megatron/buckets_pp2_vp2_dp2",
                                  "megatron/buckets_layout_pp2", "megatron/buckets_split_pp3"])
def test_torch_dist_weights_over_pipeline_and_virtual_stages_compute_the_trainers_own_logits(name, tmp_path):
    """torch_dist names every layer by its global number: the layers of stages, virtual stages, a custom layout
    and a split counting the embedding and loss land in their places (Megatron-LM's logits, after its one
    update, from the weights it saved)."""
    test_the_converted_model_computes_the_trainers_own_logits(name, tmp_path)


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


@pytest.mark.parametrize("name, batch", [("megatron/adam_tp2", 1), ("megatron/distopt_tp2_dp2", 2),
                                         ("megatron/buckets_dp2", 2), ("megatron/buckets_tp2_dp2", 2),
                                         ("megatron/buckets_tp2_pp2_dp2", 2), ("megatron/buckets_pp2_vp2_dp2", 2),
                                         ("megatron/buckets_layout_pp2", 1), ("megatron/buckets_split_pp3", 1),
                                         ("megatron/torch_adam_tp2", 1), ("megatron/torch_buckets_tp2_dp2", 2),
                                         ("megatron/torch_buckets_pp2_vp2_dp2", 2),
                                         ("megatron/buckets_overlap_dp2", 2), ("megatron/torch_buckets_overlap_dp2", 2)])
def test_megatron_lms_own_adam_state_lands_on_each_parameter(name, batch, tmp_path):
    """After Megatron-LM's one update whose gradient was each weight w itself (write_fixtures.py), exp_avg is
    (1 - 0.9) · w and exp_avg_sq (1 - 0.999) · w² element for element, and the fp32 master rounds to the
    weight Megatron-LM stored. The master moved by lr 1e-7 in the update, hence the tolerances (a state
    misplaced by one element is off by ~1e-3): read from either optimizer's files, in each of its layouts
    (per parameter, or the distributed optimizer's buckets rebuilt), every state sits on its own parameter's
    elements."""
    from megamath.compat.megatron_checkpoint import read_megatron_checkpoint
    from megamath.compat.megatron_llama import llama_config, llama_state_dict
    from megamath.compat.megatron_run import convert_megatron_to_run
    from megamath.training.config import TrainConfig
    from megamath.training.reshard import TrainCheckpoint

    model = {"vocab_size": 64, "hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
             "ffn_hidden_size": 48, "max_seq_length": 16, "norm_eps": 1e-5, "kernels": "reference"}
    config = TrainConfig.from_dict({"model": model, "data": {"seq_length": 16}, "train_steps": 20,
                                    "optimizer": {"beta2": 0.999}, "parallel": {"tp_size": 2},
                                    "run_dir": str(tmp_path / "run")})
    done = convert_megatron_to_run(trainer_files(name), tmp_path / "run", config)
    assert (done.source.adam_step, done.source.betas, done.dp_size) == (1, (0.9, 0.999), batch)
    saved = TrainCheckpoint(done.checkpoint)
    stored = read_megatron_checkpoint(trainer_files(name))
    hf = llama_state_dict(stored, llama_config(stored.args))
    assert_one_update_of_each_weight(saved, hf)


def assert_one_update_of_each_weight(saved, weights: dict) -> None:
    """Each parameter's state in the converted checkpoint is that of one Adam update (betas 0.9, 0.999; lr 1e-7)
    whose gradient was the weight w: the master rounds to the trainer's stored weight, exp_avg = 0.1 · w and
    exp_avg_sq = 0.001 · w² (to within what lr 1e-7 moved the master)."""
    for param in saved.local:
        state, weight = saved.param_state(param), weights[param].read()
        assert torch.equal(state["master"].to(weight.dtype), weight), param
        w = state["master"]
        torch.testing.assert_close(state["exp_avg"], 0.1 * w, rtol=1e-5, atol=2e-8, msg=param)
        torch.testing.assert_close(state["exp_avg_sq"], 1e-3 * w.square(), rtol=1e-5, atol=1e-9, msg=param)


@pytest.mark.parametrize("name, sharding", [("megatron/adam_tp2", "per parameter"),
                                            ("megatron/distopt_tp2_dp2", "fully_reshardable")])
def test_the_test_time_writer_writes_megatron_lms_own_optimizer_state(name, sharding, tmp_path):
    """trainer_checkpoints' optimizer state, given what megamath read from Megatron-LM's file, is that file's:
    the same keys (no fp32_param for a float32 parameter), dtypes and elements."""
    from megamath.compat.megatron_checkpoint import read_megatron_checkpoint
    from megamath.compat.megatron_llama import llama_config, llama_state_dict
    from megamath.compat.megatron_optimizer import read_megatron_adam
    from trainer_checkpoints import write_megatron_torch_dist

    stored = read_megatron_checkpoint(trainer_files(name))
    adam = read_megatron_adam(stored)
    config = llama_config(stored.args)
    states = {key: {n: t.read() for n, t in llama_state_dict(found, config).items()}
              for key, found in adam.states.items()}
    model = _converted(name, tmp_path)
    write_megatron_torch_dist(model, tmp_path / "ours", tp=2, adam={"sharding": sharding, "step": adam.step, **states})
    theirs = DistCheckpoint(trainer_files(name) / "iter_0000010")
    ours = DistCheckpoint(tmp_path / "ours" / "iter_0000010")
    keys = {k for k in theirs.tensor_keys() if k.startswith("optimizer.")}
    assert keys == {k for k in ours.tensor_keys() if k.startswith("optimizer.")}
    for key in keys:
        assert torch.equal(theirs.read(key), ours.read(key)), key


def test_gpt_neoxs_own_zero_state_lands_on_each_parameter(tmp_path):
    """GPT-NeoX's llemma branch through DeepSpeed's ZeRO stage 1 (TP 2 × DP 2, bf16), after one update whose
    gradient was each weight (write_fixtures.py): exp_avg = 0.1 · w and exp_avg_sq = 0.001 · w² on every
    element, and the fp32 master rounds to the weight DeepSpeed stored. And DeepSpeed's partitions hold the
    parameters in the module's order, as neox_zero_files writes them for the everyday tests."""
    from megamath.compat.neox_checkpoint import llama_config, llama_state_dict, read_neox_checkpoint
    from megamath.compat.neox_run import convert_neox_to_run
    from megamath.training.config import TrainConfig
    from megamath.training.reshard import TrainCheckpoint

    src = trainer_files("neox/llemma_zero1_tp2_dp2")
    model = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "ffn_hidden_size": 256, "max_seq_length": 16, "norm_eps": 1e-10, "kernels": "reference"}
    config = TrainConfig.from_dict({"model": model, "data": {"seq_length": 16}, "train_steps": 20,
                                    "optimizer": {"beta2": 0.999}, "parallel": {"tp_size": 2},
                                    "run_dir": str(tmp_path / "run")})
    done = convert_neox_to_run(src, tmp_path / "run", config)
    assert (done.source.adam_step, done.source.betas, done.dp_size) == (1, (0.9, 0.999), 2)
    saved = TrainCheckpoint(done.checkpoint)
    checkpoint = read_neox_checkpoint(src)
    weights, _ = llama_state_dict(checkpoint, llama_config(checkpoint)[0])
    assert_one_update_of_each_weight(saved, weights)
    for t in range(2):
        names = []
        for d in range(2):
            state = guarded_load(src / "global_step10" / f"bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")
            names += [n for n in state["optimizer_state_dict"]["param_slice_mappings"][0] if n not in names]
        module = guarded_load(src / "global_step10" / f"mp_rank_{t:02d}_model_states.pt")["module"]
        assert names == [n for n in module if not n.endswith("inv_freq")]


def test_gpt_neox_mains_pipeline_files_zero_state_lands_on_each_parameter(tmp_path):
    """GPT-NeoX main's pipeline layout (layer files; DeepSpeed names the parameters by layer index) after one
    real update through DeepSpeed's pipeline engine, ZeRO-1, TP 2 × DP 2: each master rounds to the weight
    stored, and exp_avg_sq = 0.1 · exp_avg² (one update with betas 0.9, 0.999: 0.001 g² and 0.1 g) on every
    element."""
    from megamath.compat.neox_checkpoint import llama_config, llama_state_dict, read_neox_checkpoint
    from megamath.compat.neox_run import convert_neox_to_run
    from megamath.training.config import TrainConfig
    from megamath.training.reshard import TrainCheckpoint

    src = trainer_files("neox/main_zero1_tp2_dp2")
    checkpoint = read_neox_checkpoint(src)
    model = llama_config(checkpoint)[0]
    config = TrainConfig.from_dict({"model": {**model.to_dict(), "kernels": "reference"}, "data": {"seq_length": 16},
                                    "train_steps": 20, "optimizer": {"beta2": 0.999}, "parallel": {"tp_size": 2},
                                    "run_dir": str(tmp_path / "run")})
    done = convert_neox_to_run(src, tmp_path / "run", config)
    assert (done.source.adam_step, done.dp_size) == (1, 2)
    saved = TrainCheckpoint(done.checkpoint)
    weights, _ = llama_state_dict(checkpoint, model)
    for param in saved.local:
        state, weight = saved.param_state(param), weights[param].read()
        assert torch.equal(state["master"].to(weight.dtype), weight), param
        assert state["exp_avg"].abs().max() > 0, param
        torch.testing.assert_close(state["exp_avg_sq"], 0.1 * state["exp_avg"].square(), rtol=1e-5, atol=1e-30,
                                   msg=param)
