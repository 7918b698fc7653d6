"""GPT-NeoX YAML configs -> megamath training configs (`megamath config from-neox`).

GPT-NeoX reads one or more YAML files (JSON-like, with comments) whose top-level keys may be spelt with
`-` or `_`; a key set in two files is an error there, and here. Values a config leaves out take
GPT-NeoX's defaults (those of the `llemma` branch LLEMMA trained with: dropout 0.1, learned positions,
LayerNorm, tied embeddings, linear decay, weight decay 0.01, clipping at 1.0), so a key that is absent can
still be one megamath cannot honour; the error then says the default is the problem. A config written for
GPT-NeoX main (its Llama MLP is `activation: swiglu`, which the llemma branch lacks) takes main's defaults
where they differ: no dropout, weight decay 0.1, MLP biases unless `use_bias_in_mlp: false`.

Where GPT-NeoX and megamath compute a mapped value differently, a note says how (the schedule is the
main case: see `_schedule`).

Why one file: it has one job, the key-by-key mapping, one function per config section; the table of the
keys it does not map is in neox_keys.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from megamath.compat.conversion import (NO_EQUIVALENT, NOT_NEEDED, UNSUPPORTED, Conversion, Keys, Unmapped,
                                        held_out_set_names, held_out_sets)
from megamath.compat.neox_keys import NULL_IS_UNSET, UNMAPPED
from megamath.data.splits import canonical_split
from megamath.training.config import read_yaml

LLAMA_MLP_MULTIPLE = 256  # GPT-NeoX's LLaMAParallelMLP rounds 2·4h/3 up to a multiple of this
ATTENTION_TYPES = {"global", "flash"}  # dense causal attention; the rest are sparse or local patterns
ADAM_TYPES = {"adam", "adamw", "cpu_adam", "cpu_torch_adam"}
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
SPLIT_HINT = " (a config split over several files, e.g. a model .yml and local_setup.yml, converts from all of them: " \
             "give every file, as to deepy.py)"

# Keys accepted and dropped, with why. Anything neither mapped nor listed here is reported as unknown.


def read_neox_yaml(paths: Sequence[str | Path]) -> dict:
    """Merge GPT-NeoX config files into one mapping with `_` spellings (a key set twice is an error)."""
    merged: dict = {}
    for path in map(Path, paths):
        raw = read_yaml(path, "GPT-NeoX config")
        if not isinstance(raw, dict):
            kind = "an empty file" if raw is None else type(raw).__name__
            raise ValueError(f"{path}: a GPT-NeoX config is a mapping of keys, got {kind}")
        spelled: dict = {}  # this file's keys as written, by their `_` spelling
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name in spelled:  # `num-layers` and `num_layers` in one file: no earlier file is to blame
                raise ValueError(f"{path}: key {name!r} is set twice in this file ({spelled[name]!r} and {key!r})")
            if name in merged:
                raise ValueError(f"{path}: key {name!r} is already set by an earlier file (GPT-NeoX refuses this too)")
            spelled[name] = key
            merged[name] = value
    return merged


def convert_neox(raw: dict, vocab_size: int | None = None, source: str = "") -> Conversion:
    """Convert a merged GPT-NeoX config. `vocab_size` is the tokenizer's size when its file is not at hand."""
    keys = Keys(raw)
    out = Conversion({}, source=source)
    missing = [k for k in SHAPE_KEYS if raw.get(k) is None]
    if missing:  # before the architecture checks: with no model file, "pos_emb is not set" would be the error
        raise ValueError(f"{', '.join(missing)} not set: GPT-NeoX needs them too{SPLIT_HINT}")
    _architecture(keys)
    tp = _int(keys, "model_parallel_size", 1, low=1)
    out.config["model"] = _model(keys, vocab_size, tp, out)
    out.config["parallel"] = {"tp_size": tp, "sequence_parallel": bool(keys.take("sequence_parallel", False))}
    _optimizer(keys, out)
    out.config["data"] = _data(keys, out)
    _schedule(keys, out)
    _checkpointing(keys, out)
    _logging(keys, out)
    keys.check_spelling(str, known=UNMAPPED.not_a_typo)
    for key in keys.untaken():
        kind, reason = UNMAPPED.reason(key) or (NO_EQUIVALENT, "not a GPT-NeoX training key this converter knows; "
                                                                "ignored")
        out.unmapped.append(Unmapped(key, kind, reason))
    out.validate()
    return out


def neox_model_config(raw: dict, vocab_size: int) -> tuple[dict, list[str]]:
    """The model section (and notes) of a merged GPT-NeoX config, for converting its checkpoint: the
    architecture is checked and the shapes mapped as for training; what only shapes training (dropout, the
    pipeline size, which the checkpoint's files already reflect) is not asked about."""
    missing = [k for k in SHAPE_KEYS if raw.get(k) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set in the checkpoint's config")
    keys = Keys({**raw, "pipe_parallel_size": 0, "hidden_dropout": 0, "attention_dropout": 0})
    out = Conversion({})
    _architecture(keys)
    return _model(keys, vocab_size, _int(keys, "model_parallel_size", 1, low=1), out), out.notes


# ---- what megamath can train ---------------------------------------------------------------------------

def _neox_main(keys: Keys) -> bool:
    """Whether the config is written for GPT-NeoX main: only main has the swiglu activation (its Llama MLP)."""
    return keys.raw.get("activation") == "swiglu"


def _require(keys: Keys, key: str, wanted, default, why: str) -> None:
    value = keys.take(key, default)
    ok = any(value == w for w in wanted) if isinstance(wanted, (set, tuple)) else value == wanted  # (a list given)
    if not ok:
        given = f"is {value!r}" if key in keys else f"is not set (GPT-NeoX's default: {default!r})"
        raise ValueError(f"{key} {given}: {why}")


def _architecture(keys: Keys) -> None:
    """Errors for what megamath cannot train: it is a Llama with tensor and data parallelism only."""
    pipe = keys.take("pipe_parallel_size", 0)
    if not isinstance(pipe, int) or pipe > 1:
        raise ValueError(f"pipe_parallel_size is {pipe!r}: megamath has no pipeline parallelism; set it to 0 and "
                         "split the model with model_parallel_size (tensor parallelism) instead")
    # First: a Mamba or RWKV model (layer types here) would otherwise be refused for its position embeddings.
    for item in keys.take("attention_config") or []:
        types = set(item[0]) if isinstance(item, list) and item and isinstance(item[0], list) else {str(item)}
        if not types <= ATTENTION_TYPES:
            raise ValueError(f"attention_config has {sorted(types - ATTENTION_TYPES)}: megamath has dense causal "
                             "attention only (global / flash)")
    llama = "megamath trains the Llama architecture only"
    _require(keys, "pos_emb", "rotary", "learned", f"{llama} (rotary position embeddings)")
    _require(keys, "rotary_pct", {1, 1.0}, 1.0, "megamath rotates the whole head (rotary_pct 1)")
    _require(keys, "norm", "rmsnorm", "layernorm", f"{llama} (RMSNorm)")
    if _neox_main(keys):  # GPT-NeoX main spells the Llama MLP as a gated activation
        keys.take("activation")
        _require(keys, "use_bias_in_mlp", False, True, f"{llama} (no biases)")
    else:  # the llemma branch: mlp_type llama with a silu gate
        _require(keys, "mlp_type", "llama", "regular", f"{llama} (the gated SwiGLU MLP: mlp_type llama, or "
                 "activation swiglu in GPT-NeoX main)")
        _require(keys, "activation", "silu", "gelu", f"{llama} (SwiGLU: silu gate)")
    _require(keys, "use_bias_in_norms", False, True, f"{llama} (no biases)")
    _require(keys, "use_bias_in_attn_linear", False, True, f"{llama} (no biases)")
    _require(keys, "no_weight_tying", True, False, f"{llama} (untied input and output embeddings)")
    _require(keys, "gpt_j_residual", False, False, f"{llama} (sequential residual)")
    _require(keys, "gpt_j_tied", False, False, f"{llama} (sequential residual)")
    for key in ("hidden_dropout", "attention_dropout"):
        _require(keys, key, {0, 0.0}, 0.0 if _neox_main(keys) else 0.1,
                 "megamath trains without dropout; set it to 0")
    _require(keys, "use_mup", False, False, "megamath has no muP parametrization")
    _require(keys, "use_qk_layernorm", False, False, f"{llama} (no query/key norms)")
    experts = _int(keys, "moe_num_experts", 1, low=1)
    if experts > 1:
        raise ValueError(f"moe_num_experts is {experts}: megamath trains dense Llama models only (no MoE)")
    window = _int(keys, "sliding_window_width", None, low=1)
    if window is not None and window < int(keys.raw.get("seq_length") or 0):
        raise ValueError(f"sliding_window_width is {window}: megamath has dense causal attention only (a window "
                         "shorter than seq_length changes what each token attends to)")
    if keys.take("num_unique_layers") not in (None, keys.raw.get("num_layers")):
        raise ValueError("num_unique_layers: megamath has no parameter sharing between layers")
    keys.take("param_sharing_style")
    for key in ("label_data_paths", "eod_mask_loss", "weight_by_num_documents"):
        if keys.take(key):
            raise ValueError(f"{key} is set: megamath trains on every token of the blend at the given weights; "
                             "remove it to convert")
    _require(keys, "train_impl", "normal", "normal", "megamath trains language modelling only (no DPO, KTO, reward "
             "model or REINFORCE objective)")
    _require(keys, "dataset_impl", "gpt2", "gpt2", "megamath reads GPT-style token datasets only")
    for key, what in (("soft_prompt_tuning", "a soft prompt alone"), ("curriculum_learning", "a sequence-length "
                                                                                             "curriculum")):
        setting = keys.take(key)
        if isinstance(setting, dict) and setting.get("enabled"):
            raise ValueError(f"{key} is enabled: it trains {what}; megamath trains the whole model on full-length "
                             "samples")
    if not _neox_main(keys) and keys.take("intermediate_size") is not None:
        raise ValueError("intermediate_size: the MLP width follows GPT-NeoX's Llama rule (256·⌈(8h/3)/256⌉); "
                         "this converter does not map an explicit width, remove the key or edit "
                         "model.ffn_hidden_size after converting")


def _model(keys: Keys, vocab_size: int | None, tp: int, out: Conversion) -> dict:
    shape = {k: _int(keys, k, None, low=1) for k in SHAPE_KEYS}
    hidden = shape["hidden_size"]
    ffn = _ffn_hidden_size(keys, hidden, out)
    init_method = keys.take("init_method", "normal")
    output_init = keys.take("output_layer_init_method", "scaled_normal")
    if (init_method, output_init) != ("normal", "scaled_normal"):
        out.unmapped.append(Unmapped("init_method", UNSUPPORTED, f"{init_method}/{output_init}: megamath initializes "
                                     "normal(0, init_std) with scaled output projections; only a run from random "
                                     "weights is affected"))
    eps = _float(keys.take("rms_norm_epsilon", 1e-8), "rms_norm_epsilon")
    if not _neox_main(keys):  # main's RMSNorm is Llama's: x · rsqrt(mean(x²) + eps)
        out.notes.append(f"rms_norm_epsilon {eps:g}: the llemma branch's RMSNorm divides by rms(x) + eps, megamath's "
                         "(Llama's, Hugging Face's, GPT-NeoX main's) by sqrt(mean(x²) + eps); they differ where "
                         "rms(x)² is not large against eps")
    return {
        "vocab_size": _vocab_size(keys, vocab_size, tp, out),
        "hidden_size": hidden,
        "num_layers": int(shape["num_layers"]),
        "num_heads": int(shape["num_attention_heads"]),
        "num_kv_heads": _kv_heads(keys, int(shape["num_attention_heads"]), out),
        "ffn_hidden_size": ffn,
        "max_seq_length": _int(keys, "max_position_embeddings", None, low=1) or int(shape["seq_length"]),
        "rope_theta": _float(keys.take("rotary_emb_base", 10000), "rotary_emb_base"),
        "norm_eps": eps,
        "init_std": _float(keys.take("init_method_std", 0.02), "init_method_std"),
        "activation_checkpointing": bool(keys.take("checkpoint_activations", False)),
        "kernels": "auto",
    }


def _kv_heads(keys: Keys, heads: int, out: Conversion) -> int:
    """The llemma branch reads num_kv_heads only when attention_type (default multihead) is multiquery or
    groupedquery; GPT-NeoX main has no attention_type and always reads num_kv_heads."""
    kind, kv = keys.take("attention_type"), keys.take("num_kv_heads")
    if kind is None and _neox_main(keys):
        return heads if kv is None else _int(keys, "num_kv_heads", kv, low=1)
    if (kind or "multihead") == "multihead":
        if kv not in (None, heads):
            out.unmapped.append(Unmapped("num_kv_heads", NOT_NEEDED, f"{kv}: GPT-NeoX ignores it with attention_type "
                                         "multihead (its default), so the model has one KV head per query head"))
        return heads
    if kind not in ("multiquery", "groupedquery") or kv is None:
        raise ValueError(f"attention_type {kind!r} needs num_kv_heads (GPT-NeoX's attention types: multihead, "
                         "multiquery, groupedquery)")
    return int(kv)


def _ffn_hidden_size(keys: Keys, hidden: int, out: Conversion) -> int:
    """The SwiGLU width GPT-NeoX builds. The llemma branch's LLaMAParallelMLP: 256·⌈(8h/3)/256⌉. GPT-NeoX
    main's gated ParallelMLP (activation swiglu) scales its width w (intermediate_size, else
    expansion_factor·h, else 4h) to ⌊2w/3⌋ for gate and up together, so each is ⌊⌊2w/3⌋/2⌋, rounded up to
    mlp_multiple_of (default 1)."""
    if not _neox_main(keys):
        return _ffn_llama(hidden)
    size, factor = keys.take("intermediate_size"), keys.take("expansion_factor")
    if size is not None and factor is not None:
        raise ValueError("intermediate_size and expansion_factor are both set: GPT-NeoX refuses that too; keep one")
    width = int(size) if size else int(float(factor) * hidden) if factor else 4 * hidden
    multiple = _int(keys, "mlp_multiple_of", 1, low=1)
    ffn = multiple * math.ceil((int(width * 2 / 3) // 2) / multiple)
    if not size:
        out.notes.append(f"activation swiglu without intermediate_size: GPT-NeoX sizes the MLP from "
                         f"{'expansion_factor·h' if factor else '4h'}, so ffn_hidden_size is {ffn}; a Llama "
                         f"checkpoint of this hidden size has {_ffn_llama(hidden)} (GPT-NeoX's Llama configs set "
                         "intermediate_size)")
    return ffn


def _ffn_llama(hidden: int) -> int:
    ffn = int(2 * hidden * 4 / 3)
    return LLAMA_MLP_MULTIPLE * ((ffn + LLAMA_MLP_MULTIPLE - 1) // LLAMA_MLP_MULTIPLE)


def _vocab_size(keys: Keys, given: int | None, tp: int, out: Conversion) -> int:
    """GPT-NeoX's padded vocabulary: the tokenizer's size rounded up to make_vocab_size_divisible_by × TP."""
    if keys.take("padded_vocab_size") is not None:
        return int(keys.raw["padded_vocab_size"])
    tokenizer = keys.take("tokenizer_type", "GPT2BPETokenizer")
    vocab_file = keys.take("vocab_file")
    keys.take("merge_file")
    if given is None:
        if tokenizer != "SPMTokenizer" or not vocab_file:
            raise ValueError(f"tokenizer_type {tokenizer}: the vocabulary size comes from the tokenizer; pass "
                             "--vocab-size N (the tokenizer's number of tokens)")
        path = Path(vocab_file)
        if not path.is_file():
            raise ValueError(f"vocab_file {vocab_file} not found: the vocabulary size comes from it; run where "
                             "the path resolves or pass --vocab-size N")
        from megamath.data.tokenizer import load_sentencepiece

        given = load_sentencepiece(path).get_piece_size()
    multiple = _int(keys, "make_vocab_size_divisible_by", 128, low=1) * tp
    padded = multiple * math.ceil(given / multiple)
    out.unmapped.append(Unmapped("tokenizer_type", NOT_NEEDED,
                                 f"{tokenizer}: it only sizes the vocabulary here ({given} tokens, padded to {padded} "
                                 "as GPT-NeoX pads); megamath reads token ids from the preprocessed datasets"
                                 + ("" if tokenizer == "SPMTokenizer" else
                                    " (megamath preprocess needs a SentencePiece model)")))
    return padded


def _optimizer(keys: Keys, out: Conversion) -> None:
    spec = _mapping(keys.take("optimizer"), "optimizer")
    kind = str(spec.get("type", "adam")).lower()
    if kind not in ADAM_TYPES:
        raise ValueError(f"optimizer.type is {spec.get('type')!r}: megamath trains with AdamW (ZeRO-1) only")
    params = dict(_mapping(spec.get("params"), "optimizer.params"))
    lr_key = "optimizer.params.lr" if "lr" in params else "lr"
    lr = params.pop("lr", keys.take("lr"))
    if lr is None:
        raise ValueError(f"optimizer.params.lr not set: GPT-NeoX needs it too{SPLIT_HINT}")
    if _float(lr, lr_key) <= 0:  # the schedule's floor is min_lr / lr
        raise ValueError(f"{lr_key} must be positive, got {lr!r}")
    betas = params.pop("betas", [0.9, 0.999])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"optimizer.params.betas must be two numbers [beta1, beta2], got {betas!r}")
    eps = params.pop("eps", 1e-8)
    for name in params:
        out.unmapped.append(Unmapped(f"optimizer.params.{name}", NO_EQUIVALENT, "megamath's AdamW takes lr, betas, "
                                     "eps and the top-level weight_decay"))
    zero = _mapping(keys.take("zero_optimization"), "zero_optimization")
    stage = zero.get("stage", keys.take("zero_stage", 0))
    if stage not in (0, 1):
        out.unmapped.append(Unmapped("zero_optimization.stage", UNSUPPORTED, f"{stage}: megamath runs ZeRO-1, the "
                                     "same updates; gradients (stage 2) and parameters (stage 3) are not sharded, "
                                     "so each GPU needs more memory"))
    if zero.get("cpu_offload") or zero.get("offload_optimizer"):
        out.unmapped.append(Unmapped("zero_optimization.cpu_offload", UNSUPPORTED, "the optimizer shards stay on "
                                     "the GPU (12 bytes per parameter / DP size)"))
    for name in zero:
        if name not in ("stage", "cpu_offload", "offload_optimizer"):
            out.unmapped.append(Unmapped(f"zero_optimization.{name}", NOT_NEEDED, "megamath's ZeRO-1 buckets the gradients "
                                         "(parallel.bucket_mb) and overlaps their reduce-scatter and the parameter "
                                         "all-gather with compute (parallel.overlap_grad_reduce / "
                                         "overlap_param_gather, on by default)"))
    for name in ("zero_reduce_scatter", "zero_contiguous_gradients", "zero_reduce_bucket_size",
                 "zero_allgather_bucket_size"):
        keys.take(name)
    grad_dtype = _grad_dtype(keys, out)
    clip = keys.take("gradient_clipping", 1.0)  # DeepSpeed's setting; GPT-NeoX's default clips at 1.0
    out.config["optimizer"] = {"lr": _float(lr, lr_key), "beta1": _float(betas[0], "optimizer.params.betas[0]"),
                               "beta2": _float(betas[1], "optimizer.params.betas[1]"),
                               "eps": _float(eps, "optimizer.params.eps"),
                               "weight_decay": _float(keys.take("weight_decay", 0.1 if _neox_main(keys) else 0.01),
                                                      "weight_decay"),
                               "clip_grad": _float(clip or 0.0, "gradient_clipping"), "grad_dtype": grad_dtype}
    if kind != "adamw":
        out.notes.append(f"optimizer.type {spec.get('type', 'adam')}: GPT-NeoX's Adam decouples weight decay "
                         "(AdamW), as megamath does; neither decays norm weights or biases")


def _grad_dtype(keys: Keys, out: Conversion) -> str:
    precision = str(keys.take("precision", "fp32")).lower()
    fp16, bf16 = keys.take("fp16") or {}, keys.take("bf16") or {}
    if precision in ("fp16", "float16", "half") or fp16.get("enabled"):
        raise ValueError("precision fp16: megamath trains in bfloat16 (or fp32) without loss scaling; "
                         "set precision: bfloat16")
    if precision in ("bfloat16", "bf16") or bf16.get("enabled"):
        out.config["param_dtype"] = "auto"
        out.notes.append("precision bfloat16: param_dtype auto = bfloat16 weights with fp32 master weights and "
                         "Adam moments on GPUs (float32 on a CPU)")
    else:
        out.config["param_dtype"] = "float32"
    accum = str(_mapping(keys.take("data_types"), "data_types").get("grad_accum_dtype", "fp32")).lower()
    if accum in ("fp16", "float16"):
        raise ValueError("data_types.grad_accum_dtype fp16: megamath accumulates gradients in fp32 or bf16")
    if keys.take("fp32_allreduce") or accum in ("fp32", "float32"):
        return "fp32"  # megamath reduce-scatters the gradient buffer in its own dtype
    return "bf16"


def _schedule(keys: Keys, out: Conversion) -> None:
    """GPT-NeoX (llemma branch) and megamath both compute, after a linear warmup,
    lr = peak · (r + (1 − r) · ½ · (1 + cos(π · (i − warmup) / (decay − warmup)))); the differences are noted."""
    train_iters = _int(keys, "train_iters", None, low=1)
    if train_iters is None:
        raise ValueError(f"train_iters not set: GPT-NeoX needs it too{SPLIT_HINT}")
    style = keys.take("lr_decay_style", "linear")
    decay = _int(keys, "lr_decay_iters", None, low=1)
    fraction = keys.take("lr_decay_fraction")
    fraction = None if fraction is None else _float(fraction, "lr_decay_fraction")
    decay = decay if decay is not None else math.floor(train_iters * fraction) if fraction else train_iters
    if keys.raw.get("warmup_iters") and keys.raw.get("warmup"):
        raise ValueError("warmup_iters and warmup are both set: GPT-NeoX refuses that too; keep one")
    # Neither: 1%, GPT-NeoX main's default (the llemma branch has no default and fails to build its schedule).
    # warmup_iters 0 beside a warmup fraction: GPT-NeoX takes the fraction (0 is its "not set").
    fraction_given = "warmup" in keys.raw
    warmup_iters, warmup_fraction = _int(keys, "warmup_iters", None, low=0), keys.take("warmup", 0.01)
    warmup_fraction = _float(warmup_fraction or 0.0, "warmup")
    by_fraction = warmup_iters is None or (not warmup_iters and fraction_given)
    warmup = round(float(warmup_fraction or 0.0) * decay) if by_fraction else int(warmup_iters)
    if by_fraction and warmup_fraction and warmup != float(warmup_fraction) * decay:
        out.notes.append(f"warmup {warmup_fraction}: {float(warmup_fraction) * decay} iterations in GPT-NeoX, "
                         f"rounded to {warmup} steps")
    peak = out.config["optimizer"]["lr"]
    ratio, min_lr = keys.take("decay_lr_to"), _float(keys.take("min_lr", 0.0) or 0.0, "min_lr")
    ratio = None if ratio is None else _float(ratio, "decay_lr_to")
    if style == "constant":
        ratio = 1.0
    elif style != "cosine":
        raise ValueError(f"lr_decay_style {'is ' + repr(style) if 'lr_decay_style' in keys else 'is not set'} "
                         "(GPT-NeoX's default is linear): megamath's schedule is warmup then cosine "
                         "(or constant)")
    elif ratio is None:
        ratio = min_lr / peak
    elif min_lr > float(ratio) * peak:
        out.notes.append(f"min_lr {min_lr} is above decay_lr_to·lr: GPT-NeoX clamps to it, megamath's floor is "
                         "decay_lr_to·lr")
    out.config["schedule"] = {"warmup_steps": warmup, "decay_steps": decay, "min_lr_ratio": float(ratio)}
    out.config["train_steps"] = int(train_iters)
    out.notes.append("schedule: GPT-NeoX steps its scheduler after each update, so its update k runs at the lr of "
                     "iteration k−1 (on the llemma branch the first at 0; main since #1379 runs the first two at "
                     "lr/warmup); megamath's update k runs at lr(k): the same curve, one update earlier. Past "
                     "lr_decay_iters GPT-NeoX's cosine rises again, megamath's holds the floor")


def _data(keys: Keys, out: Conversion) -> dict:
    seed = _int(keys, "seed", 1234, low=0)
    data: dict = {"seq_length": int(keys.raw["seq_length"]), "seed": seed,
                  "sample_order": "neox"}  # GPT-NeoX's samples in its order, even for one train_data_paths entry
    out.config["seed"] = seed
    _require(keys, "pack_impl", "packed", "packed", "megamath packs documents into samples across their boundaries, "
             "as GPT-NeoX's packed does")
    keys.take("allow_chopped")  # (it matters only to the other pack_impl)
    if keys.take("train_epochs") is not None:
        raise ValueError("train_epochs is set: give train_iters instead (megamath counts optimizer steps, and GPT-NeoX "
                         "builds another sample order from an epoch count)")
    train, weights = _list(keys.take("train_data_paths"), "train_data_paths"), \
        _list(keys.take("train_data_weights"), "train_data_weights")
    single = keys.take("data_path")
    split = keys.take("split")
    if train:
        weights = weights or [1.0] * len(train)
        if len(weights) != len(train):
            raise ValueError(f"train_data_weights has {len(weights)} entries for {len(train)} train_data_paths")
        data["data_path"] = [x for w, p in zip(weights, train) for x in (_float(w, "train_data_weights"), str(p))]
    elif single:  # GPT-NeoX cuts data_path by split (969, 30, 1 by default) and reads it without a blend
        data["data_path"] = [str(single)]
        data["split"] = canonical_split(split if split is not None else "969, 30, 1")
        out.notes.append(f"split {data['split']}{'' if split is not None else ' (GPT-NeoX default)'}: data_path's "
                         "documents are cut into train, validation and test parts by GPT-NeoX's rule (with "
                         "data.sample_order neox; megamath's other orders cut by Megatron-LM's, where a bound can "
                         "differ by one document)")
    elif split is not None:
        out.unmapped.append(Unmapped("split", NOT_NEEDED, "no data_path to split"))
    if train and split is not None:
        out.unmapped.append(Unmapped("split", NOT_NEEDED, f"{split}: GPT-NeoX ignores it beside train_data_paths"))
    valid = _list(keys.take("valid_data_paths"), "valid_data_paths")
    data["valid_data"] = held_out_set_names([str(p) for p in valid])
    test = _list(keys.take("test_data_paths"), "test_data_paths")
    if test:  # GPT-NeoX evaluates the test blend once, after the last iteration; megamath each set on its own
        data["test_data"] = held_out_set_names([str(p) for p in test])
    return data


def _init_step(load: str) -> str:
    """`init_step: N` with the step of the checkpoint at `load` (a global_stepN folder, or a save folder whose
    `latest` file names one), when this machine can read it."""
    name = Path(load).name
    if not re.fullmatch(r"global_step\d+", name):
        try:
            name = (Path(load) / "latest").read_text().strip()
        except (OSError, UnicodeDecodeError):  # not here (converted on another machine): the convert says it
            name = ""
    step = re.fullmatch(r"global_step(\d+)", name)
    return f"init_step: {int(step.group(1))}" if step else "init_step: the iteration the convert command prints"


def _checkpointing(keys: Keys, out: Conversion) -> None:
    c = out.config
    # The aliases batch_size and gas count only when these keys are absent: a 0 is an error, not absent.
    micro = _int(keys, "train_micro_batch_size_per_gpu", None, low=1)
    c["micro_batch_size"] = _int(keys, "batch_size", 1, low=1) if micro is None else micro
    accum = _int(keys, "gradient_accumulation_steps", None, low=1)
    if accum is None:
        accum = _int(keys, "gas", 1, low=1)
    c["grad_accum_steps"] = accum
    batch = keys.take("train_batch_size")
    if batch is not None:
        out.unmapped.append(Unmapped("train_batch_size", NOT_NEEDED, f"{batch}: megamath's global batch is "
                                     "micro_batch_size × grad_accum_steps × data-parallel size, as in GPT-NeoX"))
    interval, iters = _int(keys, "eval_interval", 1000), _int(keys, "eval_iters", 100)
    sets = len(c["data"]["valid_data"]) + held_out_sets(c["data"])
    c["eval_every"] = interval if sets else 0
    c["eval_batches"] = math.ceil(iters * accum / max(sets, 1))
    if interval and not sets:
        out.notes.append(f"eval_interval {interval}: no valid_data_paths and no validation share in split, so "
                         f"evaluation is off; set data.valid_data or data.split, and eval_every={interval}")
    out.notes.append(f"eval_iters {iters}: GPT-NeoX evaluates eval_iters × gradient_accumulation_steps = "
                     f"{iters * accum} micro-batches per rank on the blend of its validation data and reports one loss; "
                     f"megamath reports each validation set, so the same work is split: eval_batches = "
                     f"⌈{iters * accum} / {max(sets, 1)}⌉ = {c['eval_batches']} per set")
    if keys.take("checkpoint_scale", "linear") != "linear":
        out.unmapped.append(Unmapped("checkpoint_scale", UNSUPPORTED, "megamath saves every checkpoint.save_every "
                                     "steps (linear)"))
    num_layers = _int(keys, "checkpoint_num_layers", 1)
    if num_layers != 1:
        out.unmapped.append(Unmapped("checkpoint_num_layers", UNSUPPORTED, f"{num_layers}: megamath checkpoints "
                                     "every block (less memory, the same recompute)"))
    factor = _int(keys, "checkpoint_factor", None, low=1)  # a 0 is an error, not "absent"
    c["checkpoint"] = {"save_every": _int(keys, "save_interval", 0) if factor is None else factor}
    keep = keys.take("keep_last_n_checkpoints")
    if keep is not None:
        c["checkpoint"]["keep"] = int(keep)
    else:
        out.notes.append("keep_last_n_checkpoints not set: GPT-NeoX keeps every checkpoint, megamath keeps "
                         "checkpoint.keep (2 by default); raise it to keep more")
    save, load, finetune = keys.take("save"), keys.take("load"), keys.take("finetune", False)
    if save:
        c["run_dir"] = str(save)
    if load:
        if (Path(load) / "config.json").is_file():
            c["init_from_hf"] = str(load)
            if not finetune:
                out.notes.append("load without finetune: GPT-NeoX would resume its iteration count; init_from_hf "
                                 "starts at step 0 from the weights, unless init_step gives the iteration")
        else:
            out.unmapped.append(Unmapped("load", UNSUPPORTED, f"{load} is not a Hugging Face folder (no config.json "
                                         "there): a GPT-NeoX checkpoint; convert it with `megamath convert "
                                         f"neox-to-hf {load} HF_DIR` and set init_from_hf: HF_DIR"
                                         + ("" if finetune else " (and, to go on from its iteration as GPT-NeoX does "
                                            f"without finetune, {_init_step(load)}); or keep its optimizer state "
                                            f"too: `megamath convert neox-to-run {load} RUN_DIR --config` this "
                                            "config")))
            if finetune:
                out.unmapped.append(Unmapped("finetune", NOT_NEEDED, "init_from_hf always loads the weights only "
                                             "and starts at step 0 (GPT-NeoX's finetune)"))
    elif finetune:
        out.notes.append("finetune without load: nothing to start from, so random initialization")
    c["log_every"] = _int(keys, "log_interval", 100)
    c["checkpoint"]["resume"] = "auto"
    exit_every = _int(keys, "exit_interval", 0, low=0)
    if exit_every:
        c["exit_every"] = exit_every
        out.notes.append(f"exit_interval {exit_every}: megamath saves a checkpoint when it stops there (exit_every); "
                         "GPT-NeoX only exits, keeping what its last checkpoint_factor save holds")


def _logging(keys: Keys, out: Conversion) -> None:
    use = keys.take("use_wandb")
    project, group = keys.take("wandb_project", "neox"), keys.take("wandb_group")
    team, host = keys.take("wandb_team"), keys.take("wandb_host") or "https://api.wandb.ai"
    name = keys.take("wandb_run_name")
    events = keys.take("tensorboard_dir")
    logging: dict = {"tensorboard": True, "tensorboard_dir": str(events)} if events else {}
    if use:
        logging["wandb"] = {"project": str(project), "group": group and str(group), "name": name and str(name),
                            "mode": "online", "entity": team and str(team)}
        if str(host).rstrip("/") != "https://api.wandb.ai":
            out.unmapped.append(Unmapped("wandb_host", NO_EQUIVALENT, f"set WANDB_BASE_URL={host} in the environment"))
    if logging:
        out.config["logging"] = logging
    _profiling(keys, out)


def _profiling(keys: Keys, out: Conversion) -> None:
    """profile's window and memory_profiling, as profile.steps and profile.memory. GPT-NeoX's torch.profiler
    schedule waits profile_step_start steps and warms up one, so its trace holds steps start+1..stop (1-based);
    nsys, which it starts too, brackets one more."""
    profile: dict = {}
    if keys.take("profile"):
        start, stop = _int(keys, "profile_step_start", 10, low=0), _int(keys, "profile_step_stop", 12, low=0)
        if stop <= start:
            raise ValueError(f"profile_step_stop {stop} leaves no step to profile after profile_step_start {start}")
        profile["steps"] = [start + 1, stop]
    if keys.take("memory_profiling"):
        profile["memory"] = True  # one snapshot at the window's end (GPT-NeoX: one per profiled step)
    if profile:
        out.config["profile"] = profile


def _int(keys: Keys, key: str, default, low=None):
    """The key's integer; `low` bounds it from below (a size the conversion divides by must not be 0)."""
    value = keys.take(key, default)
    if value is None and key in NULL_IS_UNSET:
        return default
    if value is None and default is not None:  # set to null where GPT-NeoX's default is a number: it fails later
        raise ValueError(f"{key} is null: give an integer (GPT-NeoX's default: {default})")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{key} must be at least {low}, got {value!r}")
    return int(value)


def _list(value, key: str) -> list:
    """A list of the config (null or absent: empty), each entry a prefix or a weight; anything else (a lone
    string would be read letter by letter) is a one-line error naming it."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise ValueError(f"{key} must be a list (of prefixes, or of weights), got {value!r}")
    return value


def _mapping(value, key: str) -> dict:
    """A section of the config (null or absent: empty); anything else is a one-line error naming it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of keys, got {value!r}")
    return value


def _float(value, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
