"""Megatron-LM's optimizer state in a torch_dist checkpoint, as its two optimizers save it, for
trainer_checkpoints.write_megatron_torch_dist (checked against Megatron-LM's own files in
tests/test_trainer_files.py)."""
from __future__ import annotations

import io

import torch

from megamath.model import ModelConfig
from trainer_checkpoints import _megatron_global, _megatron_layer


def optimizer_state(adam: dict, config: ModelConfig, tp: int, weights: dict) -> tuple[dict, dict, dict]:
    """The common state's optimizer entry, the tensors (key: (tensor, TP-split dim)) and the pickled objects
    (key: bytes) of `adam` (write_megatron_torch_dist's argument), beside the stored `weights`."""
    if adam["sharding"] == "dp_reshardable":
        flats, objects = _buckets(adam, config, tp)
        return _adam_common(adam), {key: (flat, None) for key, flat in flats.items()}, objects
    tensors = {}
    master = "param" if adam["sharding"] == "fully_reshardable" else "fp32_param"
    for state, ours in (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), (master, "master")):
        for key, (t, dim) in _megatron_global(adam[ours], config).items():
            if state == "fp32_param" and weights[key][0].dtype == torch.float32:
                continue  # a float32 parameter is its own master
            tensors[f"optimizer.state.{state}.{key}"] = (t.float().clone(), dim)
    return _adam_common(adam), tensors, {}


_LOCAL_NAMES = {"input_norm": "input_layernorm.weight", "proj": "self_attention.linear_proj.weight",
                "qkv": "self_attention.linear_qkv.weight", "mlp_norm": "pre_mlp_layernorm.weight",
                "fc1": "mlp.linear_fc1.weight", "fc2": "mlp.linear_fc2.weight"}


def _buckets(adam: dict, config: ModelConfig, tp: int) -> tuple[dict, dict]:
    """The distributed optimizer's dp_reshardable state, laid out as Megatron-LM's DistributedOptimizer lays out
    its buffers for the local spec of a --bf16 run: per model-parallel group (TP rank r of pipeline stage p is
    group p·TP + r; adam["pp"] stages, the first holding adam["first_stage_layers"] layers if given, else an
    even split), per model chunk (adam["vp"] virtual stages: chunk c of stage p holds the (c·pp + p)-th run of
    share / vp layers; or adam["virtual_stage_layers"], [chunk][stage] counts, the layers numbered chunk-major,
    for a custom layout or a split that counts the embedding and loss), a buffer per dtype in the order the
    chunk first registers one (norms float32, the rest bfloat16), numbered on from the previous chunk's, each
    holding its parameters' local slices in reverse registration order, every start a multiple of 64, the
    padding 0 here; buckets close at the parameter reaching adam["bucket_numel"] (default: one bucket). Also
    each group's param groups object (with the step)."""
    pp, vp, first = adam.get("pp", 1), adam.get("vp", 1), adam.get("first_stage_layers")
    counts = [config.num_layers // pp] * pp
    if first is not None:
        counts = [first] + [(config.num_layers - first) // (pp - 1)] * (pp - 1)
    per_chunk = adam.get("virtual_stage_layers", [[n // vp for n in counts]] * vp)
    vp = len(per_chunk)
    bucket_numel = adam.get("bucket_numel")
    flats, objects = {}, {}
    for group_index in range(tp * pp):
        r, stage = group_index % tp, group_index // tp
        chunks = []
        for c in range(vp):
            start = sum(map(sum, per_chunk[:c])) + sum(per_chunk[c][:stage])
            order = ["embedding"] if stage == 0 and c == 0 else []
            order += [f"layers.{i}.{role}" for i in range(start, start + per_chunk[c][stage]) for role in _LOCAL_NAMES]
            order += ["final_norm", "output"] if stage == pp - 1 and c == vp - 1 else []
            chunks.append(order)
        locals_ = {}
        for key in ("master", "exp_avg", "exp_avg_sq"):
            state = {n: t.detach().float() for n, t in adam[key].items()}
            layers = {i: _megatron_layer(state, i, config, tp, r) for i in range(config.num_layers)}
            for role in (role for order in chunks for role in order):
                if role.startswith("layers."):
                    _, i, name = role.split(".")
                    value = layers[int(i)][_LOCAL_NAMES[name]]
                else:
                    value = {"embedding": state["embed_tokens.weight"].chunk(tp, dim=0)[r], "final_norm":
                             state["norm.weight"], "output": state["lm_head.weight"].chunk(tp, dim=0)[r]}[role]
                locals_.setdefault(role, {})[key] = value.reshape(-1)
        buffers = [(order, dtype) for order in chunks
                   for dtype in dict.fromkeys("float32" if role.endswith("norm") else "bfloat16" for role in order)]
        for gbuf, (order, dtype) in enumerate(buffers):
            params = [role for role in reversed(order) if role.endswith("norm") == (dtype == "float32")]
            buckets, current, start = [], [], 0
            for role in params:
                start = -(-start // 64) * 64
                current.append((role, start))
                start += locals_[role]["master"].numel()
                if bucket_numel is not None and start >= bucket_numel:
                    buckets.append((current, start))
                    current, start = [], 0
            if current:
                buckets.append((current, start))
            for k, (placed, length) in enumerate(buckets):
                base = (f"optimizer.distributed.dp_group_idx_{group_index}.gbuf_idx_{gbuf}.dtype_(torch.{dtype}, "
                        f"torch.float32).bucket_idx_{k}")
                for key, name in (("master", "param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    flat = torch.zeros(length)
                    for role, at in placed:
                        flat[at:at + locals_[role][key].numel()] = locals_[role][key]
                    flats[f"{base}.{name}"] = flat
        buffer = io.BytesIO()
        group = {"betas": (0.9, 0.95), "eps": 1e-8, "step": float(adam["step"])}
        torch.save([{"param_groups": [group, {**group, "wd_mult": 0.0}]}], buffer)
        objects[f"optimizer.distributed.dp_group_idx_{group_index}.optimizer/shard_0_1"] = buffer.getvalue()
    return flats, objects


def _adam_common(adam: dict) -> dict:
    """The optimizer's entry of the common state, as each optimizer saves it."""
    group = {"betas": (0.9, 0.95), "eps": 1e-8, "lr": 1e-4, "weight_decay": 0.1, "wd_mult": 1.0}
    if adam["sharding"] == "fully_reshardable":
        groups = [{**group, "step": float(adam["step"])}, {**group, "wd_mult": 0.0, "step": float(adam["step"])}]
        return {"optimizer": {"param_groups": groups}, "param_state_sharding_type": "fully_reshardable"}
    if adam["sharding"] == "dp_reshardable":
        return {"param_state_sharding_type": "dp_reshardable"}
    return {"optimizer": {"state": {"common_step": torch.tensor(float(adam["step"]))},
                          "param_groups": [group, {**group, "wd_mult": 0.0}]},
            "fp32_from_fp16_params": [[]]}


def torch_optimizer(adam: dict, models: list[dict], states: dict[str, list[dict]]) -> tuple[dict, dict | None]:
    """One model-parallel rank's optimizer state in Megatron-LM's torch format, beside its stored chunks
    `models` (Megatron name -> tensor, registration order) and their local `states` ("master", "exp_avg",
    "exp_avg_sq", the same layout): model_optim_rng.pt's `optimizer` entry, and distrib_optim.pt's content for
    adam["sharding"] "distributed" (else None).

    Per parameter: torch's Adam state dict, group 0 the matrices (weight decay) and group 1 the norms, each in
    registration order, the indices counting through group 0 then group 1; fp32_from_fp16_params the
    bfloat16 parameters' masters per group (a float32 norm is its own master). Distributed: the param groups
    with the step, and per buffer (each chunk's parameters of one dtype, in the order the chunk first
    registers one; numbered on over the chunks) the flat master, exp_avg and exp_avg_sq of the whole buffer,
    its parameters in reverse registration order at multiples of 64, one bucket, as `buckets_coalesced` keeps
    it."""
    group = {"betas": (0.9, 0.95), "eps": 1e-8, "lr": 1e-4, "weight_decay": 0.1}
    keys = [(c, k) for c, chunk in enumerate(models) for k, v in chunk.items() if v is not None]
    if adam["sharding"] == "distributed":
        groups = [{**group, "wd_mult": 1.0, "step": float(adam["step"])},
                  {**group, "wd_mult": 0.0, "step": float(adam["step"])}]
        distributed, gbuf = {"buckets_coalesced": True}, 0
        for c, chunk in enumerate(models):
            names = [k for k, v in chunk.items() if v is not None]
            for dtype in dict.fromkeys(chunk[k].dtype for k in names):
                placed, start = [], 0
                for k in reversed([k for k in names if chunk[k].dtype == dtype]):
                    start = -(-start // 64) * 64
                    placed.append((k, start))
                    start += chunk[k].numel()
                flats = {}
                for ours, theirs in (("master", "param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    flat = torch.zeros(start)
                    for k, at in placed:
                        flat[at:at + chunk[k].numel()] = states[ours][c][k].float().reshape(-1)
                    flats[theirs] = flat
                distributed[gbuf] = {(dtype, torch.float32): {**flats, "numel_unpadded": start}}
                gbuf += 1
        return {"optimizer": {"param_groups": groups}}, distributed
    decayed = [(c, k) for c, k in keys if models[c][k].dim() > 1]
    others = [(c, k) for c, k in keys if models[c][k].dim() == 1]
    state, masters = {}, [[], []]
    for index, (g, (c, k)) in enumerate([(0, key) for key in decayed] + [(1, key) for key in others]):
        state[index] = {"step": torch.tensor(float(adam["step"])), "exp_avg": states["exp_avg"][c][k].float().clone(),
                        "exp_avg_sq": states["exp_avg_sq"][c][k].float().clone()}
        if models[c][k].dtype != torch.float32:
            masters[g].append(states["master"][c][k].float().clone())
    groups = [{**group, "wd_mult": 1.0, "params": list(range(len(decayed)))},
              {**group, "wd_mult": 0.0, "params": list(range(len(decayed), len(keys)))}]
    return {"optimizer": {"state": state, "param_groups": groups}, "fp32_from_fp16_params": masters}, None
