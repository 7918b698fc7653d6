"""`megamath convert neox-to-run`: a GPT-NeoX checkpoint with DeepSpeed's ZeRO optimizer files becomes a megamath
run that resumes where it stopped (LLEMMA's trainer; the files checked against GPT-NeoX's own in
tests/test_trainer_files.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megamath.cli import main
from megamath.compat.neox_run import convert_neox_to_run
from megamath.model import Llama
from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from megamath.training.reshard import TrainCheckpoint
from neox_zero_files import write_zero_files
from test_megatron_run import assert_trains_as
from test_train_loop import one_thread, raw_config  # noqa: F401  (one_thread is a fixture)
from trainer_checkpoints import NEOX, source_model, write_neox

KEYS = ("master", "exp_avg", "exp_avg_sq")


def holders(model: Llama, seed: int) -> dict[str, Llama]:
    """Llamas holding distinct master / exp_avg / exp_avg_sq values (the masters a little off the weights)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in KEYS:
        holder = Llama(model.config)
        with torch.no_grad():
            for name, p in holder.named_parameters():
                w = model.state_dict()[name]
                noise = torch.randn(w.shape, generator=g)
                p.copy_({"master": w + 1e-3 * noise, "exp_avg": noise, "exp_avg_sq": noise.square()}[key])
        out[key] = holder
    return out


def neox_config(tmp_path, variant: str, **top) -> TrainConfig:
    raw = raw_config(tmp_path / "corpus", tmp_path / "run", train_steps=20, **top)
    fields = NEOX[variant]
    raw["model"].update(num_layers=fields["num_layers"], ffn_hidden_size=fields["ffn_hidden_size"],
                        num_kv_heads=fields["num_kv_heads"], norm_eps=fields["norm_eps"], max_seq_length=16)
    raw["data"]["seq_length"] = 16
    raw["micro_batch_size"], raw["grad_accum_steps"] = 1, 1
    return TrainConfig.from_dict(raw)


@pytest.mark.parametrize("variant", ["llemma", "llemma_gqa", "main_gqa"])
def test_the_run_holds_deepspeeds_masters_moments_and_step(tmp_path, variant):
    model = source_model(**NEOX[variant])
    states = holders(model, 1)
    write_neox(model, tmp_path / "neox", variant, tp=2)
    write_zero_files(tmp_path / "neox", states, variant, tp=2, dp=3, step=7)
    done = convert_neox_to_run(tmp_path / "neox", tmp_path / "run", neox_config(tmp_path, variant,
                                                                                parallel__tp_size=2))
    saved = TrainCheckpoint(done.checkpoint)
    assert (saved.step_count, saved.meta["step"], done.source.optimizer_state) == (7, 10, "DeepSpeed ZeRO, DP 3")
    for name, value in model.state_dict().items():
        got = saved.param_state(name)
        for key in KEYS:
            assert torch.equal(got[key], states[key].state_dict()[name]), (name, key)


@pytest.mark.parametrize("variant", ["llemma", "main_gqa"])
def test_deepspeeds_own_sample_count_is_read_once_and_noted_where_it_differs(tmp_path, variant, monkeypatch):
    """DeepSpeed's engine counts the samples it trained (`global_samples`, in mp_rank_00_model_states.pt, which
    holds the weights of TP rank 0 in the sequential layout, so it is read once); GPT-NeoX's sampler goes on
    by iteration, and so does the run, saying so where the two differ."""
    model = source_model(**NEOX[variant])
    write_neox(model, tmp_path / "neox", variant, tp=2, global_samples=77)
    write_zero_files(tmp_path / "neox", holders(model, 2), variant, tp=2, dp=3, step=10)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: loads.append(Path(path).name) or real(path, *a, **k))
    done = convert_neox_to_run(tmp_path / "neox", tmp_path / "run", neox_config(tmp_path, variant,
                                                                                parallel__tp_size=2))
    assert loads.count("mp_rank_00_model_states.pt") == 1, loads
    batch = done.source.global_batch
    assert (f"GPT-NeoX counted 77 samples read, iteration × global batch is {10 * batch}: the run reads on from "
            f"sample {10 * batch}, as GPT-NeoX's sampler goes on by iteration") in done.notes
    assert TrainCheckpoint(done.checkpoint).meta["consumed_samples"] == 10 * batch


def test_a_run_continued_from_deepspeeds_files_trains_as_the_original(tmp_path, one_thread):  # noqa: F811
    """A megamath run's step-3 state, written as GPT-NeoX and DeepSpeed store it (TP 2 × DP 2) and converted
    back, trains steps 4..6 exactly as the run itself did."""
    full = raw_config(tmp_path / "corpus", tmp_path / "full", train_steps=6, checkpoint__save_every=3)
    full["model"].update(ffn_hidden_size=256, norm_eps=1e-10)  # write_neox's llemma_gqa model
    train(TrainConfig.from_dict(full), ParallelState.single())
    saved = TrainCheckpoint(tmp_path / "full" / "checkpoints" / "step_0000003")
    model = Llama(saved.config)
    model.load_state_dict({n: saved.weight(n) for n in model.state_dict()})
    states = {key: Llama(saved.config) for key in KEYS}
    for name in model.state_dict():
        for key, value in saved.param_state(name).items():
            states[key].state_dict()[name].copy_(value)
    write_neox(model, tmp_path / "neox", "llemma_gqa", tp=2)
    write_zero_files(tmp_path / "neox", states, "llemma_gqa", tp=2, dp=2, step=saved.step_count)
    folder = tmp_path / "neox" / "global_step10"
    (folder.parent / "global_step3").mkdir()
    for path in folder.iterdir():
        path.rename(folder.parent / "global_step3" / path.name)
    (tmp_path / "neox" / "latest").write_text("global_step3")
    later = TrainConfig.from_dict({**full, "run_dir": str(tmp_path / "later")})
    convert_neox_to_run(tmp_path / "neox", tmp_path / "later", later)
    train(later, ParallelState.single())
    assert_trains_as(tmp_path / "later", tmp_path / "full", after=3)


def test_the_cli_converts_and_what_cannot_continue_says_what_to_do(tmp_path, capsys):
    model = source_model(**NEOX["llemma"])
    write_neox(model, tmp_path / "neox", "llemma", tp=2)
    config = neox_config(tmp_path, "llemma")
    path = tmp_path / "config.yaml"
    path.write_text(__import__("json").dumps(config.to_dict()))
    assert main(["convert", "neox-to-run", str(tmp_path / "neox"), str(tmp_path / "out"), "--config", str(path)]) == 2
    assert ("no DeepSpeed ZeRO optimizer files (zero_pp_rank_D_mp_rank_TT_optim_states.pt): saved without its "
            "optimizer, or with ZeRO stage 0; convert the weights alone with `megamath convert neox-to-hf`"
            ) in capsys.readouterr().err
    write_zero_files(tmp_path / "neox", holders(model, 2), "llemma", tp=2, dp=2, step=10)
    assert main(["convert", "neox-to-run", str(tmp_path / "neox"), str(tmp_path / "out"), "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("(neox-to-run): iteration 10, Adam step 10 (optimizer state DeepSpeed ZeRO, DP 2), TP 2 -> TP 1 × DP 2"
            in out)
    assert "resumes at update 11" in out
    (tmp_path / "neox" / "global_step10" / "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    assert main(["convert", "neox-to-run", str(tmp_path / "neox"), str(tmp_path / "out2"), "--config", str(path)]) == 2
    assert "ZeRO optimizer files missing: zero_pp_rank_1_mp_rank_01 (TP 2, DP 2)" in capsys.readouterr().err


def test_neox_to_hf_points_at_neox_to_run_when_the_optimizer_is_saved(tmp_path, capsys):
    model = source_model(**NEOX["llemma"])
    write_neox(model, tmp_path / "neox", "llemma", tp=2)
    assert main(["convert", "neox-to-hf", str(tmp_path / "neox"), str(tmp_path / "hf")]) == 0
    assert "its optimizer state is saved too" not in capsys.readouterr().out
    write_zero_files(tmp_path / "neox", holders(model, 3), "llemma", tp=2, dp=1, step=10)
    assert main(["convert", "neox-to-hf", str(tmp_path / "neox"), str(tmp_path / "hf2")]) == 0
    out = capsys.readouterr().out
    assert f"its optimizer state is saved too: `megamath convert neox-to-run {tmp_path / 'neox'} RUN_DIR" in out
