"""A Hugging Face model whose vocabulary the TP size does not divide trains, reshards and exports exactly.

The case of a Llama fine-tune with an added pad token (vocab 32,001) at TP 2, shrunk: vocab 61 (one padding
row at TP 2, three on rank 3 at TP 4), hidden 64 (head_dim 16, which the kernels take), 2 layers, fp32,
weight decay 0.1 and clipping 1.0, ZeRO-1 as every run. From one Hugging Face folder (`init_from_hf`):
    tp1, tp1_triton                 this process (reference ops; Triton kernels, interpreted: 2 steps)
    tp2, tp2_sp, tp2_triton_sp      2 gloo ranks
    tp4_sp                          4 gloo ranks
Each TP run's losses and gradient norms equal TP 1's (the same ops) within the tolerance of the existing
TP tests, its exported Hugging Face folder equals TP 1's export at the true V (each weight within 1e-3 of how
far training moved it, in norm), and its padding rows are zero in the weights and the Adam
moments at every rank. `megamath reshard` of tp2_sp's step 2 to TP 1 and TP 4 and back to TP 2 is bit-exact
(weights, masters, moments); the TP 1 reshard resumes like the TP 1 run, as does tp2's checkpoint read
straight into TP 1, and TP 1's read straight into TP 4.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distributed import run_distributed
from megamath.cli import main
from megamath.model import Llama, ModelConfig
from megamath.model.model_folder import convert_megamath_to_hf, save_model_folder
from megamath.model.partition import vocab_range, vocab_rows_per_rank
from megamath.parallel.state import ParallelState
from megamath.training import reshard as rs
from megamath.training.config import TrainConfig
from megamath.training.export import export_training_checkpoint_to_hf
from megamath.training.loop import train
from test_reshard_tp import assert_same_files
from test_train_loop import metrics, raw_config, untimed

V, STEPS, SAVE_AT = 61, 4, 2
RTOL = 2e-5  # fp32; TP and serial add partial sums in different orders (test_tp_from_hf.py's bar)
MODEL = dict(model__vocab_size=V, model__hidden_size=64, model__num_heads=4, model__num_kv_heads=2,
             model__ffn_hidden_size=64, model__max_seq_length=32)
RUNS = {  # name: (tp, sequence_parallel, kernels)
    "tp1": (1, False, "reference"), "tp1_triton": (1, False, "triton"),
    "tp2": (2, False, "reference"), "tp2_sp": (2, True, "reference"), "tp2_triton_sp": (2, True, "triton"),
    "tp4_sp": (4, True, "reference"),  # TP 4 without SP: tests/test_tp_vocab_padding.py (one step's worth)
}
SAVED = f"checkpoints/step_{SAVE_AT:07d}"


def last_step(run: str) -> str:
    return f"checkpoints/step_{SAVE_AT if 'triton' in run else STEPS:07d}"


def raw(tmp: Path, run: str, **top) -> dict:
    tp, sp, kernels = RUNS.get(run, (1, False, "reference"))
    parallel = {"parallel__tp_size": tp, **({"parallel__sequence_parallel": True} if sp else {})}
    parallel.update({k: top.pop(k) for k in list(top) if k.startswith("parallel__")})  # a run not in RUNS
    steps = SAVE_AT if kernels == "triton" else STEPS  # the interpreter takes seconds a step on a CPU
    return raw_config(tmp / "data", tmp / run, train_steps=steps, init_from_hf=str(tmp / "hf"), model__kernels=kernels,
                      checkpoint__save_every=SAVE_AT, **MODEL, **parallel, **top)


def _train(tmp: Path, run: str, state: ParallelState) -> None:
    train(TrainConfig.from_dict(raw(tmp, run)), state)


def tp2_worker(rank, world_size, tmp):
    state = ParallelState.from_env(2)
    for run in ("tp2", "tp2_sp", "tp2_triton_sp"):
        _train(tmp, run, state)


def tp4_worker(rank, world_size, tmp):
    state = ParallelState.from_env(4)
    _train(tmp, "tp4_sp", state)
    # TP 1's checkpoint read straight into TP 4 (load_checkpoint_any_tp): weights and moments padded on load
    train(TrainConfig.from_dict(raw(tmp, "tp4_from_tp1", parallel__tp_size=4, checkpoint__resume=str(tmp / "tp1" / SAVED))),
          state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_vocab_training")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig.from_dict(raw(tmp, "tp1")).model  # writes the corpus (ids < 60 < V)
        torch.manual_seed(0)
        save_model_folder(Llama(ModelConfig(**{**config.to_dict(), "init_std": 0.1})), tmp / "megamath")
        convert_megamath_to_hf(tmp / "megamath", tmp / "hf")  # the pretrained model: a Hugging Face folder
        for run in ("tp1", "tp1_triton"):
            _train(tmp, run, ParallelState.single())
        run_distributed(tp2_worker, 2, tmp)
        run_distributed(tp4_worker, 4, tmp)
        for run in RUNS:
            export_training_checkpoint_to_hf(tmp / run, tmp / "export" / run)
        yield tmp
    finally:
        torch.set_num_threads(threads)


def series(tmp: Path, run: str, key: str) -> list[float]:
    return [r[key] for r in metrics(tmp / run)]


def test_hf_folder_has_the_true_vocabulary(runs):
    assert json.loads((runs / "hf" / "config.json").read_text())["vocab_size"] == V
    meta = json.loads((runs / "tp2_sp" / last_step("tp2_sp") / "metadata.json").read_text())
    assert meta["config"]["model"]["vocab_size"] == V  # checkpoint metadata keeps the user's V


@pytest.mark.parametrize("run", [r for r in RUNS if r not in ("tp1", "tp1_triton")])
def test_tp_run_equals_tp1_and_exports_the_same_model(runs, run):
    serial = "tp1_triton" if "triton" in run else "tp1"
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(series(runs, run, key), series(runs, serial, key), rtol=RTOL,
                                   err_msg=f"{run}: {key}")
    assert sum(n > 1.0 for n in series(runs, serial, "grad_norm")) >= 1, "clipping active at least once"
    exported = json.loads((runs / "export" / run / "config.json").read_text())
    assert exported == json.loads((runs / "export" / serial / "config.json").read_text())
    assert exported["vocab_size"] == V
    want, got = load_file(str(runs / "export" / serial / "model.safetensors")), \
        load_file(str(runs / "export" / run / "model.safetensors"))
    start = load_file(str(runs / "hf" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert got["lm_head.weight"].shape == got["model.embed_tokens.weight"].shape == (V, 64)
    for name, tensor in got.items():
        # Norms, not the max element: AdamW moves an element whose gradient is ~0 by about lr · sign(noise), so
        # the largest elementwise gap is a few % of lr between any two summation orders (measured the same at
        # V 64, nothing padded), while the tensor as a whole agrees to ~1e-4 of how far training moved it.
        moved = (want[name] - start[name]).norm()
        assert moved > 0, name
        assert (tensor - want[name]).norm() < 1e-3 * moved, f"{run}: exported {name}"


@pytest.mark.parametrize("run", ["tp2", "tp4_sp", "tp2_triton_sp"])
def test_padding_stays_zero_in_weights_and_adam_moments(runs, run):
    """Straight from the files of the last checkpoint: each rank's rows past its vocab_range are exactly 0."""
    tp = RUNS[run][0]
    folder = runs / run / last_step(run)
    for t in range(tp):
        start, stop = vocab_range(V, tp, t)
        weights = load_file(str(folder / f"model_tp{t:02d}.safetensors"))
        shard = torch.load(folder / f"optimizer_tp{t:02d}_dp000.pt", weights_only=True)
        offsets = {n: (numel, offset) for n, numel, offset in shard["params"]}
        for name in ("embed_tokens.weight", "lm_head.weight"):
            w = weights[name]
            assert w.shape == (vocab_rows_per_rank(V, tp), 64)
            assert w[:stop - start].abs().sum() > 0
            assert not w[stop - start:].any(), f"{run} rank {t}: {name} padding"
            numel, offset = offsets[name]
            for key in ("master", "exp_avg", "exp_avg_sq"):
                state = shard[key][offset:offset + numel].view(w.shape)  # DP 1: the whole flat vector
                assert not state[stop - start:].any(), f"{run} rank {t}: {name} padding's {key}"
                assert state[:stop - start].abs().sum() > 0, f"{run} rank {t}: {name} {key}"


def test_reshard_of_a_padded_vocabulary_is_bit_exact(runs, capsys):
    src = runs / "tp2_sp" / SAVED
    assert main(["reshard", "--checkpoint", str(src), "--tp-size", "4", "--output", str(runs / "r4")]) == 0
    rs.reshard_checkpoint(src, runs / "r1", 1)
    rs.reshard_checkpoint(runs / "r4", runs / "r4_2", 2, 1)
    rs.reshard_checkpoint(runs / "r1", runs / "r1_2", 2, 1)
    rs.reshard_checkpoint(runs / "r4", runs / "r4_dp2", 2, 2)  # ZeRO shards cut over 2 DP ranks as well
    source = rs.TrainCheckpoint(src)
    for out in ("r4", "r1", "r4_2", "r1_2", "r4_dp2"):  # reading merges every rank and checks its padding is zero
        other = rs.TrainCheckpoint(runs / out / SAVED)
        for name in source.local:
            assert torch.equal(other.weight(name), source.weight(name)), (out, name)
            for key, tensor in source.param_state(name).items():
                assert torch.equal(other.param_state(name)[key], tensor), (out, name, key)
    assert rs.TrainCheckpoint(runs / "r1" / SAVED).weight("lm_head.weight").shape == (V, 64)
    for back in ("r4_2", "r1_2"):  # TP 2 -> 4 -> 2 and 2 -> 1 -> 2 give back the very files
        assert_same_files(runs / back / SAVED, src, 2, 1)


def test_resharded_to_tp1_resumes_like_the_tp1_run(runs):
    rs.reshard_checkpoint(runs / "tp2" / SAVED, runs / "resharded_tp1", 1)
    train(TrainConfig.from_dict(raw(runs, "resharded_tp1")), ParallelState.single())
    direct = raw(runs, "direct_tp1", checkpoint__resume=str(runs / "tp2" / SAVED))  # no tool: read at TP 1
    train(TrainConfig.from_dict(direct), ParallelState.single())
    assert untimed(metrics(runs / "direct_tp1")) == untimed(metrics(runs / "resharded_tp1"))
    for run in ("resharded_tp1", "tp4_from_tp1"):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(series(runs, run, key), series(runs, "tp1", key)[SAVE_AT:], rtol=RTOL,
                                       err_msg=f"{run}: {key}")
