"""Where a run continues from: the newest checkpoint that verifies, and only if it fits this run.

`checkpoint.resume=auto` starts at the checkpoint `latest` names (the newest complete one when there is no
`latest`) and walks back through older complete checkpoints until one verifies (every file's size and
SHA-256, see checkpoint_integrity.py). A checkpoint that fails is renamed aside to `step_….corrupt` (kept
for inspection, never deleted), the skip and its reason are reported, and `latest` is pointed at the one
chosen. Verification is spread over the ranks (file i by rank i mod world), so the checkpoint is read
once whatever the job's size; the ranks then agree, before anyone loads, that every file is intact.

An explicit path is verified too but never replaced by another. Checkpoints newer than the one chosen
(a rewind) are named in a note, and left to the run's saves (checkpoint.prune_checkpoints). Whatever is chosen must have the run's
model shape and (unless `checkpoint.allow_seq_length_change`) its sequence length. A change to what orders
the samples (train_steps, the blend, the data seed) is allowed, as in Megatron-LM, but said in a warning,
and so is a change that gives the validation sets other samples (their size follows the DP size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable


from megamath.atomic_io import write_text_atomically
from megamath.parallel.mappings import all_gather_objects, barrier
from megamath.parallel.state import ParallelState
from megamath.training import checkpoint as ckpt
from megamath.training.checkpoint_integrity import verify_files
from megamath.data.splits import parse_split
from megamath.training.schedule import ScheduleConfig, lr_at

SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size")


def _candidates(root: Path) -> tuple[list[Path], str | None]:
    """Checkpoints to try, newest first: `latest`'s, then older complete ones; and a note on a bad pointer."""
    complete = list(reversed(ckpt.complete_checkpoints(root)))  # (step, path), newest first
    try:
        latest = ckpt.latest_checkpoint(root.parent)
    except ValueError as err:  # a pointer naming nothing usable: every complete checkpoint is a candidate
        return [path for _, path in complete], str(err)
    if latest is None:
        if complete:  # killed between the first save's rename and its pointer, or step folders copied without it
            note = f"{root / ckpt.LATEST} is missing though {root} holds complete checkpoints"
            return [path for _, path in complete], note
        return [], None
    newest = next(step for step, path in complete if path == latest)
    return [latest] + [path for step, path in complete if step < newest], None


def _verify_share(path: Path, state: ParallelState) -> str | None:
    """This rank's share of the check of `path`: None when intact, else what is wrong."""
    try:
        meta = ckpt.read_metadata(path, check_files=False)
        files = meta["files"]
        verify_files(path, meta, files[state.rank::state.world_size])
    except (ValueError, OSError, KeyError) as err:
        return str(err)
    return None


def _agree(problem: str | None, state: ParallelState) -> str | None:
    """The first rank's problem, the same on every rank (None when no rank found one)."""
    if not state.is_distributed:
        return problem
    problems = all_gather_objects(problem, state.world_group)
    return next((p for p in problems if p is not None), None)


def verified_checkpoint(path: Path, state: ParallelState) -> None:
    """Raise (on every rank) unless every file of `path` is intact."""
    problem = _agree(_verify_share(path, state), state)
    if problem is not None:
        raise ckpt.CheckpointIntegrityError(problem)


def find_resume_checkpoint(mode: str, run_dir: Path, state: ParallelState,
                           say: Callable[[str], None]) -> Path | None:
    """The verified checkpoint to resume from under `checkpoint.resume` = `mode`, or None to start fresh."""
    root = run_dir / ckpt.CHECKPOINTS
    if mode == "never":
        held = ckpt.complete_checkpoints(root)
        if held:
            raise ValueError(f"{run_dir} already holds checkpoints (latest: {held[-1][1].name}) and "
                             "checkpoint.resume is 'never': resume with checkpoint.resume=auto or choose another "
                             "run_dir")
        return None
    if mode != "auto":
        path = Path(mode)
        if not (path / ckpt.METADATA).is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint "
                                    f"({ckpt.METADATA} not found)")
        verified_checkpoint(path, state)
        return path
    # Rank 0's view, on every rank: a rank that listed another set (a stale directory cache) would verify
    # other checkpoints, that is issue other collectives, and hang the job.
    candidates, pointer_problem = _candidates(root) if state.rank == 0 else (None, None)
    if state.is_distributed:
        candidates, pointer_problem = all_gather_objects((candidates, pointer_problem), state.world_group)[0]
    if pointer_problem:
        say(f"warning: {pointer_problem}; looking for the newest intact checkpoint instead")
    skipped = []
    for path in candidates:
        problem = _agree(_verify_share(path, state), state)
        if problem is None:
            if skipped or pointer_problem:
                if state.rank == 0:
                    write_text_atomically(root / ckpt.LATEST, path.name + "\n")
                say(f"resuming from {path.name}, the newest intact checkpoint")
            return path
        barrier(state.world_group)  # every rank is done reading it before it moves
        if state.rank == 0:
            aside = ckpt.set_aside(path)
            say(f"skipped checkpoint {path.name}: {problem}; renamed it to {aside.name} for inspection")
        skipped.append(path.name)
    if skipped:
        raise ckpt.CheckpointIntegrityError(
            f"no intact checkpoint in {root}: {', '.join(skipped)} failed verification (renamed to *.corrupt); "
            "restore one, or start afresh with checkpoint.resume=never in a new run_dir")
    if pointer_problem:
        raise ValueError(pointer_problem)
    return None


def rewound_past(run_dir: Path, step: int) -> str | None:
    """A line naming the run's checkpoints newer than `step`, the one it continues from (None when none):
    a future it rewound past, which its saves replace step by step and `keep` does not count."""
    later = [path.name for later_step, path in ckpt.complete_checkpoints(run_dir / ckpt.CHECKPOINTS)
             if later_step > step]
    if not later:
        return None
    return (f"note: {', '.join(later)} {'was' if len(later) == 1 else 'were'} saved after step {step}, where this "
            "run continues; its own saves replace them as it reaches their steps, and checkpoint.keep does not "
            "count them")


DATA_ORDER_KEYS = (("train_steps",), ("data", "data_path"), ("data", "data_dir"), ("data", "seed"), ("data", "split"),
                   ("data", "sample_order"))
"""What fixes the order of the training samples besides the global batch (which must stay equal): the blend is
train_steps · global batch samples, and its shuffles depend on that size (as Megatron-LM's indices do on
train-iters)."""
ORDER_KEYS_ADDED = {("data", "sample_order"): "megamath"}
"""Keys newer than some checkpoints, with the value an older checkpoint ran with."""


def data_order_change(meta: dict, config) -> str | None:
    """A warning line when this run draws the samples after the checkpoint in another order than the run that
    saved it (e.g. train_steps extended on resume): samples may then repeat or be skipped. None otherwise."""
    saved, ours = meta["config"], config.to_dict()
    changed = []
    for keys in DATA_ORDER_KEYS:
        old, new = saved, ours
        for key in keys:
            old, new = (old or {}).get(key), (new or {}).get(key)
        old = ORDER_KEYS_ADDED.get(keys) if old is None else old
        if old != new:
            changed.append(f"{'.'.join(keys)} {old!r} -> {new!r}")
    if not changed:
        return None
    line = (f"warning: {', '.join(changed)} since checkpoint step {meta['step']}: the blend is rebuilt, so the samples "
            "from here on come in another order than that run's (some may repeat, others be skipped)")
    old_split = (saved.get("data") or {}).get("split")
    before = 1.0 if old_split is None else parse_split(old_split)[0]
    if before > config.data.split_shares()[0]:  # the old train part reaches into the new held-out parts
        line += (f"; documents trained on up to step {meta['step']} now lie in data.split's held-out parts, so "
                 "val_loss and test_loss of those parts are no longer of unseen documents")
    return line


def schedule_change(meta: dict, config) -> str | None:
    """A warning line when this run's learning-rate schedule differs from the checkpoint run's (the peak, warmup,
    decay or floor): the curve then jumps at the resume. Megatron-LM refuses this unless told to override;
    megamath takes the config's schedule, as `--override-opt_param-scheduler` does, and says what changed."""
    saved = meta.get("schedule")
    if not saved or "peak_lr" not in saved:
        return None
    opt = config.optimizer
    ours = {"peak_lr": opt.lr, **vars(config.schedule), "decoupled_lr": opt.decoupled_lr,
            "decoupled_min_lr": opt.decoupled_min_lr}  # (the last two absent before megamath had them: None)
    section = {"peak_lr": "optimizer.lr", "decoupled_lr": "optimizer.decoupled_lr",
               "decoupled_min_lr": "optimizer.decoupled_min_lr"}
    changed = [f"{section.get(key, 'schedule.' + key)} {saved.get(key)!r} -> {value!r}"
               for key, value in ours.items() if saved.get(key) != value]
    if not changed:
        return None
    step = meta["step"] + 1
    batch = meta.get("global_batch_size")
    position = (meta.get("consumed_samples", meta["step"] * batch) + batch) / batch if batch else step
    try:  # (the position: TrainData.schedule_position)
        before = lr_at(position, saved["peak_lr"], ScheduleConfig(**{k: saved[k] for k in vars(config.schedule)}))
        after = lr_at(position, config.optimizer.lr, config.schedule)
        jump = f"; update {step} runs at lr {after:.4g}, not {before:.4g}"
    except (KeyError, TypeError, ValueError):  # a schedule this version cannot rebuild: the keys say enough
        jump = ""
    return f"warning: {', '.join(changed)} since checkpoint step {meta['step']}{jump}"


def validation_change(meta: dict, config, dp_size: int) -> str | None:
    """A warning line when this run's validation sets hold another number of samples than the checkpoint run's.

    Each set is eval_batches · micro_batch_size · DP size fixed samples, so a resume at another DP size with the
    global batch kept (grad_accum_steps adjusted, as the resume requires) evaluates val_loss on another set: the
    curve would jump where the model did not change (by ~1e-3 on a tiny model, DP 2 -> DP 1). None otherwise.
    """
    saved = meta["config"]
    batches, micro = saved.get("eval_batches"), saved.get("micro_batch_size")
    if not config.eval_every or not saved.get("eval_every") or batches is None or micro is None:
        return None
    trained_dp = meta.get("resharded_from", {}).get("dp_size", meta["dp_size"])  # `megamath reshard` trains nothing
    old = batches * micro * trained_dp
    per_batch = config.micro_batch_size * dp_size  # samples of one eval batch over this run's DP ranks
    new = config.eval_batches * per_batch
    if old == new:
        return None
    keep = (f"; eval_batches={old // per_batch} keeps the checkpoint's sets" if old % per_batch == 0 else "")
    return (f"warning: the validation sets hold {new} samples each (eval_batches · micro_batch_size · DP size), the "
            f"run of checkpoint step {meta['step']} evaluated {old}: val_loss after it is not comparable with the "
            f"earlier values{keep}")


def check_resume_compatible(meta: dict, config, path: Path) -> None:
    """The checkpoint's model shape must be the run's; its seq_length too unless the override allows it."""
    saved = meta["config"]
    model = saved.get("model", {})
    differ = [f"model.{k} {model.get(k)} (checkpoint) vs {getattr(config.model, k)} (this run)"
              for k in SHAPE_KEYS if model.get(k) != getattr(config.model, k)]
    if differ:
        raise ValueError(f"checkpoint {path} holds a model of another shape than this run's: {'; '.join(differ)}")
    old_seq = saved.get("data", {}).get("seq_length")
    if old_seq != config.data.seq_length and not config.checkpoint.allow_seq_length_change:
        raise ValueError(f"checkpoint {path} was trained with data.seq_length {old_seq}, this run's is "
                         f"{config.data.seq_length}: set checkpoint.allow_seq_length_change=true to change it on "
                         "purpose")


def resume_sample_offset(meta: dict, global_batch: int, path) -> int:
    """TrainData.sample_offset of a run resumed from checkpoint `meta`: its consumed samples minus step × global
    batch (0 for megamath's own checkpoints; negative for another trainer's run converted after a batch-size
    ramp)."""
    consumed = meta.get("consumed_samples", meta["step"] * global_batch)
    if not isinstance(consumed, int) or not 0 <= consumed <= meta["step"] * global_batch:
        raise ValueError(f"checkpoint {path}: consumed_samples {consumed!r} is not between 0 and step × global batch "
                         f"{meta['step'] * global_batch}")
    return consumed - meta["step"] * global_batch
