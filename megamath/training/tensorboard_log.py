"""The metrics.jsonl scalars as TensorBoard events (`logging.tensorboard: true`), in RUN_DIR/tensorboard/ or
logging.tensorboard_dir.

metrics.jsonl stays the source of truth (reports read it); this is for people who watch runs in
TensorBoard beside other jobs. Nested values become tags with a slash: `phases/forward`,
`val_loss/arxiv`. Imported only when asked for, so a run without it never loads tensorboard.

A folder outside RUN_DIR is not covered by the run directory's lock, and TensorBoard reads one folder as one
run: two jobs writing there would be drawn as one curve, and a resume's purge of the steps it redoes would drop
the other job's. So such a folder is claimed: CLAIM_NAME in it names the RUN_DIR whose events it holds, and a
start from another RUN_DIR is refused, as is a folder already holding events that no run claimed.
"""
from __future__ import annotations

import os
from pathlib import Path

CLAIM_NAME = "megamath_run_dir.txt"


def claim(directory: Path, run_dir: Path) -> None:
    """Make `directory` the events folder of the run in `run_dir`, or raise a one-line error saying why not."""
    directory, owner = Path(directory), str(Path(run_dir).resolve())
    if directory.resolve().is_relative_to(owner):  # inside RUN_DIR: the run's lock already covers it
        return
    where = f"logging.tensorboard_dir {directory}"
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{where} is a file, not a folder: give a folder for the events")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{where}: cannot create it ({err.strerror or err}): give a folder this job can write") \
            from None
    marker = directory / CLAIM_NAME
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # exclusive: two jobs starting at once
    except FileExistsError:
        held = marker.read_text(encoding="utf-8", errors="replace").strip()
        if held != owner:
            raise ValueError(f"{where} holds the events of the run in {held}: give this run its own folder "
                             f"(e.g. {directory / Path(owner).name}), so that TensorBoard does not draw two runs "
                             "as one") from None
        return
    except OSError as err:
        raise ValueError(f"{where}: cannot write there ({err.strerror or err}): give a folder this job can write") \
            from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(owner + "\n")
    foreign = sorted(p.name for p in directory.glob("events.out.tfevents.*"))
    if foreign:
        marker.unlink()
        raise ValueError(f"{where} already holds TensorBoard events of another job ({foreign[0]}), not claimed by a "
                         "megamath run: give this run its own folder")


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """Every number in a metrics record, nested dicts flattened to `a/b` tags (step and flags left out)."""
    out = {}
    for key, value in rec.items():
        if key == "step" or isinstance(value, bool) or value is None:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, tag + "/"))
        elif isinstance(value, (int, float)):
            out[tag] = float(value)
    return out


class TensorBoardLog:
    """One SummaryWriter per run; `write(rec)` adds the record's scalars at its step.

    `first_step` is the step this process starts at: TensorBoard drops the events of that step and later
    ones left by an earlier attempt (a resumed run redoes them), as metrics.jsonl drops their lines."""

    def __init__(self, directory: Path, first_step: int, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(f"logging.tensorboard needs the tensorboard package ({err}): pip install tensorboard") \
                from None
        claim(directory, run_dir)
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=first_step)

    def write(self, rec: dict) -> None:
        for tag, value in scalars(rec).items():
            self.writer.add_scalar(tag, value, global_step=rec["step"])

    def close(self) -> None:
        self.writer.close()
