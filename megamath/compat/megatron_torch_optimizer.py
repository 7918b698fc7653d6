"""The Adam state of a Megatron-LM checkpoint in the legacy `torch` format (`--ckpt-format torch`, Megatron-LM's
default until torch_dist): one file set per model-parallel rank (mp_rank_TT[_PPP]), none of which records
which parameter a state belongs to.

- The non-distributed optimizer, in model_optim_rng.pt's `optimizer`: torch's Adam state dict (each state by
  parameter index, the indices listed by the param groups) and `fp32_from_fp16_params` (per group, the fp32
  masters of its 16-bit parameters in order; a float32 parameter is its own master). Megatron-LM's groups
  keep the weight-decayed parameters (the matrices) apart from the others (the norms), each in the order the
  stage registers them; the indices are mapped by that rule, for each layer spec's registration order, and an
  order is taken only when every parameter's state has its local shape and every master rounds to the
  weight stored beside it.
- The distributed optimizer, in distrib_optim.pt: per gradient buffer (a model chunk's parameters of one
  dtype) the masters, exp_avg and exp_avg_sq of the whole buffer, gathered over the DP ranks, its buckets
  joined without their end padding (`buckets_coalesced`); the step and Adam's settings in model_optim_rng.pt's
  param groups. The parameters lie in each buffer as megatron_buckets rebuilds them, read here as one bucket:
  the buckets of a run with --overlap-grad-reduce start at multiples of 64 in the compact buffer too whenever
  each ends on one, as a Llama's parameter sizes make them (checked on Megatron-LM's own files); where a join
  shifts the parameters, no order fits and the checkpoint is refused with what to do instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megamath.compat.megatron_buckets import LAYER_ORDERS, bucket_states, local_shape, registration
from megamath.compat.megatron_checkpoint import MegatronWeights, Slices
from megamath.compat.pickle_guard import guarded_load

DISTRIBUTED_FILE = "distrib_optim.pt"


def checkpoint_folder(weights: MegatronWeights) -> Path:
    """The iteration folder of a torch-format checkpoint (the mp_rank_* folders' parent)."""
    return next(iter(weights.rank_files.values())).parent.parent


def is_distributed(weights: MegatronWeights) -> bool:
    return all((path.parent / DISTRIBUTED_FILE).is_file() for path in weights.rank_files.values())


def rank_optimizers(weights: MegatronWeights) -> dict[tuple[int, int], dict]:
    """Each model-parallel rank's `optimizer` entry of model_optim_rng.pt, as the weights' reader kept it."""
    for rank, optimizer in weights.rank_optimizers.items():
        if not isinstance(optimizer, dict):
            raise ValueError(f"{weights.rank_files[rank]}: the checkpoint holds no optimizer state (saved with "
                             "--no-save-optim?)")
    return weights.rank_optimizers


class DistributedFiles:
    """The distrib_optim.pt files of every model-parallel rank as the flat buffers megatron_buckets places
    parameters in: group g = TP rank + TP size × stage, its buffers in order, each one bucket long."""

    def __init__(self, weights: MegatronWeights) -> None:
        tp = weights.args.get("tensor_model_parallel_size") or 1
        self.folder = checkpoint_folder(weights)
        self.buffers: dict[int, list] = {}
        self._flat: dict[str, dict] = {}
        for (t, p), path in sorted(weights.rank_files.items()):
            file = path.parent / DISTRIBUTED_FILE
            state = guarded_load(file)
            if not isinstance(state, dict) or not state.get("buckets_coalesced"):
                raise ValueError(f"{file}: an older distributed-optimizer layout (buckets stored apart), which "
                                 "megamath does not read")
            group, buffers = p * tp + t, []
            for gbuf in sorted(k for k in state if isinstance(k, int)):
                if len(state[gbuf]) != 1:
                    raise ValueError(f"{file}: buffer {gbuf} holds {len(state[gbuf])} dtypes; one is expected")
                (dtype, _), tensors = next(iter(state[gbuf].items()))
                key = f"{group}.{gbuf}"
                self._flat[key] = tensors
                buffers.append((dtype, [(key, int(tensors["numel_unpadded"]))]))
            self.buffers[group] = buffers

    def read_range(self, key: str, start: int, end: int) -> torch.Tensor:
        name, state = key.rsplit(".", 1)
        return self._flat[name][state][start:end].float()


def distributed_states(weights: MegatronWeights) -> tuple[dict[str, dict], str]:
    """Per state ("param", "exp_avg", "exp_avg_sq"), the tensors by role, and the layer order that fits."""
    files = DistributedFiles(weights)
    return bucket_states(weights, files, files.buffers)


def per_parameter_states(weights: MegatronWeights, optimizers: dict[tuple[int, int], dict]
                         ) -> tuple[dict[str, dict], str]:
    """The non-distributed optimizer's states ("master", "exp_avg", "exp_avg_sq") by role, and the order that
    fits (see the module's docstring)."""
    spec = weights.args.get("transformer_impl")
    for name in sorted(LAYER_ORDERS, key=lambda name: not name.startswith(str(spec))):
        states = _assign(weights, optimizers, LAYER_ORDERS[name])
        if states is not None and all(_rounds_to(states["master"][role], weights, role) for role in weights.tensors):
            return states, name
    raise ValueError(f"{checkpoint_folder(weights)}: the optimizer's parameter indices fit none of the parameter "
                     f"orders megamath knows ({', '.join(LAYER_ORDERS)})")


def _assign(weights: MegatronWeights, optimizers: dict, layer_order: tuple[str, ...]) -> dict[str, dict] | None:
    """Each role's state pieces (one per TP rank) under `layer_order`; None where a count or shape disagrees."""
    tp = weights.args.get("tensor_model_parallel_size") or 1
    pieces: dict[str, dict[str, dict[int, torch.Tensor]]] = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for (t, p), optimizer in optimizers.items():
        inner, masters = optimizer.get("optimizer") or {}, optimizer.get("fp32_from_fp16_params") or []
        roles = [role for chunk in registration(weights, layer_order, p) for role in chunk if role in weights.tensors]
        decayed = [role for role in roles if len(weights.tensors[role].shape) > 1]
        others = [role for role in roles if len(weights.tensors[role].shape) == 1]
        groups = inner.get("param_groups") or []
        if len(groups) != len(masters) or sum(len(g["params"]) for g in groups) != len(roles):
            return None
        for group, group_masters in zip(groups, masters):
            members = decayed if group.get("wd_mult", 1.0) else others
            sixteen = [role for role in members if weights.tensors[role].dtype != torch.float32]
            if len(members) != len(group["params"]) or len(sixteen) != len(group_masters):
                return None
            for role, index in zip(members, group["params"]):
                state = (inner.get("state") or {}).get(index) or {}
                shape = local_shape(tuple(weights.tensors[role].shape), role, tp)
                if any(tuple(state.get(key, torch.empty(0)).shape) != shape for key in ("exp_avg", "exp_avg_sq")):
                    return None
                for key in ("exp_avg", "exp_avg_sq"):
                    pieces[key].setdefault(role, {})[t] = state[key]
            for role, master in zip(sixteen, group_masters):
                pieces["master"].setdefault(role, {})[t] = master
    where = checkpoint_folder(weights)
    out = {key: {role: Slices([found[t] for t in range(tp)], role.rsplit(".", 1)[-1], f"{where}: the {key} of {role}")
                 for role, found in by_role.items()} for key, by_role in pieces.items()}
    for role, tensor in weights.tensors.items():  # a float32 parameter is its own master
        if tensor.dtype == torch.float32:
            out["master"][role] = tensor
    return out if all(set(found) == set(weights.tensors) for found in out.values()) else None


def _rounds_to(master, weights: MegatronWeights, role: str) -> bool:
    if master is weights.tensors[role]:  # a float32 parameter, its own master
        return True
    weight = weights.tensors[role].read()
    return torch.equal(master.read().to(weight.dtype), weight)


def optimizer_step(optimizer: dict, where: str) -> float:
    """The non-distributed optimizer's step count: torch Adam's per-parameter `step`, one for all."""
    steps = {float(state["step"]) for state in ((optimizer.get("optimizer") or {}).get("state") or {}).values()
             if isinstance(state, dict) and "step" in state}
    if len(steps) != 1:
        raise ValueError(f"{where}: the optimizer's step count is {'missing' if not steps else sorted(steps)}; one "
                         "is needed for Adam's bias correction")
    return steps.pop()

