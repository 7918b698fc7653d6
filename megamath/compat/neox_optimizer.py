"""Read Adam's state from a GPT-NeoX checkpoint: DeepSpeed's ZeRO (stage 1 or 2) optimizer files.

GPT-NeoX trains through DeepSpeed (LLEMMA with ZeRO stage 1 and bf16), which saves, beside each
tensor-parallel rank's model states, one file per data-parallel rank d and TP rank t:
`[bf16_]zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt`. Each holds, per parameter group, that DP rank's
partition of the group's flat fp32 masters (`single_partition_of_fp32_groups`) and of Adam's exp_avg and
exp_avg_sq (`base_optimizer_state`), and `param_slice_mappings`: for every parameter with elements in the
partition, its name (the engine module's: `sequential.{i}.{name}`, or `{i}.{name}` for the pipeline layout's
layer i) and the fragment's length and start. The
fragments of a parameter, in DP rank order, are its flattened elements; the shape is the weight's on that
TP rank. The states come out as NeoXCheckpoints holding the state in place of the weights, so
neox_checkpoint.llama_state_dict maps them to megamath's parameters exactly as it maps the weights.
Refused with what to do instead: a checkpoint without ZeRO files (saved without its optimizer, or ZeRO
stage 0, whose state DeepSpeed keeps elsewhere), files without `param_slice_mappings` (DeepSpeed before
its universal-checkpoint records), and ZeRO stage 3.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from megamath.compat.neox_checkpoint import NeoXCheckpoint
from megamath.compat.pickle_guard import guarded_load

_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_WEIGHTS_ONLY = ("convert the weights alone with `megamath convert neox-to-hf` and continue with init_from_hf and "
                 "init_step (the moments then start fresh)")


@dataclass
class NeoXAdam:
    step: int
    betas: tuple[float, float]
    eps: float
    dp_size: int
    states: dict[str, NeoXCheckpoint] = field(default_factory=dict)
    """"master", "exp_avg", "exp_avg_sq": the checkpoint with that state in place of each weight."""


def read_neox_adam(checkpoint: NeoXCheckpoint) -> NeoXAdam:
    folder = checkpoint.folder
    files = {(int(m.group(1)), int(m.group(2))): p for p in folder.iterdir() if (m := _ZERO_FILE.match(p.name))}
    if not files:
        raise ValueError(f"{folder}: no DeepSpeed ZeRO optimizer files (zero_pp_rank_D_mp_rank_TT_optim_states.pt): "
                         "saved without its optimizer, or with ZeRO stage 0; " + _WEIGHTS_ONLY)
    tp = len(next(iter(checkpoint.modules.values())))
    dp = 1 + max(d for d, _ in files)
    missing = [f"zero_pp_rank_{d}_mp_rank_{t:02d}" for d in range(dp) for t in range(tp) if (d, t) not in files]
    if missing:
        raise ValueError(f"{folder}: ZeRO optimizer files missing: {', '.join(missing)} (TP {tp}, DP {dp}); the "
                         "checkpoint is incomplete")
    if max(t for _, t in files) >= tp:
        raise ValueError(f"{folder}: ZeRO optimizer files of TP rank {max(t for _, t in files)}, but the model "
                         f"files are of {tp} TP ranks")
    keys = ("master", "exp_avg", "exp_avg_sq")
    per_rank = [{key: {} for key in keys} for _ in range(tp)]  # TP rank -> state -> name -> fragments
    steps, settings = set(), set()
    for (d, t) in sorted(files):
        state = _zero_state(files[(d, t)])
        for group, mapping in enumerate(state["param_slice_mappings"]):
            adam_state = state["base_optimizer_state"]["state"][group]
            flats = {"master": state["single_partition_of_fp32_groups"][group], "exp_avg": adam_state["exp_avg"],
                     "exp_avg_sq": adam_state["exp_avg_sq"]}
            flats = {key: flat.detach() for key, flat in flats.items()}  # (DeepSpeed saves the masters as Parameters)
            steps.add(float(torch.as_tensor(adam_state["step"]).detach()))
            for name, fragment in mapping.items():
                numel, start = _fragment(fragment, files[(d, t)])
                for key in keys:
                    per_rank[t][key].setdefault(name, []).append(flats[key][start:start + numel])
        for group in state["base_optimizer_state"]["param_groups"]:
            settings.add((tuple(float(b) for b in group["betas"]), float(group["eps"])))
    if len(steps) != 1 or len(settings) != 1:
        raise ValueError(f"{folder}: the ZeRO files disagree on Adam's step ({sorted(steps)}) or settings "
                         f"({sorted(settings)})")
    step = steps.pop()
    if step != int(step) or step < 1:
        raise ValueError(f"{folder}: Adam's step count is {step}, not a positive whole number")
    betas, eps = settings.pop()
    adam = NeoXAdam(int(step), betas, eps, dp)
    for key in keys:
        adam.states[key] = NeoXCheckpoint(folder, checkpoint.config, checkpoint.layout,
                                          _modules(checkpoint, [rank[key] for rank in per_rank], key))
    return adam


def _zero_state(path) -> dict:
    loaded = guarded_load(path)
    state = loaded.get("optimizer_state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or "single_partition_of_fp32_groups" not in state:
        raise ValueError(f"{path}: not a ZeRO stage 1 or 2 optimizer file (no single_partition_of_fp32_groups; "
                         "ZeRO stage 3 is not read); " + _WEIGHTS_ONLY)
    if "param_slice_mappings" not in state:
        raise ValueError(f"{path}: no param_slice_mappings (written by a DeepSpeed older than its universal "
                         "checkpoints), so which elements are whose is not recorded; " + _WEIGHTS_ONLY)
    return state


def _fragment(fragment, path) -> tuple[int, int]:
    """(numel, start) of DeepSpeed's fragment_address, a dataclass the file pickles (read back inert)."""
    fields = getattr(fragment, "state", None) or getattr(fragment, "__dict__", {})
    try:
        return int(fields["numel"]), int(fields["start"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: a param_slice_mappings entry is not a fragment address ({fragment!r})") from None


def _modules(checkpoint: NeoXCheckpoint, ranks: list[dict], key: str) -> dict[int, list[dict]]:
    """The checkpoint's modules with each parameter's `key` state (its fragments joined, in its weight's shape)."""
    modules = {}
    for index, weights in checkpoint.modules.items():
        modules[index] = []
        for t, held in enumerate(weights):
            found = {}
            for name, weight in held.items():
                # DeepSpeed names a parameter as the engine's module does: the sequential model's attribute,
                # or the pipeline module's layer index
                full = f"sequential.{index}.{name}" if checkpoint.layout == "sequential" else f"{index}.{name}"
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer, not a parameter
                pieces = ranks[t].pop(full, None)
                if pieces is None:
                    raise ValueError(f"{checkpoint.folder}: no {key} for {full} on TP rank {t} in the ZeRO files; the "
                                     "checkpoint is incomplete")
                flat = torch.cat(pieces)
                if flat.numel() != weight.numel():
                    raise ValueError(f"{checkpoint.folder}: the {key} of {full} on TP rank {t} has {flat.numel()} "
                                     f"elements, its weight {weight.numel()}")
                found[name] = flat.view(weight.shape)
            modules[index].append(found)
    for t, left in enumerate(ranks):
        if left:
            raise ValueError(f"{checkpoint.folder}: the ZeRO files of TP rank {t} hold state of {sorted(left)[0]}, "
                             "which is not a weight of the model files")
    return modules
