"""Read the Adam state of a Megatron-LM checkpoint: each parameter's fp32 master, exp_avg and exp_avg_sq.

Why: a run converted with its weights alone continues with fresh moments (and weights rounded to bf16), and
Adam's first updates after a restart are lr-sized for every element whatever its gradient (the bias
correction makes m̂/√v̂ ≈ ±1), a jolt a continued pretraining run does not need. With the state, the run
goes on as Megatron-LM would have.

Read, from the `torch_dist` format, where Megatron-LM stores the state per parameter, in the weights' own
global layout (layers stacked on the first axis, linear_qkv grouped by query group, linear_fc1 [gate; up]):
- the non-distributed optimizer: `optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<key>`; a parameter kept
  in float32 (the norms of a --bf16 run) has no fp32_param, its weight is its master; the Adam step is the
  common state's `common_step`;
- the distributed optimizer saved with `--dist-ckpt-optim-fully-reshardable`:
  `optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`, the step in the param groups;
- the distributed optimizer's default layout (`dp_reshardable`): flat buckets whose parameter order the file
  does not record, rebuilt and checked against the weights by megatron_buckets.
From the legacy `torch` format, both optimizers (megatron_torch_optimizer). Refused with what to do instead:
a checkpoint saved without its optimizer (--no-save-optim), and a layout no known parameter order fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megamath.compat import megatron_torch_optimizer as torch_format
from megamath.compat.megatron_buckets import bucket_states
from megamath.compat.megatron_checkpoint import MegatronWeights, dist_roles, dist_tensors

STATE_PREFIXES = {"exp_avg": "optimizer.state.exp_avg.", "exp_avg_sq": "optimizer.state.exp_avg_sq.",
                  "fp32_param": "optimizer.state.fp32_param.", "param": "optimizer.state.param."}
FULLY_RESHARDABLE = "fully_reshardable"
BUCKETED = "dp_reshardable"
PER_PARAMETER = "per parameter"  # the non-distributed optimizer
_WEIGHTS_ONLY = ("convert the weights alone with `megamath convert megatron-to-hf` and continue with init_from_hf "
                 "and init_step (the moments then start fresh)")


@dataclass
class MegatronAdam:
    """A checkpoint's Adam state: per state ("master", "exp_avg", "exp_avg_sq"), the global tensors by role
    (MegatronWeights' roles), read when asked; the optimizer's step count and settings."""

    step: int
    sharding: str
    betas: tuple[float, float]
    eps: float
    states: dict[str, MegatronWeights] = field(default_factory=dict)


def read_megatron_adam(weights: MegatronWeights) -> MegatronAdam:
    """The Adam state stored beside `weights` (read_megatron_checkpoint's result), every tensor checked
    against its weight's shape before anything is read."""
    if weights.source is None:
        return _read_torch_format(weights)
    checkpoint = weights.source
    where = str(checkpoint.folder)
    common = checkpoint.common_state()
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict):
        raise ValueError(f"{where}: the checkpoint holds no optimizer state (saved with --no-save-optim?); "
                         + _WEIGHTS_ONLY)
    sharding = optimizer.get("param_state_sharding_type")
    if sharding == BUCKETED:
        return _read_bucketed(weights, checkpoint, where)
    if sharding is not None and sharding != FULLY_RESHARDABLE:
        raise ValueError(f"{where}: the distributed optimizer's state is stored as {sharding!r}, a layout megamath "
                         "does not read; save it once with --dist-ckpt-optim-fully-reshardable (Megatron-LM writes "
                         "each parameter's state then), or " + _WEIGHTS_ONLY)
    inner = optimizer.get("optimizer", optimizer)
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    if not groups:
        raise ValueError(f"{where}: the optimizer state has no param_groups; " + _WEIGHTS_ONLY)
    step = _step(groups, where, (inner.get("state") or {}).get("common_step"))
    betas, eps = _settings(groups, where)
    master = "param" if sharding == FULLY_RESHARDABLE else "fp32_param"
    adam = MegatronAdam(step, sharding or PER_PARAMETER, betas, eps)
    for state in ("exp_avg", "exp_avg_sq", master):
        found = MegatronWeights(weights.args, weights.iteration, "torch_dist", source=checkpoint)
        found.tensors = dist_tensors(checkpoint, dist_roles(checkpoint, STATE_PREFIXES[state]))
        adam.states["master" if state == master else state] = found
    _fill_float32_masters(adam.states["master"], weights, where)
    _check_complete(adam, weights, where)
    return adam


def _read_bucketed(weights: MegatronWeights, checkpoint, where: str) -> MegatronAdam:
    """The distributed optimizer's default layout, rebuilt and checked by megatron_buckets."""
    key = "optimizer.distributed.dp_group_idx_0.optimizer"
    groups = (checkpoint.read_object(key) or {}).get("param_groups") if checkpoint.object_keys(key) else None
    if not groups:
        raise ValueError(f"{where}: the bucketed optimizer state has no param_groups ({key}); " + _WEIGHTS_ONLY)
    states, order = bucket_states(weights, checkpoint)
    betas, eps = _settings(groups, where)
    adam = MegatronAdam(_step(groups, where), f"{BUCKETED} ({order} order)", betas, eps)
    for state, ours in (("param", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        adam.states[ours] = MegatronWeights(weights.args, weights.iteration, "torch_dist", states[state], checkpoint)
    _check_complete(adam, weights, where)
    return adam


def _read_torch_format(weights: MegatronWeights) -> MegatronAdam:
    """The legacy torch format's optimizer state, read by megatron_torch_optimizer."""
    where = str(torch_format.checkpoint_folder(weights))
    try:
        optimizers = torch_format.rank_optimizers(weights)
    except ValueError as error:
        raise ValueError(f"{error}; {_WEIGHTS_ONLY}") from None
    first = optimizers[(0, 0)]
    distributed = torch_format.is_distributed(weights)
    groups = (first.get("optimizer") or {}).get("param_groups")
    if not groups:
        raise ValueError(f"{where}: the optimizer state has no param_groups; " + _WEIGHTS_ONLY)
    betas, eps = _settings(groups, where)
    try:
        if distributed:
            states, order = torch_format.distributed_states(weights)
            adam = MegatronAdam(_step(groups, where), f"distributed, torch format ({order} order)", betas, eps)
            states = {ours: states[state] for state, ours in (("param", "master"), ("exp_avg", "exp_avg"),
                                                                ("exp_avg_sq", "exp_avg_sq"))}
        else:
            states, order = torch_format.per_parameter_states(weights, optimizers)
            step = torch_format.optimizer_step(first, where)
            adam = MegatronAdam(_step(groups, where, step),
                                f"{PER_PARAMETER}, torch format ({order} order)", betas, eps)
    except ValueError as error:
        raise ValueError(f"{error}; re-save the checkpoint with Megatron-LM in the torch_dist format (the run's "
                         "launch with --ckpt-convert-format torch_dist --ckpt-convert-save DIR writes "
                         "DIR/torch_dist, its optimizer included) and convert that, or " + _WEIGHTS_ONLY) from None
    for key, tensors in states.items():
        adam.states[key] = MegatronWeights(weights.args, weights.iteration, "torch", tensors)
    _check_complete(adam, weights, where)
    return adam


def _step(groups: list, where: str, common: float | None = None) -> int:
    """Adam's step count (its bias correction's exponent): the non-distributed optimizer's own (`common`), or
    the param groups' `step` (one for all: Megatron-LM steps every group together)."""
    steps = {float(g["step"]) for g in groups if isinstance(g, dict) and g.get("step") is not None}
    if common is not None:
        steps.add(float(common))
    if len(steps) != 1:
        raise ValueError(f"{where}: the optimizer's step count is {'missing' if not steps else sorted(steps)}; "
                         "one is needed for Adam's bias correction")
    step = steps.pop()
    if step != int(step) or step < 1:
        raise ValueError(f"{where}: the optimizer's step count is {step}, not a positive whole number")
    return int(step)


def _settings(groups: list, where: str) -> tuple[tuple[float, float], float]:
    betas = {tuple(float(b) for b in g.get("betas", ())) for g in groups}
    eps = {float(g.get("eps", math.nan)) for g in groups}
    if len(betas) != 1 or len(eps) != 1 or len(next(iter(betas))) != 2 or math.isnan(next(iter(eps))):
        raise ValueError(f"{where}: the param groups disagree on, or lack, Adam's betas and eps "
                         f"({sorted(betas)}, {sorted(eps)})")
    return betas.pop(), eps.pop()


def _fill_float32_masters(masters: MegatronWeights, weights: MegatronWeights, where: str) -> None:
    """The non-distributed optimizer keeps no copy of a float32 parameter: its weight is its master."""
    for role, tensor in weights.tensors.items():
        if role in masters.tensors:
            continue
        if tensor.dtype != torch.float32:
            raise ValueError(f"{where}: no fp32 master of the {tensor.dtype} parameter {role} in the optimizer "
                             "state; the checkpoint is incomplete")
        masters.tensors[role] = tensor


def _check_complete(adam: MegatronAdam, weights: MegatronWeights, where: str) -> None:
    for state, found in adam.states.items():
        missing = sorted(set(weights.tensors) - set(found.tensors))
        if missing:
            raise ValueError(f"{where}: the optimizer state has no {state} for {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}; the checkpoint is incomplete")
        for role, tensor in found.tensors.items():
            if role not in weights.tensors:
                raise ValueError(f"{where}: the optimizer state holds {state} of {role}, which is not a weight "
                                 "of the checkpoint")
            if tuple(tensor.shape) != tuple(weights.tensors[role].shape):
                raise ValueError(f"{where}: the {state} of {role} has shape {tuple(tensor.shape)}, its weight "
                                 f"{tuple(weights.tensors[role].shape)}")
            if not tensor.dtype.is_floating_point:  # (bf16 moments, of a precision-aware optimizer, widen exactly)
                raise ValueError(f"{where}: the {state} of {role} is {tensor.dtype}, not a float tensor")
