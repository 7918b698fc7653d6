"""A GPT-NeoX checkpoint as a Llama: `megamath convert neox-to-hf CKPT OUT`, without GPT-NeoX or DeepSpeed.

GPT-NeoX saves through DeepSpeed, in one of two layouts, and copies the run's YAML files into
`global_stepN/configs/`, which say what the model is (the checkpoint's own `args` hold only a few shapes):
- sequential (`pipe_parallel_size: 0`, as LLEMMA trained): one `mp_rank_TT_model_states.pt` per
  tensor-parallel rank, the weights under `module` as `sequential.{i}.{name}`;
- pipeline (`pipe_parallel_size` ≥ 1): one `layer_II-model_TT-model_states.pt` per layer and rank.
Either way, module i is the embedding, the transformer layers, the final norm or the output layer; they
are told apart by the tensors they hold.

Per tensor-parallel rank the fused tensors are laid out as GPT-NeoX's forward reads them, and cut so:
- query_key_value, multi-head: per head [q; k; v] (the rank's heads one after another);
- query_key_value, grouped-query, llemma branch: per query head [q; k/ratio; v/ratio], where ratio is
  heads / kv_heads (each query head's rows carry a 1/ratio slice of the K and V rows);
- query_key_value, grouped-query, GPT-NeoX main: [q; k; v] (all the rank's query rows, then K, then V);
- the Llama MLP: the llemma branch's w1 (gate), w3 (up), w2 (down); main's linear1 is [up; gate] per rank.
RoPE is rotate-half on both sides (rotary_pct 1), so no weight is permuted. GPT-NeoX's RMSNorm adds eps
to rms(x) where Llama's adds it under the square root: a difference of order eps/rms(x)², noted.
Files are unpickled by pickle_guard: nothing of GPT-NeoX's or DeepSpeed's is imported or run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamath.compat.neox import neox_model_config, read_neox_yaml
from megamath.compat.pickle_guard import guarded_load
from megamath.compat.tokenizer_ids import sentencepiece_token_ids
from megamath.input_path import require_folder
from megamath.model.config import ModelConfig
from megamath.model.model_folder import Deferred, save_state_as_hf
from megamath.model.partition import parameter_shapes
from megamath.model.safetensors_io import DEFAULT_MAX_SHARD_SIZE

_SEQUENTIAL = "mp_rank_{:02d}_model_states.pt"
_PIPELINE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_ARCHITECTURE = "megamath converts the Llama architecture only"
LLEMMA_MLP = ("mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight")
MAIN_MLP = ("mlp.linear1.weight", "mlp.linear2.weight")
_ATTENTION = ("input_layernorm.scale", "attention.query_key_value.weight", "attention.dense.weight",
              "post_attention_layernorm.scale")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # recomputed from rotary_emb_base


@dataclass
class NeoXCheckpoint:
    """What a GPT-NeoX checkpoint holds: its merged config, and its modules' state per tensor-parallel rank."""

    folder: Path
    config: dict
    layout: str
    modules: dict[int, list[dict]] = field(default_factory=dict)
    """Module index -> its state dict on TP ranks 0 … p-1."""
    global_samples: int | None = None
    """DeepSpeed's count of samples trained (mp_rank_00_model_states.pt), None where the files have none."""


def checkpoint_folder(path: str | Path) -> Path:
    """The global_stepN folder: a --save folder's latest (its `latest` file names it), or the folder itself."""
    path = require_folder(path, "a GPT-NeoX checkpoint (the save folder, or one global_stepN folder in it)")
    if (path / _SEQUENTIAL.format(0)).is_file() or any(_PIPELINE.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if not latest.is_file():
        raise ValueError(f"{path}: not a GPT-NeoX checkpoint (no 'latest' file, no {_SEQUENTIAL.format(0)}, no "
                         "layer_*-model_*-model_states.pt)")
    tag = latest.read_text().strip()
    folder = path / tag
    if not tag or "/" in tag or not folder.is_dir():
        raise FileNotFoundError(f"{latest} names {tag!r}, but {folder} is not there")
    return checkpoint_folder(folder)


def read_neox_checkpoint(path: str | Path) -> NeoXCheckpoint:
    folder = checkpoint_folder(path)
    configs = sorted((folder / "configs").glob("*.yml")) + sorted((folder / "configs").glob("*.yaml"))
    if not configs:
        raise ValueError(f"{folder}: no configs/*.yml (GPT-NeoX copies the run's YAML files there); copy the "
                         "run's config files into that folder")
    config = read_neox_yaml(configs)
    tp = config.get("model_parallel_size") or 1
    pipeline = {(int(m.group(1)), int(m.group(2))): p for p in folder.iterdir() if (m := _PIPELINE.match(p.name))}
    checkpoint = NeoXCheckpoint(folder, config, "pipeline" if pipeline else "sequential")
    extra = sorted({r for _, r in pipeline} | {int(m.group(1)) for p in folder.iterdir()
                                              if (m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", p.name))})
    if extra and extra[-1] >= tp:  # reading only the first ranks would write half-width weights
        raise ValueError(f"{folder}: files of tensor-parallel rank {extra[-1]}, but the config says "
                         f"model_parallel_size {tp}")
    if pipeline:
        for index in sorted({i for i, _ in pipeline}):
            missing = [r for r in range(tp) if (index, r) not in pipeline]
            if missing:
                raise FileNotFoundError(f"{folder}: layer_{index:02d}-model_{missing[0]:02d}-model_states.pt "
                                        f"missing (model_parallel_size {tp})")
            checkpoint.modules[index] = [guarded_load(pipeline[(index, r)]) for r in range(tp)]
        engine = folder / _SEQUENTIAL.format(0)  # DeepSpeed's engine state beside the layer files (no module)
        if engine.is_file():
            checkpoint.global_samples = guarded_load(engine).get("global_samples")
    else:
        _read_sequential(checkpoint, tp)
    for index, ranks in checkpoint.modules.items():
        for rank, held in enumerate(ranks[1:], 1):
            if held.keys() != ranks[0].keys():
                raise ValueError(f"{folder}: module {index} holds other tensors on TP rank {rank} than on rank 0 "
                                 f"({sorted(set(held) ^ set(ranks[0]))[0]})")
    return checkpoint


def _read_sequential(checkpoint: NeoXCheckpoint, tp: int) -> None:
    """mp_rank_TT_model_states.pt's `module` (keys sequential.{i}.{name}) into checkpoint.modules."""
    folder = checkpoint.folder
    for rank in range(tp):
        file = folder / _SEQUENTIAL.format(rank)
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: {file.name} missing (model_parallel_size {tp})")
        state = guarded_load(file)
        module = state.get("module")
        if rank == 0:
            checkpoint.global_samples = state.get("global_samples")
        if not isinstance(module, dict):
            raise ValueError(f"{file}: no 'module' state dict in the file")
        for key, value in module.items():
            m = re.match(r"sequential\.(\d+)\.(.+)$", key)
            if m is None:
                raise ValueError(f"{file}: unexpected key {key} (a sequential model's keys are sequential.N.name)")
            checkpoint.modules.setdefault(int(m.group(1)), [{} for _ in range(tp)])[rank][m.group(2)] = value


def llama_config(checkpoint: NeoXCheckpoint, vocab_size: int | None = None) -> tuple[ModelConfig, list[str]]:
    """The model's ModelConfig (vocabulary: the embedding's rows, or the first `vocab_size`) and notes."""
    embedding = _find(checkpoint, "word_embeddings.weight")
    padded = sum(r["word_embeddings.weight"].shape[0] for r in checkpoint.modules[embedding])
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ValueError(f"--vocab-size {vocab_size}: must be between 1 and the checkpoint's padded vocabulary "
                         f"{padded}")
    model, notes = neox_model_config(checkpoint.config, padded)
    model.update(vocab_size=vocab_size or padded, kernels="auto")
    return ModelConfig.from_dict(model), notes


def _find(checkpoint: NeoXCheckpoint, name: str) -> int:
    found = [i for i, ranks in checkpoint.modules.items() if name in ranks[0]]
    if len(found) != 1:
        raise ValueError(f"{checkpoint.folder}: {len(found)} modules hold {name}, expected one")
    return found[0]


def llama_state_dict(checkpoint: NeoXCheckpoint, config: ModelConfig) -> tuple[dict[str, Deferred], list[str]]:
    """megamath's serial Llama state dict of the checkpoint, each tensor made when it is written (the rank
    files are memory-mapped: one tensor at a time is held), and the notes of replicated norms that differ
    (filled as the norms are written)."""
    notes: list[str] = []
    modules = checkpoint.modules
    layers = sorted(i for i, ranks in modules.items() if _ATTENTION[1] in ranks[0])
    if len(layers) != config.num_layers:
        raise ValueError(f"{checkpoint.folder}: {len(layers)} transformer layers in the files, the config says "
                         f"num_layers {config.num_layers}")
    if checkpoint.config.get("output_layer_parallelism", "column") != "column":
        raise ValueError(f"output_layer_parallelism is {checkpoint.config['output_layer_parallelism']!r}: GPT-NeoX's "
                         "row-parallel output layer is turned off in the llemma branch and in main (its issue 905), "
                         "so this converter reads the column-parallel one only")
    embedding, norm, output = (_find(checkpoint, n) for n in ("word_embeddings.weight", "norm.scale",
                                                               "final_linear.weight"))
    shapes, v = parameter_shapes(config), config.vocab_size
    state: dict[str, Deferred] = {}

    def put(name: str, ranks: list[dict], make) -> None:
        """`make(ranks)` is run once on meta tensors now (its shape checked before anything is written)."""
        meta = [{k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in r.items()} for r in ranks]
        made = make(meta)
        if tuple(made.shape) != shapes[name]:
            raise ValueError(f"{checkpoint.folder}: {name} comes out of the checkpoint with shape "
                             f"{tuple(made.shape)}, the config gives {shapes[name]}")
        state[name] = Deferred(shapes[name], made.dtype, lambda: make(ranks))

    put("embed_tokens.weight", modules[embedding], lambda rs: _cat(rs, "word_embeddings.weight", 0)[:v])
    for i, index in enumerate(layers):
        ranks = modules[index]
        unknown = sorted(set(ranks[0]) - set(_ATTENTION) - set(LLEMMA_MLP) - set(MAIN_MLP)
                         - {k for k in ranks[0] if _IGNORED.match(k)})
        if unknown:
            raise ValueError(f"{checkpoint.folder}: unexpected tensor {unknown[0]} in layer {i}: {_ARCHITECTURE} "
                             "(RMSNorm, SwiGLU, no biases)")
        llemma, where, prefix = LLEMMA_MLP[0] in ranks[0], f"layer {i}", f"layers.{i}."
        _check_qkv(ranks, config, llemma, where)
        put(prefix + "input_layernorm.weight", ranks, lambda rs, w=where: _replicated(rs, _ATTENTION[0], w, notes))
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            put(f"{prefix}self_attn.{name}.weight", ranks,
                lambda rs, p=part, ll=llemma: _split_qkv(rs, config, ll)[p])
        put(prefix + "self_attn.o_proj.weight", ranks, lambda rs: _cat(rs, _ATTENTION[2], 1))
        put(prefix + "post_attention_layernorm.weight", ranks,
            lambda rs, w=where: _replicated(rs, _ATTENTION[3], w, notes))
        if llemma:
            for name, source, dim in (("gate", "w1", 0), ("up", "w3", 0), ("down", "w2", 1)):
                put(f"{prefix}mlp.{name}_proj.weight", ranks,
                    lambda rs, s=source, d=dim: _cat(rs, f"mlp.{s}.weight", d))
        else:  # GPT-NeoX main: linear1 is [up; gate] on each rank
            for name, half in (("up", 0), ("gate", 1)):
                put(f"{prefix}mlp.{name}_proj.weight", ranks,
                    lambda rs, k=half: torch.cat([r[MAIN_MLP[0]].chunk(2, dim=0)[k] for r in rs]))
            put(prefix + "mlp.down_proj.weight", ranks, lambda rs: _cat(rs, MAIN_MLP[1], 1))
    put("norm.weight", modules[norm], lambda rs: _replicated(rs, "norm.scale", "the final norm", notes))
    put("lm_head.weight", modules[output], lambda rs: _cat(rs, "final_linear.weight", 0)[:v])
    return state, notes


def _cat(ranks: list[dict], name: str, dim: int) -> torch.Tensor:
    return torch.cat([r[name] for r in ranks], dim=dim)


def _replicated(ranks: list[dict], name: str, where: str, notes: list[str]) -> torch.Tensor:
    """A norm weight every TP rank holds: their mean, as GPT-NeoX's own converter takes it."""
    if ranks[0][name].is_meta:  # put()'s shape check
        return ranks[0][name]
    pieces = [r[name].float() for r in ranks]
    mean = torch.stack(pieces).mean(0)
    spread = max((p - mean).abs().max().item() for p in pieces)
    if spread:
        notes.append(f"{where}: {name} differs between TP ranks by up to {spread:.3g}; their mean is written")
    return mean.to(ranks[0][name].dtype)


def _check_qkv(ranks: list[dict], config: ModelConfig, llemma: bool, where: str) -> None:
    tp, d, heads, kv = len(ranks), config.head_dim, config.num_heads, config.num_kv_heads
    if heads % tp or kv % tp or (llemma and (d * kv) % heads):
        raise ValueError(f"{where}: {heads} heads and {kv} KV heads cannot be split over {tp} tensor-parallel ranks "
                         "as GPT-NeoX splits them")
    rows = (heads + 2 * kv) * d // tp
    for r in ranks:
        if r[_ATTENTION[1]].shape[0] != rows:
            raise ValueError(f"{where}: query_key_value has {r[_ATTENTION[1]].shape[0]} rows per rank, expected "
                             f"(heads + 2 · kv_heads) · head_dim / TP = {rows}: the config's heads do not match "
                             "the weights")


def _split_qkv(ranks: list[dict], config: ModelConfig, llemma: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v (serial) from each rank's query_key_value, by the layout its GPT-NeoX version reads."""
    tp, d, heads, kv = len(ranks), config.head_dim, config.num_heads, config.num_kv_heads
    per_rank_heads, per_rank_kv = heads // tp, kv // tp
    qs, ks, vs = [], [], []
    for r in ranks:
        w = r[_ATTENTION[1]]
        if kv == heads:  # per head [q; k; v]
            grouped = w.reshape(per_rank_heads, 3, d, -1)
            q, k, v = grouped[:, 0], grouped[:, 1], grouped[:, 2]
        elif llemma:  # per query head [q; k/ratio; v/ratio]
            dk = d * kv // heads
            grouped = w.reshape(per_rank_heads, d + 2 * dk, -1)
            q, k, v = grouped[:, :d], grouped[:, d:d + dk], grouped[:, d + dk:]
        else:  # [q; k; v]
            q, k, v = w.split([per_rank_heads * d, per_rank_kv * d, per_rank_kv * d], dim=0)
        qs.append(q.reshape(per_rank_heads * d, -1))
        ks.append(k.reshape(per_rank_kv * d, -1))
        vs.append(v.reshape(per_rank_kv * d, -1))
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def convert_neox_to_hf(src: str | Path, dst: str | Path, vocab_size: int | None = None,
                       max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                       dtype: torch.dtype | None = None) -> tuple[ModelConfig, NeoXCheckpoint, list[str]]:
    """A GPT-NeoX checkpoint -> a Hugging Face Llama folder; the model's config, what was read, and notes
    (the last: which special token ids were written)."""
    checkpoint = read_neox_checkpoint(src)
    config, notes = llama_config(checkpoint, vocab_size)
    state, more = llama_state_dict(checkpoint, config)
    kind = checkpoint.config.get("tokenizer_type") or "GPT2BPETokenizer"  # GPT-NeoX's default
    spm = kind == "SPMTokenizer"
    ids, said = sentencepiece_token_ids(checkpoint.config.get("vocab_file") if spm else None,
                                        "the config's vocab_file" if spm else f"tokenizer_type {kind}")
    save_state_as_hf(state, config, dst, dtype, max_shard_size, ids)  # DeepSpeed saved the training dtype
    return config, checkpoint, notes + more + [said]
