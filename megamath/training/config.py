"""A training run's configuration: dataclasses that a YAML file maps onto one to one.

A YAML section is a dataclass, a YAML key is a field (documented by the docstring under it); an
unknown key is an error that names it, because a misspelt `optimizer.lrr` silently falling back to a
default would waste a run. Command-line overrides are dotted keys (`optimizer.lr=1e-4`) whose values
are parsed as YAML scalars, applied to the raw mapping before validation. Nothing is executed.

The model section is a `ModelConfig`, given in full or as `preset: <name>` plus the fields to change.
The peak learning rate is `optimizer.lr`; `schedule` only shapes it (see schedule.py).

Why one file: it is one schema, the run's sections and the one walk (`_build`, `_coerce`) that checks each
key against its annotation and names the key it refuses; split, the fields would part from their checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from megamath.data.blending import parse_data_path
from megamath.data.megatron_order import check_sample_order, lone_prefix
from megamath.data.splits import canonical_split, parse_split
from megamath.evaluation.config import EvaluationConfig
from megamath.input_path import read_text
from megamath.model.config import ModelConfig
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.training.schedule import ScheduleConfig
from megamath.training.wandb_log import WandbConfig

# LLEMMA's ProofPile II weights. LLEMMA also mixed in general data: the Pile at 0.147368 and
# RedPajama code at 0.221053 (weights beside these 2, 4, 1), to limit forgetting; those are not
# ProofPile II and are left to an explicit data_path list (examples/llemma_7b.yaml shows it).
LLEMMA_MIXTURE = {"arxiv": 2.0, "open-web-math": 4.0, "algebraic-stack": 1.0}
PARAM_DTYPES = ("auto", "float32", "bfloat16")
INT64_LIMIT = 2**63  # config integers must be below it: they reach numpy and torch as int64


def proofpile_prefix(data_dir: str | Path, subset: str, split: str) -> str:
    """The dataset `megamath preprocess` writes for a ProofPile II subset and split."""
    return str(Path(data_dir) / f"{subset}_{split}_text_document")


@dataclass
class ParallelConfig:
    tp_size: int = 1
    """Tensor-parallel size: ranks that split each layer; the rest of the world is data parallel (ZeRO-1)."""
    sequence_parallel: bool = False
    """Split norms and residual activations along the sequence over the TP ranks (needs tp_size > 1)."""
    overlap_grad_reduce: bool = True
    """Start each ZeRO-1 gradient bucket's DP reduce-scatter inside the last micro-batch's backward, as soon as
    the bucket is complete, instead of after the backward (results are bit-identical either way)."""
    overlap_param_gather: bool = True
    """Leave each bucket's DP all-gather of the updated weights running until the next forward reaches its
    layers (a forward pre-hook waits), instead of waiting at the end of the step (bit-identical either way)."""
    overlap_optimizer_step: bool = False
    """AdamW bucket by bucket on a side CUDA stream once the gradient norm is known, in the forward's order:
    later layers update under the next forward of earlier ones, each waiting for its own buckets
    (bit-identical). Needs bucket_mb > 0 and, with DP, overlap_param_gather. The `optimizer` phase then
    times the norm and launches; the updates show in the next `forward`. Off: on one H200 it saved 2.5-3 % of
    the benchmark's step at micro-batch 1 and cost 3 % at micro-batch 2 (perf/results/train-2026-12-04*.md)."""
    bucket_mb: float = 128.0
    """MiB of gradients per ZeRO-1 bucket (0: one bucket, nothing to overlap). Smaller buckets start their
    reduce-scatter earlier; larger ones pay the collective's latency fewer times."""
    timeout_minutes: float = 10.0
    """How long a collective waits for the other ranks before the job stops with an error (Megatron-LM's
    --distributed-timeout-minutes, the same default). Raise it where a rank is slow for long on purpose: rank 0
    building a large blend's sample index while the others wait, or a save to a slow filesystem."""

    def __post_init__(self) -> None:
        _check_int("parallel.tp_size", self.tp_size, 1)
        _check_bool("parallel.sequence_parallel", self.sequence_parallel)
        _check_bool("parallel.overlap_grad_reduce", self.overlap_grad_reduce)
        _check_bool("parallel.overlap_param_gather", self.overlap_param_gather)
        _check_bool("parallel.overlap_optimizer_step", self.overlap_optimizer_step)
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or \
                not 0 <= self.bucket_mb < math.inf:  # inf: a traceback at the optimizer's build, after the data's
            raise ValueError(f"parallel.bucket_mb must be a finite number >= 0 (0: one bucket), got {self.bucket_mb!r}")
        self.bucket_mb = float(self.bucket_mb)
        minutes = self.timeout_minutes
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes < math.inf:
            raise ValueError(f"parallel.timeout_minutes must be a finite number of minutes > 0, got {minutes!r}")
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp_size > 1")


@dataclass
class DataConfig:
    data_path: list | str = field(default_factory=list)
    """Training blend: Megatron's `[W1, PREFIX1, W2, PREFIX2, ...]` (or one prefix), or `llemma`:
    LLEMMA's ProofPile II mixture (arxiv 2, open-web-math 4, algebraic-stack 1) of the train splits in data_dir."""
    data_dir: str | None = None
    """Folder of `megamath preprocess` outputs that `llemma` refers to ({subset}_{split}_text_document)."""
    valid_data: dict | str = field(default_factory=dict)
    """Validation sets reported one by one, `{name: prefix}`, or `llemma`: the validation split of each
    ProofPile II subset in data_dir. Empty: no evaluation (unless data.split holds some out)."""
    test_data: dict | str = field(default_factory=dict)
    """Test sets whose loss is taken once, after the last step (`test_loss`, beside data.split's test parts),
    `{name: prefix}`, or `llemma`: the test split of each ProofPile II subset in data_dir (Megatron-LM's
    --test-data-path, GPT-NeoX's test_data_paths)."""
    split: str | list | float | None = None
    """Megatron-LM's --split, e.g. `969,30,1`: train, validation and test shares of each data_path prefix's
    documents, cut in order as Megatron-LM cuts them (megamath.data.splits). The train parts form the blend;
    each validation part is a validation set named after its prefix (`.../arxiv_train_text_document` ->
    `arxiv`), reported beside valid_data's; each test part's loss is taken once, at the last step
    (`test_loss`), beside test_data's. None: every document trains."""
    seq_length: int = 4096
    """Tokens per sample fed to the model (each sample reads seq_length + 1, the targets shifted by one)."""
    seed: int = 1234
    """Shuffling seed of the sample indices (Megatron's --seed for the data)."""
    sample_order: str = "megamath"
    """`megamath`, or `megatron` / `neox`: the training samples in exactly the order that trainer gives for the
    same data_path, split, seed, seq_length and train_steps × global batch (Megatron-LM's --train-iters ×
    --global-batch-size at its default --mid-level-dataset-surplus; GPT-NeoX's train_iters × train_batch_size,
    with data.split cut as GPT-NeoX cuts it). A lone data_path prefix without a weight is read unblended, as
    Megatron-LM's --data-path and GPT-NeoX's data_path read it; give it a weight for a blend of one (GPT-NeoX's
    train_data_paths). megamath.data.megatron_order says where the orders differ. Validation and test sets keep
    megamath's fixed sample lists."""
    cache_dir: str | None = None
    """Where sample indices are cached; default RUN_DIR/index-cache."""

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str) and self.data_path != "llemma":
            self.data_path = [self.data_path]
        if not isinstance(self.data_path, (list, str)):
            raise ValueError(f"data.data_path must be a list [W1, PREFIX1, ...] or 'llemma', got {self.data_path!r}")
        if "llemma" in (self.data_path, self.valid_data, self.test_data) and self.data_dir is None:
            raise ValueError("data.data_dir is needed to find the 'llemma' datasets")
        for key in ("valid_data", "test_data"):
            value = getattr(self, key)
            if not isinstance(value, (dict, str)) or (isinstance(value, str) and value != "llemma"):
                raise ValueError(f"data.{key} must be a mapping {{name: prefix}} or 'llemma', got {value!r}")
            bad = [name for name, prefix in (value.items() if isinstance(value, dict) else ())
                   if not isinstance(prefix, str) or not prefix]
            if bad:
                raise ValueError(f"data.{key}: set {bad[0]!r} has no prefix (give {{name: path/to/prefix}}, without "
                                 ".bin/.idx)")
        _check_int("data.seq_length", self.seq_length, 1)
        _check_int("data.seed", self.seed, 0)
        check_sample_order(self.sample_order, "data.sample_order")
        if self.split is not None:
            self.split = canonical_split(self.split)  # one spelling, so that a resume compares like with like
        if self.data_path:
            self.train_blend()  # reject a malformed list now; an empty one is refused when training starts

    def train_blend(self) -> tuple[list[float], list[str]]:
        """(weights, prefixes) of the training blend, as given (not normalized)."""
        if self.data_path == "llemma":
            return (list(LLEMMA_MIXTURE.values()),
                    [proofpile_prefix(self.data_dir, s, "train") for s in LLEMMA_MIXTURE])
        if not self.data_path:
            raise ValueError("data.data_path is empty: give [W1, PREFIX1, ...], one PREFIX, or 'llemma'")
        try:
            return parse_data_path([str(item) for item in self.data_path])
        except ValueError as err:
            raise ValueError(f"data.data_path: {err}") from None

    def lone_prefix(self) -> bool:
        """Whether data_path is one prefix without a weight, which Megatron-LM and GPT-NeoX read without a blend."""
        return lone_prefix(self.data_path)

    def split_shares(self) -> tuple[float, float, float]:
        """(train, valid, test) shares of each training prefix's documents: (1, 0, 0) without data.split."""
        return (1.0, 0.0, 0.0) if self.split is None else parse_split(self.split)

    def has_validation(self) -> bool:
        """Whether the run has validation sets: valid_data's, or data.split's validation parts."""
        return bool(self.valid_sets()) or (bool(self.data_path) and self.split_shares()[1] > 0)

    def valid_sets(self) -> dict[str, str]:
        """{name: prefix} of the validation sets of valid_data (data.split's parts are cut from the data)."""
        return self._held_out_sets(self.valid_data, "validation")

    def test_sets(self) -> dict[str, str]:
        """{name: prefix} of the test sets of test_data (data.split's parts are cut from the data)."""
        return self._held_out_sets(self.test_data, "test")

    def _held_out_sets(self, value: dict | str, split: str) -> dict[str, str]:
        if value == "llemma":
            return {s: proofpile_prefix(self.data_dir, s, split) for s in LLEMMA_MIXTURE}
        return {str(name): str(prefix) for name, prefix in value.items()}


@dataclass
class CheckpointConfig:
    save_every: int = 1000
    """Save every this many steps (0: only at the end and on preemption)."""
    keep: int = 2
    """Complete checkpoints kept on disk; older ones are deleted after each save."""
    resume: str = "auto"
    """`auto`: continue from RUN_DIR/checkpoints/latest when it exists; `never`: start fresh (refused
    when checkpoints exist); or a path to a step_XXXXXXX folder to continue from. `auto` skips (and
    renames to step_….corrupt) checkpoints that fail verification, resuming from the newest intact one."""
    allow_seq_length_change: bool = False
    """Resume from a checkpoint trained at another data.seq_length (refused unless true: a changed
    sequence length changes the data order and the positions the model was trained on)."""

    def __post_init__(self) -> None:
        _check_int("checkpoint.save_every", self.save_every, 0)
        _check_int("checkpoint.keep", self.keep, 1)
        _check_bool("checkpoint.allow_seq_length_change", self.allow_seq_length_change)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"checkpoint.resume must be auto, never or a checkpoint path, got {self.resume!r}")


@dataclass
class ProfileConfig:
    steps: list = field(default_factory=list)
    """`[a, b]`: a torch.profiler trace of steps a..b (inclusive) per rank, RUN_DIR/profile/ (Chrome/Perfetto
    JSON); empty: no trace."""
    memory: bool = False
    """Record CUDA allocations and write a memory snapshot at the end of the `steps` window (or after the
    first step without one); GPUs only. An out-of-memory error writes one whatever this says."""

    def __post_init__(self) -> None:
        _check_bool("profile.memory", self.memory)
        if self.steps and (len(self.steps) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                       for s in self.steps) or self.steps[0] > self.steps[1]):
            raise ValueError(f"profile.steps must be [first, last] with 1 <= first <= last, got {self.steps!r}")


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Also write every metrics.jsonl scalar as TensorBoard events in tensorboard_dir (metrics.jsonl stays the
    source of truth)."""
    tensorboard_dir: str | None = None
    """Where the events go (Megatron-LM's --tensorboard-dir), e.g. a run's own folder under the one a TensorBoard
    server watches; a folder outside RUN_DIR is claimed by the first run that writes there, and refused to any
    other. null: RUN_DIR/tensorboard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases, `{project, group, name, mode, entity}`: off unless `project` is set."""

    def __post_init__(self) -> None:
        _check_bool("logging.tensorboard", self.tensorboard)
        if self.tensorboard_dir is not None:
            if not isinstance(self.tensorboard_dir, str) or not self.tensorboard_dir:
                raise ValueError(f"logging.tensorboard_dir must be a folder or null, got {self.tensorboard_dir!r}")
            if not self.tensorboard:
                raise ValueError(f"logging.tensorboard_dir is {self.tensorboard_dir!r} but logging.tensorboard is "
                                 "false: set logging.tensorboard=true to write the events (or tensorboard_dir=null)")

    def tensorboard_path(self, run_dir: str | Path) -> Path | None:
        """The folder of the TensorBoard events, or None without them."""
        if not self.tensorboard:
            return None
        return Path(run_dir) / "tensorboard" if self.tensorboard_dir is None else Path(self.tensorboard_dir)


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None
    """The device's dense bf16 peak in TFLOP/s, the denominator of `mfu`; null: looked up by the GPU's name in
    megamath.training.metrics.PEAK_TFLOPS (no MFU on CPUs or on a GPU missing from it). Set it for a card the
    table lacks, or one run at other clocks."""

    def __post_init__(self) -> None:
        value = self.peak_tflops
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"metrics.peak_tflops must be a positive number of TFLOP/s or null, got {value!r}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model's shape and switches (activation_checkpointing, kernels); YAML: fields or `preset:` + fields."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the ranks are split between tensor and data parallelism."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW with ZeRO-1 sharding; `lr` is the schedule's peak."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training blend, validation sets, sequence length."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Warmup and cosine decay of the learning rate."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save, how many to keep, where to resume from."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler traces and CUDA memory snapshots on demand."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Sinks besides metrics.jsonl (the source of truth): TensorBoard, Weights & Biases."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """How metrics.jsonl's MFU is computed: the device's peak."""
    run_dir: str = "runs/train"
    """Everything the run writes: metrics.jsonl, config.yaml, checkpoints/, index-cache/."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro_batch_size · grad_accum_steps · dp."""
    train_steps: int = 1000
    """Optimizer steps of the whole run (it sizes the blend: train_steps · global batch samples)."""
    eval_every: int = 0
    """Validation loss per set every this many steps (0: never)."""
    eval_batches: int = 10
    """Micro-batches per data-parallel rank in each validation set's evaluation."""
    init_from_hf: str | None = None
    """Start from a Hugging Face Llama checkpoint folder (or a megamath one), or from the weights of a megamath
    training run (its latest checkpoint) or step folder, at step 0 with a fresh optimizer (Megatron-LM's
    --finetune); null: random initialization."""
    init_step: int = 0
    """The step init_from_hf's weights were trained to, when this run continues that run (e.g. a Megatron-LM or
    GPT-NeoX run converted at that iteration): the first update is init_step + 1, so the learning rate, the
    data position (with the source's data.sample_order, train_steps and global batch, the samples it had not
    read yet) and the checkpoint names carry on; the optimizer's moments start fresh. 0: a new run."""
    param_dtype: str = "auto"
    """Model parameter dtype (the optimizer keeps fp32 masters): auto = bfloat16 on GPUs, float32 on CPUs."""
    seed: int = 1234
    """Seed of the random initialization (and of the per-rank RNGs)."""
    max_consecutive_nonfinite: int = 5
    """Stop with an error after this many skipped (NaN/inf) steps in a row."""
    log_every: int = 10
    """Print a console line every this many steps (metrics.jsonl gets every step)."""
    exit_every: int = 0
    """Save and stop (exit 0) after each step that is a multiple of this, before train_steps (Megatron-LM's
    --exit-interval): a long run in jobs of a fixed length, each resuming where the last stopped. 0: never."""
    exit_after_minutes: float = 0.0
    """Save and stop (exit 0) at the end of the first step that ends this many minutes after the training
    started (Megatron-LM's --exit-duration-in-mins): under a walltime limit, set it the longest step, an
    evaluation and a save under the limit. Every rank stops at the same step. 0: no limit."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Few-shot tasks run every eval_every steps (megamath.evaluation.config)."""
    skip_train: bool = False
    """Train nothing: evaluate the run's starting point (the checkpoint a resume would take, else init_from_hf's
    weights) on the validation and test sets and evaluation.tasks, print the losses and write
    RUN_DIR/held_out_step{N}.json (Megatron-LM's --skip-train)."""

    def __post_init__(self) -> None:
        for name, low in (("micro_batch_size", 1), ("grad_accum_steps", 1), ("train_steps", 1), ("eval_every", 0),
                          ("eval_batches", 1), ("seed", 0), ("max_consecutive_nonfinite", 1), ("log_every", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("init_step", self.init_step, 0)
        _check_int("exit_every", self.exit_every, 0)
        minutes = self.exit_after_minutes
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes) \
                or minutes < 0:
            raise ValueError(f"exit_after_minutes must be a number of minutes >= 0 (0: no limit), got {minutes!r}")
        if self.init_step and not self.init_from_hf:
            raise ValueError(f"init_step {self.init_step} needs init_from_hf: the weights trained to that step")
        if self.init_step >= self.train_steps:
            raise ValueError(f"init_step {self.init_step} leaves no step to train: train_steps is {self.train_steps} "
                             "(the whole run's, counted from its start)")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.data.seq_length > self.model.max_seq_length:
            raise ValueError(f"data.seq_length {self.data.seq_length} exceeds model.max_seq_length "
                             f"{self.model.max_seq_length}")
        _check_bool("skip_train", self.skip_train)
        opt = self.optimizer
        if opt.decoupled_lr is not None and opt.decoupled_min_lr is None \
                and self.schedule.min_lr_ratio * opt.lr > opt.decoupled_lr:
            raise ValueError(f"optimizer.decoupled_lr {opt.decoupled_lr:g} is below the schedule's floor "
                             f"schedule.min_lr_ratio × optimizer.lr = {self.schedule.min_lr_ratio * opt.lr:g}, which "
                             "decoupled_min_lr defaults to: set optimizer.decoupled_min_lr")
        if self.evaluation.tasks and not self.eval_every and not self.skip_train:
            raise ValueError("evaluation.tasks are listed but eval_every is 0: set how often they run")
        if self.skip_train and not (self.data.has_validation() or self.data.test_sets() or
                                    (self.data.data_path and self.data.split_shares()[2] > 0)
                                    or self.evaluation.tasks):
            raise ValueError("skip_train evaluates the held-out sets, and this config has none: set data.valid_data, "
                             "data.test_data, a data.split with held-out shares, or evaluation.tasks")
        self.evaluation.check_room(self.model.max_seq_length)
        if self.eval_every and not self.data.has_validation():
            raise ValueError(f"eval_every is {self.eval_every} but data.valid_data is empty "
                             "(and no data.split holds validation documents out)")

    def global_batch_size(self, dp_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * dp_size

    def to_dict(self) -> dict:
        """Plain data (the model in full, no preset) that `from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        return _build(cls, raw, "")


# ---- YAML and overrides --------------------------------------------------------------------------------

def read_yaml(path: Path, what: str):
    """The parsed contents of a YAML file; one-line errors for a missing file (`what not found: path`) and
    for invalid YAML."""
    text = read_text(path, what, "a YAML file")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {yaml_problem(err)}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message on one line: where, then what (its own spans several lines, quoting the source)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply `dotted.key=value` overrides."""
    path = Path(path)
    raw = read_yaml(path, "config file")
    if raw is None:  # an empty (or truncated) file would train the defaults and fail on one of them
        raise ValueError(f"config file {path} is empty (a config of the defaults only is written {{}})")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return TrainConfig.from_dict(apply_overrides(raw, overrides))


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of `raw` with each `a.b.c=value` set; values are YAML scalars (`1e-4`, `null`, `[1, a]`)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {yaml_problem(err)}") from None
        *sections, last = key.split(".")
        node = raw
        for depth, part in enumerate(sections):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(sections[:depth + 1])} is not a section")
        node[last] = value
    return raw


def _build(cls, raw: Any, where: str):
    """Construct dataclass `cls` from a mapping, recursing into sections and coercing scalars."""
    label = where or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{label} must be a mapping of keys, got {raw!r}")
    if cls is ModelConfig:
        return _build_model(raw, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ValueError(f"unknown key {_dotted(where, unknown[0])!r}; {label} takes: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, _dotted(where, name))
        else:
            values[name] = _coerce(kind, value, _dotted(where, name))
    with _keys_named(cls, where):
        return cls(**values)


@contextlib.contextmanager
def _keys_named(cls, where: str):
    """Say `optimizer.lr`, the key the user wrote, where a section's own check says `OptimizerConfig.lr`."""
    try:
        yield
    except ValueError as err:
        message, prefix = str(err), f"{cls.__name__}."
        if where and message.startswith(prefix):
            raise ValueError(where + "." + message[len(prefix):]) from None
        raise


def _build_model(raw: dict, where: str) -> ModelConfig:
    raw = dict(raw)
    preset = raw.pop("preset", None)
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ValueError(f"unknown key {_dotted(where, unknown[0])!r}; model takes: preset, {', '.join(known)}")
    hints = typing.get_type_hints(ModelConfig)
    values = {k: _coerce(hints[k], v, _dotted(where, k)) for k, v in raw.items()}
    with _keys_named(ModelConfig, where):
        if preset is not None:
            return ModelConfig.from_preset(str(preset), **values)
        return ModelConfig(**values)


def _coerce(kind, value, key: str):
    """Check `value` against the annotation `kind`; numbers written as strings become floats, since
    YAML 1.1 reads `1e-4` (no dot) as a string."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        base = typing.get_origin(option) or option
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            if not -INT64_LIMIT <= value < INT64_LIMIT:  # numpy and torch take 64-bit integers: refuse it here
                raise ValueError(f"{key} must fit in 64 bits (at most {INT64_LIMIT - 1}), got {value}")
            return value
        if base is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if base in (str, list, dict) and isinstance(value, base):
            return value
        if base not in (bool, int, float, str, list, dict, type(None)):
            return value  # a type this loader does not know: the dataclass validates it
    names = " or ".join("null" if o is type(None) else getattr(typing.get_origin(o) or o, "__name__", str(o))
                        for o in options)
    raise ValueError(f"{key} must be {names}, got {value!r}")


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
