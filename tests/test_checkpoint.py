"""Checkpoints: a process killed mid-save leaves a loadable previous one, pruning, refusals, pretrained init."""
import json
import re
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from forked_script import ScriptProcess
from megamath.model.model_folder import convert_megamath_to_hf, save_model_folder
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.training import loop
from megamath.training.checkpoint import (LATEST, complete_checkpoints, latest_checkpoint, load_checkpoint,
                                          read_metadata, rng_state, set_rng_state)
from megamath.training.checkpoint_integrity import sealed_metadata_text
from megamath.training.config import TrainConfig
from test_train_loop import assert_bitwise_equal, final_state, metrics, one_thread, raw_config, run  # noqa: F401

# Stops the run inside its second save (step 4), at a point the test picks, and waits to be killed.
RUNNER = """
import sys, time
import torch
torch.set_num_threads(1)
import megamath.training.checkpoint as ckpt
config, marker, where = sys.argv[1:4]

def hang():
    open(marker, "w").close()
    time.sleep(600)

fsync, write_pointer = ckpt._fsync, ckpt._write_text_atomically
def fsync_then_hang(path):
    fsync(path)
    if where == "shard" and ".step_0000004.tmp" in str(path) and path.name.startswith("optimizer"):
        hang()  # the model and optimizer files are written, the RNG states and metadata are not
def hang_before_pointer(path, text):
    if where == "pointer" and text.startswith("step_0000004"):
        hang()  # step_0000004 is complete and in place, `latest` still names step_0000002
    write_pointer(path, text)
ckpt._fsync, ckpt._write_text_atomically = fsync_then_hang, hang_before_pointer
from megamath.cli import main
sys.exit(main(["train", "--config", config]))
"""


@pytest.mark.parametrize("where", ["shard", "pointer"])
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, one_thread, where):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=6, checkpoint__save_every=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "runner.py").write_text(RUNNER)
    marker = tmp_path / "saving"
    proc = ScriptProcess(tmp_path / "runner.py", [tmp_path / "run.yaml", marker, where], tmp_path / "runner.log")
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    root = tmp_path / "run" / "checkpoints"
    assert (root / LATEST).read_text() == "step_0000002\n"
    assert latest_checkpoint(tmp_path / "run") == root / "step_0000002"
    assert read_metadata(root / "step_0000002")["step"] == 2
    if where == "shard":
        [partial] = root.glob(".step_0000004.tmp-*")  # unique to the killed attempt
        assert sorted(p.name for p in partial.iterdir()) == ["model_tp00.safetensors", "optimizer_tp00_dp000.pt"]
        assert [step for step, _ in complete_checkpoints(root)] == [2]
    else:
        assert [step for step, _ in complete_checkpoints(root)] == [2, 4]
    # Resuming goes on from step 2 and ends where an uninterrupted run ends, bit for bit.
    run(raw)
    straight = raw_config(tmp_path / "data", tmp_path / "straight", train_steps=6, checkpoint__save_every=2)
    run(straight)
    assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in metrics(tmp_path / "straight")]
    assert_bitwise_equal(final_state(tmp_path / "run", 6), final_state(tmp_path / "straight", 6))
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000002", "step_0000004", "step_0000006"]


def test_keep_prunes_the_oldest(tmp_path, one_thread):
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=9, checkpoint__save_every=2, checkpoint__keep=2))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000008", "step_0000009"]
    meta = read_metadata(root / "step_0000009")
    assert (meta["step"], meta["consumed_samples"], meta["tp_size"], meta["dp_size"]) == (9, 18, 1, 1)
    assert meta["files"] == ["model_tp00.safetensors", "optimizer_tp00_dp000.pt", "rng_rank00000.pt"]
    assert meta["schedule"]["peak_lr"] == 3e-3 and meta["schedule"]["warmup_steps"] == 2
    assert TrainConfig.from_dict(meta["config"]) == TrainConfig.from_dict(raw_config(
        tmp_path / "data", tmp_path / "run", train_steps=9, checkpoint__save_every=2, checkpoint__keep=2))


def test_a_run_rewound_to_an_earlier_checkpoint_keeps_what_it_branched_from(tmp_path, one_thread, capsys):
    """Resuming from step 2 of a run saved at 2, 4 and 6 (a rewind past a loss spike): 4 and 6 hold a future the
    run left. Counted by `keep`, they got step 2, where this run branched, deleted at its first save (its own
    line then held one checkpoint), and the stale step 6 was protected as the last good state."""
    raw = dict(train_steps=6, checkpoint__save_every=2, checkpoint__keep=3)
    run(raw_config(tmp_path / "data", tmp_path / "run", **raw))
    root = tmp_path / "run" / "checkpoints"
    abandoned_loss = metrics(tmp_path / "run")[3]["loss"]
    capsys.readouterr()
    run(raw_config(tmp_path / "data", tmp_path / "run", **{**raw, "train_steps": 4, "checkpoint__keep": 2},
                   checkpoint__resume=str(root / "step_0000002")))
    assert "note: step_0000004, step_0000006 were saved after step 2, where this run continues" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000002", "step_0000004", "step_0000006"]
    assert (root / LATEST).read_text() == "step_0000004\n" and read_metadata(root / "step_0000004")["step"] == 4
    assert metrics(tmp_path / "run")[3]["loss"] == abandoned_loss  # the same data and state: the same step 4


def test_refusals(tmp_path, one_thread):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=2, checkpoint__save_every=2)
    run(raw)
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(ValueError, match=r"already holds checkpoints \(latest: step_0000002\) and checkpoint.resume is "
                                         r"'never': resume with checkpoint.resume=auto or choose another run_dir"):
        run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=4, checkpoint__resume="never"))
    (root / LATEST).write_text("step_0000007\n")
    with pytest.raises(ValueError, match=r"latest names step_0000007, which is not a complete checkpoint; point it at "
                                         r"one of \['step_0000002'\] or resume from a path"):
        latest_checkpoint(tmp_path / "run")
    (root / LATEST).write_text("step_0000002\n")
    config, state = TrainConfig.from_dict(raw), ParallelState.single()
    model = loop.build_model(config, state)
    optimizer = ZeroOptimizer(model, state, config.optimizer, model.split_parameter_names())
    meta_path = root / "step_0000002" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(sealed_metadata_text({**meta, "tp_size": 2}))  # sealed: the layout check is reached
    with pytest.raises(ValueError, match=r"was saved with tensor-parallel size 2, this run uses 1: re-cut it with "
                                         r"`megamath reshard` or load it with "
                                         r"megamath\.training\.reshard\.load_checkpoint_any_tp"):
        load_checkpoint(root / "step_0000002", model, optimizer, state)
    meta_path.write_text(json.dumps(meta))
    (root / "step_0000002" / "rng_rank00000.pt").unlink()
    with pytest.raises(ValueError, match=r"step_0000002 is missing files: rng_rank00000.pt$"):
        load_checkpoint(root / "step_0000002", model, optimizer, state)
    with pytest.raises(FileNotFoundError, match=r"is not a complete checkpoint: metadata.json not found$"):
        read_metadata(root)


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # plain types: no pickled objects
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


class FakeCuda:
    """torch.cuda's RNG functions on a process that sees `count` GPUs and uses `current` (no GPU needed)."""

    def __init__(self, monkeypatch, count: int, current: int) -> None:
        self.states = [torch.full((16,), 10 * current + i, dtype=torch.uint8) for i in range(count)]
        for name in ("is_available", "current_device", "get_rng_state", "get_rng_state_all", "set_rng_state",
                     "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        self.current = current

    def is_available(self):
        return True

    def current_device(self):
        return self.current

    def get_rng_state(self, device="cuda"):
        return self.states[self.current if device == "cuda" else device].clone()

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state(self, state, device="cuda"):
        self.states[self.current if device == "cuda" else device] = state.clone()  # IndexError past the count

    def set_rng_state_all(self, states):  # as torch does it: device i gets states[i]
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def test_cuda_rng_state_resumes_on_a_node_with_fewer_gpus(tmp_path, monkeypatch):
    """Global rank 5 saved on an 8-GPU node (its device 5), resumed on a 4-GPU node (its device 1), same DP size:
    every visible GPU's state was saved and set back by index, so device 4 of 4 raised IndexError."""
    eight = FakeCuda(monkeypatch, count=8, current=5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    four = FakeCuda(monkeypatch, count=4, current=1)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(four.states[1], eight.states[5])  # the device it trains on gets the state it trained with
    assert [int(s[0]) for s in four.states] == [10, 55, 12, 13]  # the others untouched
    older = [torch.full((16,), 70 + i, dtype=torch.uint8) for i in range(8)]  # older megamath's list, by index
    set_rng_state({**torch.load(tmp_path / "rng.pt", weights_only=True), "cuda": older})
    assert [int(s[0]) for s in four.states] == [10, 71, 12, 13]


def test_init_from_hugging_face_and_megamath_checkpoints(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run")
    config, state = TrainConfig.from_dict(raw), ParallelState.single()
    torch.manual_seed(3)
    source = loop.build_model(config, state)
    save_model_folder(source, tmp_path / "ours")
    convert_megamath_to_hf(tmp_path / "ours", tmp_path / "hf")
    expected = {n: p.detach() for n, p in source.named_parameters()}
    for directory in ("hf", "ours"):
        model = loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / directory)}), state)
        assert_bitwise_equal({n: p.detach() for n, p in model.named_parameters()}, expected)
    # the run's rope_theta may differ from the checkpoint's (LLEMMA 7B: 1e4 on Code Llama's 1e6 weights) ...
    raw["model"]["rope_theta"] = 1e6
    loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / "hf")}), state)
    # ... its shapes may not
    raw["model"]["ffn_hidden_size"] = 96
    with pytest.raises(ValueError, match=r"^checkpoint tensors have wrong shapes: model.layers.0.mlp.gate_proj.weight "
                                         r"\(64, 32\) \(expected \(96, 32\)\)"):
        loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / "hf")}), state)
    with pytest.raises(FileNotFoundError, match=r"^init_from_hf: .*nowhere/config.json not found \(nor is .* a megamath training run"):
        loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / "nowhere")}), state)



def test_init_from_hf_refuses_what_the_shapes_do_not_show(tmp_path):
    """Same tensor shapes, another model: these loaded silently and trained something else than the checkpoint."""
    raw = raw_config(tmp_path / "data", tmp_path / "run")
    config, state = TrainConfig.from_dict(raw), ParallelState.single()
    save_model_folder(loop.build_model(config, state), tmp_path / "ours")
    convert_megamath_to_hf(tmp_path / "ours", tmp_path / "hf")
    # 8 heads x 4 and 4 KV heads fill q_proj (32, 32) and k_proj (16, 32) as 4 x 8 with 2 KV heads do
    other_heads = {**raw, "model": {**raw["model"], "num_heads": 8, "num_kv_heads": 4}}
    for directory in ("hf", "ours"):
        with pytest.raises(ValueError, match=r"^init_from_hf: .* splits attention into other heads than this run: "
                                             r"num_heads 4 \(checkpoint\) vs 8 \(this run\); num_kv_heads 2 "
                                             r"\(checkpoint\) vs 4 \(this run\)$"):
            loop.build_model(TrainConfig.from_dict({**other_heads, "init_from_hf": str(tmp_path / directory)}), state)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in (({"hidden_act": "gelu"}, "hidden_act must be 'silu', got 'gelu'"),
                            ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, **change}))
        with pytest.raises(ValueError, match=rf"^init_from_hf: .*hf: Hugging Face config: {re.escape(message)}"):
            loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / "hf")}), state)


def test_training_from_a_pretrained_checkpoint_starts_from_its_loss(tmp_path, one_thread):
    """A run initialized from a trained model's checkpoint starts near that model's final loss."""
    run(raw_config(tmp_path / "data", tmp_path / "first", train_steps=12, checkpoint__save_every=0))
    step12 = tmp_path / "first" / "checkpoints" / "step_0000012"
    config = TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "first"))
    with torch.device("meta"):
        model = loop.Llama(config.model)
    model.to_empty(device="cpu").load_state_dict(load_file(str(step12 / "model_tp00.safetensors")))
    save_model_folder(model, tmp_path / "pretrained")
    run(raw_config(tmp_path / "data", tmp_path / "second", train_steps=2, init_from_hf=str(tmp_path / "pretrained")))
    first, second = metrics(tmp_path / "first"), metrics(tmp_path / "second")
    assert second[0]["loss"] < first[0]["loss"] - 0.5
