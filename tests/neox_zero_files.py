"""DeepSpeed's ZeRO (stage 1) optimizer files beside a GPT-NeoX checkpoint written by trainer_checkpoints.write_neox,
laid out as DeepSpeed lays them out (checked against files GPT-NeoX and DeepSpeed wrote in
tests/test_trainer_files.py): per TP rank, its parameters (the module's, in order) flattened into one group,
padded to a multiple of the DP size and cut into equal partitions, one file per DP rank holding its partition
of the fp32 masters and of Adam's moments, and `param_slice_mappings`: each parameter's fragment in it."""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import torch

from megamath.model import Llama
from trainer_checkpoints import _neox_modules


@dataclasses.dataclass
class fragment_address:  # noqa: N801  (DeepSpeed's name; the reader sees only its fields)
    numel: int
    start: int


def write_zero_files(save: Path, states: dict[str, Llama], variant: str, tp: int, dp: int, step: int) -> None:
    """`states`: Llama models holding the "master", "exp_avg" and "exp_avg_sq" values as their weights."""
    folder = save / "global_step10"
    for r in range(tp):
        flats, names = {}, []
        for key, holder in states.items():
            modules = _neox_modules(holder, tp, r, variant)
            prefix = "sequential." if variant.startswith("llemma") else ""  # pipeline layer files for main
            params = [(f"{prefix}{i}.{k}", v) for i, m in modules.items() for k, v in m.items()
                      if not k.endswith("inv_freq")]
            names = [(n, v.numel()) for n, v in params]
            flat = torch.cat([v.float().reshape(-1) for _, v in params])
            flats[key] = torch.cat([flat, torch.zeros(-len(flat) % dp)])
        size = len(flats["master"]) // dp
        for d in range(dp):
            mapping, offset = collections.OrderedDict(), 0
            for name, numel in names:
                lo, hi = max(offset, d * size), min(offset + numel, (d + 1) * size)
                if lo < hi:
                    mapping[name] = fragment_address(hi - lo, lo - d * size)
                offset += numel
            part = {key: flat[d * size:(d + 1) * size].clone() for key, flat in flats.items()}
            state = {"base_optimizer_state": {
                         "state": {0: {"step": torch.tensor(float(step)), "exp_avg": part["exp_avg"],
                                       "exp_avg_sq": part["exp_avg_sq"]}},
                         "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "params": [0]}]},
                     "single_partition_of_fp32_groups": [part["master"]], "partition_count": [dp],
                     "param_slice_mappings": [mapping], "zero_stage": 1}
            torch.save({"optimizer_state_dict": state, "ds_version": "0.12"},
                       folder / f"bf16_zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt")
