"""Which samples each rank trains and evaluates on, as a pure function of the step.

The training set is one BlendedDataset of train_steps · global_batch samples over the data_path blend
(over each prefix's train part under data.split), so the whole run's sample order is fixed before the
first step; data.sample_order `megatron` or `neox` makes it that trainer's order for the same settings.
Step s (1-based) consumes samples [(s−1)·G, s·G) with G = micro_batch_size · grad_accum_steps · dp_size.
Inside a step the order is Megatron's (and GPT-NeoX's): micro-batch m covers [m·b·dp, (m+1)·b·dp) of the
step's samples and DP rank r takes the b = micro_batch_size rows starting at r·b. Tensor-parallel ranks
of one DP rank read the same rows.
Nothing is iterated, so the data position of a checkpoint is just its step and resume is exact.

Sample indices are built on global rank 0 first (it writes the cache), then loaded by the others after a
barrier, so a large run does not build them world_size times over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from megamath.data import megatron_order
from megamath.data.blended_dataset import BlendedDataset
from megamath.data.gpt_dataset import GPTDataset
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.splits import cut_splits
from megamath.parallel.agreement import check_same_on_every_rank
from megamath.parallel.mappings import barrier
from megamath.parallel.state import ParallelState

T = TypeVar("T")
MicroBatch = tuple[torch.Tensor, torch.Tensor]  # tokens (b, S), targets (b, S), int64


def rank0_first(state: ParallelState, build: Callable[[], T]) -> T:
    """Run `build` on rank 0, then (after a barrier) on every other rank, which then hits rank 0's cache."""
    if not state.is_distributed:
        return build()
    result = build() if state.rank == 0 else None
    barrier(state.world_group)
    return result if state.rank == 0 else build()


def _open(prefix: str) -> IndexedDataset:
    try:
        return IndexedDataset(prefix)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (data prefixes are given without .bin/.idx)") from None


class TrainData:
    """The run's training samples and validation sets, cut into this rank's micro-batches."""

    def __init__(self, config, state: ParallelState, cache_dir: str | Path | None) -> None:
        self.micro_batch_size, self.grad_accum_steps = config.micro_batch_size, config.grad_accum_steps
        self.dp_size, self.dp_rank, self.device = state.dp_size, state.dp_rank, state.device
        self.vocab_size = config.model.vocab_size
        self.global_batch_size = config.global_batch_size(state.dp_size)
        self.sample_offset = 0
        """Where update `step` reads, against (step - 1) × global batch: the samples a resumed run's checkpoint
        consumed minus step × global batch, 0 but for another trainer's run that ramped its batch size up (it
        read fewer; the loop sets it from the checkpoint, and reads on from there as Megatron-LM does)."""
        data = config.data
        weights, prefixes = data.train_blend()
        num_samples = config.train_steps * self.global_batch_size
        if num_samples >= 2**63:  # the sample index counts in int64
            raise ValueError(f"train_steps {config.train_steps} × global batch {self.global_batch_size} "
                             "(micro_batch_size · grad_accum_steps · DP) is more samples than 64 bits count")
        sources = [_open(p) for p in prefixes]
        cut = cut_splits(sources, prefixes, data.split, data.seq_length, taken=[*data.valid_sets(), *data.test_sets()],
                         rule=megatron_order.split_rule(data.sample_order))
        self.split_lines = cut.lines  # what the run's log says of the split
        trained = {Path(prefix).resolve() for prefix in prefixes}
        self.warnings = [f"warning: data.{key} set {name!r} ({prefix}) is also in data.data_path: its loss is of "
                         "documents the run trains on, not of unseen ones"
                         for key, sets in (("valid_data", data.valid_sets()), ("test_data", data.test_sets()))
                         for name, prefix in sets.items() if Path(prefix).resolve() in trained]

        def build_train() -> BlendedDataset:
            return BlendedDataset(sources, weights, num_samples, data.seq_length, seed=data.seed,
                                  cache_dir=cache_dir, documents=cut.train, sample_order=data.sample_order,
                                  surplus=megatron_order.blend_surplus(data.data_path))

        self.train = rank0_first(state, build_train)
        # Each validation set is a fixed list of samples, the same at every evaluation, so that the
        # curve moves only with the model (Megatron instead walks on through its validation set).
        eval_samples = config.eval_batches * self.micro_batch_size * state.dp_size

        def build_held_out(parts: dict[str, tuple[IndexedDataset, np.ndarray | None]]) -> dict[str, GPTDataset]:
            return {name: GPTDataset(source, eval_samples, data.seq_length, seed=data.seed, documents=ids,
                                     cache_dir=cache_dir)
                    for name, (source, ids) in parts.items()}

        if config.eval_every or config.skip_train:  # (valid_data's prefixes are opened only then)
            valid_parts = {name: (_open(prefix), None) for name, prefix in data.valid_sets().items()} | cut.valid
            self.valid = rank0_first(state, lambda: build_held_out(valid_parts))
        else:
            self.valid = {}
        # Test sets (test_data's and data.split's test parts) are evaluated once, after the last step.
        test_parts = {name: (_open(prefix), None) for name, prefix in data.test_sets().items()} | cut.test
        self.test = rank0_first(state, lambda: build_held_out(test_parts))
        # The same prefixes may hold other data on another node (a stale copy): its ranks would train on
        # other samples, with exit 0. The fingerprints (each index's hash) are computed already, for the cache.
        held = {gpt.name: gpt.dataset.fingerprint() for gpt in self.train.datasets if gpt is not None}
        held.update({gpt.name: gpt.dataset.fingerprint() for gpt in (*self.valid.values(), *self.test.values())})
        check_same_on_every_rank(held, state.world_group,
                                 "data (the SHA-256 of each dataset's .idx, and its .bin size)",
                                 "give every node the same copy of the datasets")

    def sample_rows(self, step: int, micro: int) -> range:
        """Indices into the blend of this rank's rows of micro-batch `micro` of update `step` (1-based)."""
        b = self.micro_batch_size
        start = (step - 1) * self.global_batch_size + self.sample_offset + micro * b * self.dp_size + self.dp_rank * b
        return range(start, start + b)

    def consumed_after(self, step: int) -> int:
        """Samples read once update `step` is done (what metrics and checkpoints record)."""
        return step * self.global_batch_size + self.sample_offset

    def schedule_position(self, step: int) -> float:
        """Where update `step` stands on the learning-rate schedule: its samples read over the global batch.

        That is `step` itself (exactly) unless a converted run ramped its batch size up: Megatron-LM's scheduler
        advances by each update's samples (decay over lr_decay_iters × global batch samples), so its learning
        rate after a ramp is where the samples say, behind the iteration count; the continued run keeps it."""
        return self.consumed_after(step) / self.global_batch_size

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's grad_accum_steps micro-batches of update `step`."""
        return [self._batch(self.train, self.sample_rows(step, m)) for m in range(self.grad_accum_steps)]

    def held_out_batches(self, dataset: GPTDataset) -> list[MicroBatch]:
        """This rank's micro-batches of a validation or test set (eval_batches of them)."""
        b = self.micro_batch_size
        starts = range(self.dp_rank * b, len(dataset), b * self.dp_size)
        return [self._batch(dataset, range(s, s + b)) for s in starts]

    def _batch(self, dataset, rows: range) -> MicroBatch:
        samples = np.stack([dataset[i] for i in rows])  # (b, S + 1) int64
        # Checked here, on the host, so that the loss kernel needs no device-to-host sync to do it.
        if samples.size and (samples.min() < 0 or samples.max() >= self.vocab_size):
            bad = int(samples.max() if samples.max() >= self.vocab_size else samples.min())
            raise ValueError(f"sample {rows[int(np.argwhere(samples == bad)[0, 0])]} holds token id {bad}, "
                             f"outside the model's vocabulary [0, {self.vocab_size}): was the data made with "
                             "another tokenizer (or does model.vocab_size need padding)?")
        samples = torch.from_numpy(samples)
        samples = samples.to(self.device, non_blocking=True)
        return samples[:, :-1], samples[:, 1:]  # tokens (b, S), targets (b, S)
