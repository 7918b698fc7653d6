"""The metrics.jsonl scalars as TensorBoard events (`logging.tensorboard: true`), in RUN_DIR/tensorboard/.

metrics.jsonl stays the source of truth (reports read it); this is for people who watch runs in
TensorBoard beside other jobs. Nested values become tags with a slash: `phases/forward`,
`val_loss/arxiv`. Imported only when asked for, so a run without it never loads tensorboard.
"""
from __future__ import annotations

from pathlib import Path


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

    def __init__(self, directory: Path, first_step: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(f"logging.tensorboard needs the tensorboard package ({err}): pip install tensorboard") \
                from None
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=first_step)

    def write(self, rec: dict) -> None:
        for tag, value in scalars(rec).items():
            self.writer.add_scalar(tag, value, global_step=rec["step"])

    def close(self) -> None:
        self.writer.close()
