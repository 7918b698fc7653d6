"""Megatron-LM training command lines -> megamath training configs (`megamath config from-megatron`).

The flags are read the way Megatron's argparse reads them (`--flag value...`, `--flag=value`, switches
without values), after an optional launcher (`torchrun --nnodes 4 --nproc_per_node 8 pretrain_gpt.py`,
whose sizes give the world size). Megatron's defaults apply to flags left out (LayerNorm, learned
positions, GeLU MLP, biases, tied embeddings, dropout 0.1, linear decay, weight decay 0.01, clipping
1.0, Adam betas 0.9/0.999), so a missing flag can be what megamath cannot train; the error says so.

Megatron's `--global-batch-size` counts sequences over all data-parallel ranks; megamath's config counts
per rank (`micro_batch_size`, `grad_accum_steps`), so the conversion needs the data-parallel size:
world size / tensor-parallel size.

Why one file: it has one job, the flag-by-flag mapping, one function per config section; the tables of the
flags it does not map or refuses are in megatron_flags.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Sequence

from megamath.compat.conversion import (NO_EQUIVALENT, NOT_NEEDED, UNSUPPORTED, Conversion, Keys, Unmapped,
                                        held_out_set_names, held_out_sets, is_number)
from megamath.compat.megatron_flags import LEGACY_FLAGS, MODEL_CHANGES, OTHER_TRAINING, UNMAPPED
from megamath.data.megatron_order import BLEND_SURPLUS
from megamath.data.splits import canonical_split
from megamath.input_path import read_text

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
LAUNCHER_SIZES = {"--nnodes", "--nproc_per_node", "--nproc-per-node"}



def read_command_line(args: Sequence[str]) -> tuple[list[str], str]:
    """The words of a Megatron command line: the arguments themselves, or the one file that holds them."""
    args = list(args)
    if args and args[0] == "--":
        args = args[1:]
    if len(args) == 1 and not args[0].startswith("-"):
        path = Path(args[0])
        text = read_text(path, "Megatron-LM command line file", "the file holding the command line")
        text = text.replace("\\\n", " ")
        try:  # the whole text: a quoted string may span lines (DISTRIBUTED_ARGS="\n  --nnodes 4 ...")
            words = shlex.split(text, comments=True)
        except ValueError:
            words = []
            for line in text.splitlines():
                try:
                    words += shlex.split(line, comments=True)
                except ValueError as err:  # shlex's "No closing quotation" names neither file nor line
                    raise ValueError(f"{path}: {err} in {line.strip()[:120]!r}") from None
        if not any(w.startswith("--") for w in words):  # an empty or wrong file: not "--position-embedding-type is not given"
            raise ValueError(f"{path}: no Megatron-LM flags in it (expected its command line, "
                             "e.g. `torchrun ... pretrain_gpt.py --num-layers 32 ...`)")
        return words, str(path)
    if not args:
        raise ValueError("give Megatron-LM's flags after `--`, or a file holding its command line")
    return args, "a Megatron-LM command line"


def parse_flags(words: Sequence[str]) -> tuple[dict, int | None, dict]:
    """{flag_name (underscores): [values]} of the training script's flags, the launcher's world size, and
    {flag as written: number of times} of the flags given more than once: as Megatron-LM's argparse does, the last
    occurrence counts (a script's base flags followed by overrides)."""
    variables = [w for w in words if "$" in w]
    if variables:
        raise ValueError(f"{variables[0]}: expand shell variables first (e.g. run the script with "
                         "`bash -x` and convert the command it prints)")
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    launcher, flags = (words[:script], words[script + 1:]) if script is not None else ([], list(words))
    world = _launcher_world_size(launcher)
    parsed: dict = {}
    repeated: dict = {}
    current = None
    for word in flags:
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            current = name.replace("-", "_")
            if current in parsed:
                repeated[f"--{name}"] = repeated.get(f"--{name}", 1) + 1
                del parsed[current]  # (re-inserted last: the order of the flags as they finally stand)
            parsed[current] = [value] if eq else []
        elif current is None:
            hint = (" (a file holding the command line goes last, after megamath's own flags such as --output "
                    "and --world-size)") if Path(word).is_file() else ""
            raise ValueError(f"{word!r} comes before any --flag{hint}")
        else:
            parsed[current].append(word)
    return parsed, world, repeated


def _launcher_world_size(launcher: list[str]) -> int | None:
    """torchrun's nproc_per_node × nnodes; a size of 0 is an error (the batch arithmetic divides by it)."""
    sizes = {}
    for i, word in enumerate(launcher):
        name, eq, value = word.partition("=")
        if name in LAUNCHER_SIZES:
            value = value if eq else (launcher[i + 1] if i + 1 < len(launcher) else "")
            if not value.isdigit():
                return None  # e.g. an elastic range 1:4: not a fixed size
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            sizes[name.lstrip("-").replace("-", "_")] = int(value)
    if "nproc_per_node" not in sizes:
        return None
    return sizes["nproc_per_node"] * sizes.get("nnodes", 1)


class Flags(Keys):
    """Megatron flags with typed reads; switches are present or not."""

    def on(self, key: str) -> bool:
        value = self.take(key)
        return value is not None and (value == [] or str(value[0]).lower() in ("true", "1"))

    def one(self, key: str, kind, default=None, low=None):
        """The flag's one value as `kind`, or `default` when absent. A given value below `low` is an error:
        a size the conversion divides by must not be 0 (a ZeroDivisionError), nor be replaced by the default."""
        value = self.take(key)
        if value is None:
            return default
        if len(value) != 1:
            raise ValueError(f"--{key.replace('_', '-')} takes one value, got {value}")
        try:
            result = kind(value[0])
        except ValueError:
            raise ValueError(f"--{key.replace('_', '-')} must be {kind.__name__}, got {value[0]!r}") from None
        if low is not None and result < low:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {low}, got {value[0]}")
        return result


def convert_megatron(words: Sequence[str], world_size: int | None = None, vocab_size: int | None = None,
                     source: str = "") -> Conversion:
    parsed, launcher_world, repeated = parse_flags(words)
    flags = Flags(parsed)
    out = Conversion({}, source=source)
    for flag, times in repeated.items():
        value = " ".join(parsed[flag[2:].replace("-", "_")])
        out.notes.append(f"{flag} is given {times} times: Megatron-LM's argparse takes the last"
                         f"{f' ({value})' if value else ''}, and so does this conversion")
    world = world_size or launcher_world
    _refuse(flags)
    tp = flags.one("tensor_model_parallel_size", int, 1, low=1)
    sequence_parallel = flags.on("sequence_parallel")
    if sequence_parallel and tp == 1:  # Megatron turns it off (with a warning) when there is no TP to split over
        out.notes.append("--sequence-parallel with --tensor-model-parallel-size 1: Megatron disables it, and so "
                         "does megamath (parallel.sequence_parallel false)")
    out.config["parallel"] = {"tp_size": tp, "sequence_parallel": sequence_parallel and tp > 1}
    out.config["model"] = _model(flags, vocab_size, tp, out)
    _optimizer(flags, out)
    global_batch = _batch(flags, world, tp, out)
    _schedule(flags, global_batch, out)
    _data_and_checkpoints(flags, out)
    _profiling(flags, out)
    flags.check_spelling(lambda key: "--" + key.replace("_", "-"), known=UNMAPPED.not_a_typo)
    for key in flags.untaken():
        kind, reason = UNMAPPED.reason(key) or (NO_EQUIVALENT, "not a Megatron-LM training flag this converter knows; "
                                                                "ignored")
        out.unmapped.append(Unmapped("--" + key.replace("_", "-"), kind, reason))
    out.validate()
    return out


def _refuse(flags: Flags) -> None:
    """What megamath cannot train is an error naming the flag (or the Megatron default behind it)."""
    for key, what in (("pipeline_model_parallel_size", "pipeline parallelism"),
                      ("context_parallel_size", "context parallelism"),
                      ("expert_model_parallel_size", "expert parallelism")):
        if flags.one(key, int, 1) > 1:
            raise ValueError(f"--{key.replace('_', '-')}: megamath has no {what}; use tensor and data parallelism")
    if flags.one("num_experts", int, 0):
        raise ValueError("--num-experts: megamath trains dense Llama models only (no MoE)")
    checks = (
        ("position_embedding_type", "rope", "learned_absolute", "rotary position embeddings"),
        ("normalization", "RMSNorm", "LayerNorm", "RMSNorm"),
    )
    rope_legacy = flags.on("use_rotary_position_embeddings")
    for key, wanted, default, what in checks:
        value = flags.one(key, str, "rope" if key == "position_embedding_type" and rope_legacy else default)
        if value != wanted:
            given = f"is {value}" if key in flags else f"is not given (Megatron's default: {default})"
            raise ValueError(f"--{key.replace('_', '-')} {given}: megamath trains the Llama architecture "
                             f"only ({what}: --{key.replace('_', '-')} {wanted})")
    for key, why in (("swiglu", "the SwiGLU MLP"), ("disable_bias_linear", "no biases"),
                     ("untie_embeddings_and_output_weights", "untied input and output embeddings")):
        if not flags.on(key):
            raise ValueError(f"--{key.replace('_', '-')} is not given: megamath trains the Llama architecture "
                             f"only ({why})")
    for key in ("hidden_dropout", "attention_dropout"):
        if flags.one(key, float, 0.1) != 0:
            given = "is not given (Megatron's default: 0.1)" if key not in flags else f"is {flags.raw[key][0]}"
            raise ValueError(f"--{key.replace('_', '-')} {given}: megamath trains without dropout; pass "
                             f"--{key.replace('_', '-')} 0")
    if flags.one("rotary_percent", float, 1.0) != 1.0:
        raise ValueError("--rotary-percent: megamath rotates the whole head (1.0)")
    for key in ("rotary_interleaved", "use_rope_scaling"):
        if flags.on(key):
            raise ValueError(f"--{key.replace('_', '-')}: megamath computes Llama's plain RoPE only (rotate-half, "
                             "no frequency scaling)")
    factor = flags.one("rotary_seq_len_interpolation_factor", int, 1)
    if factor != 1:
        raise ValueError(f"--rotary-seq-len-interpolation-factor {factor}: megamath computes Llama's plain RoPE only "
                         "(no position interpolation)")
    for key in ("fp16", "qk_layernorm", "eod_mask_loss", "reset_position_ids",
                "reset_attention_mask", "add_qkv_bias", "add_bias_linear", "apply_residual_connection_post_layernorm"):
        if flags.on(key):
            raise ValueError(f"--{key.replace('_', '-')}: megamath cannot train that (" +
                             ("it trains in bfloat16 without loss scaling; use --bf16" if key == "fp16" else
                              "Llama layers, every token of the blend in the loss") + ")")
    for key in ("rampup_batch_size", "step_batch_size_schedule"):
        if flags.take(key) is not None:
            raise ValueError(f"--{key.replace('_', '-')}: megamath trains with one global batch size")
    style = flags.one("weight_decay_incr_style", str, "constant")
    start, end = flags.take("start_weight_decay"), flags.take("end_weight_decay")
    if style != "constant":  # Megatron then ramps start -> end over training and ignores --weight-decay
        raise ValueError(f"--weight-decay-incr-style {style}: megamath trains with one weight decay (--weight-decay); "
                         "remove it")
    if start is not None or end is not None:
        raise ValueError("--start-weight-decay/--end-weight-decay: megamath trains with one weight decay "
                         "(--weight-decay), and Megatron-LM reads them only with a --weight-decay-incr-style "
                         "other than constant; remove them")
    optimizer = flags.one("optimizer", str, "adam")
    if optimizer != "adam":
        raise ValueError(f"--optimizer {optimizer}: megamath trains with AdamW (ZeRO-1) only")
    for key, (neutral, what) in MODEL_CHANGES.items():
        value = flags.take(key)
        if value is None or (value and value[0] in neutral) or [str(v).lower() for v in value] in (["false"], ["0"]):
            continue
        raise ValueError(f"--{key.replace('_', '-')}{''.join(' ' + str(v) for v in value)}: this trains {what}; "
                         "megamath trains the Llama architecture only")
    for key, instead in LEGACY_FLAGS.items():
        if flags.take(key) is not None:
            raise ValueError(f"--{key.replace('_', '-')}: Megatron-LM refuses it too (no longer valid); use {instead}")
    for key, what in OTHER_TRAINING.items():
        if flags.on(key):
            raise ValueError(f"--{key.replace('_', '-')}: this trains {what}; megamath trains every weight on every "
                             "token of the blend (continued pretraining)")
    phases = flags.one("phase_transition_iterations", str, None)
    if phases:
        raise ValueError(f"--phase-transition-iterations {phases}: Megatron-LM stops at each and builds each phase's "
                         "samples for that phase alone; megamath's sample order spans the whole run: remove it for "
                         "one order over all train_steps (data.sample_order megatron then follows Megatron-LM "
                         "without phases)")
    skipped = flags.take("iterations_to_skip")
    if skipped:
        raise ValueError(f"--iterations-to-skip {' '.join(skipped)}: megamath trains every step's samples (no skip "
                         "list); remove it, or stop before those steps and resume past them with init_step")
    if flags.take("yaml_cfg") is not None:
        raise ValueError("--yaml-cfg: Megatron-LM then reads the settings from that YAML file, which this converter "
                         "does not read; give them as flags")


def _model(flags: Flags, vocab_size: int | None, tp: int, out: Conversion) -> dict:
    shape = {k: flags.one(k, int, low=1) for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length")}
    missing = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not given: Megatron-LM needs them too")
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    gqa = flags.on("group_query_attention")
    groups = flags.one("num_query_groups", int, 1, low=1)  # Megatron's default: one group (multi-query attention)
    ffn = flags.one("ffn_hidden_size", int, None)
    if ffn is None:  # Megatron's default with --swiglu: 2/3 of 4h, rounded down to a multiple of 64
        ffn = int((4 * h * 2 / 3) / 64) * 64
    if flags.one("kv_channels", int, h // heads) != h // heads:
        raise ValueError("--kv-channels: megamath's head size is hidden_size / num_attention_heads")
    if "norm_epsilon" in flags and "layernorm_epsilon" in flags:
        raise ValueError("--layernorm-epsilon and --norm-epsilon are both given: they are one setting (the older "
                         "and the newer name of the norm's epsilon); keep one")
    eps = flags.one("norm_epsilon", float, None)
    if eps is None:
        eps = flags.one("layernorm_epsilon", float, 1e-5)  # the older name, in the versions before the rename
    if flags.on("apply_layernorm_1p"):
        out.notes.append("--apply-layernorm-1p: Megatron-LM stores each norm weight as γ − 1, megamath as γ (a "
                         "Llama's): the same model, and the same Adam updates (the gradient is the same and neither "
                         "decays norms); only bf16 rounds γ and γ − 1 differently. Its checkpoints convert with the "
                         "1 added back (megatron-to-hf, megatron-to-run)")
    return {
        "vocab_size": _vocab_size(flags, vocab_size, tp, out), "hidden_size": h, "num_layers": shape["num_layers"],
        "num_heads": heads, "num_kv_heads": groups if gqa else heads, "ffn_hidden_size": ffn,
        "max_seq_length": flags.one("max_position_embeddings", int, None, low=1) or shape["seq_length"],
        "rope_theta": flags.one("rotary_base", float, 10000.0), "norm_eps": eps,
        "init_std": flags.one("init_method_std", float, 0.02),
        "activation_checkpointing": _recompute(flags, out), "kernels": "auto",
    }


def _recompute(flags: Flags, out: Conversion) -> bool:
    selective = flags.on("recompute_activations")
    granularity = flags.one("recompute_granularity", str, "selective" if selective else None)
    method, layers = flags.take("recompute_method"), flags.take("recompute_num_layers")
    if granularity is None:
        return False
    if granularity == "selective":
        out.notes.append("selective recomputation (--recompute-activations): megamath recomputes whole blocks, "
                         "which saves more memory for about a third more compute")
    if method is not None or layers is not None:
        out.notes.append("--recompute-method/--recompute-num-layers: megamath recomputes every block")
    return True


def _vocab_size(flags: Flags, given: int | None, tp: int, out: Conversion) -> int:
    """Megatron's padded vocabulary: the tokenizer's size rounded up to make_vocab_size_divisible_by × TP."""
    tokenizer = flags.one("tokenizer_type", str, None)
    model = flags.one("tokenizer_model", str, None)
    in_flags = flags.one("vocab_size", int, None)  # read either way: --vocab-size N of `megamath config` wins
    if given is None:
        given = in_flags
    elif in_flags not in (None, given):
        out.notes.append(f"--vocab-size {in_flags} of the command line is replaced by the {given} given to "
                         "`megamath config`")
    if given is None:
        if tokenizer not in SENTENCEPIECE_TYPES or not model:
            raise ValueError(f"--tokenizer-type {tokenizer}: the vocabulary size comes from the tokenizer; pass "
                             "--vocab-size N (the tokenizer's number of tokens)")
        if not Path(model).is_file():
            raise ValueError(f"--tokenizer-model {model} not found: the vocabulary size comes from it; run where "
                             "the path resolves or pass --vocab-size N")
        from megamath.data.tokenizer import load_sentencepiece

        given = load_sentencepiece(model).get_piece_size()
    multiple = flags.one("make_vocab_size_divisible_by", int, 128, low=1) * tp
    padded = multiple * math.ceil(given / multiple)
    sizing = f"{given} tokens, padded to {padded} as Megatron pads (make_vocab_size_divisible_by × TP)"
    fixed, unpadded = flags.one("padded_vocab_size", int, None, low=1), flags.on("no_pad_vocab_size")
    if fixed is not None:  # Megatron-LM takes the model's vocabulary as given, padding nothing
        if fixed < given:
            raise ValueError(f"--padded-vocab-size {fixed} is below the tokenizer's {given} tokens")
        padded, sizing = fixed, f"{given} tokens, {fixed} rows as --padded-vocab-size gives"
    elif unpadded:
        padded, sizing = given, f"{given} tokens, unpadded (--no-pad-vocab-size)"
    if tokenizer is None:
        out.notes.append(f"vocabulary: {sizing}")
    else:
        out.unmapped.append(Unmapped("--tokenizer-type", NOT_NEEDED, f"{tokenizer}: it only sizes the vocabulary "
                                     f"here ({sizing}); megamath reads token ids from the preprocessed datasets"))
    return padded


def _optimizer(flags: Flags, out: Conversion) -> None:
    lr = flags.one("lr", float, None)
    if lr is None:
        raise ValueError("--lr not given: Megatron-LM needs it too")
    if lr <= 0:  # the schedule's floor is min_lr / lr
        raise ValueError(f"--lr must be positive, got {flags.raw['lr'][0]}")
    if flags.on("bf16"):
        out.config["param_dtype"] = "auto"
        out.notes.append("--bf16: param_dtype auto = bfloat16 weights with fp32 master weights and Adam moments "
                         "on GPUs (float32 on a CPU)")
    else:
        out.config["param_dtype"] = "float32"
    grad_dtype = "bf16" if flags.on("grad_reduce_in_bf16") else "fp32"
    flags.take("accumulate_allreduce_grads_in_fp32")
    out.config["optimizer"] = {"lr": lr, "beta1": flags.one("adam_beta1", float, 0.9),
                               "beta2": flags.one("adam_beta2", float, 0.999), "eps": flags.one("adam_eps", float, 1e-8),
                               "weight_decay": flags.one("weight_decay", float, 0.01),
                               "clip_grad": flags.one("clip_grad", float, 1.0), "grad_dtype": grad_dtype,
                               "gradient_accumulation_fusion": not flags.on("no_gradient_accumulation_fusion")}
    decoupled, decoupled_min = flags.one("decoupled_lr", float, None), flags.one("decoupled_min_lr", float, None)
    if decoupled is not None:  # the embedding and output layer's own peak (and floor), on the others' schedule
        out.config["optimizer"].update(decoupled_lr=decoupled, decoupled_min_lr=decoupled_min)
    elif decoupled_min is not None:
        out.unmapped.append(Unmapped("--decoupled-min-lr", NOT_NEEDED, "read only with --decoupled-lr"))


def _batch(flags: Flags, world: int | None, tp: int, out: Conversion) -> int | None:
    """Sets micro_batch_size and grad_accum_steps; returns the global batch, None where the world size is unknown
    and --global-batch-size absent (Megatron-LM's default then: the micro-batch on every data-parallel rank)."""
    micro = flags.one("micro_batch_size", int, None, low=1)
    if micro is None:
        raise ValueError("--micro-batch-size not given: Megatron-LM needs it too")
    out.config["micro_batch_size"] = micro
    global_batch = flags.one("global_batch_size", int, None)
    if global_batch is None:
        out.config["grad_accum_steps"] = 1
        return None if world is None or world % tp else micro * (world // tp)
    if world is None:
        raise ValueError("--global-batch-size: megamath's config counts per data-parallel rank, so the job's size "
                         "is needed; pass --world-size N (GPUs) or include torchrun's --nnodes/--nproc_per_node")
    if world % tp:
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp}")
    dp = world // tp
    if global_batch % (micro * dp):
        raise ValueError(f"--global-batch-size {global_batch} is not divisible by micro-batch {micro} × "
                         f"data-parallel size {dp}")
    out.config["grad_accum_steps"] = global_batch // (micro * dp)
    out.notes.append(f"--global-batch-size {global_batch} on {world} GPUs (data-parallel {dp}): grad_accum_steps "
                     f"{out.config['grad_accum_steps']}; on another GPU count change grad_accum_steps to keep it")
    return global_batch


def _iteration_based(flags: Flags, out: Conversion) -> tuple[int, int, int]:
    """(train_iters, decay, warmup) of an iteration-based run, in iterations."""
    if flags.raw.get("lr_decay_samples") is not None or flags.one("lr_warmup_samples", int, 0):
        raise ValueError("--lr-decay-samples / --lr-warmup-samples beside --train-iters: Megatron-LM asserts "
                         "iteration-based decay and warmup then; give --lr-decay-iters / --lr-warmup-iters")
    train_iters = flags.one("train_iters", int, None, low=1)
    if train_iters is None:
        raise ValueError("--train-iters not given: Megatron-LM needs it (or --train-samples) too")
    decay = flags.one("lr_decay_iters", int, None, low=1) or train_iters  # 0: Megatron-LM asserts
    return train_iters, decay, _warmup(flags, "lr_warmup_iters", decay, 1, out)


def _sample_based(flags: Flags, global_batch: int | None, out: Conversion) -> tuple[int, int, int]:
    """(train_iters, decay, warmup) in iterations of a sample-based run (--train-samples, --lr-decay-samples,
    --lr-warmup-samples): Megatron-LM trains train_samples // global batch iterations, and its scheduler,
    advanced by the global batch each iteration, draws the same curve over decay / G and warmup / G iterations."""
    if flags.raw.get("train_iters") is not None:
        raise ValueError("--train-iters and --train-samples are both set: Megatron-LM asserts one of them; keep one")
    if flags.raw.get("lr_decay_iters") is not None or flags.one("lr_warmup_iters", int, 0):
        raise ValueError("--lr-decay-iters / --lr-warmup-iters beside --train-samples: Megatron-LM asserts "
                         "sample-based decay and warmup then; give --lr-decay-samples / --lr-warmup-samples")
    if global_batch is None:
        raise ValueError("--train-samples: megamath counts steps of one global batch, so the global batch is needed; "
                         "give --global-batch-size, or the world size (--world-size N or torchrun's --nnodes/"
                         "--nproc_per_node)")
    samples = flags.one("train_samples", int, None, low=1)
    if samples < global_batch:
        raise ValueError(f"--train-samples {samples} is less than one global batch ({global_batch}): no iteration "
                         "to train")
    if samples % global_batch:
        out.notes.append(f"--train-samples {samples} is not a multiple of the global batch {global_batch}: "
                         f"{samples // global_batch} steps, as Megatron-LM trains, but its sample order is built for "
                         f"{samples} samples and megamath's for {samples // global_batch * global_batch}, so "
                         f"data.sample_order megatron reads other samples (a multiple of {global_batch} reads the "
                         "same)")
    decay = flags.one("lr_decay_samples", int, None, low=1) or samples
    return (samples // global_batch, _in_steps(decay, global_batch, "--lr-decay-samples", out),
            _warmup(flags, "lr_warmup_samples", decay, global_batch, out))


def _warmup(flags: Flags, key: str, decay: int, per_step: int, out: Conversion) -> int:
    """Warmup steps from `key` (iterations or samples, per_step of them a step) or --lr-warmup-fraction of the
    decay, which Megatron-LM takes when `key` is 0, its default."""
    warmup = flags.one(key, int, 0)
    fraction = flags.one("lr_warmup_fraction", float, None)
    if fraction is None:
        return _in_steps(warmup, per_step, "--" + key.replace("_", "-"), out)
    if warmup:
        raise ValueError(f"--{key.replace('_', '-')} and --lr-warmup-fraction are both set: Megatron-LM refuses "
                         "that too; keep one")
    return _in_steps(fraction * decay, per_step, f"--lr-warmup-fraction {fraction}", out)


def _in_steps(amount: float, per_step: int, what: str, out: Conversion) -> int:
    """`amount` iterations or samples as whole steps of `per_step`, with a note when that rounds."""
    steps = round(amount / per_step)
    if steps != amount / per_step:
        unit = "iterations" if per_step == 1 else f"samples, {amount / per_step:g} steps of {per_step}"
        out.notes.append(f"{what}: {amount:g} {unit} in Megatron-LM, rounded to {steps} steps")
    return steps


def _schedule(flags: Flags, global_batch: int | None, out: Conversion) -> None:
    """Megatron: warmup lr = peak · i / warmup, then min + (peak − min) · ½ · (1 + cos(π · (i − warmup) /
    (decay − warmup))), min after decay; megamath's formula, with r = min_lr / lr. A sample-based run (its
    scheduler counts samples, global_batch per iteration) is the same curve over iterations of global_batch."""
    if flags.raw.get("train_samples") is not None:
        train_iters, decay, warmup = _sample_based(flags, global_batch, out)
    else:
        train_iters, decay, warmup = _iteration_based(flags, out)
    style = flags.one("lr_decay_style", str, "linear")
    peak = out.config["optimizer"]["lr"]
    if style == "constant":
        ratio = 1.0
        flags.take("min_lr")
    elif style == "cosine":
        ratio = flags.one("min_lr", float, 0.0) / peak
    else:
        given = f"is {style}" if "lr_decay_style" in flags else "is not given (Megatron's default: linear)"
        raise ValueError(f"--lr-decay-style {given}: megamath's schedule is warmup then cosine (or constant)")
    if flags.one("lr_warmup_init", float, 0.0):
        out.unmapped.append(Unmapped("--lr-warmup-init", UNSUPPORTED, "megamath's warmup starts from 0"))
    out.config["schedule"] = {"warmup_steps": warmup, "decay_steps": decay, "min_lr_ratio": ratio}
    out.config["train_steps"] = train_iters
    out.notes.append("schedule: Megatron steps its scheduler after each update, so its update k runs at the lr of "
                     "iteration k−1 (the first at lr 0); megamath's update k runs at lr(k): the same curve, one "
                     "update earlier")


def _data_and_checkpoints(flags: Flags, out: Conversion) -> None:
    c = out.config
    data: dict = {"seq_length": int(flags.raw["seq_length"][0]), "sample_order": "megatron"}
    seed = flags.one("seed", int, 1234)
    data["seed"], c["seed"] = seed, seed
    per_split, valid, test = _data_files(flags, out)
    train = per_split or flags.take("data_path")
    # Megatron-LM reads a lone prefix without a blend, and so without the blend's surplus samples, when it has no
    # weight or comes per split; data.sample_order megatron does the same for a lone prefix without a weight
    if train and (len(train) == 1 or (per_split and len(train) == 2 and is_number(train[0]))):
        data["data_path"] = [train[-1]]
    elif train:
        if len(train) % 2 or not all(is_number(w) for w in train[0::2]):
            raise ValueError("--data-path: give weights and prefixes (W1 PREFIX1 W2 PREFIX2 ...) or one prefix")
        data["data_path"] = [float(x) if i % 2 == 0 else x for i, x in enumerate(train)]
    surplus = flags.one("mid_level_dataset_surplus", float, BLEND_SURPLUS)
    if surplus != BLEND_SURPLUS:
        out.unmapped.append(Unmapped("--mid-level-dataset-surplus", UNSUPPORTED,
                                     f"{surplus}: data.sample_order megatron builds Megatron-LM's order at its default "
                                     f"{BLEND_SURPLUS}; with another surplus each blended dataset is built for another "
                                     "count, and its samples come in another order"))
    split = flags.one("split", str, None)
    if train and not per_split and (split is not None or not valid):
        data["split"] = canonical_split(split if split is not None else "969, 30, 1", "--split")  # as Megatron-LM
        if split is None:
            out.notes.append("--split: not given, so Megatron-LM's default 969,30,1 (it warns so too): 3 % of each "
                             "--data-path prefix's documents validate, 0.1 % test")
    elif train and not per_split:
        out.notes.append("--split: not given, and --valid-data-path names the validation data, so every --data-path "
                         "document trains (Megatron-LM either refuses the two together or ignores --valid-data-path "
                         "and cuts 969,30,1); set data.split to hold documents out as well")
    elif split is not None:
        out.unmapped.append(Unmapped("--split", NOT_NEEDED, f"{split}: Megatron-LM ignores it beside per-split data"
                                     if per_split else f"{split}: no --data-path to split"))
    data["valid_data"] = held_out_set_names(list(valid))
    if test:  # Megatron-LM evaluates the test blend once, after the last iteration; megamath each set on its own
        data["test_data"] = held_out_set_names(list(test))
    c["data"] = data
    interval, iters = flags.one("eval_interval", int, 1000), flags.one("eval_iters", int, 100)
    sets = len(data["valid_data"]) + held_out_sets(data)
    c["eval_every"] = interval if sets else 0
    c["eval_batches"] = max(1, math.ceil(iters * c["grad_accum_steps"] / max(sets, 1)))
    if interval and not sets:
        out.notes.append(f"--eval-interval {interval}: no --valid-data-path and no validation share in --split, so "
                         "evaluation is off; set data.valid_data or data.split, and eval_every")
    c["checkpoint"] = {"save_every": flags.one("save_interval", int, 0), "resume": "auto"}
    save, load = flags.one("save", str, None), flags.one("load", str, None)
    if save:
        c["run_dir"] = save
    if load:
        if (Path(load) / "config.json").is_file():
            c["init_from_hf"] = load
        else:
            reason = (f"{load} is not a Hugging Face folder (no config.json): convert the Megatron checkpoint with "
                      f"`megamath convert megatron-to-hf {load} HF_DIR` and set init_from_hf: HF_DIR")
            if flags.raw.get("finetune") is None:  # Megatron-LM goes on from the checkpoint's iteration
                reason += (" (and, to go on from its iteration as Megatron-LM does without --finetune, "
                           f"{_init_step(load)}); or keep its optimizer state too: `megamath convert megatron-to-run "
                           f"{load} RUN_DIR --config` this config")
            out.unmapped.append(Unmapped("--load", UNSUPPORTED, reason))
    c["log_every"] = flags.one("log_interval", int, 100)
    timeout = flags.one("distributed_timeout_minutes", float, None, low=1)
    if timeout is not None:
        c["parallel"]["timeout_minutes"] = timeout
    if flags.on("skip_train"):  # evaluate the starting point on the validation and test data, train nothing
        c["skip_train"] = True
    exit_every, minutes = flags.one("exit_interval", int, 0, low=0), flags.one("exit_duration_in_mins", float, 0, low=0)
    if exit_every:
        c["exit_every"] = exit_every
    if minutes:
        c["exit_after_minutes"] = minutes
    logging: dict = {}
    events = flags.one("tensorboard_dir", str, None)
    if events:
        logging.update(tensorboard=True, tensorboard_dir=events)
    project = flags.one("wandb_project", str, None)
    if project:
        logging["wandb"] = {"project": project, "group": None, "name": flags.one("wandb_exp_name", str, None),
                            "mode": "online", "entity": flags.one("wandb_entity", str, None)}
    if logging:
        c["logging"] = logging


def _profiling(flags: Flags, out: Conversion) -> None:
    """--profile's window of steps, and --record-memory-history, as profile.steps and profile.memory."""
    profile: dict = {}
    if flags.on("profile"):
        start, end = flags.one("profile_step_start", int, 10, low=0), flags.one("profile_step_end", int, 12, low=0)
        torch_profiler = flags.on("use_pytorch_profiler")
        # Megatron-LM's torch.profiler schedule is active over steps start..end-1 (1-based); without it, nsys is
        # started before step start+1 and stopped after step end.
        first, last = (max(start, 1), end - 1) if torch_profiler else (start + 1, end)
        if last < first:
            raise ValueError(f"--profile-step-end {end} leaves no step to profile after --profile-step-start {start}")
        profile["steps"] = [first, last]
        if not torch_profiler:
            out.notes.append(f"--profile without --use-pytorch-profiler: Megatron-LM brackets steps {first}..{last} "
                             "for nsys (cudaProfilerStart/Stop); megamath writes a torch.profiler trace of them per "
                             "rank in RUN_DIR/profile/ (profile.steps), with a summary of their kernels by kind")
    if flags.on("record_memory_history"):
        profile["memory"] = True  # one snapshot at the window's end (Megatron-LM: one every --log-interval)
    if profile:
        out.config["profile"] = profile


def _init_step(load: str) -> str:
    """`init_step: N` with the iteration of the checkpoint at `load`, when this machine can read it."""
    from megamath.compat.megatron_checkpoint import iteration_folder

    try:
        _, iteration = iteration_folder(load)
    except (OSError, ValueError):  # not here (converted on another machine), or not readable: the convert says it
        return "init_step: the iteration the convert command prints"
    return f"init_step: {iteration}" if isinstance(iteration, int) else "init_step: 0 (a release checkpoint)"


def _data_files(flags: Flags, out: Conversion) -> tuple[list[str] | None, list[str], list[str]]:
    """(--train-data-path, --valid-data-path, --test-data-path) words, read from Megatron-LM's files when they are
    given instead: --data-args-path (the words of --data-path) and --per-split-data-args-path (JSON: train, valid,
    test, each a list of words or one string of them). Paths are read from the current folder, as Megatron-LM
    reads them."""
    train, valid, test = (flags.take("train_data_path"), flags.take("valid_data_path") or [],
                          flags.take("test_data_path") or [])
    args_path = flags.one("data_args_path", str, None)
    if args_path is not None:
        if flags.raw.get("data_path") is not None:
            raise ValueError("--data-path and --data-args-path are both given: Megatron-LM takes one of them")
        if flags.raw.get("split") is None:  # its default split is set for --data-path only, and a blend needs one
            raise ValueError("--data-args-path without --split: Megatron-LM stops there too (a blend needs a split); "
                             "give --split, e.g. 969,30,1, its default beside --data-path")
        words = read_text(args_path, "--data-args-path", "a list of weights and prefixes").split()
        if not words:
            raise ValueError(f"--data-args-path {args_path} holds no weights or prefixes")
        flags.raw["data_path"] = words
    per_split_path = flags.one("per_split_data_args_path", str, None)
    if flags.raw.get("data_path") is not None and (train or per_split_path is not None):
        raise ValueError("--data-path beside --train-data-path or --per-split-data-args-path: Megatron-LM takes one "
                         "blend (cut by --split) or per-split blends, not both; give one of them")
    if per_split_path is not None:
        text = read_text(per_split_path, "--per-split-data-args-path", "a JSON file")
        try:
            blends = json.loads(text)
            blends = {part: blends[part].split() if isinstance(blends[part], str) else list(blends[part])
                      for part in ("train", "valid", "test")}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--per-split-data-args-path {per_split_path}: expected JSON with train, valid and test, "
                             f"each a list of weights and prefixes (or one string of them): {err!r}") from None
        train, valid, test = blends["train"], blends["valid"], blends["test"]
    return train, valid, test

