"""Optional Weights & Biases logging: the records of metrics.jsonl, sent to a W&B run as well.

W&B is one more sink beside metrics.jsonl, never the record of the run: the package is optional, only
global rank 0 talks to it, and `mode: offline` writes the run under RUN_DIR/wandb/ with no network (sync
it later with `wandb sync RUN_DIR/wandb/offline-run-*`). A resumed run continues the same W&B run: its
id is kept in RUN_DIR/wandb_run_id, written whole (by rename) before the W&B run starts (W&B keeps the first
values of steps a resumed run redoes; metrics.jsonl keeps the redone ones). The package is imported only when
`project` is set, and a missing package is reported on every rank before the first step, so a multi-rank job
fails together instead of hanging.
"""
from __future__ import annotations

import importlib
import importlib.util
import secrets
from dataclasses import dataclass
from pathlib import Path

from megamath.atomic_io import write_text_atomically

WANDB_MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "wandb_run_id"


@dataclass
class WandbConfig:
    project: str | None = None
    """W&B project; null (the default) turns W&B off. GPT-NeoX: wandb_project."""
    group: str | None = None
    """Runs grouped together in the W&B UI (GPT-NeoX: wandb_group)."""
    name: str | None = None
    """Display name of the run; null lets W&B pick one."""
    mode: str = "online"
    """`online`, `offline` (no network: written under RUN_DIR/wandb/, synced later) or `disabled`."""
    entity: str | None = None
    """W&B team or user the run belongs to; null: the logged-in user's default (GPT-NeoX: wandb_team)."""

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")
        for name in ("project", "group", "name", "entity"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"logging.wandb.{name} must be a non-empty string or null, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.project is not None and self.mode != "disabled"


def import_wandb(config: WandbConfig, load: bool = True):
    """The wandb module when W&B is on (None when it is off); a clear error when it is on but not installed.
    `load=False` only checks that it is installed (ranks that do not log skip the slow import)."""
    if not config.enabled:
        return None
    try:
        if not load:
            if importlib.util.find_spec("wandb") is None:
                raise ImportError("wandb")
            return None
        return importlib.import_module("wandb")
    except ImportError:
        raise ValueError("logging.wandb.project is set but the wandb package is not installed: "
                         "pip install wandb (or pip install 'megamath[wandb]'), or remove logging.wandb") from None


def flatten_record(rec: dict) -> dict:
    """A metrics.jsonl record as W&B scalars: `val_loss: {name: x}` becomes `val_loss/name`; nulls are left out."""
    out = {}
    for key, value in rec.items():
        if isinstance(value, dict):
            out.update({f"{key}/{name}": v for name, v in value.items() if v is not None})
        elif value is not None and key != "step":
            out[key] = value
    return out


class WandbSink:
    """A started W&B run that receives every metrics record (rank 0 only)."""

    def __init__(self, wandb, config: WandbConfig, run_dir: Path, run_config: dict | None) -> None:
        self.wandb = wandb
        id_file = Path(run_dir) / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:  # kept before the run starts, and whole: a cut or lost id makes the resumed run a new W&B run
            run_id = secrets.token_hex(4)
            write_text_atomically(id_file, run_id + "\n")
        try:
            self.run = wandb.init(project=config.project, group=config.group, name=config.name,
                                  entity=config.entity, mode=config.mode, dir=str(run_dir), id=run_id,
                                  resume="allow", config=run_config)
        except wandb.errors.Error as err:  # W&B's own refusals (no API key, no such entity, ...): one line
            raise ValueError(f"logging.wandb: W&B could not start the run: {' '.join(str(err).split())} "
                             "(log in with `wandb login` or WANDB_API_KEY, or set logging.wandb.mode to offline)"
                             ) from err

    def log(self, rec: dict) -> None:
        self.run.log(flatten_record(rec), step=rec["step"])

    def close(self) -> None:
        self.run.finish()
