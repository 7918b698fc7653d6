"""The distributed optimizer's default checkpoint layout (`dp_reshardable`): Adam's state in its gradient buckets.

Megatron-LM saves, per model-parallel rank g (TP rank + TP size × pipeline stage) and per gradient buffer b
(one per parameter dtype), each bucket k's fp32 master, exp_avg and exp_avg_sq as flat vectors

    optimizer.distributed.dp_group_idx_{g}.gbuf_idx_{b}.dtype_(PARAM, GRAD).bucket_idx_{k}.{param,...}

of the bucket's unpadded length, and no record of which parameter lies where. The layout is Megatron-LM's
(megatron/core/optimizer/distrib_optimizer.py, _compute_per_buffer_param_layout): a buffer holds the
parameters of its dtype in reverse registration order, each TP rank's local slice, each starting at a
multiple of 64 elements; a bucket closes at the parameter that fills it, so each bucket's stored length
says where the next one starts. A pipeline stage registers the embedding (the first stage), its layers
(placed as _virtual_stage_counts says) and the final norm and output layer (the last stage); with virtual
stages each of its model chunks has buffers of its own, numbered after the previous chunk's. It is rebuilt
here for the registration orders Megatron Core's GPT layer specs give (the local spec's, and Transformer
Engine's with a norm inside the fused linear, either side of its weight) and trusted only when the
checkpoint says so: an order is taken when every parameter's first row of masters rounds to the weight
Megatron-LM stored, and then each master read is checked, element for element, against its weight. A
checkpoint no order fits is refused with what to do instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megamath.compat.megatron_checkpoint import TP_DIM, MegatronWeights, join_tp_slices
from megamath.compat.megatron_torch_dist import DistCheckpoint

STATES = ("param", "exp_avg", "exp_avg_sq")
PARAM_ALIGN = 64
_BUCKET = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_\(torch\.(\w+), "
                     r"torch\.(\w+)\)\.bucket_idx_(\d+)\.param$")
LAYER_ORDERS = {  # a layer's parameters in the order Megatron Core registers them, per layer spec
    "local": ("input_norm", "proj", "qkv", "mlp_norm", "fc1", "fc2"),
    "transformer_engine": ("proj", "input_norm", "qkv", "mlp_norm", "fc1", "fc2"),
    "transformer_engine, weight first": ("proj", "qkv", "input_norm", "fc1", "mlp_norm", "fc2"),
}
REFUSED = ("save it once with --dist-ckpt-optim-fully-reshardable (Megatron-LM writes each parameter's state "
           "then), or convert the weights alone with `megamath convert megatron-to-hf` and continue with "
           "init_from_hf and init_step (the moments then start fresh)")


@dataclass(frozen=True)
class Piece:
    """One TP rank's local slice of a parameter inside a bucket: its key (without the state), start, shape."""

    key: str
    start: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class BucketTensor:
    """A global tensor of one state, joined from its TP ranks' pieces when read. A master (`state` "param")
    is checked against the parameter's weight as it is read."""

    source: DistCheckpoint
    role: str
    state: str
    pieces: list[Piece]
    shape: tuple[int, ...]
    weight: object = None
    dtype: torch.dtype = torch.float32

    def read(self) -> torch.Tensor:
        slices = [self.source.read_range(f"{p.key}.{self.state}", p.start, p.start + p.numel).view(p.shape)
                  for p in self.pieces]
        where = f"{self.source.folder}: the bucketed {self.state} of {self.role}"
        out = join_tp_slices(slices, self.role.rsplit(".", 1)[-1], where)
        if self.weight is not None:
            weight = self.weight.read()
            if not torch.equal(out.to(weight.dtype), weight):
                raise ValueError(f"{where} does not round to its weight: the bucket layout megamath rebuilt is not "
                                 f"this checkpoint's; {REFUSED}")
        return out


def bucket_states(weights: MegatronWeights, checkpoint: DistCheckpoint, buffers: dict | None = None
                  ) -> tuple[dict[str, dict], str]:
    """Per state ("param", "exp_avg", "exp_avg_sq"), the BucketTensors by role; and the layer order that fits.
    `buffers` (as _buffers gives them) and `checkpoint.read_range` may come from another source of flat
    buffers (megatron_torch_optimizer's distrib_optim.pt files)."""
    buffers = _buffers(checkpoint, weights) if buffers is None else buffers
    spec = weights.args.get("transformer_impl")
    orders = sorted(LAYER_ORDERS, key=lambda name: not name.startswith(str(spec)))  # the args' spec tried first
    for name in orders:
        pieces = _place(LAYER_ORDERS[name], weights, buffers)
        if pieces is not None and all(_first_row_fits(checkpoint, weights, role, found)
                                      for role, found in pieces.items()):
            states = {state: {role: BucketTensor(checkpoint, role, state, found, tuple(weights.tensors[role].shape),
                                                 weights.tensors[role] if state == "param" else None)
                              for role, found in pieces.items()} for state in STATES}
            return states, name
    raise ValueError(f"{checkpoint.folder}: the distributed optimizer's bucketed state (dp_reshardable) fits none of "
                     f"the parameter orders megamath knows ({', '.join(LAYER_ORDERS)}); " + REFUSED)


def _buffers(checkpoint: DistCheckpoint, weights: MegatronWeights) -> dict[int, list[tuple[torch.dtype, list]]]:
    """Per model-parallel group (TP rank + TP size × pipeline stage), its buffers in order: (parameter dtype,
    [(bucket key, stored length), ...])."""
    found: dict[int, dict[int, tuple[torch.dtype, dict[int, tuple[str, int]]]]] = {}
    for key, meta in checkpoint.tensor_keys().items():
        match = _BUCKET.match(key)
        if match is None:
            continue
        group, gbuf, dtype, _, bucket = match.groups()
        buffer = found.setdefault(int(group), {}).setdefault(int(gbuf), (getattr(torch, dtype), {}))
        buffer[1][int(bucket)] = (key[:-len(".param")], int(meta.size[0]))
    tp, pp = _sizes(weights)
    if sorted(found) != list(range(tp * pp)):
        raise ValueError(f"{checkpoint.folder}: the bucketed optimizer state holds model-parallel groups "
                         f"{sorted(found)}, the args TP {tp} × PP {pp}; the checkpoint is incomplete")
    out = {}
    for group, gbufs in found.items():
        out[group] = []
        for gbuf in sorted(gbufs):
            dtype, buckets = gbufs[gbuf]
            if sorted(buckets) != list(range(len(buckets))):
                raise ValueError(f"{checkpoint.folder}: buffer {gbuf} of group {group} has buckets {sorted(buckets)}; "
                                 "the checkpoint is incomplete")
            out[group].append((dtype, [buckets[k] for k in range(len(buckets))]))
    return out


def _sizes(weights: MegatronWeights) -> tuple[int, int]:
    return (weights.args.get("tensor_model_parallel_size") or 1, weights.args.get("pipeline_model_parallel_size") or 1)


def chunk_layers(weights: MegatronWeights) -> list[list[range]]:
    """The layers of each pipeline stage's model chunks (one chunk per stage without virtual stages), as
    Megatron-LM places them: virtual stage (c, p), chunk c of stage p, holds the next run of layers in
    chunk-major order (chunk 0 of every stage in stage order, then chunk 1, ...), as many as
    _virtual_stage_counts gives it."""
    _, pp = _sizes(weights)
    start, out = 0, [[] for _ in range(pp)]
    for row in _virtual_stage_counts(weights, pp):
        for stage, n in enumerate(row):
            out[stage].append(range(start, start + n))
            start += n
    if start != weights.num_layers:
        raise ValueError(f"the args place {start} layers over the pipeline stages, the model has "
                         f"{weights.num_layers}")
    return out


def _virtual_stage_counts(weights: MegatronWeights, pp: int) -> list[list[int]]:
    """Decoder layers per virtual stage, [chunk][stage]. A --pipeline-model-parallel-layout lists them (its
    t's, virtual stage c·pp + p being chunk c of stage p). Otherwise each stage gets an even share, or the
    first and last stage the counts --decoder-first/last-pipeline-num-layers give, and each share is cut into
    v chunks (v virtual stages); --account-for-embedding/loss-in-pipeline-split count the embedding and the
    output layer as one layer each, in the first chunk of the first stage and the last chunk of the last."""
    args = weights.args
    layout = args.get("pipeline_model_parallel_layout")
    if layout:
        stages = _parse_layout(str(layout))
        flat = "".join(stages)
        if len(stages) % pp:
            raise ValueError(f"--pipeline-model-parallel-layout {layout}: {len(stages)} virtual stages do not "
                             f"divide among {pp} pipeline stages")
        ends = stages[0].startswith("E") and stages[-1].endswith("L")
        if not ends or (flat.count("E"), flat.count("L")) != (1, 1):
            raise ValueError(f"--pipeline-model-parallel-layout {layout}: the embedding (E) must open the first "
                             "stage and the loss (L) close the last, once each")
        vp = len(stages) // pp
        return [[stages[c * pp + p].count("t") for p in range(pp)] for c in range(vp)]
    vp = args.get("virtual_pipeline_model_parallel_size") or 1
    if vp == 1 and args.get("num_layers_per_virtual_pipeline_stage"):  # (Megatron-LM derives the size from it)
        vp = weights.num_layers // pp // args["num_layers_per_virtual_pipeline_stage"]
    first, last = (args.get(f"decoder_{end}_pipeline_num_layers") for end in ("first", "last"))
    embedding, loss = (int(bool(args.get(f"account_for_{end}_in_pipeline_split"))) for end in ("embedding", "loss"))
    counts = [first, *[None] * (pp - 2), last] if pp > 1 else [None]
    rest = weights.num_layers + embedding + loss - sum(c for c in counts if c is not None)
    even = counts.count(None)
    if even and rest % even or not even and rest:
        raise ValueError(f"{weights.num_layers} layers do not split over {pp} pipeline stages as the args say")
    counts = [c if c is not None else rest // even for c in counts]
    if any(c % vp for c in counts):
        raise ValueError(f"the stages' {counts} layers do not split into {vp} virtual stages each as the args say")
    out = [[c // vp for c in counts] for _ in range(vp)]
    out[0][0] -= embedding
    out[-1][-1] -= loss
    return out


def _parse_layout(layout: str) -> list[str]:
    """Megatron-LM's --pipeline-model-parallel-layout, its virtual stages in order (e.g. "E|(tt|)*2,tL" ->
    ["E", "tt", "tt", "tL"]): commas are cosmetic, "(x)*n" and "x*n" repeat, "|" separates stages."""
    layout = layout.replace(",", "")
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):
        layout = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), layout)
    stages = layout.split("|")
    unknown = set("".join(stages)) - set("EtL")
    if unknown:
        raise ValueError(f"--pipeline-model-parallel-layout holds {''.join(sorted(unknown))}: megamath reads "
                         "embedding (E), decoder (t) and loss (L) stages only")
    return stages


def registration(weights: MegatronWeights, layer_order: tuple[str, ...], stage: int = 0) -> list[list[str]]:
    """Pipeline stage `stage`'s model chunks, each its parameters in the order it registers them: the embedding
    in the first chunk of the first stage, the final norm and output layer in the last chunk of the last."""
    stages = chunk_layers(weights)
    chunks = [[f"layers.{i}.{role}" for i in layers for role in layer_order] for layers in stages[stage]]
    if stage == 0:
        chunks[0].insert(0, "embedding")
    if stage == len(stages) - 1:
        chunks[-1].extend(["final_norm", "output"])
    return chunks


def local_shape(shape: tuple[int, ...], role: str, tp: int) -> tuple[int, ...]:
    dim = TP_DIM.get(role.rsplit(".", 1)[-1])
    return shape if dim is None else tuple(n // tp if d == dim else n for d, n in enumerate(shape))


def _place(layer_order, weights: MegatronWeights, buffers) -> dict[str, list[Piece]] | None:
    """Each parameter's pieces (one per TP rank) under `layer_order`; None where the buckets' lengths disagree."""
    tp, pp = _sizes(weights)
    pieces: dict[str, dict[int, Piece]] = {}
    for group in range(tp * pp):
        rank, stage = group % tp, group // tp
        group_buffers = iter(buffers[group])
        for chunk in registration(weights, layer_order, stage):  # its buffers follow the previous chunk's
            order = [role for role in chunk if role in weights.tensors]
            for _ in {weights.tensors[role].dtype for role in order}:  # a buffer per dtype
                dtype, buckets = next(group_buffers, (None, None))
                params = [role for role in reversed(order) if weights.tensors[role].dtype == dtype]
                if not params or not _fill(params, buckets, pieces, rank, tp, weights):
                    return None
        if next(group_buffers, None) is not None:
            return None
    if set(pieces) != set(weights.tensors) or any(len(found) != tp for found in pieces.values()):
        return None
    return {role: [found[t] for t in range(tp)] for role, found in pieces.items()}


def _fill(params: list[str], buckets: list[tuple[str, int]], pieces: dict, rank: int, tp: int,
          weights: MegatronWeights) -> bool:
    """Place `params` (in buffer order) into one buffer's buckets, adding TP rank `rank`'s pieces; False where
    they do not fill the buckets' stored lengths exactly."""
    k, start = 0, 0
    for role in params:
        if k == len(buckets):
            return False
        start = -(-start // PARAM_ALIGN) * PARAM_ALIGN
        piece = Piece(buckets[k][0], start, local_shape(tuple(weights.tensors[role].shape), role, tp))
        end = start + piece.numel
        if end > buckets[k][1]:
            return False
        pieces.setdefault(role, {})[rank] = piece
        k, start = (k + 1, 0) if end == buckets[k][1] else (k, end)
    return k == len(buckets)


def _first_row_fits(checkpoint: DistCheckpoint, weights: MegatronWeights, role: str, pieces: list[Piece]) -> bool:
    """Whether each TP rank's first row of masters rounds to the weight's elements there (a cheap test of an
    order: a misplaced parameter's row is another tensor's values)."""
    weight = weights.tensors[role].read()
    tp = len(pieces)
    for rank, piece in enumerate(pieces):
        row = piece.shape[-1] if len(piece.shape) > 1 else piece.numel
        master = checkpoint.read_range(f"{piece.key}.param", piece.start, piece.start + row)
        if not torch.equal(master.to(weight.dtype), tp_local_slice(weight, role, tp, rank).reshape(-1)[:row]):
            return False
    return True


def tp_local_slice(tensor: torch.Tensor, role: str, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s slice of a global tensor, as Megatron-LM holds it (linear_fc1: [gate_r; up_r])."""
    role = role.rsplit(".", 1)[-1]
    dim = TP_DIM.get(role)
    if dim is None:
        return tensor
    if role == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    return tensor.chunk(tp, dim=dim)[rank]
