"""A run settles its attention once: rank 0's tiles on every rank, and the choice kept for its resumes.

The timing itself needs a GPU (test_attention_choice); here `choose_attention` is replaced by a stand-in
that returns what a GPU's timing would (an implementation and tuned tiles, different on each rank), so
what is tested is what the run does with it: agree, register, write RUN_DIR/attention.json, and on the
next start read it instead of timing again, unless the GPU, shape, dtype or setting changed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from distributed import run_and_load
from megamath.kernels.flash_attention import FlashAttentionBlocks, flash_attention_blocks, use_blocks
from megamath.model.attention import AttentionChoice, QKVLayout
from megamath.model.llama import Attention, Llama
from megamath.parallel.state import ParallelState
from megamath.training import attention_settle
from megamath.training.config import TrainConfig

HEAD_DIM = 16
TILES = [FlashAttentionBlocks(128, 64, 8, 3, 32, 64, 64, 32, 8, 4, True),
         FlashAttentionBlocks(64, 64, 4, 3, 32, 128, 128, 32, 8, 2, False)]


def config(run_dir, micro_batch_size=2) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"vocab_size": 64, "hidden_size": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                  "ffn_hidden_size": 64, "max_seq_length": 32, "kernels": "reference"},
        "data": {"data_path": [1, str(run_dir / "none")], "seq_length": 32},
        "run_dir": str(run_dir), "micro_batch_size": micro_batch_size, "train_steps": 1})


def stand_in(monkeypatch, attention: str, tiles: FlashAttentionBlocks | None, calls: list, layouts: list | None = None):
    def choose(setting, ops, shape, dtype, device, repeats=10, layout=None):
        calls.append(shape)
        if layouts is not None:
            layouts.append(layout)
        return AttentionChoice(attention, {"megamath": 1.0}, f"attention: {attention} (auto, timed)", tiles)
    monkeypatch.setattr(attention_settle, "choose_attention", choose)


@pytest.fixture
def clean_tiles():
    yield
    use_blocks(HEAD_DIM, torch.float32, None)


def settle(cfg: TrainConfig, state: ParallelState) -> tuple[Llama, str]:
    model = Llama(cfg.model)
    return model, attention_settle.settle_attention(model, cfg, state, Path(cfg.run_dir), torch.float32)


def test_the_first_start_writes_the_choice_and_a_resume_keeps_it(tmp_path, monkeypatch, clean_tiles):
    calls = []
    stand_in(monkeypatch, "megamath", TILES[0], calls)
    model, line = settle(config(tmp_path), ParallelState.single())
    assert calls == [(2, 32, 4, 2, HEAD_DIM)] and line == "attention: megamath (auto, timed)"
    assert flash_attention_blocks(HEAD_DIM, interpret=False, dtype=torch.float32) == TILES[0]  # registered
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["attention"] == "megamath" and FlashAttentionBlocks(**saved["tiles"]) == TILES[0]

    use_blocks(HEAD_DIM, torch.float32, None)  # a new process: nothing registered
    stand_in(monkeypatch, "sdpa", TILES[1], calls)  # a resume's timing would now prefer sdpa and other tiles
    model, line = settle(config(tmp_path), ParallelState.single())
    assert len(calls) == 1, "a resume must not time again"
    assert model.attention == "megamath" and line.endswith("(kept from this run's first start, attention.json)")
    assert flash_attention_blocks(HEAD_DIM, interpret=False, dtype=torch.float32) == TILES[0]


def test_a_changed_shape_or_an_unreadable_file_is_timed_again(tmp_path, monkeypatch, clean_tiles):
    calls = []
    stand_in(monkeypatch, "megamath", TILES[0], calls)
    settle(config(tmp_path), ParallelState.single())
    stand_in(monkeypatch, "sdpa", None, calls)
    model, line = settle(config(tmp_path, micro_batch_size=4), ParallelState.single())
    assert len(calls) == 2 and model.attention == "sdpa"
    assert line.endswith("(timed again: shape changed since attention.json was written)"), line
    assert json.loads((tmp_path / "attention.json").read_text())["key"]["shape"][0] == 4
    (tmp_path / "attention.json").write_text('{"key": ')  # a torn write, say
    settle(config(tmp_path, micro_batch_size=4), ParallelState.single())
    assert len(calls) == 3


def test_the_race_gets_the_models_q_k_v_layout_and_a_changed_one_is_timed_again(tmp_path, monkeypatch, clean_tiles):
    """Whether q/k/v are fused depends on where the optimizer put their weights: the race runs on the layout the
    model reports, and a start whose layout differs from the saved one (a run now fused, say) times again."""
    calls, layouts = [], []
    stand_in(monkeypatch, "megamath", None, calls, layouts)
    settle(config(tmp_path), ParallelState.single())
    assert layouts == [QKVLayout(None, False)]  # reference ops: three matmuls
    fused = QKVLayout((2, 1, 0), False)
    monkeypatch.setattr(Attention, "qkv_layout", lambda self, ops: fused)
    model, line = settle(config(tmp_path), ParallelState.single())
    assert layouts[-1] == fused and line.endswith("(timed again: qkv_layout changed since attention.json was written)")
    assert json.loads((tmp_path / "attention.json").read_text())["key"]["qkv_layout"] == fused.describe()
    settle(config(tmp_path), ParallelState.single())
    assert len(calls) == 2  # the same layout again: kept
    # a file from before the layout and PyTorch's version were recorded: its choice stands (the run computes
    # what it computed)
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["key"]["torch"] == torch.__version__
    del saved["key"]["qkv_layout"], saved["key"]["torch"]
    (tmp_path / "attention.json").write_text(json.dumps(saved))
    model, line = settle(config(tmp_path), ParallelState.single())
    assert len(calls) == 2 and line.endswith("(kept from this run's first start, attention.json)")
    del saved["key"]["dtype"]  # but not a key missing any other field
    (tmp_path / "attention.json").write_text(json.dumps(saved))
    settle(config(tmp_path), ParallelState.single())
    assert len(calls) == 3
    monkeypatch.setattr(torch, "__version__", "0.0.1")  # another PyTorch: other SDPA backends, timed again
    model, line = settle(config(tmp_path), ParallelState.single())
    assert len(calls) == 4 and line.endswith("(timed again: torch changed since attention.json was written)")


def registered() -> tuple:
    """The tiles registered for (HEAD_DIM, fp32), as a plain tuple (what torch.save loads back safely)."""
    return dataclasses.astuple(flash_attention_blocks(HEAD_DIM, interpret=False, dtype=torch.float32))


def _two_ranks(rank, world_size, out_dir):
    state = ParallelState.from_env(1)  # two data-parallel ranks
    cfg = config(out_dir)
    calls = []

    def choose(setting, ops, shape, dtype, device, repeats=10, layout=None):
        calls.append(shape)
        preferred = "megamath" if state.rank == 0 else "sdpa"  # timings differ by rank
        return AttentionChoice(preferred, {}, f"attention: {preferred} (auto, timed)", TILES[state.rank])

    attention_settle.choose_attention = choose
    model, line = settle(cfg, state)
    first = (model.attention, registered(), line)
    use_blocks(HEAD_DIM, torch.float32, None)
    model, line = settle(cfg, state)  # the resume
    again = (model.attention, registered(), line)
    # every rank prefers an SDPA backend, each another one: rank 0's is run everywhere
    backends = {0: "sdpa-cudnn", 1: "sdpa-flash"}
    attention_settle.choose_attention = lambda *args, **kwargs: AttentionChoice(
        backends[state.rank], {}, f"attention: {backends[state.rank]} (auto, timed)", None)
    (out_dir / "sdpa").mkdir(exist_ok=True)
    model, line = settle(config(out_dir / "sdpa"), state)
    sdpa = (model.attention, line)
    torch.save({"first": first, "again": again, "calls": len(calls), "sdpa": sdpa}, out_dir / f"rank{state.rank}.pt")


def test_every_rank_runs_rank_0s_tiles_and_the_agreed_implementation(tmp_path):
    results = run_and_load(_two_ranks, 2, tmp_path)
    for rank, got in enumerate(results):
        attention, tiles, line = got["first"]
        want = dataclasses.astuple(TILES[0])
        assert (attention, tiles) == ("megamath", want), rank  # sdpa only if every rank prefers it
        assert got["again"][:2] == ("megamath", want) and got["calls"] == 1, rank
        assert got["again"][2].endswith("(kept from this run's first start, attention.json)")
    assert results[1]["first"][2].endswith("megamath on every rank, as another preferred it")
    assert results[0]["sdpa"] == ("sdpa-cudnn", "attention: sdpa-cudnn (auto, timed)")
    assert results[1]["sdpa"] == ("sdpa-cudnn", "attention: sdpa-flash (auto, timed); sdpa-cudnn on every rank, as "
                                                "rank 0 preferred it")
