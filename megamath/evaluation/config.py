"""The training config's `evaluation` section: few-shot tasks run on the model being trained.

    evaluation:
      tokenizer_model: runs/demo/tokenizer.model
      data_dir: runs/demo/eval          # task data paths are relative to it (optional)
      tasks:
        - {name: demo-arith, data: demo-arith.jsonl, limit: 70}
        - {name: gsm8k, data: gsm8k_test.jsonl, shots: 8, limit: 200, maj: 4}

The tasks run every `eval_every` steps, beside the validation loss; results go to metrics.jsonl as
`eval/<task>/maj1` and `eval/<task>/maj<k>`. This module holds only the dataclasses (the training
config imports it); megamath.evaluation.during_training runs them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EvalTaskConfig:
    name: str
    """A task of megamath.evaluation.tasks: gsm8k, math or demo-arith."""
    data: str
    """Its data file or folder (relative to evaluation.data_dir when that is set)."""
    shots: int | None = None
    """Exemplars in the prompt (null: the task's default)."""
    limit: int | None = None
    """Evaluate the first `limit` problems (null: all)."""
    maj: int = 1
    """k of maj@k; 1 runs greedy decoding only."""
    max_new_tokens: int | None = None
    """null: the task's default."""

    def __post_init__(self) -> None:
        from megamath.evaluation.tasks import TASKS  # light: the task table, no model code

        for key in ("name", "data"):  # YAML hands over lists, numbers and nulls as they are
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string, got {value!r}")
        if self.name not in TASKS:
            raise ValueError(f"task {self.name!r} is unknown; choose one of {', '.join(TASKS)}")
        for key, low in (("shots", 0), ("limit", 1), ("maj", 1), ("max_new_tokens", 1)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


@dataclass
class EvaluationConfig:
    tasks: list = field(default_factory=list)
    """Tasks to run every eval_every steps: mappings with the fields of EvalTaskConfig."""
    tokenizer_model: str | None = None
    """SentencePiece model of the training data (needed when tasks are listed)."""
    data_dir: str | None = None
    """Folder the tasks' data paths are relative to (null: as written)."""
    temperature: float = 0.6
    """Sampling temperature of the maj@k votes."""
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, list):
            raise ValueError(f"evaluation.tasks must be a list of mappings, got {self.tasks!r}")
        for key in ("tokenizer_model", "data_dir"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"evaluation.{key} must be a non-empty path or null, got {value!r}")
        tasks = []
        for i, task in enumerate(self.tasks):
            if isinstance(task, EvalTaskConfig):
                tasks.append(task)
                continue
            if not isinstance(task, dict):
                raise ValueError(f"evaluation.tasks[{i}] must be a mapping, got {task!r}")
            known = {f.name for f in dataclasses.fields(EvalTaskConfig)}
            unknown = sorted(set(task) - known)
            if unknown or "name" not in task or "data" not in task:
                raise ValueError(f"evaluation.tasks[{i}]: needs name and data, takes {', '.join(sorted(known))}"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            try:
                tasks.append(EvalTaskConfig(**task))
            except ValueError as err:
                raise ValueError(f"evaluation.tasks[{i}]: {err}") from None
        self.tasks = tasks
        if tasks and not self.tokenizer_model:
            raise ValueError("evaluation.tokenizer_model is required when evaluation.tasks are listed")
        # Checked here: otherwise a bad value stops the run only when its first evaluation begins.
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"evaluation.temperature must be >= 0 and finite, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"evaluation.top_p must be in (0, 1], got {self.top_p!r}")
        for key, low in (("seed", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"evaluation.{key} must be an integer >= {low}, got {value!r}")

    def check_room(self, max_seq_length: int) -> None:
        """Each task's max_new_tokens must leave a prompt room in the model's context (as `megamath eval` asks)."""
        from megamath.evaluation.tasks import get_task

        for task in self.tasks:
            max_new = task.max_new_tokens or get_task(task.name).max_new_tokens
            if max_seq_length - max_new < 2:
                raise ValueError(f"evaluation task {task.name}: max_new_tokens {max_new} leaves no room for a prompt "
                                 f"in model.max_seq_length {max_seq_length}")

    def data_path(self, task: EvalTaskConfig) -> Path:
        return Path(self.data_dir) / task.data if self.data_dir else Path(task.data)
