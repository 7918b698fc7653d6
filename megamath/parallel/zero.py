"""ZeRO-1: AdamW whose fp32 master weights and moments are split over the data-parallel ranks.

Why: with Adam, the optimizer state (fp32 master + two moments = 12 bytes per parameter) is six times
the bf16 weights. Data-parallel ranks all hold the same weights, so each can own 1/dp of that state and
update only its part (llm.c's ZeRO-1, Megatron's distributed optimizer).

Layout (explicit offsets over flat buffers, see zero_layout.py). Every trainable parameter of the model
is re-pointed into ONE flat parameter buffer (`p.data` becomes a view of it), and its gradient is summed
into ONE flat gradient buffer, both in backward order (lm_head first) and cut into buckets of about
`bucket_mb` MiB of gradients. Each bucket is padded and split into dp equal pieces: DP rank r owns piece
r of every bucket, and its fp32 master, exp_avg, exp_avg_sq are those pieces concatenated (length S).

Bytes per parameter on one rank, bf16 model (`zero_layout.buffer_bytes`, plus the padding):

    bf16 params 2 + grads (4 with grad_dtype "fp32", 2 with "bf16") + (master 4 + exp_avg 4 + exp_avg_sq 4) / dp
    fp32 grads: 6 + 12/dp;  bf16 grads: 4 + 12/dp

(7B at dp = 8 with fp32 grads: 6 + 1.5 = 7.5 bytes, 52 GB, against 18 bytes without sharding.)
What grad_dtype costs: "fp32" adds each micro-batch's gradient into an fp32 buffer (a linear weight's,
with gradient-accumulation fusion, as its matmul's fp32 product; otherwise in bf16, as autograd computes
it), so the accumulation over micro-batches and the DP sum round only once, at the end, to fp32; "bf16"
saves 2 bytes per parameter and half the reduce-scatter's bytes, but rounds to bf16 at every
micro-batch's add and inside the reduce-scatter (the DP sum is taken in bf16 by the collective); "auto"
(the default) is "bf16" exactly where no sum enters the buffer (bf16 weights, one micro-batch, one GPU:
zero_layout.resolve_grad_dtype), where it holds autograd's bf16 gradients as they are, and "fp32"
everywhere else.

One step (`step(lr)`), in three phases:
  1. `_reduce_scatter_grads`: every bucket's gradients summed over DP into this rank's pieces (a sum; the
     1/dp of the average is folded into the norm and AdamW's grad_scale). With overlap_grad_reduce and
     `zero_grad(micro_batches=n)`, a bucket's reduce-scatter was already started, asynchronously, by the
     gradient hook that delivered the bucket's last gradient of the n-th backward; this phase starts
     the rest and waits. Sequence-parallel weights are then summed over TP (`sum_sequence_parallel_grads`).
  2. `_norm_and_scale`, then `_update`: the global gradient norm over the DP pieces and TP splits
     (grad_clip.py); a non-finite norm on any rank skips the update on every rank; clipping joins
     grad_scale; AdamW on this rank's ranges writes the new bf16 weights straight into its pieces of the
     parameter buffer. All of it on the device: the clip factor, and the skip (a NaN grad_scale, which the
     AdamW kernel treats as "write nothing"), so the host launches the whole step without waiting for the
     norm. `launch_step` returns the step's figures as a device tensor; the caller reads them once, at the
     step's end, together with its loss, and hands them to `finish_step` (`step` does both, for callers
     that read nothing else).
  3. `_all_gather_params`: each bucket's pieces all-gathered over DP, embedding's bucket first. With
     overlap_param_gather they run while the next forward starts: a forward pre-hook on each module
     waits only for its own parameters' buckets (`model.state_dict()` and the next step wait for all).

With overlap_optimizer_step, phases 2 and 3 go bucket by bucket instead (`_launch_updates`): once the norm
is known, each bucket's AdamW and then its all-gather, in the forward's order, on a side CUDA stream. The
forward pre-hooks that wait for a bucket's all-gather first wait for its update (an event), so the
update of later layers runs under the next forward of earlier ones: AdamW reads and writes ~30 bytes per
parameter, a fifth of a step at Code Llama 7B's width with one micro-batch (arithmetic), while the forward's
matmuls are compute-bound. The forward's end, `state_dict`, the checkpoint's shards, `grad_view` and the
next step wait for whatever is still running.

The overlaps move only when a collective or an update is issued, never what it computes: the buckets,
their collectives, the kernels on each range and the order of every floating-point operation are the
same with and without them, so results are bit-identical.

Gradients reach the flat buffer through post-accumulate-grad hooks: once autograd has accumulated a
parameter's gradient, the hook puts it into the buffer and frees `p.grad`. This allows a gradient buffer
whose dtype differs from the model's (torch refuses a `.grad` of another dtype), and accumulates over
micro-batches until `zero_grad()`. The first gradient of a parameter after `zero_grad()` is copied, later
ones added, so `zero_grad()` clears nothing: it only marks every slot as awaiting its first gradient.
That saves, per step, a pass writing the whole buffer with zeros and the first add's read of them
(for 1B parameters and fp32 gradients, about 8 GB of memory traffic). A parameter whose gradient never
arrives (unused in the forward) has its slot zeroed before anything reads the buffer: the reductions,
the step and `grad_view`. Copying is exact: x + 0 is x (only -0.0 becomes +0.0 in the add). A linear
weight's gradients (and the embedding's, by its lookup) skip the hook: its matmul writes the first into the
slot and, with
optimizer.gradient_accumulation_fusion (the default), adds later ones there, in the buffer's dtype
(`_BufferSlot`, grad_into_buffer.py), and the hook finds no `p.grad`; without fusion only a first gradient
into a buffer of the weight's own dtype does.

Which parameters are split over the TP ranks (each holds a different piece) is passed by name
(`split_names`, for Llama `model.split_parameter_names()`, from megamath.model.partition); everything else
is replicated on every TP rank. Nothing is read from attributes on the parameter tensors, which vanish
when a model's parameters are re-created (`to_empty` for a pretrained init).

Why one file: it is one object's job. The buffers, the gradient and forward hooks, the bucketed
collectives in flight and the step share that object's state; about 80 of its lines are this docstring.
The layout arithmetic (zero_layout.py), the settings (optimizer_config.py) and the checkpoint format and
re-cutting (zero_checkpoint.py) live apart.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass
from typing import Collection

import torch
import torch.nn as nn

from megamath.kernels.adamw import adamw_step, adamw_step_ref
from megamath.kernels.sum_of_squares import sum_of_squares, sum_of_squares_ref
from megamath.parallel.grad_clip import clip_coefficient, global_grad_norm
from megamath.parallel.mappings import (all_gather_into, all_gather_list, all_reduce_, native_collectives,
                                        reduce_scatter_into)
from megamath.parallel.optimizer_config import GRAD_DTYPES, OptimizerConfig
from megamath.parallel import grad_into_buffer, zero_checkpoint
from megamath.parallel.state import ParallelState
from megamath.parallel.zero_layout import ParamSlot, ZeroLayout, bucket_numel_for, resolve_grad_dtype, zero_layout


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    """Global L2 norm of the DP-averaged gradient, before clipping (nan/inf when it is what skipped the step;
    a false `finite` flag skips it with a finite norm)."""
    skipped: bool
    """True when the norm was not finite (or the caller's `finite` flag was false) and nothing was updated."""
    clip_coef: float
    """The factor the gradient was scaled by (1.0 without clipping; 0.0 when skipped)."""


@dataclass(frozen=True)
class ShardRange:
    """A run of the shard, [start, end) in shard coordinates, whose parameters share decay, TP-ness and learning
    rate (`decoupled`: optimizer.decoupled_lr's); it lies in one bucket piece, at [flat_start, flat_start + end -
    start) of the flat buffers."""

    start: int
    end: int
    flat_start: int
    decay: bool
    tensor_parallel: bool
    decoupled: bool = False

    @property
    def flat(self) -> slice:
        return slice(self.flat_start, self.flat_start + self.end - self.start)


class _BufferSlot:
    """grad_into_buffer.GradSlot of one parameter: its view of the flat gradient buffer, offered for the step's
    first gradient (written) and, with gradient-accumulation fusion, for later ones (added). The optimizer is
    held weakly (the registry lives as long as the parameter)."""

    def __init__(self, optimizer: "ZeroOptimizer", index: int, slot: ParamSlot, shape: tuple[int, ...]):
        self._optimizer = weakref.ref(optimizer)
        self.index, self.slot, self.shape = index, slot, shape

    def claim(self) -> tuple[torch.Tensor, bool] | None:
        opt = self._optimizer()
        if opt is None or opt._grad_work[self.slot.bucket] is not None:
            return None  # a bucket already sent: the hook's path (and its error)
        later = opt._arrived[self.index]
        if later and (not opt.gradient_accumulation_fusion or opt._one_gradient):
            return None  # a sum the hook adds (or, for grad_dtype auto's one gradient, refuses)
        return opt.flat_grad[self.slot.offset:self.slot.offset + self.slot.numel].view(self.shape), later

    def filled(self) -> None:
        opt = self._optimizer()
        opt._arrived[self.index] = True
        opt._gradient_in(self.slot)


def _adamw_fn(device: torch.device):
    """The Triton kernel on CUDA, its plain-torch reference elsewhere (as megamath.model.ops dispatches)."""
    return adamw_step if device.type == "cuda" else adamw_step_ref


def _sum_of_squares_fn(device: torch.device):
    """Σ g² in fp64: the Triton kernel on CUDA (one read of the buffer), elsewhere its reference (fp64 norm)."""
    return sum_of_squares if device.type == "cuda" else sum_of_squares_ref


class ZeroOptimizer:
    """AdamW over flat buffers with fp32 master weights and moments sharded over the DP group.

    Build it after the model is on its device and in its training dtype (bf16; fp32 works too). The
    model must not be moved or cast afterwards: its parameters are views of this optimizer's buffer.
    `split_names`: the names of the parameters tensor parallelism splits (required when tp_size > 1;
    the gradient norm sums their squares over TP and counts the other parameters once).
    `bucket_mb`: MiB of gradients per bucket (0: one bucket). `overlap_grad_reduce` /
    `overlap_param_gather`: start the reduce-scatters in the backward / finish the all-gathers in the next
    forward (see the module docstring); off, each runs inside step(). `overlap_optimizer_step`: AdamW bucket
    by bucket on a side CUDA stream, under the next forward (the module docstring). `micro_batches`: backward passes per
    step, when fixed; config.grad_dtype "auto" takes a bf16 buffer only when it is 1 and nothing else sums
    into the buffer (zero_layout.resolve_grad_dtype), and a second gradient per step is then refused.
    """

    def __init__(self, model: nn.Module, state: ParallelState, config: OptimizerConfig,
                 split_names: Collection[str] = (), *, bucket_mb: float = 0.0, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False, micro_batches: int | None = None,
                 overlap_optimizer_step: bool = False, decoupled_names: Collection[str] = ()):
        self.state, self.config = state, config
        self.dp_size, self.dp_rank, self.dp_group = state.dp_size, state.dp_rank, state.dp_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZeroOptimizer: the model has no trainable parameters")
        split_names, self.decoupled_names = set(split_names), set(decoupled_names)
        for what, names in (("split_names", split_names), ("decoupled_names", self.decoupled_names)):
            unknown = sorted(names - {n for n, _ in named})
            if unknown:
                raise ValueError(f"ZeroOptimizer: {what} names no trainable parameter of the model: {', '.join(unknown)}")
        if state.tp_size > 1 and not split_names:
            raise ValueError(f"ZeroOptimizer: tensor-parallel size {state.tp_size} needs split_names, the parameters TP "
                             "splits (Llama.split_parameter_names()), or the gradient norm would count their pieces "
                             "as replicated")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb >= 0:
            raise ValueError(f"ZeroOptimizer: bucket_mb must be a number >= 0, got {bucket_mb!r}")
        if micro_batches is not None and (isinstance(micro_batches, bool) or not isinstance(micro_batches, int)
                                          or micro_batches < 1):
            raise ValueError(f"ZeroOptimizer: micro_batches must be an integer >= 1 or None, got {micro_batches!r}")
        dtypes = sorted({str(p.dtype) for _, p in named})
        devices = sorted({str(p.device) for _, p in named})
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"ZeroOptimizer: all parameters must share one dtype and device for the flat buffer, "
                             f"got dtypes {dtypes} on devices {devices}")
        self.param_dtype, self.device = named[0][1].dtype, named[0][1].device
        self._adamw_writes_params = self.param_dtype in grad_into_buffer.LOW_PRECISION  # else the masters are copied
        self.grad_dtype = resolve_grad_dtype(config.grad_dtype, self.param_dtype == torch.bfloat16, self.dp_size,
                                             state.tp_size, micro_batches)
        self._one_gradient = config.grad_dtype == "auto" and self.grad_dtype == "bf16"  # exact only so
        grad_dtype = GRAD_DTYPES[self.grad_dtype]
        self.layout: ZeroLayout = zero_layout([(n, tuple(p.shape), n in split_names) for n, p in named],
                                              self.dp_size, bucket_numel_for(bucket_mb, grad_dtype.itemsize))
        self.slots: list[ParamSlot] = self.layout.slots
        self.buckets = self.layout.buckets
        self.numel, self.padded_numel, self.shard_size = (self.layout.numel, self.layout.padded_numel,
                                                          self.layout.shard_size)
        self.pieces = self.layout.rank_pieces(self.dp_rank)  # per bucket: (flat_start, flat_end, shard_start)
        self.overlap_grad_reduce, self.overlap_param_gather = bool(overlap_grad_reduce), bool(overlap_param_gather)
        self.overlap_optimizer_step = bool(overlap_optimizer_step)

        self.flat_param = torch.zeros(self.padded_numel, dtype=self.param_dtype, device=self.device)  # (N,)
        self.flat_grad = torch.zeros(self.padded_numel, dtype=grad_dtype, device=self.device)  # (N,)
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion and (
            grad_dtype == self.param_dtype or (grad_dtype == torch.float32
                                               and self.param_dtype in grad_into_buffer.LOW_PRECISION
                                               and grad_into_buffer.mixed_dtype_gemm(self.device.type)))
        """Whether linear weights' gradients are written and summed by their matmuls into the buffer (the
        setting, where this buffer and device allow it: grad_into_buffer.py); the training log says which."""
        into_buffer = self.gradient_accumulation_fusion or grad_dtype == self.param_dtype
        by_name = dict(named)
        self.params: list[nn.Parameter] = []
        self._slot_of: dict[int, ParamSlot] = {}  # id(parameter) -> its slot
        self._hooks = []
        self._params_per_bucket = [0] * len(self.buckets)
        with torch.no_grad():
            for slot in self.slots:
                p = by_name[slot.name]
                view = self.flat_param[slot.offset:slot.offset + slot.numel].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = None
                self.params.append(p)
                self._slot_of[id(p)] = slot
                self._params_per_bucket[slot.bucket] += 1
                grad_view = self.flat_grad[slot.offset:slot.offset + slot.numel].view_as(p)
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    self._make_grad_hook(len(self.params) - 1, slot, grad_view)))
                if into_buffer:  # the weight's matmul may write its gradient there itself
                    grad_into_buffer.register(p, _BufferSlot(self, len(self.params) - 1, slot, tuple(p.shape)))
        self._hook_forward(model)
        self.ranges = self._shard_ranges()
        self._norm_runs = self._runs_for_the_norm()
        self.master = torch.cat([self.flat_param[f0:f1] for f0, f1, _ in self.pieces]).to(torch.float32)  # (S,)
        self.exp_avg = torch.zeros_like(self.master)  # (S,)
        self.exp_avg_sq = torch.zeros_like(self.master)  # (S,)
        self.step_count = 0
        self._grad_work: list = [None] * len(self.buckets)  # in-flight reduce-scatter per bucket
        self._gather_work: list = [None] * len(self.buckets)  # in-flight all-gather per bucket
        self._update_work: list = [None] * len(self.buckets)  # per bucket: its AdamW in flight (overlapped step)
        self._side_stream = None  # the overlapped step's CUDA stream, made at its first use
        self._ranges_by_bucket = [[r for r in self.ranges if f0 <= r.flat_start < f1] for f0, f1, _ in self.pieces]
        self._ready = [0] * len(self.buckets)  # gradients delivered per bucket since zero_grad
        self._arrived = [False] * len(self.slots)  # per slot: a gradient since zero_grad (else it is stale)
        self._expected: list[int] | None = None  # gradients per bucket that complete it (None: no early start)
        self._sp_slots: list[ParamSlot] = []
        self.events: list | None = None
        """Set to a list to record ("grad", name), ("reduce_scatter", bucket), ("all_gather", bucket) ... in
        the order they happen (tests read it to see what overlaps what)."""

    def _hook_forward(self, model: nn.Module) -> None:
        """A forward pre-hook per module waits for its own parameters' all-gathers; state_dict waits for all.

        A module without parameters of its own whose children all hold parameters (a block of layers, not the
        model) also waits for its children's: it may apply their weights directly (the sequence-parallel
        attention and MLP fuse their column-parallel projections into one autograd function that never calls
        the projection modules)."""
        slot_by_name = {s.name: s for s in self.slots}
        self.forward_waits: dict[str, list[int]] = {}  # module name -> the buckets its forward pre-hook waits for
        for prefix, module in model.named_modules():
            own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
            names = own
            children = list(module.children())
            if (not own and module is not model and children
                    and all(any(True for _ in c.parameters(recurse=False)) for c in children)):
                names = [f"{prefix}.{c}.{n}" for c, child in module.named_children()
                         for n, _ in child.named_parameters(recurse=False)]
            # in forward order: the embedding's bucket (the last) first
            buckets = sorted({slot_by_name[n].bucket for n in names if n in slot_by_name}, reverse=True)
            if buckets:
                self.forward_waits[prefix] = buckets
                self._hooks.append(module.register_forward_pre_hook(
                    lambda mod, args, buckets=buckets: self._wait_param_gathers(buckets)))
        self._hooks.append(model.register_state_dict_pre_hook(lambda *args: self.finish_param_sync()))
        # After the whole forward nothing may still update: the backward writes the gradients AdamW reads (a
        # bucket no module waited for, of parameters the forward did not use, is waited for here).
        self._hooks.append(model.register_forward_hook(lambda *args: self._wait_updates(range(len(self.buckets)))))

    def _make_grad_hook(self, index: int, slot: ParamSlot, grad_view: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            grad = p.grad  # (shape of p): this micro-batch's gradient, which autograd has just accumulated
            if grad is None:  # its matmul wrote it into the buffer (_BufferSlot): autograd accumulated nothing
                return
            if torch.promote_types(grad.dtype, grad_view.dtype) != grad_view.dtype:
                grad = grad.to(grad_view.dtype)  # fp32 into a bf16 buffer; bf16 into fp32 adds without a copy
            if self._grad_work[slot.bucket] is not None:
                raise RuntimeError(f"ZeroOptimizer: a gradient of {slot.name} arrived after its bucket's "
                                   "reduce-scatter started: more backward passes than zero_grad(micro_batches=...) "
                                   "announced")
            if self._arrived[index]:
                if self._one_gradient:
                    raise RuntimeError(f"ZeroOptimizer: a second gradient of {slot.name} in one step, but grad_dtype "
                                       "auto chose a bf16 buffer for one micro-batch per step (micro_batches=1): "
                                       "pass the real count, or set grad_dtype")
                grad_view.add_(grad)
            else:  # the slot still holds an earlier step's values: overwrite them
                grad_view.copy_(grad)
                self._arrived[index] = True
            p.grad = None
            self._gradient_in(slot)
        return hook

    def _gradient_in(self, slot: ParamSlot) -> None:
        """A gradient of `slot` is in the buffer (by the hook, or written there by its matmul: _BufferSlot)."""
        if self.events is not None:
            self.events.append(("grad", slot.name))
        if self._expected is not None:
            self._ready[slot.bucket] += 1
            if self._ready[slot.bucket] == self._expected[slot.bucket]:
                self._launch_reduce_scatter(slot.bucket)  # the bucket's last gradient of the last backward

    def _shard_ranges(self) -> list[ShardRange]:
        """The parameters' pieces inside this rank's bucket pieces, merged into runs of equal (decay, TP, learning
        rate), never across buckets: with DP 1 one bucket's piece ends where the next one's begins, and the
        overlapped step updates (and marks done) each bucket's runs on their own (_launch_updates)."""
        ranges: list[ShardRange] = []
        for slot in self.slots:
            f0, f1, s0 = self.pieces[slot.bucket]
            lo, hi = max(slot.offset, f0), min(slot.offset + slot.numel, f1)
            if lo >= hi:
                continue
            start, last = s0 + lo - f0, ranges[-1] if ranges else None
            decoupled = slot.name in self.decoupled_names
            if (last and last.end == start and last.flat.stop == lo and last.flat_start >= f0
                    and (last.decay, last.tensor_parallel, last.decoupled) == (slot.decay, slot.tensor_parallel,
                                                                              decoupled)):
                ranges[-1] = dataclasses.replace(last, end=start + hi - lo)
            else:
                ranges.append(ShardRange(start, start + hi - lo, lo, slot.decay, slot.tensor_parallel, decoupled))
        return ranges

    def _runs_for_the_norm(self) -> list[tuple[slice, bool]]:
        """(flat slice, tensor_parallel) for the gradient norm: the ranges joined where they touch in the buffer
        and their TP flag agrees, or whatever it is without TP (both sums then just add). The norm needs no
        decay or learning-rate runs: at Code Llama 7B's width and 4 layers its 19 ranges (norms between the
        linears) become one, and one sum_of_squares launch replaces 19 launches and 19 fp64 adds, most of
        them over a norm's few thousand elements: host launches the GPU was left waiting for."""
        runs: list[tuple[slice, bool]] = []
        any_flag = self.state.tp_group is None
        for r in self.ranges:
            if runs and runs[-1][0].stop == r.flat.start and (any_flag or runs[-1][1] == r.tensor_parallel):
                runs[-1] = (slice(runs[-1][0].start, r.flat.stop), runs[-1][1])
            else:
                runs.append((r.flat, r.tensor_parallel))
        return runs

    def remove_hooks(self) -> None:
        """Finish the parameters' all-gathers and detach every hook (the parameters stay views of the buffer)."""
        self.finish_param_sync()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for p in self.params:
            grad_into_buffer.unregister(p)

    def zero_grad(self, micro_batches: int | None = None) -> None:
        """Start a new gradient sum; call once per optimizer step, before the first micro-batch. Nothing is
        written: each parameter's first gradient overwrites its slot (see the module docstring).

        micro_batches: the number of backward passes before step(). With overlap_grad_reduce, each bucket's
        reduce-scatter then starts inside the last one, as soon as its gradients are complete; None starts
        them all in step() (the only safe choice when the count is not known).
        """
        self._wait_grad_reductions()  # a step the caller skipped (non-finite loss) may leave some in flight
        self._arrived = [False] * len(self.slots)
        self._ready = [0] * len(self.buckets)
        early = self.overlap_grad_reduce and micro_batches and self.dp_group is not None
        self._expected = [n * micro_batches for n in self._params_per_bucket] if early else None
        self._sp_slots = []

    def grad_view(self, p: nn.Parameter) -> torch.Tensor:
        """Parameter p's accumulated gradient: its view (shape of p) into the flat gradient buffer."""
        slot = self._slot_of.get(id(p))
        if slot is None:
            raise KeyError("ZeroOptimizer.grad_view: the parameter is not one of this optimizer's")
        self._wait_updates(range(len(self.buckets)))  # an overlapped step may still read the buffer
        self._zero_missing_grads()
        return self.flat_grad[slot.offset:slot.offset + slot.numel].view_as(p)

    def _zero_missing_grads(self) -> None:
        """Zero the slots of parameters whose gradient has not arrived since zero_grad (stale values)."""
        if all(self._arrived):
            return
        for index, slot in enumerate(self.slots):
            if not self._arrived[index]:
                self.flat_grad[slot.offset:slot.offset + slot.numel].zero_()
                self._arrived[index] = True

    def sum_sequence_parallel_grads(self, params: list[nn.Parameter]) -> None:
        """Have this step sum these parameters' gradients over TP (the sequence-parallel norm weights, whose
        gradient on each TP rank covers only its sequence chunk). It is done in step(), after the DP
        reduction and on this rank's pieces only, so it never races an in-flight reduce-scatter and costs
        1/dp of a full all-reduce; the sum is linear, so the order (DP, then TP) gives the same total."""
        self._sp_slots = sorted((self._slot_of[id(p)] for p in params), key=lambda s: s.offset)

    # ---- communication --------------------------------------------------------------------------------

    def _record(self, *event) -> None:
        if self.events is not None:
            self.events.append(event)

    def _launch_reduce_scatter(self, b: int) -> None:
        bucket, (f0, f1, _) = self.buckets[b], self.pieces[b]
        grad = self.flat_grad[bucket.start:bucket.end]  # (dp·L,): row r is rank r's piece
        if native_collectives(self.dp_group):
            work = reduce_scatter_into(self.flat_grad[f0:f1], grad, self.dp_group, async_op=True)  # in place
        else:
            work = all_reduce_(grad, self.dp_group, async_op=True)  # every row summed; ours is used
        self._grad_work[b] = work
        self._record("reduce_scatter", b)

    def _wait_grad_reductions(self) -> None:
        for b, work in enumerate(self._grad_work):
            if work is not None:
                work.wait()
                self._grad_work[b] = None

    def _launch_all_gather(self, b: int) -> None:
        bucket, (f0, f1, _) = self.buckets[b], self.pieces[b]
        full, mine = self.flat_param[bucket.start:bucket.end], self.flat_param[f0:f1]  # (dp·L,), (L,)
        if native_collectives(self.dp_group):
            self._gather_work[b] = (all_gather_into(full, mine, self.dp_group, async_op=True), None)  # in place
        else:
            source = mine.clone()  # kept alive until the wait
            rows = list(full.view(self.dp_size, -1).unbind(0))
            _, work = all_gather_list(source, self.dp_group, async_op=True, out=rows)
            self._gather_work[b] = (work, source)
        self._record("all_gather", b)

    def _wait_updates(self, buckets) -> None:
        """The current stream waits for these buckets' overlapped AdamW (a no-op for buckets without one)."""
        for b in buckets:
            work = self._update_work[b]
            if work is not None:
                if isinstance(work, torch.cuda.Event):
                    torch.cuda.current_stream(self.device).wait_event(work)
                self._update_work[b] = None
                self._record("wait_update", b)

    def _wait_param_gathers(self, buckets) -> None:
        self._wait_updates(buckets)
        for b in buckets:
            if self._gather_work[b] is not None:
                self._gather_work[b][0].wait()
                self._gather_work[b] = None
                self._record("wait_all_gather", b)

    def finish_param_sync(self) -> None:
        """Wait for every overlapped update and parameter all-gather still in flight (before reading the weights
        or the optimizer's state outside a forward)."""
        self._wait_param_gathers(range(len(self.buckets)))

    # ---- the step ----------------------------------------------------------------------------------

    def _check_views(self) -> None:
        for slot, p in zip(self.slots, self.params):
            if p.data_ptr() != self.flat_param[slot.offset:].data_ptr() or p.dtype != self.param_dtype:
                raise RuntimeError(f"ZeroOptimizer: parameter {slot.name} no longer lives in the optimizer's flat "
                                   "buffer (was the model moved or cast after the optimizer was built?)")

    def _reduce_scatter_grads(self) -> None:
        """Phase 1: each bucket summed over DP into this rank's piece (the backward may have started some)."""
        self._zero_missing_grads()  # a bucket started early had all its gradients; the others may not
        if self.dp_group is not None:
            for b in range(len(self.buckets)):
                if self._grad_work[b] is None:
                    self._launch_reduce_scatter(b)
            self._wait_grad_reductions()
            self._record("reduce_scatter_done")
        self._expected = None
        self._sum_sequence_parallel()

    def _sum_sequence_parallel(self) -> None:
        """The TP sum asked for by sum_sequence_parallel_grads, over this rank's pieces, as one message."""
        slots, self._sp_slots = self._sp_slots, []
        if self.state.tp_size == 1 or not slots:
            return
        views = []
        for slot in slots:  # the same pieces on every TP rank: their layouts are identical
            f0, f1, _ = self.pieces[slot.bucket]
            lo, hi = max(slot.offset, f0), min(slot.offset + slot.numel, f1)
            if lo < hi:
                views.append(self.flat_grad[lo:hi])
        if views:
            flat = torch.cat(views)  # (Σ,)
            all_reduce_(flat, self.state.tp_group)
            offset = 0
            for v in views:
                v.copy_(flat[offset:offset + v.numel()])
                offset += v.numel()

    def _grad_norm(self) -> torch.Tensor:
        """Global norm of the DP-averaged gradient (fp32 scalar); valid after _reduce_scatter_grads."""
        # Squares accumulate in fp64: a CPU fp32 norm over millions of elements is off by ~1e-4 relative,
        # enough to move the clip coefficient away from what a serial run (or transformers) computes. On CUDA
        # the kernel reads the buffer once; the fp64 norm would first copy it to fp64 (kernels/sum_of_squares.py).
        sums = {True: torch.zeros((), dtype=torch.float64, device=self.device),
                False: torch.zeros((), dtype=torch.float64, device=self.device)}
        squares = _sum_of_squares_fn(self.device)
        for flat, tensor_parallel in self._norm_runs:
            sums[tensor_parallel] += squares(self.flat_grad[flat])
        norm = global_grad_norm(sums[True], sums[False], dp_group=self.dp_group, tp_group=self.state.tp_group)
        return norm / self.dp_size  # the buffer holds the DP sum; the average is 1/dp of it

    @torch.no_grad()
    def step(self, lr: float, timer=None, decoupled_lr: float | None = None) -> StepResult:
        """One AdamW update at learning rate lr of the gradients accumulated since zero_grad(); reads its
        result on the host at the end (launch_step, then finish_step)."""
        return self.finish_step(self.launch_step(lr, timer, decoupled_lr=decoupled_lr).tolist())

    @torch.no_grad()
    def launch_step(self, lr: float, timer=None, finite: torch.Tensor | None = None,
                    decoupled_lr: float | None = None) -> torch.Tensor:
        """The whole step, launched without a device-to-host sync: (grad_norm, applied 1/0, clip_coef), a (3,)
        fp32 tensor on the device. Read it when the step has to end anyway and pass the values to
        finish_step before the next step.

        `finite` (optional, a bool device scalar, the same on every rank) must also hold for the update to
        happen: the training loop passes `isfinite(loss)`. `timer` (a megamath.training.phases.PhaseTimer)
        times grad_reduce / optimizer / param_gather; with the overlaps on, grad_reduce is the wait for
        reductions the backward started, and param_gather the launch of gathers the next forward waits for.
        A skipped update still all-gathers the (unchanged) parameters: the host does not know it was skipped.
        `decoupled_lr`: the learning rate of the decoupled_names parameters (default: `lr`).
        """
        lrs = (lr, lr if decoupled_lr is None else decoupled_lr)  # (the others', decoupled_names')
        phase = timer.phase if timer is not None else (lambda name: contextlib.nullcontext())
        with phase("param_gather"):
            self.finish_param_sync()  # the last step's gathers (the forward has normally waited for them all)
        with phase("grad_reduce"):
            self._check_views()
            self._reduce_scatter_grads()
        with phase("optimizer"):
            stats, grad_scale = self._norm_and_scale(finite)
            if self.overlap_optimizer_step:
                self._launch_updates(lrs, grad_scale)  # and each bucket's all-gather after its update
            else:
                self._update(lrs, grad_scale)
        with phase("param_gather"):
            if not self.overlap_optimizer_step:
                self._all_gather_params()
        return stats

    def finish_step(self, stats: list[float]) -> StepResult:
        """The StepResult of launch_step's (grad_norm, applied, clip_coef), read on the host."""
        grad_norm, applied, clip_coef = stats
        if not applied:
            self.step_count -= 1  # counted at launch for the bias correction, but nothing was updated
            return StepResult(grad_norm, True, 0.0)
        return StepResult(grad_norm, False, clip_coef)

    def _norm_and_scale(self, finite: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 2's decisions, on the device: the norm, the skip, clipping. Returns the step's figures (grad_norm,
        applied, clip_coef) and AdamW's grad_scale (NaN when skipped: the kernel then writes nothing)."""
        norm = self._grad_norm()  # () fp32, the same on every rank
        applied = torch.isfinite(norm) if finite is None else torch.isfinite(norm) & finite
        coef = clip_coefficient(norm, self.config.clip_grad)  # () fp32
        grad_scale = torch.where(applied, coef / self.dp_size, torch.nan)  # NaN: the AdamW kernel writes nothing
        self.step_count += 1  # taken back by finish_step if the update was skipped
        return torch.stack([norm, applied.float(), coef.float()]), grad_scale

    def _adamw(self, ranges: list[ShardRange], lrs: tuple[float, float], grad_scale: torch.Tensor) -> None:
        cfg, adamw = self.config, _adamw_fn(self.device)
        lowp = self._adamw_writes_params
        for r in ranges:
            part = slice(r.start, r.end)
            adamw(self.master[part], self.flat_grad[r.flat], self.exp_avg[part], self.exp_avg_sq[part],
                  lr=lrs[1] if r.decoupled else lrs[0],
                  beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay if r.decay else 0.0,
                  step=self.step_count, params_lowp=self.flat_param[r.flat] if lowp else None,
                  grad_scale=grad_scale)

    def _update(self, lrs: tuple[float, float], grad_scale: torch.Tensor) -> None:
        """Phase 2's AdamW on this rank's ranges, writing the new weights straight into its pieces."""
        self._adamw(self.ranges, lrs, grad_scale)
        if not self._adamw_writes_params:
            self._masters_to_params()  # padding stays 0: its grads are 0 and it is never decayed

    def _launch_updates(self, lrs: tuple[float, float], grad_scale: torch.Tensor) -> None:
        """Phases 2 and 3 bucket by bucket, in the forward's order (the embedding's bucket first): each bucket's
        AdamW, then its all-gather. On CUDA they run on a side stream, once the norm and grad_scale (on the
        current stream) are done; an event per bucket marks its update, which the next forward's pre-hook waits
        for (_wait_param_gathers), so the updates of later layers run under the forward of earlier ones. The
        same kernels on the same ranges as _update: the same bits. Elsewhere the same order, inline."""
        side = None
        if self.device.type == "cuda":
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(self.device))  # the norm, grad_scale and the gradients
            grad_scale.record_stream(side)  # freed by this stream's host code, read by the side stream's kernels
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for b in reversed(range(len(self.buckets))):
                self._adamw(self._ranges_by_bucket[b], lrs, grad_scale)
                if not self._adamw_writes_params:
                    self._masters_to_params([b])
                self._record("update", b)
                if side is not None:
                    self._update_work[b] = torch.cuda.Event()
                    self._update_work[b].record(side)
                else:
                    self._update_work[b] = True  # done already; waiting only records it (for the tests' events)
                if self.dp_group is not None:
                    self._launch_all_gather(b)  # from the side stream: the collective waits for the update
        if self.dp_group is not None and not self.overlap_param_gather:
            self.finish_param_sync()  # the gathers end in step(), and with them the updates they follow

    def _masters_to_params(self, buckets=None) -> None:
        """The masters (rounded to the weights' dtype) into these buckets' pieces of the weights (default all)."""
        for b in range(len(self.pieces)) if buckets is None else buckets:
            f0, f1, s0 = self.pieces[b]
            self.flat_param[f0:f1].copy_(self.master[s0:s0 + f1 - f0])

    def _all_gather_params(self) -> None:
        """Phase 3: the updated pieces all-gathered over DP, the embedding's bucket (the forward's first) first."""
        if self.dp_group is None:
            return
        for b in reversed(range(len(self.buckets))):
            self._launch_all_gather(b)
        if not self.overlap_param_gather:
            self.finish_param_sync()

    # ---- checkpoints (the shard format and the re-cutting: zero_checkpoint.py) --------------------------

    def sharded_state_dict(self) -> dict:
        """This rank's optimizer state and the layout needed to re-cut it (zero_checkpoint.sharded_state_dict)."""
        return zero_checkpoint.sharded_state_dict(self)

    def load_sharded_state_dicts(self, shards: list[dict]) -> None:
        """Resume from the shards of ALL DP ranks of a run, whatever its DP size and layout
        (zero_checkpoint.load_sharded_state_dicts)."""
        zero_checkpoint.load_sharded_state_dicts(self, shards)

    def load_param_states(self, param_state, step: int) -> None:
        """Resume from whole per-parameter states (zero_checkpoint.load_param_states)."""
        zero_checkpoint.load_param_states(self, param_state, step)

    def _param_pieces(self):
        """(slot, lo, hi, shard_start): the part [lo, hi) (flat coordinates) of each parameter this rank owns."""
        for slot in self.slots:
            f0, f1, s0 = self.pieces[slot.bucket]
            lo, hi = max(slot.offset, f0), min(slot.offset + slot.numel, f1)
            if lo < hi:
                yield slot, lo, hi, s0 + lo - f0

    def _sync_params_from_masters(self) -> None:
        self.finish_param_sync()
        self._masters_to_params()
        self._all_gather_params()
        self.finish_param_sync()
