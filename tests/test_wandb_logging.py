"""Optional W&B logging: an offline run writes its run folder with the scalars of metrics.jsonl, and W&B
switched on without the package is one clear error. The package is a dev dependency (so `make test` runs
this); where it is not installed the run test skips and says so."""
import json
import time
from pathlib import Path

import pytest

from megamath.atomic_io import WriteError
from megamath.training.config import TrainConfig
from megamath.training.wandb_log import WandbConfig, WandbSink, flatten_record, import_wandb
from disk_full import file_size_limit
from test_train_loop import metrics, raw_config, run


def test_flatten_record_matches_metrics_keys():
    rec = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "mfu": None, "val_loss": {"arxiv": 2.0}}
    assert flatten_record(rec) == {"loss": 2.5, "lr": 1e-3, "val_loss/arxiv": 2.0}


SMALL = {"data": {"seq_length": 64}}


def test_config_section_and_bad_mode():
    raw = {**SMALL, "logging": {"wandb": {"project": "p", "group": "g", "name": "n", "mode": "offline"}}}
    config = TrainConfig.from_dict(raw)
    assert config.logging.wandb == WandbConfig(project="p", group="g", name="n", mode="offline")
    assert not TrainConfig.from_dict(SMALL).logging.wandb.enabled
    with pytest.raises(ValueError, match="logging.wandb.mode"):
        TrainConfig.from_dict({**SMALL, "logging": {"wandb": {"project": "p", "mode": "cloud"}}})
    with pytest.raises(ValueError, match="unknown key 'logging.wandb.team'"):
        TrainConfig.from_dict({**SMALL, "logging": {"wandb": {"team": "x"}}})


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # makes `import wandb` fail
    for load in (True, False):  # rank 0 imports it, the other ranks only look for it
        with pytest.raises(ValueError, match="pip install wandb"):
            import_wandb(WandbConfig(project="p", mode="offline"), load=load)
    assert import_wandb(WandbConfig()) is None  # off: never imported


def test_offline_run_writes_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb): the offline run is not tested")
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=6, eval_every=3, eval_batches=1,
                     checkpoint__save_every=0, schedule__decay_steps=6)
    raw["logging"] = {"wandb": {"project": "megamath-test", "group": "g1", "name": "tiny", "mode": "offline"}}
    run(raw)
    records = metrics(tmp_path / "run")
    folders = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, list((tmp_path / "run").rglob("*"))
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert folders[0].name.endswith(run_id) and list(folders[0].glob(f"run-{run_id}.wandb"))
    # The run file's history holds one row per step with every scalar of the metrics.jsonl record.
    from wandb.proto import wandb_internal_pb2
    rows, kinds, deadline = [], [], time.monotonic() + 60
    while "exit" not in kinds and time.monotonic() < deadline:  # W&B's writer process may still be flushing
        time.sleep(0.2)
        records_ = [wandb_internal_pb2.Record.FromString(data)
                    for data in read_wandb_records(next(folders[0].glob("*.wandb")))]
        kinds = [record.WhichOneof("record_type") for record in records_]
    for record, kind in zip(records_, kinds):
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    assert [row["_step"] for row in rows] == [r["step"] for r in records]
    for row, rec in zip(rows, records):
        expected = flatten_record(rec)
        assert {k: row[k] for k in expected} == pytest.approx(expected)
    assert "val_loss/arxiv" in rows[2] and "val_loss/arxiv" not in rows[1]


def read_wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte `:W&B` header, then LevelDB's log format (32 KiB blocks of
    records with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 or len(payload) < length:  # the end, or a record still being written (read it next time)
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            records.append(pending)
    return records


class StandInWandb:
    """The part of the wandb module WandbSink uses; `init` records the id it was given and what the id file held."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.inits = run_dir, []

    def init(self, **kwargs):
        id_file = self.run_dir / "wandb_run_id"
        self.inits.append((kwargs["id"], id_file.read_text() if id_file.is_file() else None))
        return self


def test_the_run_id_is_kept_whole_before_the_wandb_run_starts(tmp_path):
    """It was written in place after wandb.init: a full disk left a cut id (the resumed run became another W&B
    run), and a kill during init left none."""
    wandb, config = StandInWandb(tmp_path), WandbConfig(project="p", mode="offline")
    with file_size_limit(4), pytest.raises(WriteError, match=r"could not write .*wandb_run_id \(.*File too large"):
        WandbSink(wandb, config, tmp_path, None)  # the disk fills while the new id is written
    assert list(tmp_path.iterdir()) == [] and wandb.inits == []  # no cut id, no temporary; W&B not started
    WandbSink(wandb, config, tmp_path, None)
    run_id, held = wandb.inits[0]
    assert held == run_id + "\n" and len(run_id) == 8  # on disk before W&B starts
    WandbSink(wandb, config, tmp_path, None)  # a resume: the same W&B run
    assert wandb.inits[1] == (run_id, run_id + "\n") and [p.name for p in tmp_path.iterdir()] == ["wandb_run_id"]


def test_a_run_wandb_refuses_is_one_clear_error(tmp_path):
    """Online without an API key, wandb.init raises its UsageError: it reached the user as a 37-line traceback."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed: its error classes are needed")

    class RefusingWandb:
        errors = wandb.errors

        def init(self, **kwargs):
            raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    with pytest.raises(ValueError, match=r"^logging\.wandb: W&B could not start the run: No API key configured\. "
                                         r"Use `wandb login` to log in\. \(log in with `wandb login` or "
                                         r"WANDB_API_KEY, or set logging\.wandb\.mode to offline\)$"):
        WandbSink(RefusingWandb(), WandbConfig(project="p"), tmp_path, None)

