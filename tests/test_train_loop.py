"""The training loop end to end on a tiny model: metrics, exact resume (1 and 2 DP ranks), resume on another
DP size, SIGTERM, and the non-finite skip rule. CPU, fp32, reference ops, gloo.

The helpers at the top are shared with test_checkpoint.py.
"""
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from distributed import run_distributed
from forked_script import ScriptProcess
from megamath.cli import main
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.parallel.zero_layout import read_flat, saved_layout
from megamath.training import loop
from megamath.training.checkpoint import LATEST, latest_checkpoint, load_checkpoint, model_file, read_metadata
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from megamath.training.preemption import StopFlag
from megamath.training.resume import validation_change
from megamath.training.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


# ---- shared helpers -------------------------------------------------------------------------------------

def write_corpus(directory: Path) -> dict[str, str]:
    """Two small datasets of counting sequences (learnable: the next token is the previous + 1 mod 60)."""
    rng = np.random.default_rng(0)
    prefixes = {}
    for name in ("arxiv", "web"):
        prefixes[name] = str(directory / name)
        with IndexedDatasetWriter(prefixes[name], np.uint16) as writer:
            for _ in range(40):
                start, n = int(rng.integers(0, 60)), int(rng.integers(8, 80))
                writer.add_document((np.arange(start, start + n) % 60).astype(np.uint16))
    return prefixes


def raw_config(data_dir: Path, run_dir: Path, **top) -> dict:
    """A tiny run as the raw mapping a YAML file would hold (hidden 32, 2 layers, seq 32)."""
    prefixes = write_corpus(data_dir) if not (data_dir / "web.idx").exists() else \
        {n: str(data_dir / n) for n in ("arxiv", "web")}
    raw = {
        "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "ffn_hidden_size": 64, "max_seq_length": 32, "kernels": "reference"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "clip_grad": 1.0},
        "data": {"data_path": [1, prefixes["arxiv"], 2, prefixes["web"]], "valid_data": {"arxiv": prefixes["arxiv"]},
                 "seq_length": 32},
        "schedule": {"warmup_steps": 2, "decay_steps": 20},
        "checkpoint": {"save_every": 4, "keep": 10},
        "run_dir": str(run_dir), "micro_batch_size": 2, "grad_accum_steps": 1, "train_steps": 8,
        "eval_every": 0, "param_dtype": "float32", "log_every": 4,
    }
    for key, value in top.items():
        section, _, field = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[field] = value
    return raw


@pytest.fixture
def one_thread():
    """Runs compared bit for bit must use the same thread count (reduction order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(raw: dict) -> loop.TrainResult:
    return train(TrainConfig.from_dict(raw), ParallelState.single())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def rewind(run_dir: Path, step: int) -> None:
    """Make `run_dir` look killed right after step `step`'s checkpoint: later checkpoints gone."""
    root = Path(run_dir) / "checkpoints"
    for path in root.glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (root / LATEST).write_text(f"step_{step:07d}\n")


def final_state(run_dir: Path, step: int, tp_rank: int = 0, dp_size: int = 1) -> dict[str, torch.Tensor]:
    """Model tensors and all optimizer shards of a checkpoint, by name."""
    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    tensors = dict(load_file(str(path / f"model_tp{tp_rank:02d}.safetensors")))
    for d in range(dp_size):
        shard = torch.load(path / f"optimizer_tp{tp_rank:02d}_dp{d:03d}.pt", weights_only=True)
        tensors.update({f"{k}.dp{d}": shard[k] for k in ("master", "exp_avg", "exp_avg_sq")})
    return tensors


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- metrics ------------------------------------------------------------------------------------------------

def test_metrics_jsonl_and_falling_loss(tmp_path, one_thread, capsys):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=24, eval_every=12, eval_batches=2,
                     checkpoint__save_every=0, schedule__decay_steps=24)
    result = run(raw)
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 25)) and result.step == 24 and not result.preempted
    required = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops", "skipped", "step_time_s",
                "consumed_samples"}
    assert all(required <= r.keys() for r in records)
    assert all(r["mfu"] is None and r["tflops"] > 0 and r["tokens_per_s"] > 0 and not r["skipped"] for r in records)
    assert [r["consumed_samples"] for r in records[:3]] == [2, 4, 6]
    assert records[0]["lr"] == pytest.approx(1.5e-3) and records[1]["lr"] == pytest.approx(3e-3)
    assert set(records[11]["val_loss"]) == {"arxiv"} and "val_loss" not in records[10]
    assert records[0]["loss"] > 3.5  # about ln(64) = 4.16 at initialization
    assert np.mean([r["loss"] for r in records[-4:]]) < records[0]["loss"] - 1.0
    assert records[23]["val_loss"]["arxiv"] < records[11]["val_loss"]["arxiv"]
    assert TrainConfig.from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())) == \
        TrainConfig.from_dict(raw)
    # the checkpoint at the end, whatever save_every says, and a throughput summary
    assert latest_checkpoint(tmp_path / "run").name == "step_0000024"
    assert set(result.summary) == {"steps", "first_left_out", "step_time_s", "tokens_per_s", "tflops", "mfu"}
    out = capsys.readouterr().out
    assert "step      12  loss" in out and "val/arxiv" in out and "throughput over" in out
    # grad_dtype auto, said once: fp32 weights (CPU) would be rounded by a bf16 buffer
    assert ("gradient buffer: fp32 (grad_dtype auto at float32 weights, 1 micro-batch(es) per step, DP 1, TP 1: "
            "bf16 only where nothing is summed into it)") in out
    assert "gradient accumulation fusion" not in out  # on, and taken: fp32 weights into an fp32 buffer


def test_settings_that_cannot_take_effect_are_said(tmp_path, one_thread, capsys):
    """fp32 weights into a bf16 buffer: no matmul writes that, so the log says the hook carries the gradients;
    an overlapped optimizer step over one bucket overlaps nothing, and the log says how to change that."""
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=2, checkpoint__save_every=0,
                   optimizer__grad_dtype="bf16", parallel__bucket_mb=0, parallel__overlap_optimizer_step=True))
    out = capsys.readouterr().out
    assert ("gradient accumulation fusion: off, float32 weights into a bf16 buffer on cpu have no matmul that "
            "accumulates into it: the gradients go through the optimizer's hook") in out
    assert ("parallel.overlap_optimizer_step: one bucket (parallel.bucket_mb 0), so the forward's first layer waits "
            "for the whole update and nothing overlaps; set bucket_mb (e.g. 128) to overlap it") in out
    # the default 128 MiB holds this tiny model's gradients in one bucket: the log says so, not "bucket_mb 0"
    run(raw_config(tmp_path / "data", tmp_path / "run2", train_steps=1, checkpoint__save_every=0,
                   parallel__overlap_optimizer_step=True))
    assert ("parallel.overlap_optimizer_step: one bucket (parallel.bucket_mb 128 holds all 0.0865 MiB of gradients), "
            "so the forward's first layer waits for the whole update and nothing overlaps; set bucket_mb below 0.0865 "
            "to overlap it") in capsys.readouterr().out


def test_empty_data_path_fails_before_building_anything(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run")
    raw["data"]["data_path"] = []
    with pytest.raises(ValueError, match=r"^data.data_path is empty: give \[W1, PREFIX1, ...\], one PREFIX, or "
                                         r"'llemma'$"):
        run(raw)
    raw["data"]["data_path"] = [str(tmp_path / "nothing")]
    with pytest.raises(FileNotFoundError, match=r"indexed dataset file not found: .*nothing.idx \(data prefixes "
                                                r"are given without .bin/.idx\)"):
        run(raw)


def test_step_time_covers_the_optimizer(tmp_path, monkeypatch):
    """A deliberately slow optimizer step must show in step_time_s (the timer stops after it, synced)."""
    slow_step = ZeroOptimizer.launch_step

    def launch_step(self, lr, *args, **kwargs):
        time.sleep(0.3)
        return slow_step(self, lr, *args, **kwargs)

    monkeypatch.setattr(ZeroOptimizer, "launch_step", launch_step)
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=2, checkpoint__save_every=0))
    assert all(r["step_time_s"] >= 0.3 for r in metrics(tmp_path / "run"))


def test_each_micro_batch_names_the_gradient_its_loss_will_get(tmp_path, monkeypatch):
    """With k micro-batches each loss gets 1/k: the model is told so (its loss kernel then writes the logits'
    gradient in the forward)."""
    from megamath.model import Llama

    seen = []
    forward = Llama.forward

    def spy(self, tokens, targets=None, *args, **kwargs):
        seen.append(kwargs.get("loss_grad"))
        return forward(self, tokens, targets, *args, **kwargs)

    monkeypatch.setattr(Llama, "forward", spy)
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=1, grad_accum_steps=3, eval_every=0,
                   checkpoint__save_every=0))
    assert seen == [1 / 3] * 3


def test_metrics_peak_tflops_is_the_denominator_of_mfu(tmp_path):
    """metrics.peak_tflops overrides the table (here on a CPU, which the table has no peak for)."""
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=2, checkpoint__save_every=0,
                   metrics__peak_tflops=0.25))
    records = metrics(tmp_path / "run")
    assert len(records) == 2 and all(r["mfu"] == pytest.approx(r["tflops"] / 0.25, rel=1e-12) for r in records)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["peak_tflops"] == 0.25


def test_a_resume_drops_the_redone_steps_and_the_lines_that_are_no_step_records(tmp_path):
    """Valid JSON that is no step record (`5`, a step "x") stopped a resume with an AttributeError/TypeError
    traceback; it goes the way of a torn line. Records without a step stay."""
    from megamath.training.metrics import _truncate_after

    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}', "5", '{"step": "x"}', "[1, 2]",
             '{"step": true}', '{"note": "kept"}', '{"step": 3, "loss": 1.25}', '{"step": 4, "lo']
    path.write_text("\n".join(lines))
    _truncate_after(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"note": "kept"}\n'


def test_more_samples_than_64_bits_count_is_refused_before_the_data_is_built(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run", micro_batch_size=2**62)  # × 8 steps: 2**65 samples
    with pytest.raises(ValueError, match=rf"^train_steps 8 × global batch {2**62} \(micro_batch_size · "
                                         r"grad_accum_steps · DP\) is more samples than 64 bits count$"):
        run(raw)


def test_token_ids_outside_the_vocabulary_are_refused_on_the_host(tmp_path):
    raw = raw_config(tmp_path / "data", tmp_path / "run", model__vocab_size=48)  # the corpus holds ids up to 59
    with pytest.raises(ValueError, match=r"^sample \d+ holds token id 5\d, outside the model's vocabulary "
                                         r"\[0, 48\): was the data made with another tokenizer"):
        run(raw)


# ---- exact resume, one process ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap_step", [False, True])
def test_resume_is_bitwise_exact_single_process(tmp_path, one_thread, overlap_step):
    """Also with the optimizer step overlapped over many buckets: its weights must be the masters a resume loads."""
    par = dict(parallel__bucket_mb=0.002, parallel__overlap_optimizer_step=True) if overlap_step else {}
    raw_a = raw_config(tmp_path / "data", tmp_path / "a", **par)
    run(raw_a)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    rewind(tmp_path / "b", 4)
    result = run(raw_config(tmp_path / "data", tmp_path / "b", **par))
    assert result.step == 8
    assert untimed(metrics(tmp_path / "b")) == untimed(metrics(tmp_path / "a"))  # losses, norms, lrs: all equal
    assert_bitwise_equal(final_state(tmp_path / "a", 8), final_state(tmp_path / "b", 8))
    # a finished run resumed again does nothing more
    assert run(raw_config(tmp_path / "data", tmp_path / "b", **par)).step == 8 and len(metrics(tmp_path / "b")) == 8


def test_resume_says_when_the_samples_come_in_another_order(tmp_path, one_thread, capsys):
    run(raw_config(tmp_path / "data", tmp_path / "a"))
    rewind(tmp_path / "a", 4)
    capsys.readouterr()
    run(raw_config(tmp_path / "data", tmp_path / "a"))  # same plan: no warning
    assert "another order" not in capsys.readouterr().out
    rewind(tmp_path / "a", 4)
    longer = raw_config(tmp_path / "data", tmp_path / "a", train_steps=12)
    longer["data"]["seed"] = 7
    assert run(longer).step == 12
    assert ("warning: train_steps 8 -> 12, data.seed 1234 -> 7 since checkpoint step 4: the blend is rebuilt, so the "
            "samples from here on come in another order") in capsys.readouterr().out


def test_resume_says_when_the_learning_rate_schedule_changed(tmp_path, one_thread, capsys):
    """Megatron-LM refuses a changed schedule unless told to override it; megamath takes the config's and says
    how the lr jumps."""
    run(raw_config(tmp_path / "data", tmp_path / "a"))
    rewind(tmp_path / "a", 4)
    capsys.readouterr()
    changed = raw_config(tmp_path / "data", tmp_path / "a", optimizer__lr=1e-3, schedule__decay_steps=40)
    run(changed)
    config = TrainConfig.from_dict(changed)
    old = TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "a"))
    new_lr, old_lr = lr_at(5, 1e-3, config.schedule), lr_at(5, 3e-3, old.schedule)
    assert (f"warning: optimizer.lr 0.003 -> 0.001, schedule.decay_steps 20 -> 40 since checkpoint step 4; update 5 "
            f"runs at lr {new_lr:.4g}, not {old_lr:.4g}") in capsys.readouterr().out
    rewind(tmp_path / "a", 8)  # step 8's checkpoint was saved under the new schedule: resuming it is quiet
    changed["train_steps"] = 10
    assert run(changed).step == 10
    assert "optimizer.lr" not in capsys.readouterr().out


def test_a_refused_resume_leaves_the_runs_config_yaml_as_it_was(tmp_path, one_thread):
    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=2, checkpoint__save_every=2))
    before = (tmp_path / "a" / "config.yaml").read_text()
    other = raw_config(tmp_path / "data", tmp_path / "a", train_steps=4)
    other["model"]["hidden_size"] = 48
    with pytest.raises(ValueError, match="holds a model of another shape than this run's"):
        run(other)
    assert (tmp_path / "a" / "config.yaml").read_text() == before


def test_a_finished_run_started_again_keeps_its_description(tmp_path, one_thread):
    """Started again with no step left to run (another layout, a forgotten torchrun), the run's config.yaml and
    run_info.json were rewritten with that start's settings: `megamath report` then described the run by a start
    that trained nothing (its layout, its device count, so its GPU-hours)."""
    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=2, checkpoint__save_every=2))
    files = ("config.yaml", "run_info.json", "metrics.jsonl")
    before = [(tmp_path / "a" / f).read_text() for f in files]
    again = raw_config(tmp_path / "data", tmp_path / "a", train_steps=2, log_every=1, metrics__peak_tflops=100.0)
    assert run(again).step == 2
    assert [(tmp_path / "a" / f).read_text() for f in files] == before
    longer = raw_config(tmp_path / "data", tmp_path / "a", train_steps=3, log_every=1, metrics__peak_tflops=100.0)
    assert run(longer).step == 3  # a start that trains describes the run from then on, as before
    assert json.loads((tmp_path / "a" / "run_info.json").read_text())["peak_tflops"] == 100.0
    assert "log_every: 1" in (tmp_path / "a" / "config.yaml").read_text()


def test_a_start_that_fails_at_its_first_step_leaves_the_runs_description(tmp_path, one_thread, monkeypatch):
    """config.yaml and run_info.json describe the steps in metrics.jsonl: a start that dies before its first
    record (out of memory at step 1 with a larger micro-batch, say) must not rewrite them."""
    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=2, checkpoint__save_every=2))
    files = ("config.yaml", "run_info.json", "metrics.jsonl")
    before = [(tmp_path / "a" / f).read_text() for f in files]

    def dies(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(loop, "train_step", dies)
    with pytest.raises(RuntimeError, match="a stand-in"):
        run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=4, log_every=1))
    assert [(tmp_path / "a" / f).read_text() for f in files] == before


def test_run_info_says_since_which_step_the_layout_ran(tmp_path, one_thread):
    from megamath.training.metrics import layout_since_step

    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=2, checkpoint__save_every=2))
    info_path = tmp_path / "a" / "run_info.json"
    assert json.loads(info_path.read_text())["layout_since_step"] == 1
    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=4, checkpoint__save_every=2))
    assert json.loads(info_path.read_text())["layout_since_step"] == 1  # the same layout goes on
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "device_name": "another device"}))  # as if the job moved
    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=6, checkpoint__save_every=2))
    assert json.loads(info_path.read_text())["layout_since_step"] == 5
    layout = {"world_size": 8, "tp_size": 2, "dp_size": 4, "device_name": "H100"}
    assert layout_since_step({**layout, "layout_since_step": 3}, layout, 9) == 3
    assert layout_since_step({**layout, "layout_since_step": 3}, {**layout, "world_size": 16, "dp_size": 8}, 9) == 9
    assert layout_since_step({**layout, "layout_since_step": 12}, layout, 9) == 9  # rewound before it began
    assert layout_since_step({}, layout, 1) == 1


def test_the_work_between_two_steps_is_timed_in_the_next_one(tmp_path, one_thread, monkeypatch):
    """Steps are timed back to back: writing a step's record (NVML's readings, here slowed as a busy driver
    would) counts in the next step's `log` phase and its step_time_s, not in a gap no record shows."""
    from megamath.training.hardware import HardwareProbe

    read = HardwareProbe.read

    def slow_read(self):
        time.sleep(0.05)
        return read(self)

    monkeypatch.setattr(HardwareProbe, "read", slow_read)
    run(raw_config(tmp_path / "data", tmp_path / "a", train_steps=4))
    records = metrics(tmp_path / "a")
    assert "log" not in records[0]["phases"]  # nothing ran before the first step
    for r in records[1:]:
        assert r["phases"]["log"] >= 0.05 and r["step_time_s"] >= sum(r["phases"].values()) >= 0.05, r


def untimed(records: list[dict]) -> list[dict]:
    timed = ("tokens_per_s", "tflops", "step_time_s", "phases", "step_time_max_s", "step_time_min_s", "slowest_rank")
    return [{k: v for k, v in r.items() if k not in timed} for r in records]


# ---- two DP ranks: exact resume, then resume on one rank ------------------------------------------------------

def _dp_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    state = ParallelState.from_env(1)
    # ~20 ZeRO buckets, overlapped (the default), and an evaluation while the all-gathers are in flight
    raw = raw_config(tmp / "data", tmp / "dp2", parallel__bucket_mb=0.002, eval_every=4)
    train(TrainConfig.from_dict(raw), state)
    if rank == 0:
        shutil.copytree(tmp / "dp2", tmp / "dp2_resumed")
        rewind(tmp / "dp2_resumed", 4)
    torch.distributed.barrier()
    raw["run_dir"] = str(tmp / "dp2_resumed")
    train(TrainConfig.from_dict(raw), state)


def _two_rank_worker(rank, world_size, tmp):
    """The DP 2 runs, then the TP 2 one (below): one launch, one process start per rank for both."""
    _dp_worker(rank, world_size, tmp)
    _tp_worker(rank, world_size, tmp / "tp")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Run folders of the module's 2-rank trainings: DP 2 in it, TP 2 with SP under tp/."""
    tmp = tmp_path_factory.mktemp("dp2")
    write_corpus(tmp / "data")  # before the workers start: they would race to write it
    _write_tp_inputs(tmp / "tp")
    run_distributed(_two_rank_worker, 2, tmp)
    return tmp


@pytest.fixture(scope="module")
def dp2_runs(two_rank_runs):
    return two_rank_runs


def test_resume_is_bitwise_exact_on_two_dp_ranks(dp2_runs):
    a, b = metrics(dp2_runs / "dp2"), metrics(dp2_runs / "dp2_resumed")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 8
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert_bitwise_equal(final_state(dp2_runs / "dp2", 8, dp_size=2), final_state(dp2_runs / "dp2_resumed", 8,
                                                                                    dp_size=2))
    meta = read_metadata(dp2_runs / "dp2" / "checkpoints" / "step_0000008")
    assert (meta["dp_size"], meta["tp_size"], meta["consumed_samples"], meta["global_batch_size"]) == (2, 1, 32, 4)


def test_resume_on_a_different_dp_size(dp2_runs, tmp_path, one_thread):
    """2 → 1 rank: the optimizer shards are re-cut exactly; training with the same global batch (2 micro-batches
    instead of 2 ranks) goes on equal up to float noise, and so does the validation loss once eval_batches keeps
    the validation set (eval_batches · micro_batch_size · DP size samples); a resume that changes the set says so."""
    step4 = dp2_runs / "dp2" / "checkpoints" / "step_0000004"
    raw = raw_config(dp2_runs / "data", tmp_path / "dp1", grad_accum_steps=2, eval_every=4, eval_batches=20)
    config, state = TrainConfig.from_dict(raw), ParallelState.single()
    model = loop.build_model(config, state)
    optimizer = ZeroOptimizer(model, state, config.optimizer, model.split_parameter_names())
    load_checkpoint(step4, model, optimizer, state)
    old = [torch.load(step4 / f"optimizer_tp00_dp{d:03d}.pt", weights_only=True) for d in range(2)]
    assert len(old[0]["buckets"]) > 10 and len(optimizer.buckets) == 1
    buckets, dp = saved_layout(old[0])
    mine = {s.name: s for s in optimizer.slots}
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for name, numel, offset in old[0]["params"]:  # each parameter, read from the bucketed DP 2 shards
            want = read_flat([shard[key] for shard in old], buckets, dp, offset, numel)
            got = getattr(optimizer, key)[mine[name].offset:mine[name].offset + numel]  # one bucket, one rank
            assert torch.equal(got, want), (key, name)
    assert optimizer.step_count == 4
    assert_bitwise_equal({n: p.detach() for n, p in model.named_parameters()},
                         dict(load_file(str(step4 / "model_tp00.safetensors"))))
    optimizer.remove_hooks()

    shutil.copytree(dp2_runs / "dp2", tmp_path / "dp1")
    rewind(tmp_path / "dp1", 4)
    assert json.loads((tmp_path / "dp1" / "run_info.json").read_text())["layout_since_step"] == 1
    run(raw)
    info = json.loads((tmp_path / "dp1" / "run_info.json").read_text())
    assert (info["dp_size"], info["layout_since_step"]) == (1, 5)  # steps 1-4 ran on 2 ranks
    two, one = [r["loss"] for r in metrics(dp2_runs / "dp2")], [r["loss"] for r in metrics(tmp_path / "dp1")]
    assert one[:5] == two[:5]  # step 5 runs on the restored weights: the same sums in the same order
    # Later steps differ by rounding (1 rank sums two micro-batches, 2 ranks all-reduce them), which
    # AdamW amplifies; two fresh runs, 1 rank vs 2, drift apart just as much.
    np.testing.assert_allclose(one, two, rtol=1e-4)
    val = [r["val_loss"]["arxiv"] for run_dir in (dp2_runs / "dp2", tmp_path / "dp1") for r in metrics(run_dir)
           if r["step"] == 8]
    np.testing.assert_allclose(val[1], val[0], rtol=1e-5)  # the same 40 samples (DP 2 read 10 batches per rank)
    meta = read_metadata(step4)
    assert validation_change(meta, config, 1) is None
    fewer = TrainConfig.from_dict({**raw, "eval_batches": 10})
    warning = ("warning: the validation sets hold 20 samples each (eval_batches · micro_batch_size · DP size), the "
               "run of checkpoint step 4 evaluated 40: val_loss after it is not comparable with the earlier values; "
               "eval_batches=20 keeps the checkpoint's sets")
    assert validation_change(meta, fewer, 1) == warning
    resharded = {**meta, "dp_size": 1, "resharded_from": {"path": str(step4), "tp_size": 1, "dp_size": 2}}
    assert validation_change(resharded, fewer, 1) == warning  # the reshard's DP size evaluated nothing
    a, b, before = final_state(dp2_runs / "dp2", 8), final_state(tmp_path / "dp1", 8), final_state(dp2_runs / "dp2", 4)
    for name in b:
        if not name.endswith(".dp0"):
            assert (a[name] - b[name]).norm() < 0.05 * (a[name] - before[name]).norm(), name


def test_resume_refuses_another_global_batch(dp2_runs, tmp_path):
    shutil.copytree(dp2_runs / "dp2", tmp_path / "dp1")
    rewind(tmp_path / "dp1", 4)
    with pytest.raises(ValueError, match=r"trained with global batch 4, this run's is 2 \(micro_batch_size · "
                                         r"grad_accum_steps · dp\): keep it equal on resume"):
        run(raw_config(dp2_runs / "data", tmp_path / "dp1"))


# ---- SIGTERM ----------------------------------------------------------------------------------------------

RUNNER = """
import sys, time
import torch
torch.set_num_threads(1)
import megamath.training.loop as loop
step = loop.train_step
def slow_step(*args, **kwargs):  # slow enough for the test to signal mid-run; the numbers are untouched
    time.sleep(0.3)
    return step(*args, **kwargs)
loop.train_step = slow_step
from megamath.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def start_slow_training(tmp_path: Path, raw: dict, records: int, too_early: str) -> ScriptProcess:
    """`megamath train` of `raw` in a process of its own slowed by RUNNER (forked from a preloaded server,
    tests/forked_script.py), returned once its metrics.jsonl holds `records` lines (the test then acts
    mid-run); fails with `too_early` if it ends or stalls before."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "runner.py").write_text(RUNNER)
    proc = ScriptProcess(tmp_path / "runner.py", [tmp_path / "run.yaml"], tmp_path / "runner.log")
    log = Path(raw["run_dir"]) / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while not (log.is_file() and len(log.read_text().splitlines()) >= records):
            assert proc.poll() is None and time.time() < deadline, too_early
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise
    return proc


def test_sigterm_saves_and_exits_zero_then_resumes_exactly(tmp_path, one_thread):
    raw = raw_config(tmp_path / "data", tmp_path / "preempted", train_steps=12, checkpoint__save_every=100)
    proc = start_slow_training(tmp_path, raw, 2, "the run ended before it could be signalled")
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    stopped = len(metrics(tmp_path / "preempted"))
    assert 2 <= stopped < 12
    assert f"stopping on SIGTERM after step {stopped}: checkpoint saved" in out
    assert latest_checkpoint(tmp_path / "preempted").name == f"step_{stopped:07d}"
    run(raw)  # resume to the end, in this process
    reference = raw_config(tmp_path / "data", tmp_path / "straight", train_steps=12, checkpoint__save_every=100)
    run(reference)
    assert [r["loss"] for r in metrics(tmp_path / "preempted")] == [r["loss"] for r in metrics(tmp_path / "straight")]
    assert_bitwise_equal(final_state(tmp_path / "preempted", 12), final_state(tmp_path / "straight", 12))


def test_a_signal_during_a_scheduled_save_stops_on_that_checkpoint(tmp_path, monkeypatch, one_thread, capsys):
    """A cluster's grace period after SIGTERM may not cover one more step and another full save."""
    save = loop.ckpt.save_checkpoint

    def save_then_signalled(run_dir, step, *args, **kwargs):
        save(run_dir, step, *args, **kwargs)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", save_then_signalled)
    result = run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=8, checkpoint__save_every=2))
    assert (result.step, result.preempted) == (4, True) and len(metrics(tmp_path / "run")) == 4
    assert "stopping on SIGTERM after step 4: checkpoint saved to" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]


# ---- non-finite steps -----------------------------------------------------------------------------------------

def inject_nonfinite(monkeypatch, loss_steps=(), grad_steps=()):
    """Make the loss (forward hook) or one gradient (tensor hook) NaN at the given steps (1 micro-batch a step)."""
    build = loop.build_model

    def build_with_faults(config, state, **options):
        model = build(config, state, **options)
        calls, handles = {"n": 0}, []

        def forward_hook(module, args, output):
            calls["n"] += 1
            step = calls["n"]
            if step in grad_steps:  # a NaN in one gradient of this step's backward only
                def nan_grad(grad):
                    handles.pop().remove()
                    return grad * float("nan")

                handles.append(module.lm_head.weight.register_hook(nan_grad))
            if step in loss_steps:
                return output[0], output[1] * float("nan")
            return None

        model.register_forward_hook(forward_hook)
        return model

    monkeypatch.setattr(loop, "build_model", build_with_faults)


def test_nonfinite_steps_are_skipped_and_logged(tmp_path, monkeypatch, one_thread, capsys):
    inject_nonfinite(monkeypatch, loss_steps={3}, grad_steps={4})
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=6, checkpoint__save_every=0))
    records = metrics(tmp_path / "run")
    assert [r["skipped"] for r in records] == [False, False, True, True, False, False]
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None  # NaN loss: skipped, no norm
    assert records[3]["loss"] is not None and records[3]["grad_norm"] is None  # finite loss, NaN gradient
    out = capsys.readouterr().out
    assert "step 3: non-finite loss nan / grad norm nan: update skipped (1 in a row, limit 5)" in out
    assert "step 4: non-finite loss" in out and "(2 in a row, limit 5)" in out
    shard = torch.load(tmp_path / "run" / "checkpoints" / "step_0000006" / "optimizer_tp00_dp000.pt",
                       weights_only=True)
    assert shard["step"] == 4  # six steps, two skipped: four AdamW updates


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch, one_thread, capsys):
    inject_nonfinite(monkeypatch, loss_steps=set(range(5, 100)))
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=12, max_consecutive_nonfinite=3)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 1  # through the CLI: exit status 1
    assert capsys.readouterr().err.endswith(
        "megamath train: error: 3 consecutive steps (5..7) had a non-finite loss or gradient norm; stopping. The last "
        "checkpoint (step 4) is intact: resume from it with a lower learning rate or after checking the data of "
        "those steps\n")
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [LATEST, "step_0000004"]
    assert read_metadata(tmp_path / "run" / "checkpoints" / "step_0000004")["step"] == 4
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 8))


# ---- tensor parallelism ---------------------------------------------------------------------------------------

def _tp_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    state = ParallelState.from_env(2)
    raw = raw_config(tmp / "data", tmp / "tp2", parallel__tp_size=2, parallel__sequence_parallel=True)
    train(TrainConfig.from_dict(raw), state)
    model = loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp / "hf")}), state)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, tmp / f"pretrained_tp{rank}.pt")
    warm = loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp / "tp2")}), state)  # its own run
    torch.save({n: p.detach().clone() for n, p in warm.named_parameters()}, tmp / f"warm_tp{rank}.pt")


def _tp_source_model(tmp: Path):
    """(raw config of the serial run, the seeded model whose HF export the TP ranks start from)."""
    raw = raw_config(tmp / "data", tmp / "serial")
    torch.manual_seed(7)
    return raw, loop.build_model(TrainConfig.from_dict(raw), ParallelState.single())


def _write_tp_inputs(tmp: Path) -> None:
    """The corpus and the HF checkpoint _tp_worker reads (written before the ranks start)."""
    from megamath.model.model_folder import convert_megamath_to_hf, save_model_folder

    _, source = _tp_source_model(tmp)
    save_model_folder(source, tmp / "megamath_ckpt")
    convert_megamath_to_hf(tmp / "megamath_ckpt", tmp / "hf")


def test_tensor_and_sequence_parallel_run_matches_serial(two_rank_runs, one_thread):
    """TP = 2 with sequence parallelism (norm-weight grads summed over TP inside ZeRO's flat buffer) follows
    the serial run; init_from_hf gives each TP rank its slices of the checkpoint, a model folder or a training run."""
    from megamath.model.tp_state_dict import merge_state_dicts, shard_state_dict

    tmp_path = two_rank_runs / "tp"  # the TP 2 run is made by the module's 2-rank launch
    raw, source = _tp_source_model(tmp_path)
    config = TrainConfig.from_dict(raw)
    run(raw)
    serial, tp = [r["loss"] for r in metrics(tmp_path / "serial")], [r["loss"] for r in metrics(tmp_path / "tp2")]
    np.testing.assert_allclose(tp, serial, rtol=1e-4)
    path = tmp_path / "tp2" / "checkpoints" / "step_0000008"
    merged = merge_state_dicts([load_file(str(path / f"model_tp{r:02d}.safetensors")) for r in range(2)], config.model)
    a, before = final_state(tmp_path / "serial", 8), final_state(tmp_path / "serial", 4)
    for name, tensor in merged.items():
        assert (tensor - a[name]).norm() < 0.05 * (a[name] - before[name]).norm(), name
    full = {n: p.detach() for n, p in source.named_parameters()}
    for r in range(2):
        assert_bitwise_equal(torch.load(tmp_path / f"pretrained_tp{r}.pt"), shard_state_dict(full, config.model, 2, r))
    # init_from_hf naming a training run: at TP 2 each rank starts from the slices that rank saved, and one
    # process starts from their merge
    for r in range(2):
        assert_bitwise_equal(torch.load(tmp_path / f"warm_tp{r}.pt"),
                             dict(load_file(str(path / f"model_tp{r:02d}.safetensors"))))
    warm = loop.build_model(TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / "tp2")}),
                            ParallelState.single())
    assert_bitwise_equal({n: p.detach() for n, p in warm.named_parameters()}, merged)


def signal_at_step(monkeypatch, step: int) -> None:
    """As if SIGTERM reached the job during step `step` (the flag is read once per step)."""
    agreed, calls = StopFlag.agreed, {"n": 0}

    def agreed_at(self, state):
        calls["n"] += 1
        if calls["n"] == step:
            self.signal_name = "SIGTERM"
        return agreed(self, state)

    monkeypatch.setattr(StopFlag, "agreed", agreed_at)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_during_a_streak_of_skipped_steps_names_the_checkpoint_that_exists(tmp_path, monkeypatch,
                                                                                    one_thread, capsys, resumed):
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=12, checkpoint__save_every=4)
    first = 4 if resumed else 0
    if resumed:  # a first attempt left step 4
        run({**raw, "train_steps": 4})
    inject_nonfinite(monkeypatch, loss_steps={2, 3})  # the second and third steps of this attempt
    signal_at_step(monkeypatch, 3)
    result = run(raw)
    assert (result.step, result.preempted) == (first + 3, True)
    out = capsys.readouterr().out
    if resumed:
        assert (f"stopping on SIGTERM after step 7: resume from the last good checkpoint, "
                f"{tmp_path / 'run' / 'checkpoints' / 'step_0000004'}\n") in out
    else:  # it named step_0000000, which never exists
        assert ("stopping on SIGTERM after step 3: no checkpoint was saved yet (none is during a streak of skipped "
                "steps): the next run starts from scratch\n") in out
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_nonfinite_validation_loss_is_null_in_metrics_jsonl(tmp_path, monkeypatch, one_thread, capsys):
    """metrics.jsonl stays strict JSON (NaN and Infinity are not JSON) when only the validation loss overflows."""
    build = loop.build_model

    def build_overflowing_in_eval(config, state, **options):
        model = build(config, state, **options)
        model.register_forward_hook(lambda module, args, out: None if module.training else (out[0], out[1] * math.inf))
        return model

    monkeypatch.setattr(loop, "build_model", build_overflowing_in_eval)
    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=2, eval_every=2, eval_batches=1))

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert records[1]["val_loss"] == {"arxiv": None} and records[1]["loss"] is not None
    assert "val/arxiv nan" in capsys.readouterr().out


def test_an_overlapped_optimizer_step_trains_bit_for_bit_as_the_plain_one(tmp_path, one_thread):
    """parallel.overlap_optimizer_step through `megamath train` (two accumulated micro-batches, a few buckets,
    a checkpoint mid-run): the same losses, norms and final weights as without it."""
    records, weights = {}, {}
    for overlap in (False, True):
        run_dir = tmp_path / f"run-{overlap}"
        run(raw_config(tmp_path / "data", run_dir, train_steps=6, grad_accum_steps=2, micro_batch_size=1,
                       parallel__bucket_mb=0.01, parallel__overlap_optimizer_step=overlap))
        records[overlap] = [(r["loss"], r["grad_norm"]) for r in metrics(run_dir)]
        weights[overlap] = load_file(latest_checkpoint(run_dir) / model_file(0))
    assert len(records[False]) == 6 and records[True] == records[False]
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][n], weights[False][n]) for n in weights[False])
