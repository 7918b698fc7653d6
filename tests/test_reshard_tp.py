"""megamath reshard: a checkpoint moved to another TP size continues its run; the move is bit-exact; clear errors.

Two tiny runs (hidden 32, 2 layers, fp32, reference ops), each 2 steps, a checkpoint, 1 more step:
    A  TP 2 with sequence parallelism and 1 KV head (k/v replicated over the TP ranks), on 2 gloo ranks;
    B  TP 1, in this process, 2 KV heads (split at TP 2, replicated at TP 4).
A's step 2 resharded to TP 1 and B's to TP 2 each train 1 step and must land within 1e-5 of the
uninterrupted run (TP and serial add partial sums in different orders); resuming at the other TP size
directly must equal the tool's path bit for bit. The resharded tensors are compared, exactly, with
merge_state_dicts / shard_state_dict and with a merge of the optimizer shards written here. One launch
of 2 ranks also checks the sequence-parallel gradient sum inside ZeRO's flat buffer.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import run_distributed
from megamath.cli import main
from megamath.model.tp_state_dict import merge_state_dicts, shard_state_dict
from megamath.model.partition import tp_partition_dim
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.run_lock import FolderLock
from megamath.training import checkpoint as ckpt
from megamath.training import loop
from megamath.training import reshard as rs
from megamath.training.checkpoint import LATEST, complete_checkpoints, read_metadata, rng_state, set_rng_state
from megamath.training.checkpoint_integrity import file_digest, sealed_metadata_text
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from test_train_loop import final_state, metrics, raw_config, run, untimed, write_corpus

REPO = Path(__file__).resolve().parents[1]
STEP2, STEP3 = "checkpoints/step_0000002", "checkpoints/step_0000003"
KEYS = ("master", "exp_avg", "exp_avg_sq")


def config_a(tmp: Path, run_dir: str, tp: int, **top) -> dict:
    sp = dict(parallel__sequence_parallel=True) if tp > 1 else {}
    return raw_config(tmp / "data", tmp / run_dir, train_steps=3, checkpoint__save_every=2, parallel__tp_size=tp,
                      **{"model__num_kv_heads": 1, **sp, **top})


def config_b(tmp: Path, run_dir: str, tp: int, **top) -> dict:
    sp = dict(parallel__sequence_parallel=True) if tp > 1 else {}
    return raw_config(tmp / "data", tmp / run_dir, train_steps=3, checkpoint__save_every=2, parallel__tp_size=tp,
                      **sp, **top)


def models(path: Path, tp: int) -> list[dict]:
    return [load_file(str(path / f"model_tp{t:02d}.safetensors")) for t in range(tp)]


def shards(path: Path, tp: int, dp: int) -> list[list[dict]]:
    return [[torch.load(path / f"optimizer_tp{t:02d}_dp{d:03d}.pt", weights_only=True) for d in range(dp)]
            for t in range(tp)]


def assert_same_files(a: Path, b: Path, tp: int, dp: int) -> None:
    """Model files, optimizer shards (every entry) and RNG states of two checkpoints are bit-identical."""
    for x, y in zip(models(a, tp), models(b, tp)):
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    for row_a, row_b in zip(shards(a, tp, dp), shards(b, tp, dp)):
        for x, y in zip(row_a, row_b):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k
    for r in range(tp * dp):
        assert_same_rng(torch.load(a / f"rng_rank{r:05d}.pt"), torch.load(b / f"rng_rank{r:05d}.pt"))


def assert_same_rng(x: dict, y: dict) -> None:
    assert x["python"] == y["python"] and torch.equal(x["torch"], y["torch"])
    assert x["numpy"][0] == y["numpy"][0] and torch.equal(x["numpy"][1], y["numpy"][1])
    assert x["numpy"][2:] == y["numpy"][2:]


def merged_optimizer_ref(path: Path, config, tp: int, dp: int) -> dict[str, dict[str, torch.Tensor]]:
    """The serial fp32 state of every parameter, rebuilt here from the files: whole flat vectors, sliced."""
    local = {n: t.shape for n, t in models(path, tp)[0].items()}
    per_rank = []
    for row in shards(path, tp, dp):
        flat = {k: torch.cat([s[k] for s in row]) for k in KEYS}  # (dp·S,)
        per_rank.append({n: {k: flat[k][o:o + numel].view(local[n]) for k in KEYS}
                         for n, numel, o in row[0]["params"]})
    out = {}
    for name in local:
        dim = tp_partition_dim(name, config, tp)
        out[name] = {k: (torch.cat([r[name][k] for r in per_rank], dim) if dim is not None else per_rank[0][name][k])
                     for k in KEYS}
    return out


# ---- the runs --------------------------------------------------------------------------------------------

def _worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    state = ParallelState.from_env(2)
    train(TrainConfig.from_dict(config_a(tmp, "a_tp2", 2)), state)  # A from scratch
    train(TrainConfig.from_dict(config_b(tmp, "b_tp2_tool", 2)), state)  # B's step 2, resharded by the tool
    direct = config_b(tmp, "b_tp2_direct", 2, checkpoint__resume=str(tmp / "b_tp1" / STEP2))
    train(TrainConfig.from_dict(direct), state)  # B's step 2 read at TP 1 straight into this TP 2 run
    _sp_grads(state, tmp)


def _sp_grads(state, tmp):
    """Norm-weight gradients summed over TP: in p.grad, and in ZeRO's flat buffer, the same function."""
    from megamath.model import Llama
    from megamath.parallel.sequence_parallel import allreduce_sequence_parallel_grads
    from megamath.parallel.optimizer_config import OptimizerConfig

    config = TrainConfig.from_dict(config_b(tmp, "unused", 2)).model
    tokens = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))  # (b, S + 1)
    grads = {}
    for kind in ("serial", "plain", "zero"):
        torch.manual_seed(3)
        model = Llama(config) if kind == "serial" else Llama(config, state, sequence_parallel=True)
        optimizer = ZeroOptimizer(model, state, OptimizerConfig(), model.split_parameter_names()) if kind == "zero" else None
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        norms = [(n, p) for n, p in model.named_parameters() if "norm" in n]
        grad = (lambda p: optimizer.grad_view(p)) if optimizer else (lambda p: p.grad)
        if kind == "zero":
            grads["partial"] = {n: grad(p).clone() for n, p in norms}
        if kind != "serial":
            allreduce_sequence_parallel_grads(model.sequence_parallel_parameters(), state, optimizer)
        if optimizer:
            optimizer._reduce_scatter_grads()  # step's phase 1: the DP reduction, then the TP sum asked for
        grads[kind] = {n: grad(p).clone() for n, p in norms}
    torch.save(grads, tmp / f"sp_grads{state.rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit use one thread
    try:
        write_corpus(tmp / "data")
        run(config_b(tmp, "b_tp1", 1))
        rs.reshard_checkpoint(tmp / "b_tp1" / STEP2, tmp / "b_tp2_tool", 2)
        run_distributed(_worker, 2, tmp)
        rs.reshard_checkpoint(tmp / "a_tp2" / STEP2, tmp / "a_tp1", 1, 1)
        run(config_a(tmp, "a_tp1", 1))
        yield tmp
    finally:
        torch.set_num_threads(threads)


def _assert_close_params(resumed: dict, straight: dict, before: dict) -> None:
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert (resumed[name] - straight[name]).abs().max() < 1e-5, name
    moved = max(float((straight[n] - before[n]).abs().max()) for n in straight)
    assert moved > 1e-3  # the step after the checkpoint did change the weights: the bound above says something


def test_tp2_to_tp1_continues_the_run(runs):
    config = TrainConfig.from_dict(config_a(runs, "x", 2)).model
    straight = merge_state_dicts(models(runs / "a_tp2" / STEP3, 2), config)
    before = merge_state_dicts(models(runs / "a_tp2" / STEP2, 2), config)
    _assert_close_params(models(runs / "a_tp1" / STEP3, 1)[0], straight, before)
    assert [r["step"] for r in metrics(runs / "a_tp1")] == [3]
    np.testing.assert_allclose(metrics(runs / "a_tp1")[0]["loss"], metrics(runs / "a_tp2")[2]["loss"], rtol=1e-5)


def test_tp1_to_tp2_continues_the_run_and_direct_resume_equals_the_tool(runs):
    config = TrainConfig.from_dict(config_b(runs, "x", 1)).model
    resumed = merge_state_dicts(models(runs / "b_tp2_tool" / STEP3, 2), config)
    _assert_close_params(resumed, models(runs / "b_tp1" / STEP3, 1)[0], models(runs / "b_tp1" / STEP2, 1)[0])
    np.testing.assert_allclose(metrics(runs / "b_tp2_tool")[0]["loss"], metrics(runs / "b_tp1")[2]["loss"], rtol=1e-5)
    # The tool's shards are laid out as the live TP-2 optimizer lays them out (it saved step 3 itself).
    for t in range(2):
        assert shards(runs / "b_tp2_tool" / STEP2, 2, 1)[t][0]["params"] == \
            shards(runs / "b_tp2_tool" / STEP3, 2, 1)[t][0]["params"]
    # Resuming the TP-1 checkpoint directly at TP 2 is the tool's path, bit for bit (RNG states aside: the
    # direct path keeps fresh ones, and nothing draws from them).
    for t in range(2):
        a, b = final_state(runs / "b_tp2_tool", 3, tp_rank=t), final_state(runs / "b_tp2_direct", 3, tp_rank=t)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert untimed(metrics(runs / "b_tp2_direct")) == untimed(metrics(runs / "b_tp2_tool"))


def test_direct_resume_tp2_to_tp1_equals_the_tool(runs, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(config_a(runs, str(tmp_path / "direct"), 1, checkpoint__resume=str(runs / "a_tp2" / STEP2)))
    finally:
        torch.set_num_threads(threads)
    assert f"resumed from {runs / 'a_tp2' / STEP2} at step 2 (saved at tensor-parallel size 2, re-cut for 1)" in \
        capsys.readouterr().out
    a, b = final_state(runs / "a_tp1", 3, dp_size=1), final_state(tmp_path / "direct", 3, dp_size=1)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ---- bit-exact ------------------------------------------------------------------------------------------

def test_resharded_state_is_merge_and_shard_of_the_original(runs, tmp_path):
    config_a_model = TrainConfig.from_dict(config_a(runs, "x", 2)).model
    src = runs / "a_tp2" / STEP2
    out = runs / "a_tp1" / STEP2  # A's step 2 at TP 1 × DP 1, written by the fixture
    assert models(out, 1)[0].keys() == merge_state_dicts(models(src, 2), config_a_model).keys()
    for name, tensor in merge_state_dicts(models(src, 2), config_a_model).items():
        assert torch.equal(models(out, 1)[0][name], tensor), name
    expected = merged_optimizer_ref(src, config_a_model, 2, 1)
    assert merged_optimizer_ref(out, config_a_model, 1, 1).keys() == expected.keys()
    for name, state in merged_optimizer_ref(out, config_a_model, 1, 1).items():
        for k in KEYS:
            assert torch.equal(state[k], expected[name][k]), (name, k)
    # ... and back to TP 2: the very files the TP-2 run saved (layout, padding, step, RNG states).
    rs.reshard_checkpoint(out, tmp_path / "back", 2, 1)
    assert_same_files(src, tmp_path / "back" / STEP2, 2, 1)

    config_b_model = TrainConfig.from_dict(config_b(runs, "x", 1)).model
    src = runs / "b_tp1" / STEP2
    full = models(src, 1)[0]
    for t, shard in enumerate(models(runs / "b_tp2_tool" / STEP2, 2)):
        expected = shard_state_dict(full, config_b_model, 2, t)
        assert shard.keys() == expected.keys() and all(torch.equal(shard[n], expected[n]) for n in shard)
    # TP 4 (its 2 KV heads replicated on 4 ranks) × DP 3, padded shards, and back to TP 1 × DP 1. DP 3 needs a
    # global batch it divides: a copy says 6 (a run of micro-batch 2 on 3 ranks), its files unchanged.
    src = _copy(src, tmp_path / "batch6")
    meta = json.loads((src / "metadata.json").read_text())
    (src / "metadata.json").write_text(sealed_metadata_text({**meta, "global_batch_size": 6}))
    rs.reshard_checkpoint(src, tmp_path / "tp4", 4, 3)
    tp4 = tmp_path / "tp4" / STEP2
    for t, shard in enumerate(models(tp4, 4)):
        expected = shard_state_dict(full, config_b_model, 4, t)
        assert shard.keys() == expected.keys() and all(torch.equal(shard[n], expected[n]) for n in shard)
    expected = merged_optimizer_ref(src, config_b_model, 1, 1)
    for name, state in merged_optimizer_ref(tp4, config_b_model, 4, 3).items():
        for k in KEYS:
            assert torch.equal(state[k], expected[name][k]), (name, k)
    rs.reshard_checkpoint(tp4, tmp_path / "tp1", 1, 1)
    tp1 = tmp_path / "tp1" / STEP2
    for x, y in zip(models(src, 1) + shards(src, 1, 1)[0], models(tp1, 1) + shards(tp1, 1, 1)[0]):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)


def test_metadata_and_rng_states(runs, tmp_path):
    src = runs / "a_tp2" / STEP2
    old = read_metadata(src)
    new = read_metadata(rs.reshard_checkpoint(src, tmp_path / "out", 2, 2))
    assert (tmp_path / "out" / "checkpoints" / LATEST).read_text() == "step_0000002\n"
    assert (new["tp_size"], new["dp_size"], new["world_size"]) == (2, 2, 4)
    assert new["files"][:2] == ["model_tp00.safetensors", "model_tp01.safetensors"] and len(new["files"]) == 10
    assert new["resharded_from"] == {"path": str(src), "tp_size": 2, "dp_size": 1}
    for key in ("step", "consumed_samples", "global_batch_size", "schedule", "consecutive_nonfinite", "format"):
        assert new[key] == old[key], key
    assert new["config"] == old["config"]  # still TP 2 with SP
    one = read_metadata(runs / "a_tp1" / STEP2)["config"]
    assert one["parallel"] == {**old["config"]["parallel"], "tp_size": 1, "sequence_parallel": False}
    assert {**one, "parallel": old["config"]["parallel"]} == old["config"]
    # Ranks 0 and 1 continue the old ranks' streams; ranks 2 and 3 get what a fresh run seeds.
    rng = [torch.load(tmp_path / "out" / STEP2 / f"rng_rank{r:05d}.pt") for r in range(4)]
    for r in range(2):
        assert_same_rng(rng[r], torch.load(src / f"rng_rank{r:05d}.pt"))
    saved = rng_state()
    try:
        for r in (2, 3):
            loop.seed_rngs(old["config"]["seed"], r)
            assert_same_rng(rng[r], rng_state())
    finally:
        set_rng_state(saved)


# ---- the command line -------------------------------------------------------------------------------------

def test_cli_and_tool(runs, tmp_path, capsys):
    """A run directory reads as its latest (step 3); the default DP size keeps the 2 processes."""
    argv = ["--checkpoint", str(runs / "a_tp2"), "--tp-size", "1", "--output", str(tmp_path / "cli")]
    assert main(["reshard", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"resharded step 3 from TP 2 x DP 1 to TP 1 x DP 2: {tmp_path / 'cli' / STEP3}\n")
    assert "parallel.tp_size=1 on 2 processes; keep the global batch 2 = micro_batch_size x grad_accum_steps x 2" in out
    assert main(["reshard", *argv]) == 2
    assert capsys.readouterr().err == (f"megamath reshard: error: {tmp_path / 'cli'} already holds checkpoints "
                                       "(step_0000003): reshard into a new run directory\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "reshard_checkpoint.py"), "--checkpoint",
                           str(tmp_path / "cli" / STEP3), "--tp-size", "2", "--dp-size", "1", "--output",
                           str(tmp_path / "tool")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_files(runs / "a_tp2" / STEP3, tmp_path / "tool" / STEP3, 2, 1)


# ---- errors ------------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_meta(path: Path, **model) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    meta["config"]["model"].update(model)
    (path / "metadata.json").write_text(sealed_metadata_text(meta))  # sealed: the checks behind the seal are reached


def _reseal(path: Path) -> None:
    """Record the checksums of files edited on purpose, so the consistency checks behind the integrity
    check are reached (as for a checkpoint a buggy writer sealed, or one saved before checksums)."""
    meta = json.loads((path / "metadata.json").read_text())
    meta["checksums"] = {name: file_digest(path / name) for name in meta["files"]}
    (path / "metadata.json").write_text(sealed_metadata_text(meta))


def test_refusals(runs, tmp_path):
    src = runs / "a_tp2" / STEP2
    out = tmp_path / "out"

    def error(checkpoint, tp, dp=None, kind=ValueError) -> str:
        with pytest.raises(kind) as err:
            rs.reshard_checkpoint(checkpoint, out, tp, dp)
        return str(err.value)

    assert error(src, 3) == "tensor-parallel size 3 does not divide num_heads 4"
    assert error(src, 0) == "tensor-parallel size must be a positive integer, got 0"
    assert error(src, 1, 0) == "data-parallel size must be a positive integer, got 0"
    batch = read_metadata(src)["global_batch_size"]  # resume checks it: a DP size not dividing it never resumes
    assert error(src, 1, batch + 1) == (f"the checkpoint's global batch {batch} is not divisible by data-parallel "
                                        f"size {batch + 1}: no run on it keeps that batch (micro_batch_size · "
                                        "grad_accum_steps · DP); give --dp-size a divisor of it")
    vocab = _copy(src, tmp_path / "vocab")
    _edit_meta(vocab, vocab_size=5)
    assert error(vocab, 4) == ("tensor-parallel size 4 would leave TP rank 3 no vocabulary id of vocab_size 5 (2 rows "
                               "per rank): use a TP size at which every rank owns some (1, 2, 3, 5)")
    ffn = _copy(src, tmp_path / "ffn")
    _edit_meta(ffn, ffn_hidden_size=66)
    assert error(ffn, 4) == "tensor-parallel size 4 does not divide ffn_hidden_size 66"
    assert error(tmp_path, 1, kind=FileNotFoundError) == \
        f"{tmp_path} is not a complete checkpoint: metadata.json not found"
    partial = _copy(src, tmp_path / "partial")
    (partial / "optimizer_tp01_dp000.pt").unlink()
    assert error(partial, 1) == f"checkpoint {partial} is missing files: optimizer_tp01_dp000.pt"
    assert not out.exists(), "nothing is written before the checks pass"

    # Replicated tensors that differ between TP ranks (weights, then an Adam moment).
    bad = _copy(src, tmp_path / "bad_weight")
    tensors = load_file(str(bad / "model_tp01.safetensors"))
    tensors["norm.weight"] = tensors["norm.weight"] + 1
    save_file(tensors, str(bad / "model_tp01.safetensors"))
    _reseal(bad)
    assert error(bad, 1) == f"{bad}: the weight of replicated parameter norm.weight differs between TP ranks 0 and 1"
    bad = _copy(src, tmp_path / "bad_moment")
    shard = torch.load(bad / "optimizer_tp01_dp000.pt", weights_only=True)
    offset = {n: o for n, _, o in shard["params"]}["layers.1.self_attn.k_proj.weight"]
    shard["exp_avg_sq"][offset] += 1
    torch.save(shard, bad / "optimizer_tp01_dp000.pt")
    _reseal(bad)
    assert error(bad, 1) == (f"{bad}: the exp_avg_sq of replicated parameter layers.1.self_attn.k_proj.weight differs "
                             "between TP ranks 0 and 1")
    bad = _copy(src, tmp_path / "bad_step")
    shard = torch.load(bad / "optimizer_tp01_dp000.pt", weights_only=True)
    torch.save({**shard, "step": 5}, bad / "optimizer_tp01_dp000.pt")
    _reseal(bad)
    assert error(bad, 1) == f"{bad}: the optimizer shards of the TP ranks are at different steps [2, 5]"
    bad = _copy(src, tmp_path / "bad_model")
    tensors = load_file(str(bad / "model_tp01.safetensors"))
    save_file({n: t for n, t in tensors.items() if n != "norm.weight"}, str(bad / "model_tp01.safetensors"))
    _reseal(bad)
    assert error(bad, 1) == (f"{bad / 'model_tp01.safetensors'} does not hold TP rank 1's slices of the model in "
                             "metadata.json: missing norm.weight")
    assert complete_checkpoints(out / "checkpoints") == [] and list((out / "checkpoints").iterdir()) == []


def test_default_dp_size():
    assert [rs.default_dp_size(w, tp) for w, tp in ((2, 1), (8, 2), (1, 2), (2, 2), (4, 8))] == [2, 4, 1, 1, 1]
    with pytest.raises(ValueError) as err:
        rs.default_dp_size(6, 4)
    assert str(err.value) == ("the checkpoint's world size 6 is not divisible by the new tensor-parallel size 4: give "
                              "the data-parallel size (--dp-size)")


def test_a_failed_reshard_leaves_no_checkpoint(runs, tmp_path, monkeypatch):
    save, calls = ckpt.write_checkpoint_file, []

    def fail_on_the_third_file(write, path):
        calls.append(path.name)
        if len(calls) == 3:
            write = disk_full
        save(write, path)

    def disk_full(path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 93184 vs 93072")

    monkeypatch.setattr(ckpt, "write_checkpoint_file", fail_on_the_third_file)
    with pytest.raises(OSError, match=r"could not write checkpoint file .*/optimizer_tp00_dp001\.pt \(\d+\.\d\d GiB "
                                      r"free there\): \[enforce fail.*unexpected pos"):
        rs.reshard_checkpoint(runs / "a_tp2" / STEP2, tmp_path / "out", 1, 2)
    root = tmp_path / "out" / "checkpoints"
    assert list(root.iterdir()) == [], "the temp folder is removed, no `latest`"
    monkeypatch.setattr(ckpt, "write_checkpoint_file", save)
    path = rs.reshard_checkpoint(runs / "a_tp2" / STEP2, tmp_path / "out", 1, 2)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000002"] and read_metadata(path)["dp_size"] == 2


def test_a_step_folder_in_the_way_is_refused_before_writing(runs, tmp_path, monkeypatch):
    """A non-checkpoint OUTPUT/checkpoints/step_N: every file was written, then the rename failed ("Directory
    not empty") and the full .step_N.tmp stayed; a failed rename now leaves nothing either."""
    root = tmp_path / "out" / "checkpoints"
    (root / "step_0000002").mkdir(parents=True)
    (root / "step_0000002" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError) as err:
        rs.reshard_checkpoint(runs / "a_tp2" / STEP2, tmp_path / "out", 1, 2)
    assert str(err.value) == (f"{root / 'step_0000002'} is in the way (it is not a checkpoint): move it, or reshard "
                              "into a new run directory")
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002"]

    def failing_rename(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(rs.os, "rename", failing_rename)
    with pytest.raises(OSError, match="Invalid cross-device link"):
        rs.reshard_checkpoint(runs / "a_tp2" / STEP2, tmp_path / "other", 1, 2)
    assert list((tmp_path / "other" / "checkpoints").iterdir()) == [], "no .step_N.tmp left"


def test_an_output_inside_the_source_is_refused(runs, tmp_path, capsys):
    """OUTPUT = the source step folder was accepted (exit 0): the new run was written inside the checkpoint."""
    run = _copy(runs / "b_tp1", tmp_path / "run")
    step = run / STEP2
    cases = [(step, step, f"{step} is the run or checkpoint being resharded ({step})"),
             (step, step / "tp2", f"{step / 'tp2'} is inside the run or checkpoint being resharded ({step})"),
             (step, run / "tp2", f"{run / 'tp2'} is inside the run or checkpoint being resharded ({run})"),
             (run, run, f"{run} is the run or checkpoint being resharded ({run})")]
    before = sorted(str(p) for p in run.rglob("*"))
    for checkpoint, output, message in cases:
        assert main(["reshard", "--checkpoint", str(checkpoint), "--tp-size", "2", "--output", str(output)]) == 2
        assert capsys.readouterr().err == f"megamath reshard: error: {message}: reshard into a new run directory\n"
    assert sorted(str(p) for p in run.rglob("*")) == before, "nothing written into the source"


def test_a_second_writer_on_the_output_is_refused(runs, tmp_path, capsys):
    """Two reshards into one OUTPUT shared its temp folder, each deleting the other's files; a training there
    would race it too. The output's run lock refuses the second at once."""
    out = tmp_path / "out"
    argv = ["reshard", "--checkpoint", str(runs / "a_tp2" / STEP2), "--tp-size", "1", "--output", str(out)]
    with FolderLock(out, "training"):  # or another reshard: any holder
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"megamath reshard: error: {out} is in use by a training (pid ") and \
            err.count("\n") == 1, err
        assert not (out / "checkpoints").exists()
    assert main(argv) == 0 and complete_checkpoints(out / "checkpoints")


def test_direct_resume_refuses_another_model(runs):
    config = TrainConfig.from_dict(config_a(runs, "x", 1, model__hidden_size=48, model__num_heads=6,
                                            model__num_kv_heads=3))
    state = ParallelState.single()
    model = loop.build_model(config, state)
    optimizer = ZeroOptimizer(model, state, config.optimizer, model.split_parameter_names())
    with pytest.raises(ValueError) as err:
        rs.load_checkpoint_any_tp(runs / "a_tp2" / STEP2, model, optimizer, state)
    assert str(err.value).startswith(f"checkpoint {runs / 'a_tp2' / STEP2} holds a model of another shape than this "
                                     "run's: wrong shapes embed_tokens.weight (64, 32) (expected (64, 48))")
    optimizer.remove_hooks()


# ---- sequence-parallel gradients -----------------------------------------------------------------------------

def test_sequence_parallel_grads_are_summed_in_zeros_flat_buffer(runs):
    for rank in range(2):
        grads = torch.load(runs / f"sp_grads{rank}.pt")
        for name, serial in grads["serial"].items():
            assert torch.equal(grads["zero"][name], grads["plain"][name]), name  # one function, two homes
            torch.testing.assert_close(grads["zero"][name], serial, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(grads["partial"][name], serial, rtol=1e-5, atol=1e-6), name


def test_load_param_states_refuses_a_wrong_size_and_changes_nothing(runs):
    config = TrainConfig.from_dict(config_b(runs, "x", 1))
    state = ParallelState.single()
    model = loop.build_model(config, state)
    optimizer = ZeroOptimizer(model, state, config.optimizer, model.split_parameter_names())
    before = {k: getattr(optimizer, k).clone() for k in KEYS}
    source = rs.TrainCheckpoint(runs / "b_tp1" / STEP2)

    def states(name):
        full = source.param_state(name)
        return {k: v[:-1] if name == "norm.weight" else v for k, v in full.items()}

    with pytest.raises(ValueError) as err:
        optimizer.load_param_states(states, 2)
    assert str(err.value) == "load_param_states: master of norm.weight has 31 elements, the parameter 32"
    assert all(torch.equal(getattr(optimizer, k), before[k]) for k in KEYS) and optimizer.step_count == 0
    optimizer.load_param_states(source.param_state, 2)  # TP 1 -> TP 1: the saved shard itself
    saved = shards(runs / "b_tp1" / STEP2, 1, 1)[0][0]
    assert all(torch.equal(getattr(optimizer, k), saved[k]) for k in KEYS) and optimizer.step_count == 2
    assert all(torch.equal(p.detach(), optimizer.master[s.offset:s.offset + s.numel].view_as(p))
               for s, p in zip(optimizer.slots, optimizer.params))
    optimizer.remove_hooks()
