"""ZeRO-1: AdamW whose fp32 master weights and moments are split over the data-parallel ranks.

Why: with Adam, the optimizer state (fp32 master + two moments = 12 bytes per parameter) is six times
the bf16 weights. Data-parallel ranks all hold the same weights, so each can own 1/dp of that state and
update only its part (llm.c's ZeRO-1, Megatron's distributed optimizer).

Layout (explicit offsets over flat buffers). Every trainable parameter of the model is re-pointed into
ONE flat parameter buffer (`p.data` becomes a view of it), and its gradient is summed into ONE flat
gradient buffer. Both are padded with zeros to dp · S elements; DP rank r owns the shard

    [r·S, (r+1)·S)          of both buffers, with fp32 master, exp_avg, exp_avg_sq of length S.

Parameters are placed in groups of the same (weight decay, tensor_parallel): matrices first, then the
1-D weights, so a shard spans at most four contiguous ranges and a step is at most four AdamW launches.

Bytes per parameter on one rank, bf16 model:

    bf16 params 2 + bf16 grads 2 + (fp32 master 4 + exp_avg 4 + exp_avg_sq 4) / dp = 4 + 12/dp
    with grad_dtype="fp32":  2 + 4 + 12/dp = 6 + 12/dp

(7B at dp = 8 with fp32 grads: 6 + 1.5 = 7.5 bytes, 52 GB, against 16 bytes without sharding.)

One step (`step(lr)`):
  1. reduce-scatter the gradient buffer over DP (a sum; the 1/dp of the average is folded into the
     norm and into AdamW's grad_scale instead of a pass over the shard);
  2. the global gradient norm over the DP shards and the TP splits (grad_clip.py);
  3. a non-finite norm on any rank skips the update on every rank (nothing changes, not the step count);
  4. the clipping coefficient min(1, clip / (norm + 1e-6)) joins grad_scale;
  5. AdamW on this rank's ranges, writing the new bf16 weights straight into the parameter buffer's shard;
  6. all-gather the parameter shards over DP.

Gradients reach the flat buffer through post-accumulate-grad hooks: once autograd has accumulated a
parameter's gradient, the hook adds it into the buffer and frees `p.grad`. This costs what `.grad` views
would (autograd hands over its gradient tensor either way, then one add), allows a gradient buffer
whose dtype differs from the model's (torch refuses a `.grad` of another dtype), and accumulates over
micro-batches until `zero_grad()`. The reduce-scatter runs after backward, not overlapped with it: the
rank-major shard layout makes a gradient bucket ready only at the end of backward, so overlapping would
need Megatron's per-bucket shards. `bucket_mb` only caps the size of each collective.

Which parameters are split over the TP ranks (each holds a different piece) is passed by name
(`split_names`, for Llama `model.split_parameter_names()`, from megamath.model.partition); everything else
is replicated on every TP rank. Nothing is read from attributes on the parameter tensors, which vanish
when a model's parameters are re-created (`to_empty` for a pretrained init).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Collection

import torch
import torch.distributed as dist
import torch.nn as nn

from megamath.kernels.adamw import adamw_step, adamw_step_ref
from megamath.parallel.grad_clip import clip_coefficient, global_grad_norm
from megamath.parallel.mappings import all_gather_into, native_collectives, reduce_scatter_into
from megamath.parallel.optimizer_config import GRAD_DTYPES, OptimizerConfig
from megamath.parallel.state import ParallelState

CHECKPOINT_FORMAT = "megamath-zero1-v1"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
"""The per-parameter fp32 tensors a shard holds, in the order shards and tools list them."""


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    """Global L2 norm of the DP-averaged gradient, before clipping (nan/inf when the step was skipped)."""
    skipped: bool
    """True when the norm was not finite and nothing was updated."""
    clip_coef: float
    """The factor the gradient was scaled by (1.0 without clipping; 0.0 when skipped)."""


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the flat buffers."""

    name: str
    numel: int
    offset: int
    decay: bool
    tensor_parallel: bool


@dataclass(frozen=True)
class ShardRange:
    """A run of the shard, [start, end) in shard coordinates, whose parameters share decay and TP-ness."""

    start: int
    end: int
    decay: bool
    tensor_parallel: bool


def _adamw_fn(device: torch.device):
    """The Triton kernel on CUDA, its plain-torch reference elsewhere (as megamath.model.ops dispatches)."""
    return adamw_step if device.type == "cuda" else adamw_step_ref


def flat_layout(params: list[tuple[str, tuple[int, ...], bool]]) -> list[ParamSlot]:
    """Where each parameter (name, shape, tensor_parallel) goes in the flat buffers, in buffer order.

    Matrices (decayed) first, then 1-D weights; within each, TP-split before replicated; otherwise the
    given (the model's) order. A checkpoint tool that writes optimizer shards for a model it does not
    build uses this same rule, so its files are the ones a live optimizer would save.
    """
    ordered = sorted(params, key=lambda entry: (len(entry[1]) < 2, not entry[2]))
    slots, offset = [], 0
    for name, shape, split in ordered:
        numel = math.prod(shape)
        slots.append(ParamSlot(name, numel, offset, len(shape) >= 2, split))
        offset += numel
    return slots


class ZeroOptimizer:
    """AdamW over flat buffers with fp32 master weights and moments sharded over the DP group.

    Build it after the model is on its device and in its training dtype (bf16; fp32 works too). The
    model must not be moved or cast afterwards: its parameters are views of this optimizer's buffer.
    `split_names`: the names of the parameters tensor parallelism splits (required when tp_size > 1;
    the gradient norm sums their squares over TP and counts the other parameters once).
    """

    def __init__(self, model: nn.Module, state: ParallelState, config: OptimizerConfig,
                 split_names: Collection[str] = ()):
        self.state, self.config = state, config
        self.dp_size, self.dp_rank, self.dp_group = state.dp_size, state.dp_rank, state.dp_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZeroOptimizer: the model has no trainable parameters")
        split_names = set(split_names)
        unknown = sorted(split_names - {n for n, _ in named})
        if unknown:
            raise ValueError(f"ZeroOptimizer: split_names names no trainable parameter of the model: {', '.join(unknown)}")
        if state.tp_size > 1 and not split_names:
            raise ValueError(f"ZeroOptimizer: tensor-parallel size {state.tp_size} needs split_names, the parameters TP "
                             "splits (Llama.split_parameter_names()), or the gradient norm would count their pieces "
                             "as replicated")
        dtypes = sorted({str(p.dtype) for _, p in named})
        devices = sorted({str(p.device) for _, p in named})
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"ZeroOptimizer: all parameters must share one dtype and device for the flat buffer, "
                             f"got dtypes {dtypes} on devices {devices}")
        self.param_dtype, self.device = named[0][1].dtype, named[0][1].device
        self.slots: list[ParamSlot] = flat_layout([(n, tuple(p.shape), n in split_names) for n, p in named])
        by_name = dict(named)
        named = [(slot.name, by_name[slot.name]) for slot in self.slots]  # the buffer's order
        self.numel = sum(slot.numel for slot in self.slots)
        self.shard_size = -(-self.numel // self.dp_size)  # S = ceil(numel / dp)
        self.padded_numel = self.shard_size * self.dp_size
        self.shard_start = self.dp_rank * self.shard_size
        self.shard_end = self.shard_start + self.shard_size

        self.flat_param = torch.zeros(self.padded_numel, dtype=self.param_dtype, device=self.device)  # (dp·S,)
        self.flat_grad = torch.zeros(self.padded_numel, dtype=GRAD_DTYPES[config.grad_dtype], device=self.device)
        self.params: list[nn.Parameter] = []
        self._slot_of: dict[int, ParamSlot] = {}  # id(parameter) -> its slot
        self._hooks = []
        with torch.no_grad():
            for slot, (_, p) in zip(self.slots, named):
                view = self.flat_param[slot.offset:slot.offset + slot.numel].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = None
                self.params.append(p)
                self._slot_of[id(p)] = slot
                grad_view = self.flat_grad[slot.offset:slot.offset + slot.numel].view_as(p)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(grad_view)))
        self.ranges = self._shard_ranges()
        shard = slice(self.shard_start, self.shard_end)
        self.master = self.flat_param[shard].to(torch.float32, copy=True)  # (S,)
        self.exp_avg = torch.zeros_like(self.master)  # (S,)
        self.exp_avg_sq = torch.zeros_like(self.master)  # (S,)
        self.step_count = 0

    @staticmethod
    def _make_hook(grad_view: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            grad = p.grad  # (shape of p): this micro-batch's gradient, which autograd has just accumulated
            if torch.promote_types(grad.dtype, grad_view.dtype) != grad_view.dtype:
                grad = grad.to(grad_view.dtype)  # fp32 into a bf16 buffer; bf16 into fp32 adds without a copy
            grad_view.add_(grad)
            p.grad = None
        return hook

    def _shard_ranges(self) -> list[ShardRange]:
        """The parameters' pieces inside [shard_start, shard_end), merged into runs of equal (decay, TP)."""
        ranges: list[ShardRange] = []
        for slot in self.slots:
            lo = max(slot.offset, self.shard_start) - self.shard_start
            hi = min(slot.offset + slot.numel, self.shard_end) - self.shard_start
            if lo >= hi:
                continue
            last = ranges[-1] if ranges else None
            if last and last.end == lo and (last.decay, last.tensor_parallel) == (slot.decay, slot.tensor_parallel):
                ranges[-1] = dataclasses.replace(last, end=hi)
            else:
                ranges.append(ShardRange(lo, hi, slot.decay, slot.tensor_parallel))
        return ranges

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the model's parameters stay views of the flat buffer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer; call once per optimizer step, before the first micro-batch."""
        self.flat_grad.zero_()

    def grad_view(self, p: nn.Parameter) -> torch.Tensor:
        """Parameter p's accumulated gradient: its view (shape of p) into the flat gradient buffer."""
        slot = self._slot_of.get(id(p))
        if slot is None:
            raise KeyError("ZeroOptimizer.grad_view: the parameter is not one of this optimizer's")
        return self.flat_grad[slot.offset:slot.offset + slot.numel].view_as(p)

    # ---- the step ----------------------------------------------------------------------------------

    def _check_views(self) -> None:
        for slot, p in zip(self.slots, self.params):
            if p.data_ptr() != self.flat_param[slot.offset:].data_ptr() or p.dtype != self.param_dtype:
                raise RuntimeError(f"ZeroOptimizer: parameter {slot.name} no longer lives in the optimizer's flat "
                                   "buffer (was the model moved or cast after the optimizer was built?)")

    def _reduce_scatter_grads(self) -> None:
        """Sum the gradient buffer over DP into this rank's shard [shard_start, shard_end) of flat_grad."""
        if self.dp_group is None:
            return
        grad_2d = self.flat_grad.view(self.dp_size, self.shard_size)  # (dp, S): row r is rank r's shard
        native = native_collectives(self.dp_group)
        cols = self.shard_size
        if self.config.bucket_mb > 0:
            bytes_per_col = self.dp_size * self.flat_grad.element_size()
            cols = max(1, int(self.config.bucket_mb * 2**20) // bytes_per_col)
        for c0 in range(0, self.shard_size, cols):
            c1 = min(c0 + cols, self.shard_size)
            out = grad_2d[self.dp_rank, c0:c1]  # (c,) contiguous
            bucket = grad_2d if c1 - c0 == self.shard_size else grad_2d[:, c0:c1].contiguous()  # (dp, c)
            if native:
                reduce_scatter_into(out, bucket.view(-1), self.dp_group)  # in place when bucket is grad_2d
            else:
                dist.all_reduce(bucket, group=self.dp_group)
                if bucket.data_ptr() != grad_2d.data_ptr():
                    out.copy_(bucket[self.dp_rank])

    def _all_gather_params(self) -> None:
        if self.dp_group is None:
            return
        shard = self.flat_param[self.shard_start:self.shard_end]  # (S,)
        if native_collectives(self.dp_group):
            all_gather_into(self.flat_param, shard, self.dp_group)  # in place: shard is a view of the output
        else:
            dist.all_gather(list(self.flat_param.view(self.dp_size, self.shard_size).unbind(0)), shard.clone(),
                            group=self.dp_group)

    def _grad_norm(self) -> torch.Tensor:
        """Global norm of the DP-averaged gradient (fp32 scalar); valid after the reduce-scatter of step()."""
        grad_shard = self.flat_grad[self.shard_start:self.shard_end]  # (S,)
        # Squares accumulate in fp64: a CPU fp32 norm over millions of elements is off by ~1e-4 relative,
        # enough to move the clip coefficient away from what a serial run (or transformers) computes.
        sums = {True: torch.zeros((), dtype=torch.float64, device=self.device),
                False: torch.zeros((), dtype=torch.float64, device=self.device)}
        for r in self.ranges:
            sums[r.tensor_parallel] += torch.linalg.vector_norm(grad_shard[r.start:r.end], dtype=torch.float64) ** 2
        norm = global_grad_norm(sums[True], sums[False], dp_group=self.dp_group, tp_group=self.state.tp_group)
        return norm / self.dp_size  # the buffer holds the DP sum; the average is 1/dp of it

    @torch.no_grad()
    def step(self, lr: float, timer=None) -> StepResult:
        """One AdamW update at learning rate lr of the gradients accumulated since zero_grad().

        `timer` (a megamath.training.phases.PhaseTimer, optional) times grad_reduce / optimizer / param_gather.
        """
        phase = timer.phase if timer is not None else (lambda name: contextlib.nullcontext())
        with phase("grad_reduce"):
            self._check_views()
            self._reduce_scatter_grads()
        with phase("optimizer"):
            result = self._update(lr)
        if result.skipped:
            return result
        with phase("param_gather"):
            self._all_gather_params()
        return result

    def _update(self, lr: float) -> StepResult:
        """Norm, clipping and AdamW on this rank's shard (the parameter shard is written, not yet gathered)."""
        norm = float(self._grad_norm())  # a host sync: every rank must agree on skipping before updating
        if not math.isfinite(norm):
            return StepResult(norm, True, 0.0)
        coef = clip_coefficient(norm, self.config.clip_grad)
        self.step_count += 1
        cfg, adamw = self.config, _adamw_fn(self.device)
        grad_shard = self.flat_grad[self.shard_start:self.shard_end]  # (S,)
        param_shard = self.flat_param[self.shard_start:self.shard_end]  # (S,) model dtype
        lowp = self.param_dtype in (torch.bfloat16, torch.float16)
        for r in self.ranges:
            part = slice(r.start, r.end)
            adamw(self.master[part], grad_shard[part], self.exp_avg[part], self.exp_avg_sq[part], lr=lr,
                  beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay if r.decay else 0.0,
                  step=self.step_count, params_lowp=param_shard[part] if lowp else None,
                  grad_scale=coef / self.dp_size)
        if not lowp:
            param_shard.copy_(self.master)  # padding stays 0: its grads are 0 and it is never decayed
        return StepResult(norm, False, coef)

    # ---- checkpoints -------------------------------------------------------------------------------

    def sharded_state_dict(self) -> dict:
        """This rank's optimizer state and the layout needed to re-cut it for another DP size.

        The tensors are the live fp32 shards (S,): save them (torch.save) before the next step.
        """
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step_count, "config": dataclasses.asdict(self.config),
            "tp_size": self.state.tp_size, "tp_rank": self.state.tp_rank,
            "dp_size": self.dp_size, "dp_rank": self.dp_rank, "shard": (self.shard_start, self.shard_end),
            "params": [(s.name, s.numel, s.offset) for s in self.slots],
            "master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
        }

    @torch.no_grad()
    def load_sharded_state_dicts(self, shards: list[dict]) -> None:
        """Resume from the shards saved by ALL DP ranks of a run (same TP rank), whatever its DP size.

        Each parameter is found by name in the old layout and this rank's new shard is cut from the old
        shards without building the full vectors. The masters, rounded to the model's dtype, are also
        written into the model's parameters (they are the source of truth the bf16 weights came from).
        """
        old = validate_shards(shards, self.state.tp_size, self.state.tp_rank)
        old_slots = {name: (numel, offset) for name, numel, offset in old[0]["params"]}
        mine = {s.name: s.numel for s in self.slots}
        if mine != {n: numel for n, (numel, _) in old_slots.items()}:
            missing = sorted(set(mine) - set(old_slots))
            unexpected = sorted(set(old_slots) - set(mine))
            resized = sorted(n for n in set(mine) & set(old_slots) if mine[n] != old_slots[n][0])
            raise ValueError(f"load_sharded_state_dicts: the checkpoint's parameters differ from the model's: "
                             f"missing {missing}, unexpected {unexpected}, different sizes {resized}")
        old_size = old[0]["shard"][1] - old[0]["shard"][0]
        for key in STATE_KEYS:
            target, old_shards = getattr(self, key), [s[key] for s in old]
            target.zero_()
            for slot in self.slots:
                lo, hi = max(slot.offset, self.shard_start), min(slot.offset + slot.numel, self.shard_end)
                if lo >= hi:
                    continue
                old_offset = old_slots[slot.name][1] + (lo - slot.offset)
                target[lo - self.shard_start:hi - self.shard_start] = read_flat(old_shards, old_size, old_offset,
                                                                               hi - lo)
        self.step_count = old[0]["step"]
        self.flat_param[self.shard_start:self.shard_end].copy_(self.master)
        self._all_gather_params()

    @torch.no_grad()
    def load_param_states(self, param_state, step: int) -> None:
        """Resume from whole per-parameter states: `param_state(name)` gives {"master", "exp_avg",
        "exp_avg_sq"} of parameter `name` as this rank holds it (fp32, its shape or flat).

        The way in for a checkpoint of another layout (another TP size: megamath.training.reshard), where
        each parameter is rebuilt by name. Only the parameters overlapping this rank's shard are asked
        for. As in load_sharded_state_dicts, the masters (rounded) become the model's weights.
        """
        shard: dict[str, list[tuple[int, int, torch.Tensor]]] = {key: [] for key in STATE_KEYS}
        for slot in self.slots:
            lo, hi = max(slot.offset, self.shard_start), min(slot.offset + slot.numel, self.shard_end)
            if lo >= hi:
                continue
            state = param_state(slot.name)
            for key in STATE_KEYS:
                flat = state[key].reshape(-1)  # (numel,)
                if flat.numel() != slot.numel:
                    raise ValueError(f"load_param_states: {key} of {slot.name} has {flat.numel()} elements, the "
                                     f"parameter {slot.numel}")
                piece = flat[lo - slot.offset:hi - slot.offset]  # (hi - lo,)
                shard[key].append((lo - self.shard_start, hi - self.shard_start, piece))
        for key in STATE_KEYS:  # only now: a refused load changes nothing
            target = getattr(self, key)
            target.zero_()
            for start, end, piece in shard[key]:
                target[start:end] = piece
        self.step_count = step
        self.flat_param[self.shard_start:self.shard_end].copy_(self.master)
        self._all_gather_params()


def read_flat(shards: list[torch.Tensor], shard_size: int, start: int, n: int) -> torch.Tensor:
    """Elements [start, start + n) of the old flat vector that `shards` (in DP-rank order) cut into size S."""
    pieces = []
    while n > 0:
        rank, local = divmod(start, shard_size)
        take = min(n, shard_size - local)
        pieces.append(shards[rank][local:local + take])
        start, n = start + take, n - take
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def validate_shards(shards: list[dict], tp_size: int, tp_rank: int) -> list[dict]:
    """The shards of TP rank tp_rank's whole DP group, sorted by DP rank; a clear error for anything else."""
    if not shards:
        raise ValueError("load_sharded_state_dicts: got no shards")
    for s in shards:
        if not isinstance(s, dict) or s.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"load_sharded_state_dicts: not a {CHECKPOINT_FORMAT} optimizer shard")
    shards = sorted(shards, key=lambda s: s["dp_rank"])
    dp_size = shards[0]["dp_size"]
    ranks = [s["dp_rank"] for s in shards]
    if ranks != list(range(dp_size)) or any(s["dp_size"] != dp_size for s in shards):
        raise ValueError(f"load_sharded_state_dicts: need the shards of all {dp_size} DP ranks exactly once, "
                         f"got DP ranks {ranks}")
    first = shards[0]
    if (first["tp_size"], first["tp_rank"]) != (tp_size, tp_rank):
        raise ValueError(f"load_sharded_state_dicts: the shards are of TP rank {first['tp_rank']} of "
                         f"{first['tp_size']}, this process is TP rank {tp_rank} of {tp_size} "
                         "(resharding across tensor parallelism goes through megamath.training.reshard: "
                         "`megamath reshard`)")
    for s in shards[1:]:
        if (s["params"], s["step"], s["tp_rank"]) != (first["params"], first["step"], first["tp_rank"]):
            raise ValueError(f"load_sharded_state_dicts: DP rank {s['dp_rank']}'s shard is from another run or step "
                             "(its layout, step or TP rank differs from DP rank 0's)")
    size = first["shard"][1] - first["shard"][0]
    for s in shards:
        if any(s[k].numel() != size for k in STATE_KEYS):
            raise ValueError(f"load_sharded_state_dicts: DP rank {s['dp_rank']}'s tensors do not have the shard "
                             f"size {size}")
    return shards
