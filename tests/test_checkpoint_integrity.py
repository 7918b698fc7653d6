"""Checkpoints that cannot lie: checksums verified on load, resume falling back to the newest intact
checkpoint, `megamath checkpoint verify`, the last good checkpoint kept through a divergence."""
import json
import re
import shutil

import pytest
import torch

from megamath.cli import main
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.training import loop
from megamath.training.checkpoint import (LATEST, CheckpointIntegrityError, _saved_after_good_update,
                                          latest_checkpoint, load_checkpoint, prune_checkpoints, read_metadata)
from megamath.training.checkpoint_integrity import sealed_metadata_text
from megamath.training.checkpoint_verify import verify_checkpoint
from megamath.training.config import TrainConfig
from test_train_loop import (assert_bitwise_equal, final_state, inject_nonfinite, metrics, one_thread,  # noqa: F401
                             raw_config, run, untimed)

FILES = {"model": "model_tp00.safetensors", "optimizer": "optimizer_tp00_dp000.pt", "rng": "rng_rank00000.pt"}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """8 steps, checkpoints at 4 and 8: the reference every damaged copy must come back to."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("good")
    run(raw_config(tmp / "data", tmp / "run"))
    torch.set_num_threads(before)
    return tmp


def damage(path, fault: str) -> None:
    data = path.read_bytes()
    if fault == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    elif fault == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("fault", ["flip", "truncate", "missing"])
@pytest.mark.parametrize("kind", list(FILES))
def test_damaged_checkpoint_falls_back_to_the_previous_intact_one(good_run, tmp_path, one_thread, capsys, kind,
                                                                  fault):
    shutil.copytree(good_run / "run", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    damage(root / "step_0000008" / FILES[kind], fault)
    expected = {"flip": r"has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}", "truncate": r"is \d+ bytes, expected \d+",
                "missing": r"is missing \(expected \d+ bytes\)"}[fault]
    ok, line = verify_checkpoint(root / "step_0000008")
    assert not ok and line.startswith(f"{root / 'step_0000008'}: BROKEN: checkpoint file "
                                      f"{root / 'step_0000008' / FILES[kind]} ")
    assert re.search(expected, line), line

    result = run(raw_config(good_run / "data", tmp_path / "run"))  # resume=auto: walks back to step 4
    out = capsys.readouterr().out
    assert f"skipped checkpoint step_0000008: checkpoint file {root / 'step_0000008' / FILES[kind]} " in out
    assert "renamed it to step_0000008.corrupt for inspection" in out and "resumed from" in out
    assert result.step == 8
    # nothing good lost: the broken checkpoint is set aside, not deleted; the continuation is exact
    assert (root / "step_0000008.corrupt").is_dir() and (root / "step_0000004").is_dir()
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(good_run / "run", 8))
    assert [r["loss"] for r in metrics(tmp_path / "run")][-4:] == [r["loss"] for r in metrics(good_run / "run")][-4:]
    assert verify_checkpoint(root / "step_0000008")[0]
    # `megamath checkpoint verify RUN_DIR`: one line per checkpoint, exit 1 because one is broken
    assert main(["checkpoint", "verify", str(tmp_path / "run")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(root / n) for n in
                                                      ("step_0000004", "step_0000008", "step_0000008.corrupt")]
    assert "intact, step 4" in lines[0] and "intact, step 8" in lines[1] and "BROKEN" in lines[2]


def test_load_checkpoint_refuses_a_damaged_file_naming_it(good_run, tmp_path):
    shutil.copytree(good_run / "run" / "checkpoints" / "step_0000004", tmp_path / "step")
    config, state = TrainConfig.from_dict(raw_config(good_run / "data", tmp_path / "x")), ParallelState.single()
    model = loop.build_model(config, state)
    optimizer = ZeroOptimizer(model, state, config.optimizer)
    damage(tmp_path / "step" / FILES["optimizer"], "flip")
    with pytest.raises(CheckpointIntegrityError, match=rf"^checkpoint file {tmp_path / 'step' / FILES['optimizer']} "
                                                        r"has sha256 \w+, expected \w+ \(its contents changed"):
        load_checkpoint(tmp_path / "step", model, optimizer, state)
    optimizer.remove_hooks()
    assert main(["checkpoint", "verify", str(tmp_path / "step")]) == 1


def test_every_checkpoint_broken_is_an_error_not_a_fresh_start(good_run, tmp_path, capsys):
    shutil.copytree(good_run / "run", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    for step in (4, 8):
        damage(root / f"step_{step:07d}" / FILES["model"], "truncate")
    with pytest.raises(CheckpointIntegrityError, match=r"no intact checkpoint in .*: step_0000008, step_0000004 "
                                                       r"failed verification"):
        run(raw_config(good_run / "data", tmp_path / "run"))
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000004.corrupt", "step_0000008.corrupt"]


def test_a_latest_pointer_outside_the_run_is_refused(good_run, tmp_path, one_thread, capsys):
    shutil.copytree(good_run / "run", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    (root / LATEST).write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match=r"holds '\.\./\.\./elsewhere', not the name of a step_NNNNNNN folder"):
        latest_checkpoint(tmp_path / "run")
    assert run(raw_config(good_run / "data", tmp_path / "run")).step == 8  # walks back to the newest intact one
    assert "resuming from step_0000008, the newest intact checkpoint" in capsys.readouterr().out
    assert (root / LATEST).read_text() == "step_0000008\n"


def test_checksums_are_recorded_for_every_file(good_run):
    meta = read_metadata(good_run / "run" / "checkpoints" / "step_0000008")
    assert sorted(meta["checksums"]) == sorted(meta["files"]) and meta["update_ok"] is True
    assert all(len(c["sha256"]) == 64 and c["bytes"] > 0 for c in meta["checksums"].values())
    assert not list((good_run / "run" / "checkpoints" / "step_0000008").glob(".sums*"))


# ---- divergence ---------------------------------------------------------------------------------------------

def test_divergence_never_removes_the_last_good_checkpoint(tmp_path, monkeypatch, one_thread, capsys):
    inject_nonfinite(monkeypatch, loss_steps=set(range(7, 100)))
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=20, max_consecutive_nonfinite=5,
                     checkpoint__save_every=2, checkpoint__keep=1)
    with pytest.raises(loop.NonFiniteError, match=r"5 consecutive steps \(7\.\.11\) .* The last checkpoint \(step 6\) "
                                                  r"is intact"):
        run(raw)
    out = capsys.readouterr().out
    assert "step 8: no checkpoint during a streak of skipped steps; the last one is step 6" in out
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000006"]
    assert latest_checkpoint(tmp_path / "run").name == "step_0000006" and verify_checkpoint(root / "step_0000006")[0]


def test_pruning_keeps_the_newest_checkpoint_saved_after_a_good_update(tmp_path):
    """Checkpoints saved mid-streak (by an older megamath) never push the last good one out."""
    root = tmp_path / "checkpoints"
    for step, ok in ((2, True), (4, True), (6, False), (8, False)):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "metadata.json").write_text(json.dumps({"update_ok": ok}))
    (root / LATEST).write_text("step_0000008\n")
    prune_checkpoints(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_0000004", "step_0000008"]


# ---- config and resume compatibility ------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("optimizer__lr", float("inf"), r"optimizer.lr must be in \(0, 1\], got inf"),
    ("optimizer__lr", float("nan"), r"^optimizer.lr must be a number >= 0, got nan$"),
    ("optimizer__lr", -1.0, r"optimizer.lr must be"),
    ("optimizer__lr", 0.0, r"optimizer.lr must be in \(0, 1\], got 0.0"),
    ("optimizer__lr", 5.0, r"optimizer.lr must be in \(0, 1\], got 5.0"),
    ("optimizer__eps", 0.0, r"optimizer.eps must be in \(0, 1\], got 0.0"),
    ("optimizer__clip_grad", float("inf"), r"optimizer.clip_grad must be >= 0 and finite, got inf"),
    ("optimizer__weight_decay", float("inf"), r"optimizer.weight_decay must be >= 0 and finite, got inf"),
    ("optimizer__beta2", 1.0, r"^optimizer.beta2 must be in \[0, 1\), got 1.0$"),
    ("model__rope_theta", float("inf"), r"^model.rope_theta must be finite, got inf$"),
    ("train_steps", 0, r"train_steps must be an integer >= 1, got 0"),
    ("micro_batch_size", 0, r"micro_batch_size must be an integer >= 1, got 0"),
    ("checkpoint__keep", 0, r"checkpoint.keep must be an integer >= 1, got 0"),
    ("parallel__bucket_mb", float("inf"), r"^parallel.bucket_mb must be a finite number >= 0 \(0: one bucket\), "
                                          r"got inf$"),
])
def test_out_of_range_config_values_are_refused(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "run", **{key: value}))


def test_cli_refuses_an_infinite_lr_in_one_line(tmp_path, capsys):
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw_config(tmp_path / "data", tmp_path / "run")))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "optimizer.lr=.inf"]) == 2
    assert capsys.readouterr().err == "megamath train: error: optimizer.lr must be in (0, 1], got inf\n"


def test_resume_with_another_model_shape_or_seq_length_is_refused(good_run, tmp_path, one_thread):
    shutil.copytree(good_run / "run", tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds a model of another shape than this run's: model.ffn_hidden_size 64 "
                                         r"\(checkpoint\) vs 96 \(this run\)"):
        run(raw_config(good_run / "data", tmp_path / "run", train_steps=10, model__ffn_hidden_size=96))
    with pytest.raises(ValueError, match=r"was trained with data.seq_length 32, this run's is 16: set "
                                         r"checkpoint.allow_seq_length_change=true"):
        run(raw_config(good_run / "data", tmp_path / "run", train_steps=10, data__seq_length=16))
    result = run(raw_config(good_run / "data", tmp_path / "run", train_steps=10, data__seq_length=16,
                            checkpoint__allow_seq_length_change=True))
    assert result.step == 10


def test_a_corrupt_metadata_file_falls_back_too(good_run, tmp_path, one_thread, capsys):
    shutil.copytree(good_run / "run", tmp_path / "run")
    meta = tmp_path / "run" / "checkpoints" / "step_0000008" / "metadata.json"
    meta.write_text(meta.read_text()[:100])
    assert run(raw_config(good_run / "data", tmp_path / "run")).step == 8
    assert f"skipped checkpoint step_0000008: {meta} is not valid JSON" in capsys.readouterr().out
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(good_run / "run", 8))


def flip_digit(meta_path, before: bytes, mask: int) -> None:
    """Flip bits of the character right after `before` in a metadata file: valid JSON, another value."""
    data = meta_path.read_bytes()
    at = data.index(before) + len(before)
    meta_path.write_bytes(data[:at] + bytes([data[at] ^ mask]) + data[at + 1:])


def unseal(meta_path) -> None:
    """Metadata as versions before the seal wrote it."""
    meta = json.loads(meta_path.read_text())
    del meta["metadata_sha256"]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
def test_a_metadata_file_naming_another_step_falls_back_too(good_run, tmp_path, one_thread, capsys, sealed):
    """One flipped bit turns `"step": 8` into `"step": 0`: valid JSON. Unchecked, the run restarted at step 0 on
    step 8's weights and erased metrics.jsonl. The seal catches it; without one (older metadata), the folder's
    name does."""
    shutil.copytree(good_run / "run", tmp_path / "run")
    meta = tmp_path / "run" / "checkpoints" / "step_0000008" / "metadata.json"
    if not sealed:
        unseal(meta)
    flip_digit(meta, b'"step": ', 0x08)  # '8' -> '0'
    assert run(raw_config(good_run / "data", tmp_path / "run")).step == 8
    expected = (r"has contents with sha256 [0-9a-f]{64}, expected [0-9a-f]{64} \(it changed after it was saved\)"
                if sealed else "says step 0, but its folder is step_0000008")
    assert re.search(f"skipped checkpoint step_0000008: {re.escape(str(meta))} {expected}",
                     capsys.readouterr().out)
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(good_run / "run", 8))
    assert untimed(metrics(tmp_path / "run")) == untimed(metrics(good_run / "run"))


def test_altered_metadata_is_broken_for_verify_and_resume_walks_back(good_run, tmp_path, one_thread, capsys):
    """A flipped digit of the global batch (or the DP size, the non-finite streak) is valid JSON naming the right
    step: before the seal, `checkpoint verify` called it intact and resume stopped on a batch mismatch (or a
    missing shard) instead of walking back to the intact step 4."""
    shutil.copytree(good_run / "run", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    meta = root / "step_0000008" / "metadata.json"
    flip_digit(meta, b'"global_batch_size": ', 0x01)
    ok, line = verify_checkpoint(root / "step_0000008")
    assert not ok and line.startswith(f"{root / 'step_0000008'}: BROKEN: {meta} has contents with sha256 "), line
    assert not _saved_after_good_update(root / "step_0000008")  # pruning does not trust it either
    assert run(raw_config(good_run / "data", tmp_path / "run")).step == 8
    out = capsys.readouterr().out
    assert "skipped checkpoint step_0000008" in out and "resumed from" in out and "step_0000004" in out
    assert (root / "step_0000008.corrupt").is_dir()
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(good_run / "run", 8))


def test_reshard_refuses_a_damaged_checkpoint_in_one_line(good_run, tmp_path, capsys):
    shutil.copytree(good_run / "run", tmp_path / "run")
    shard = tmp_path / "run" / "checkpoints" / "step_0000008" / FILES["optimizer"]
    damage(shard, "truncate")
    assert main(["reshard", "--checkpoint", str(tmp_path / "run"), "--tp-size", "2", "--output",
                 str(tmp_path / "tp2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megamath reshard: error: checkpoint file {shard} is ") and err.count("\n") == 1
    assert not list((tmp_path / "tp2" / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(checksums=[]), "checksums must map each file to its bytes and sha256"),
    (lambda m: m["checksums"].update({"rng_rank00000.pt": "x"}),
     "checksums must map each file to its bytes and sha256"),
    (lambda m: m.pop("config"), "config must be a mapping with a model mapping, got NoneType"),
    (lambda m: m["config"].update(model=None), "config must be a mapping with a model mapping, got dict"),
    (lambda m: m.update(world_size=None), "world_size must be an integer >= 1, got None"),
    (lambda m: m.update(dp_size="1"), "dp_size must be an integer >= 1, got '1'"),
])
def test_metadata_of_the_wrong_shape_is_broken_not_a_traceback(good_run, tmp_path, capsys, edit, message):
    """Sealed but malformed (as a buggy writer would leave it): `checkpoint verify` called some of these intact,
    and verify, reshard and convert stopped on AttributeError / TypeError / KeyError tracebacks."""
    shutil.copytree(good_run / "run", tmp_path / "run")
    meta_path = tmp_path / "run" / "checkpoints" / "step_0000008" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(sealed_metadata_text(meta))
    assert main(["checkpoint", "verify", str(meta_path.parent)]) == 1
    assert capsys.readouterr().out == f"{meta_path.parent}: BROKEN: {meta_path}: {message}\n"
    for argv in (["reshard", "--checkpoint", str(meta_path.parent), "--tp-size", "2", "--output", str(tmp_path / "r")],
                 ["convert", "megamath-to-hf", str(meta_path.parent), str(tmp_path / "hf")]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"megamath {argv[0]}: error: {meta_path}: {message}\n"


def _dp2_fallback_worker(rank, world_size, tmp):
    """Two DP ranks: train, damage a file that rank 1 verifies, resume: both must fall back together."""
    torch.set_num_threads(1)
    state = ParallelState.from_env(1)
    raw = raw_config(tmp / "data", tmp / "run")
    loop.train(TrainConfig.from_dict(raw), state)
    if rank == 0:
        shutil.copytree(tmp / "run", tmp / "damaged")
        # files: model, optimizer dp0, optimizer dp1, rng 0, rng 1; rank r checks files r, r + 2, ...
        damage(tmp / "damaged" / "checkpoints" / "step_0000008" / "optimizer_tp00_dp000.pt", "flip")
    torch.distributed.barrier()
    raw["run_dir"] = str(tmp / "damaged")
    loop.train(TrainConfig.from_dict(raw), state)


def test_two_ranks_agree_to_fall_back(tmp_path):
    from distributed import run_distributed
    from test_train_loop import write_corpus

    write_corpus(tmp_path / "data")
    run_distributed(_dp2_fallback_worker, 2, tmp_path)
    root = tmp_path / "damaged" / "checkpoints"
    assert (root / "step_0000008.corrupt").is_dir() and verify_checkpoint(root / "step_0000008")[0]
    assert_bitwise_equal(final_state(tmp_path / "damaged", 8, dp_size=2), final_state(tmp_path / "run", 8, dp_size=2))


def test_checkpoints_saved_before_checksums_still_resume(good_run, tmp_path, one_thread, capsys):
    shutil.copytree(good_run / "run", tmp_path / "run")
    meta_path = tmp_path / "run" / "checkpoints" / "step_0000004" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["checksums"], meta["update_ok"], meta["metadata_sha256"]
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000008")
    (tmp_path / "run" / "checkpoints" / LATEST).write_text("step_0000004\n")
    assert main(["checkpoint", "verify", str(meta_path.parent)]) == 0
    assert "intact, step 4, 3 files (saved without checksums: only presence checked)" in capsys.readouterr().out
    run(raw_config(good_run / "data", tmp_path / "run"))
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(good_run / "run", 8))


def test_an_explicit_resume_path_is_verified_and_never_replaced(good_run, tmp_path, one_thread):
    shutil.copytree(good_run / "run", tmp_path / "run")
    step4 = tmp_path / "run" / "checkpoints" / "step_0000004"
    damage(step4 / FILES["rng"], "flip")
    with pytest.raises(CheckpointIntegrityError, match=rf"^checkpoint file {step4 / FILES['rng']} has sha256"):
        run(raw_config(good_run / "data", tmp_path / "run", checkpoint__resume=str(step4)))
    assert step4.is_dir() and not (step4.parent / "step_0000004.corrupt").exists()  # left where the user put it


def test_complete_checkpoints_without_a_latest_pointer_are_resumed_not_ignored(good_run, tmp_path, one_thread,
                                                                               capsys):
    """A kill between the first save's rename and its pointer, or step folders copied without `latest`: auto
    started afresh from step 0 (and truncated metrics.jsonl), while `never` refused because of the same folders."""
    shutil.copytree(good_run / "run", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    shutil.rmtree(root / "step_0000008")
    (root / LATEST).unlink()
    assert run(raw_config(good_run / "data", tmp_path / "run")).step == 8
    out = capsys.readouterr().out
    assert f"warning: {root / LATEST} is missing though {root} holds complete checkpoints" in out
    assert f"resumed from {root / 'step_0000004'} at step 4" in out
    assert (root / LATEST).read_text() == "step_0000008\n"
    assert_bitwise_equal(final_state(tmp_path / "run", 8), final_state(good_run / "run", 8))
    assert untimed(metrics(tmp_path / "run")) == untimed(metrics(good_run / "run"))
