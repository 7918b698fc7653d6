"""Megatron-LM and GPT-NeoX checkpoints of a known megamath model, written at test time in those trainers'
file layouts, so `megamath convert megatron-to-hf` / `neox-to-hf` can be checked to give that model back.

The layouts are the ones the trainers' own code writes and reads (and that tests/fixtures/*/
write_fixtures.py had Megatron-LM and GPT-NeoX write on this CPU, for the opt-in comparison in the
tests): per tensor-parallel rank, Megatron Core's linear_qkv holds its query groups (each group's query
heads, its key head, its value head) and linear_fc1 is [gate_r; up_r]; torch_dist stacks the layers on
a first axis and stores one chunk per layer and rank; GPT-NeoX's query_key_value is per head [q; k; v]
(multi-head), per query head [q; k/r; v/r] (the llemma branch's grouped-query) or [q; k; v] (main's
grouped-query), and main's linear1 is [up_r; gate_r]. The trainers pickle their own classes into their
files; here a stand-in class under Megatron-LM's module name does, so that reading needs no trainer.
"""
from __future__ import annotations

import argparse
import enum
import io
import json
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megamath.model import Llama, ModelConfig

MEGATRON = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                max_seq_length=16, rope_theta=10000.0, norm_eps=1e-5, kernels="reference")
INPUT_IDS = torch.tensor([[1, 5, 17, 59, 33, 2, 8, 40, 41, 12, 0, 59, 7, 7, 23, 30]])


def source_model(seed: int = 0, **fields) -> Llama:
    """A random float32 Llama whose weights bfloat16 holds exactly (the trainers store bfloat16), with norms
    away from 1 (so that a swapped norm shows)."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**{**MEGATRON, **fields})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.to(torch.bfloat16).float())
    return model


def logits(model: Llama) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS)


# ---- Megatron-LM -------------------------------------------------------------------------------------------

def _attn_backend():
    """An enum pickled under Megatron-LM's module path, as its args hold `attention_backend`."""
    name = "megatron.core.transformer.enums"
    module = types.ModuleType(name)
    module.AttnBackend = enum.Enum("AttnBackend", {"flash": 1, "fused": 2, "unfused": 3, "local": 4, "auto": 5})
    module.AttnBackend.__module__ = name
    return name, module


def megatron_args(config: ModelConfig, tp: int, pp: int, vp: int | None, ckpt_format: str, iteration: int = 10,
                  global_batch: int = 8, consumed: int | None = None) -> argparse.Namespace:
    """The fields Megatron-LM's parse_args/validate_args give a Llama run (the converter reads these)."""
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_heads,
        group_query_attention=True, num_query_groups=config.num_kv_heads, ffn_hidden_size=config.ffn_hidden_size,
        kv_channels=config.head_dim, seq_length=16, max_position_embeddings=config.max_seq_length,
        position_embedding_type="rope", rotary_base=int(config.rope_theta), rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=False, rotary_seq_len_interpolation_factor=None,
        normalization="RMSNorm", layernorm_epsilon=config.norm_eps, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=False, untie_embeddings_and_output_weights=True,
        apply_residual_connection_post_layernorm=False, multi_latent_attention=False, num_experts=None,
        mtp_num_layers=None, window_size=None, init_method_std=0.02, vocab_size=60,
        padded_vocab_size=config.vocab_size, make_vocab_size_divisible_by=16, tokenizer_type="NullTokenizer",
        tokenizer_model=None, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp, pipeline_model_parallel_layout=None, ckpt_format=ckpt_format,
        params_dtype=torch.bfloat16, bf16=True, transformer_impl="local", attention_backend=None,
        global_batch_size=global_batch,
        consumed_train_samples=iteration * global_batch if consumed is None else consumed)


def _grouped_qkv(state: dict, i: int, config: ModelConfig) -> torch.Tensor:
    """Megatron Core's linear_qkv (serial): per query group, its query heads, then its key and value heads."""
    d, g = config.head_dim, config.num_kv_heads
    q = state[f"layers.{i}.self_attn.q_proj.weight"].reshape(g, -1, d, config.hidden_size)
    k = state[f"layers.{i}.self_attn.k_proj.weight"].reshape(g, 1, d, config.hidden_size)
    v = state[f"layers.{i}.self_attn.v_proj.weight"].reshape(g, 1, d, config.hidden_size)
    return torch.cat([q, k, v], dim=1).reshape(-1, config.hidden_size)


def _megatron_layer(state: dict, i: int, config: ModelConfig, tp: int, r: int) -> dict:
    """Layer i's tensors on TP rank r, under the local spec's names."""
    p = f"layers.{i}."
    gate, up = (state[p + f"mlp.{n}_proj.weight"].chunk(tp, dim=0)[r] for n in ("gate", "up"))
    return {
        "input_layernorm.weight": state[p + "input_layernorm.weight"],
        "self_attention.linear_proj.weight": state[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r],
        "self_attention.linear_proj._extra_state": None,
        "self_attention.linear_qkv.weight": _grouped_qkv(state, i, config).chunk(tp, dim=0)[r],
        "self_attention.linear_qkv._extra_state": None,
        "pre_mlp_layernorm.weight": state[p + "post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": torch.cat([gate, up]),
        "mlp.linear_fc1._extra_state": None,
        "mlp.linear_fc2.weight": state[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[r],
        "mlp.linear_fc2._extra_state": None,
    }


def _stored(name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """As a --bf16 Megatron-LM run stores a tensor: norms in float32, the rest in bfloat16."""
    if tensor is None:
        return None
    return (tensor.float() if "norm" in name else tensor.to(torch.bfloat16)).clone()


def _save_with_megatron_classes(obj, args: argparse.Namespace, path) -> None:
    """torch.save `obj` with args.attention_backend an enum of Megatron-LM's module path, as Megatron-LM's
    files hold it (pickle names a class by its module, which the reader does not have)."""
    name, module = _attn_backend()
    parts = name.split(".")
    packages = {".".join(parts[:k]): types.ModuleType(".".join(parts[:k])) for k in range(1, len(parts))}
    added = {**packages, name: module}
    sys.modules.update(added)
    try:
        args.attention_backend = module.AttnBackend.auto
        torch.save(obj, path)
    finally:
        for key in added:
            del sys.modules[key]


def write_megatron_torch(model: Llama, save: Path, tp: int, pp: int, vp: int | None = None,
                         adam: dict | None = None) -> Path:
    """`--ckpt-format torch`: iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt, the stages' layers numbered from
    0, virtual stages chunk-major (chunk c of stage p holds layers (c·pp + p)·n ...).

    `adam` adds the optimizer state as Megatron-LM's torch format stores it (megatron_adam_files.torch_optimizer):
    {"sharding": "per parameter" or "distributed", "step", and megamath state dicts for "master", "exp_avg",
    "exp_avg_sq"}."""
    config = model.config
    for r in range(tp):
        for s in range(pp):
            models = [{k: _stored(k, v) for k, v in chunk.items()}
                      for chunk in _stage_chunks(model.state_dict(), config, tp, pp, vp, r, s)]
            folder = save / "iter_0000010" / (f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else ""))
            folder.mkdir(parents=True)
            content = {"args": megatron_args(config, tp, pp, vp, "torch"), "checkpoint_version": 3.0,
                       "iteration": 10, "num_floating_point_operations_so_far": 0}
            content.update({"model": models[0]} if vp is None else {f"model{c}": m for c, m in enumerate(models)})
            if adam is not None:
                from megatron_adam_files import torch_optimizer  # (it builds on this file's layouts)

                states = {key: _stage_chunks(adam[key], config, tp, pp, vp, r, s)
                          for key in ("master", "exp_avg", "exp_avg_sq")}
                content["optimizer"], distributed = torch_optimizer(adam, models, states)
                if distributed is not None:
                    torch.save(distributed, folder / "distrib_optim.pt")
            _save_with_megatron_classes(content, content["args"], folder / "model_optim_rng.pt")
    (save / "latest_checkpointed_iteration.txt").write_text("10")
    return save


def _stage_chunks(state: dict, config: ModelConfig, tp: int, pp: int, vp: int | None, r: int, s: int) -> list[dict]:
    """TP rank r of stage s's model chunks, each its local tensors of megamath state dict `state` by Megatron
    name in registration order (the local spec's)."""
    state = {n: t.detach() for n, t in state.items()}
    chunks = vp or 1
    per_chunk = config.num_layers // (pp * chunks)
    out = []
    for c in range(chunks):
        first = (c * pp + s) * per_chunk
        sd = {}
        if s == 0 and c == 0:
            sd["embedding.word_embeddings.weight"] = state["embed_tokens.weight"].chunk(tp, dim=0)[r]
        for j in range(per_chunk):
            sd.update({f"decoder.layers.{j}.{k}": v
                       for k, v in _megatron_layer(state, first + j, config, tp, r).items()})
        if s == pp - 1 and c == chunks - 1:
            sd["decoder.final_layernorm.weight"] = state["norm.weight"]
            sd["output_layer.weight"] = state["lm_head.weight"].chunk(tp, dim=0)[r]
            sd["output_layer._extra_state"] = None
        out.append(sd)
    return out


def write_megatron_torch_dist(model: Llama, save: Path, tp: int, adam: dict | None = None, iteration: int = 10,
                              global_batch: int = 8, consumed: int | None = None,
                              zero_centered_gamma: bool = False) -> Path:
    """`--ckpt-format torch_dist`: a distributed checkpoint of global tensors, layers stacked on a first axis
    (Transformer Engine's norm names), one chunk per layer and TP rank, the args in a `common_state` bytes
    item, as Megatron-LM's dist_checkpointing writes them.

    `adam` adds an optimizer state as Megatron-LM stores it: {"sharding": "per parameter" (the non-distributed
    optimizer: exp_avg, exp_avg_sq, and fp32_param for the bf16 parameters, the step in `common_step`) or
    "fully_reshardable" (the distributed optimizer's `param` for all, the step in the param groups), "step",
    and megamath state dicts for "master", "exp_avg", "exp_avg_sq"}.

    `zero_centered_gamma` stores each norm weight, and its master, as γ − 1 (`--apply-layernorm-1p`)."""
    config = model.config
    state = model.state_dict()
    if zero_centered_gamma:
        state = {n: t - 1 if "norm" in n else t for n, t in state.items()}
        if adam is not None:
            adam = {**adam, "master": {n: t - 1 if "norm" in n else t for n, t in adam["master"].items()}}
    tensors = {k: (_stored(k, t), dim) for k, (t, dim) in _megatron_global(state, config).items()}
    common = {"args": megatron_args(config, tp, 1, None, "torch_dist", iteration, global_batch, consumed),
              "checkpoint_version": 3.0, "iteration": iteration, "num_floating_point_operations_so_far": 0}
    common["args"].layernorm_zero_centered_gamma = zero_centered_gamma
    objects = {}
    if adam is not None:  # the stages' layers matter to the bucketed layout only; "args" sets any other
        common["args"].pipeline_model_parallel_size = adam.get("pp", 1)
        common["args"].decoder_first_pipeline_num_layers = adam.get("first_stage_layers")
        common["args"].virtual_pipeline_model_parallel_size = adam.get("vp")
        for key, value in adam.get("args", {}).items():
            setattr(common["args"], key, value)
    if adam is not None:
        from megatron_adam_files import optimizer_state  # (it builds on this file's layouts)

        common["optimizer"], added, objects = optimizer_state(adam, config, tp, tensors)
        tensors.update(added)
    buffer = io.BytesIO()
    _save_with_megatron_classes([common], common["args"], buffer)
    folder = save / f"iter_{iteration:07d}"
    request = {k: t for k, (t, _) in tensors.items()}
    request["common_state/shard_0_1"] = io.BytesIO(buffer.getvalue())
    request["decoder.layers.self_attention.linear_proj._extra_state/shard_0_4"] = io.BytesIO(b"")
    request.update({key: io.BytesIO(value) for key, value in objects.items()})
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(request, checkpoint_id=str(folder), no_dist=True,
                 planner=_ChunkPlanner({k: dim for k, (_, dim) in tensors.items()}, tp))
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return save


def _megatron_global(state: dict, config: ModelConfig) -> dict:
    """megamath's serial tensors under torch_dist's keys, each with the dim TP splits one layer on (None)."""
    state = {n: t.detach() for n, t in state.items()}
    layers = [_megatron_layer(state, i, config, 1, 0) for i in range(config.num_layers)]
    stacked = {  # name: (tensor, TP-split dim of one layer, or None)
        "embedding.word_embeddings.weight": (state["embed_tokens.weight"], 0),
        "decoder.final_layernorm.weight": (state["norm.weight"], None),
        "output_layer.weight": (state["lm_head.weight"], 0),
    }
    for ours, theirs, dim in (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", None),
                              ("self_attention.linear_proj.weight", "self_attention.linear_proj.weight", 1),
                              ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight", 0),
                              ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", None),
                              ("mlp.linear_fc1.weight", "mlp.linear_fc1.weight", "fc1"),
                              ("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", 1)):
        stacked[f"decoder.layers.{theirs}"] = (torch.stack([layer[ours] for layer in layers]), dim)
    return stacked


def _chunks(shape: tuple, dim, tp: int, layered: bool) -> list[tuple[tuple, tuple]]:
    """(offsets, sizes) of the stored chunks: per layer (stacked keys), per TP rank along the split dim
    (linear_fc1: each rank's gate and up halves, at r·f/p and f + r·f/p)."""
    layer_count = shape[0] if layered else 1
    inner = shape[1:] if layered else shape
    pieces = []
    for i in range(layer_count):
        prefix = (i,) if layered else ()
        ones = (1,) if layered else ()
        if dim is None:
            pieces.append((prefix + (0,) * len(inner), ones + tuple(inner)))
            continue
        axis, halves = (0, 2) if dim == "fc1" else (dim, 1)
        step = inner[axis] // (tp * halves)
        for h in range(halves):
            for r in range(tp):
                offsets, sizes = [0] * len(inner), list(inner)
                offsets[axis], sizes[axis] = h * inner[axis] // halves + r * step, step
                pieces.append((prefix + tuple(offsets), ones + tuple(sizes)))
    return pieces


class _ChunkPlanner(DefaultSavePlanner):
    """Saves each tensor as the chunks `_chunks` gives (what several Megatron-LM ranks would write)."""

    def __init__(self, split_dims: dict, tp: int):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.split_dims, self.tp = split_dims, tp

    def create_local_plan(self):
        items = []
        for fqn, value in self.state_dict.items():
            if not isinstance(value, torch.Tensor):
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
                continue
            for offsets, sizes in _chunks(tuple(value.shape), self.split_dims[fqn], self.tp,
                                          "decoder.layers." in fqn):  # the optimizer state's keys too
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items.append(WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=chunk, size=value.size(),
                                                                   properties=TensorProperties.create_from_tensor(value))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item):
        value = self.state_dict[write_item.index.fqn]
        if write_item.type == WriteItemType.BYTE_IO:
            return value
        chunk = write_item.tensor_data.chunk
        for axis, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            value = value.narrow(axis, start, size)
        return value.contiguous()


# ---- GPT-NeoX ----------------------------------------------------------------------------------------------

NEOX = {"llemma": dict(num_layers=2, ffn_hidden_size=256, num_kv_heads=4, norm_eps=1e-10),
        "llemma_gqa": dict(num_layers=2, ffn_hidden_size=256, num_kv_heads=2, norm_eps=1e-10),
        "main_gqa": dict(num_layers=2, ffn_hidden_size=32, num_kv_heads=2, norm_eps=1e-5)}


def neox_config(variant: str, config: ModelConfig, tp: int) -> dict:
    """The YAML keys a GPT-NeoX run of `variant` sets (the llemma branch's Llama MLP, or main's swiglu)."""
    raw = {"pipe_parallel_size": 0 if variant.startswith("llemma") else 1, "model_parallel_size": tp,
           "num_layers": config.num_layers, "hidden_size": config.hidden_size,
           "num_attention_heads": config.num_heads, "seq_length": 16, "max_position_embeddings": 16,
           "pos_emb": "rotary", "rotary_pct": 1, "rotary_emb_base": 10000, "no_weight_tying": True,
           "gpt_j_residual": False, "output_layer_parallelism": "column", "norm": "rmsnorm",
           "rms_norm_epsilon": config.norm_eps, "use_bias_in_norms": False, "use_bias_in_attn_linear": False,
           "attention_dropout": 0, "hidden_dropout": 0, "precision": "fp32", "make_vocab_size_divisible_by": 1,
           "checkpoint_factor": 10, "train_iters": 10}
    if variant.startswith("llemma"):
        raw.update({"mlp_type": "llama", "activation": "silu"})
        if variant == "llemma_gqa":
            raw.update({"attention_type": "groupedquery", "num_kv_heads": config.num_kv_heads,
                        "attention_config": [[["flash"], config.num_layers]]})
    else:
        raw.update({"activation": "swiglu", "intermediate_size": 96, "mlp_multiple_of": 16, "use_bias_in_mlp": False,
                    "num_kv_heads": config.num_kv_heads})
    return raw


def _neox_qkv(state: dict, i: int, config: ModelConfig, tp: int, r: int, variant: str) -> torch.Tensor:
    d, h, heads, kv = config.head_dim, config.hidden_size, config.num_heads, config.num_kv_heads
    q, k, v = (state[f"layers.{i}.self_attn.{n}_proj.weight"].chunk(tp, dim=0)[r] for n in "qkv")
    if kv == heads:  # per head [q; k; v]
        return torch.stack([t.reshape(heads // tp, d, h) for t in (q, k, v)], dim=1).reshape(-1, h)
    if variant == "llemma_gqa":  # per query head: its q rows, then its 1/r share of the rank's K and V rows
        share = d * kv // heads
        return torch.cat([q.reshape(heads // tp, d, h), k.reshape(heads // tp, share, h),
                          v.reshape(heads // tp, share, h)], dim=1).reshape(-1, h)
    return torch.cat([q, k, v])  # main: [q; k; v]


def _neox_modules(model: Llama, tp: int, r: int, variant: str) -> dict[int, dict]:
    """Module index -> its state dict on rank r: 0 the embedding, 2 … L+1 the layers, L+3 the norm, L+4 the
    output layer (1 and L+2 are GPT-NeoX's parameterless pre/post functions)."""
    config, state = model.config, {n: t.detach() for n, t in model.state_dict().items()}
    modules = {0: {"word_embeddings.weight": state["embed_tokens.weight"].chunk(tp, dim=0)[r]}}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        gate, up, down = (state[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        layer = {"input_layernorm.scale": state[p + "input_layernorm.weight"],
                 "attention.query_key_value.weight": _neox_qkv(state, i, config, tp, r, variant),
                 "attention.dense.weight": state[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r],
                 "post_attention_layernorm.scale": state[p + "post_attention_layernorm.weight"]}
        if variant.startswith("llemma"):
            layer["attention.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, config.head_dim, 2) / config.head_dim)
            layer.update({"mlp.w1.weight": gate.chunk(tp, dim=0)[r], "mlp.w3.weight": up.chunk(tp, dim=0)[r],
                          "mlp.w2.weight": down.chunk(tp, dim=1)[r]})
        else:
            layer.update({"mlp.linear1.weight": torch.cat([up.chunk(tp, dim=0)[r], gate.chunk(tp, dim=0)[r]]),
                          "mlp.linear2.weight": down.chunk(tp, dim=1)[r]})
        modules[i + 2] = layer
    modules[config.num_layers + 3] = {"norm.scale": state["norm.weight"]}
    modules[config.num_layers + 4] = {"final_linear.weight": state["lm_head.weight"].chunk(tp, dim=0)[r]}
    return {i: {k: v.clone() for k, v in m.items()} for i, m in modules.items()}


def write_neox(model: Llama, save: Path, variant: str, tp: int = 2, global_samples: int | None = None) -> Path:
    """A GPT-NeoX checkpoint as save_ds_checkpoint leaves it: global_step10/ with DeepSpeed's model states
    (sequential mp_rank_TT_model_states.pt for the llemma variants, pipeline layer files for main; the engine's
    `global_samples` if given), the run's config copied into configs/, and `latest`."""
    folder = save / "global_step10"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "tiny.yml").write_text(json.dumps(neox_config(variant, model.config, tp), indent=2))
    args = {"num_layers": model.config.num_layers, "hidden_size": model.config.hidden_size,
            "num_attention_heads": model.config.num_heads, "padded_vocab_size": model.config.vocab_size,
            "tokenizer_type": "GPT2BPETokenizer", "model_parallel_size": tp}
    for r in range(tp):
        modules = _neox_modules(model, tp, r, variant)
        module = None
        if variant.startswith("llemma"):
            module = {f"sequential.{i}.{k}": v for i, m in modules.items() for k, v in m.items()}
        else:
            for i, m in modules.items():
                torch.save(m, folder / f"layer_{i:02d}-model_{r:02d}-model_states.pt")
        torch.save({"module": module, "buffer_names": [], "optimizer": None, "iteration": 10, "args": args,
                    "dp_world_size": 1, "mp_world_size": tp, "ds_version": "0.12",
                    **({} if global_samples is None else {"global_samples": global_samples})},
                   folder / f"mp_rank_{r:02d}_model_states.pt")
    (save / "latest").write_text("global_step10")
    return save
