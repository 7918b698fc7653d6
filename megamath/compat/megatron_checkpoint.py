"""Read a Megatron-LM (Megatron Core GPT) checkpoint's model weights, without Megatron-LM installed.

Both of Megatron-LM's checkpoint formats are read:
- `torch` (`--ckpt-format torch`): one `model_optim_rng.pt` per model-parallel rank, in `mp_rank_TT` or
  `mp_rank_TT_PPP` folders. Each holds its rank's slices with the stage's layers numbered from 0; the
  slices are merged here and the layers numbered by counting the stages' layers in order (so an uneven
  split of layers over the pipeline stages needs no flag).
- `torch_dist` (`--ckpt-format torch_dist`, the default): a PyTorch distributed-checkpoint folder whose
  tensors are already global, the layers stacked on a leading axis (megatron_torch_dist reads it).

The result is a `MegatronWeights`: the checkpoint's arguments and, per layer, the global tensors in
Megatron's layout: `linear_qkv` grouped by query group (each group's query heads, then its key head,
then its value head) and `linear_fc1` as [gate; up]. megatron_llama turns them into megamath's Llama.
Files are unpickled by pickle_guard, so nothing of Megatron-LM's is imported or run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamath.compat.megatron_torch_dist import DistCheckpoint, DistTensor
from megamath.compat.pickle_guard import guarded_load, plain_args
from megamath.input_path import require_folder

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")

# Megatron Core's names of a layer's tensors, by the role megamath gives them. The norms have two
# spellings: the local spec's own modules, and Transformer Engine's fused norm+linear (which the
# torch_dist format uses for both specs).
LAYER_TENSORS = {
    "input_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "qkv": ("self_attention.linear_qkv.weight",),
    "proj": ("self_attention.linear_proj.weight",),
    "mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    "fc1": ("mlp.linear_fc1.weight",),
    "fc2": ("mlp.linear_fc2.weight",),
}
_GLOBAL_TENSORS = {"embedding": "embedding.word_embeddings.weight", "output": "output_layer.weight",
                   "final_norm": "decoder.final_layernorm.weight"}
# How tensor parallelism splits each tensor in the `torch` format: the dim its rank slices are joined on.
# Norms are replicated; linear_fc1's slices are [gate_r; up_r] and are joined half by half.
TP_DIM = {"embedding": 0, "output": 0, "qkv": 0, "fc1": 0, "proj": 1, "fc2": 1}


@dataclass
class MegatronWeights:
    """A Megatron-LM checkpoint's arguments and global (unsplit) weights."""

    args: dict
    iteration: int | str
    checkpoint_format: str
    tensors: dict[str, Slices | DistTensor] = field(default_factory=dict)
    """"embedding", "output" (absent when tied), "final_norm", and "layers.{i}.{role}" for LAYER_TENSORS' roles:
    each global tensor's shape and dtype, read only when asked for (`tensor`), one at a time."""
    source: DistCheckpoint | None = None
    """The torch_dist folder read (its optimizer state is read from it too); None for the torch format."""
    rank_files: dict[tuple[int, int], Path] = field(default_factory=dict)
    """The torch format's model_optim_rng.pt by (TP rank, pipeline stage) (distrib_optim.pt lies beside it)."""
    rank_optimizers: dict[tuple[int, int], object] = field(default_factory=dict)
    """The torch format's `optimizer` entry of each model_optim_rng.pt (None where absent), kept from the one
    unpickling of the file (its tensors memory-mapped) for megatron_torch_optimizer."""

    @property
    def optimizer_saved(self) -> bool:
        """Whether the checkpoint holds an optimizer state (megatron_optimizer reads it)."""
        if self.source is not None:
            return "optimizer" in self.source.common_state()
        return any(optimizer is not None for optimizer in self.rank_optimizers.values())

    @property
    def num_layers(self) -> int:
        return sum(1 for name in self.tensors if name.endswith(".qkv"))

    def tensor(self, name: str) -> torch.Tensor:
        """The global tensor `name`, read (and joined from its TP slices) now."""
        return self.tensors[name].read()


@dataclass
class Slices:
    """One global tensor as the TP ranks' files hold it (memory-mapped), joined only when read."""

    pieces: list[torch.Tensor]
    role: str
    where: str

    @property
    def shape(self) -> tuple[int, ...]:
        dim = TP_DIM.get(self.role)
        shape = list(self.pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in self.pieces)
        return tuple(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces[0].dtype

    def read(self) -> torch.Tensor:
        return join_tp_slices(self.pieces, self.role, self.where)


def iteration_folder(path: str | Path) -> tuple[Path, int | str]:
    """The folder of the checkpoint to read: a --save folder's latest (its tracker file names it), or an
    iter_NNNNNNN / release folder itself."""
    path = require_folder(path, "a Megatron-LM checkpoint (the --save folder, or one iter_NNNNNNN folder in it)")
    name = path.name
    if re.fullmatch(r"iter_\d{7}", name) or name == "release":
        return path, "release" if name == "release" else int(name[5:])
    tracker = path / TRACKER
    if not tracker.is_file():
        raise ValueError(f"{path}: not a Megatron-LM checkpoint (no {TRACKER}, and not an iter_NNNNNNN or "
                         "release folder)")
    text = tracker.read_text().strip()
    if text == "release":
        folder, iteration = path / "release", "release"
    elif text.isdigit():
        folder, iteration = path / f"iter_{int(text):07d}", int(text)
    else:
        raise ValueError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{tracker} names iteration {text}, but {folder} is not there")
    return folder, iteration


def read_megatron_checkpoint(path: str | Path) -> MegatronWeights:
    """The arguments and global weights of the Megatron-LM checkpoint at `path` (see iteration_folder)."""
    folder, iteration = iteration_folder(path)
    if (folder / ".metadata").is_file():
        return _read_torch_dist(folder, iteration)
    ranks = sorted(p for p in folder.iterdir() if _RANK_DIR.match(p.name))
    if not ranks:
        raise ValueError(f"{folder}: no mp_rank_* folders and no .metadata: not a Megatron-LM checkpoint of the "
                         "torch or torch_dist format")
    return _read_torch(folder, iteration, ranks)


def _read_torch(folder: Path, iteration, rank_dirs: list[Path]) -> MegatronWeights:
    files = {}
    for d in rank_dirs:
        tp, pp, ep = _RANK_DIR.match(d.name).groups()
        if ep is not None:
            raise ValueError(f"{d}: an expert-parallel checkpoint; megamath converts dense Llama models only")
        files[(int(tp), int(pp or 0))] = d / RANK_FILE
    tp_size = 1 + max(t for t, _ in files)
    pp_size = 1 + max(p for _, p in files)
    missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp_size > 1 else "")
               for t in range(tp_size) for p in range(pp_size) if (t, p) not in files or not files[(t, p)].is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {RANK_FILE} missing for {', '.join(missing)} (tensor-parallel size "
                                f"{tp_size}, pipeline size {pp_size})")
    first = guarded_load(files[(0, 0)])
    args = plain_args(first.get("args"))
    for key, found in (("tensor_model_parallel_size", tp_size), ("pipeline_model_parallel_size", pp_size)):
        if args.get(key, 1) != found:
            raise ValueError(f"{folder}: the checkpoint's args say {key} {args.get(key)}, its folders hold {found}")
    if args.get("pipeline_model_parallel_layout"):
        raise ValueError(f"{folder}: a custom --pipeline-model-parallel-layout places the layers; convert the "
                         "checkpoint to the torch_dist format first (Megatron-LM's --ckpt-convert-format torch_dist)")
    chunks = _model_chunks(first, files[(0, 0)])
    stages = {}  # (chunk, pp) -> per TP rank, the chunk's state dict
    weights = MegatronWeights(args, iteration, "torch", rank_files=files)
    for p in range(pp_size):
        loaded = [first if (t, p) == (0, 0) else guarded_load(files[(t, p)]) for t in range(tp_size)]
        for c, key in enumerate(chunks):
            stages[(c, p)] = [_model_of(sd, key, files[(t, p)]) for t, sd in enumerate(loaded)]
        weights.rank_optimizers.update({(t, p): sd.get("optimizer") for t, sd in enumerate(loaded)})
    offset = 0
    for c in range(len(chunks)):  # virtual stages are chunk-major: chunk c of every stage, then chunk c + 1
        for p in range(pp_size):
            offset += _merge_stage(stages[(c, p)], offset, weights.tensors, f"{folder}/mp_rank_*_{p:03d}")
    return weights


def _model_chunks(state: dict, where: Path) -> list[str]:
    if "model" in state:
        return ["model"]
    chunks = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not chunks:
        raise ValueError(f"{where}: no 'model' state in the file (keys: {', '.join(map(str, state))[:200]})")
    return chunks


def _model_of(state: dict, key: str, where: Path) -> dict:
    model = state[key]
    if "language_model" in model:
        raise ValueError(f"{where}: a legacy (pre-Megatron-Core) model; convert it to Megatron Core first "
                         "(Megatron-LM's tools/checkpoint/convert.py --saver core)")
    return model


def _merge_stage(per_tp: list[dict], offset: int, out: dict, where: str) -> int:
    """Join one pipeline stage's TP slices into `out` (layers renumbered from `offset`); its layer count."""
    roles = [_roles(sd, where) for sd in per_tp]
    names = list(roles[0])
    for t, r in enumerate(roles[1:], 1):
        if set(r) != set(names):
            raise ValueError(f"{where}: TP ranks 0 and {t} hold different tensors")
    layers = {int(n.split(".")[1]) for n in names if n.startswith("layers.")}
    if layers != set(range(len(layers))):
        raise ValueError(f"{where}: the stage's layers are not numbered 0..{len(layers) - 1}")
    for name in names:
        role = name.rsplit(".", 1)[-1]
        pieces = [r[name] for r in roles]
        global_name = f"layers.{offset + int(name.split('.')[1])}.{role}" if name.startswith("layers.") else name
        out[global_name] = Slices(pieces, role, f"{where}: {name}")
    return len(layers)


def _roles(state: dict, where: str) -> dict[str, torch.Tensor]:
    """A state dict's tensors by role ("embedding", "layers.{local i}.qkv", ...); an unknown tensor is refused."""
    found = {}
    known = {name: role for role, name in _GLOBAL_TENSORS.items()}
    per_layer = {name: role for role, names in LAYER_TENSORS.items() for name in names}
    for key, value in state.items():
        if key.endswith("._extra_state"):
            continue  # Transformer Engine's FP8 scaling state, not a weight
        layer = _LAYER_KEY.match(key)
        role = known.get(key) if layer is None else per_layer.get(layer.group(2))
        if role is None:
            raise ValueError(f"{where}: unexpected tensor {key}: megamath converts the Llama architecture only "
                             "(RMSNorm, SwiGLU, no biases, no MoE)")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{where}: {key} is not a float tensor ({type(value).__name__}); dequantize first")
        found[role if layer is None else f"layers.{layer.group(1)}.{role}"] = value
    return found


def join_tp_slices(pieces: list[torch.Tensor], role: str, where: str) -> torch.Tensor:
    """One global tensor of its TP ranks' slices (linear_fc1's as [gate; up] halves); a replicated one checked equal."""
    dim = TP_DIM.get(role)
    if dim is None:  # replicated over TP
        for t, piece in enumerate(pieces[1:], 1):
            if not torch.equal(piece, pieces[0]):
                raise ValueError(f"{where}: replicated over tensor parallelism, yet TP rank {t}'s copy differs "
                                 "from rank 0's")
        return pieces[0]
    if role == "fc1":
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=dim)


def _read_torch_dist(folder: Path, iteration) -> MegatronWeights:
    checkpoint = DistCheckpoint(folder)
    roles = dist_roles(checkpoint)
    _refuse_unknown(checkpoint.stored, roles, folder)
    weights = MegatronWeights(plain_args(checkpoint.common_state().get("args")), iteration, "torch_dist")
    weights.tensors = dist_tensors(checkpoint, roles)
    weights.source = checkpoint
    return weights


def dist_roles(checkpoint: DistCheckpoint, prefix: str = "") -> dict[str, str]:
    """The stored keys `prefix` + a Llama tensor's key, with that tensor's role (the weights: no prefix; their
    optimizer state: `optimizer.state.exp_avg.` and the like, as Megatron-LM names it)."""
    per_layer = {f"decoder.layers.{name}": role for role, names in LAYER_TENSORS.items() for name in names}
    known = {**{v: k for k, v in _GLOBAL_TENSORS.items()}, **per_layer}
    return {key: known[key[len(prefix):]] for key in checkpoint.tensor_keys()
            if key.startswith(prefix) and key[len(prefix):] in known}


def dist_tensors(checkpoint: DistCheckpoint, roles: dict[str, str]) -> dict[str, DistTensor]:
    """The global tensors of `roles`' keys by role ("embedding", "layers.{i}.qkv", ...), each read when asked."""
    tensors = {}
    for key, role in roles.items():
        meta = checkpoint.stored[key]
        shape, dtype = tuple(meta.size), meta.properties.dtype
        if role not in _GLOBAL_TENSORS:  # layers stacked on the first axis: one window each
            for i in range(shape[0]):
                tensors[f"layers.{i}.{role}"] = DistTensor(checkpoint, key, i, shape[1:], dtype)
        else:
            tensors[role] = DistTensor(checkpoint, key, None, shape, dtype)
    return tensors


def _refuse_unknown(stored: dict, roles: dict, folder: Path) -> None:
    """A model tensor that is not one of the Llama's (a bias, a q/k norm, an expert) is refused, by name."""
    for key in stored:
        if key in roles or key.startswith(("optimizer.", "common_state", "rng_state", "rerun_state")) \
                or "_extra_state" in key:
            continue
        if key.startswith(("embedding.", "decoder.", "output_layer.", "mtp.")):
            raise ValueError(f"{folder}: unexpected tensor {key}: megamath converts the Llama architecture only "
                             "(RMSNorm, SwiGLU, no biases, no MoE)")
