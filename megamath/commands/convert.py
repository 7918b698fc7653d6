"""`megamath convert`: Hugging Face Llama checkpoints to megamath's format and back, Megatron-LM and
GPT-NeoX checkpoints to Hugging Face's, and a Megatron-LM or GPT-NeoX checkpoint with its optimizer state to a
megamath run that resumes where it stopped.

Every direction streams tensor by tensor from memory-mapped files into one output shard at a time, so a
34B checkpoint converts in about one shard of memory, without transformers (or the other trainer)
installed.
"""
from __future__ import annotations

import re
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="convert Llama checkpoints between Hugging Face and megamath, or from Megatron-LM and GPT-NeoX",
        description="hf-to-megamath reads a Hugging Face Llama directory (config.json + model.safetensors or "
        "sharded model-*.safetensors with model.safetensors.index.json); megamath-to-hf reads a megamath model "
        "folder or a training checkpoint (a run directory, taking its latest, or a step_XXXXXXX folder, at any "
        "tensor-parallel size) and writes one that LlamaForCausalLM.from_pretrained loads. DST must not exist "
        "or be an empty directory. Special token ids (bos/eos/pad) and generation_config.json travel with the "
        "model both ways. megatron-to-hf reads a Megatron-LM (Megatron Core GPT) checkpoint of either format, "
        "torch or torch_dist, at any tensor- and pipeline-parallel size (the --save folder, taking its latest, or one "
        "iter_NNNNNNN folder); neox-to-hf a GPT-NeoX checkpoint (the llemma branch's or main's; the save folder, "
        "taking its latest, or one global_stepN folder, with the configs/ GPT-NeoX copies into it), sequential or "
        "pipeline files, at any tensor-parallel size. Their pickles are read without importing those trainers. "
        "Only float weights convert (F32, BF16, F16, F64): dequantize a quantized checkpoint first. "
        "megatron-to-run (a Megatron-LM checkpoint of either format saved with its optimizer) and neox-to-run (a "
        "GPT-NeoX checkpoint with its DeepSpeed ZeRO optimizer files) read the optimizer state too and write run directory DST's checkpoint for "
        "--config (fp32 masters, Adam's moments and step, the iteration): `megamath train --config` with run_dir "
        "DST resumes from it at the next iteration.",
    )
    parser.add_argument("direction", choices=("hf-to-megamath", "megamath-to-hf", "megatron-to-hf", "neox-to-hf",
                                              "megatron-to-run", "neox-to-run"))
    parser.add_argument("src", type=Path, metavar="SRC", help="checkpoint directory to read")
    parser.add_argument("dst", type=Path, metavar="DST", help="checkpoint directory to write")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file to write, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast the weights; a cast that turns a finite weight into inf is refused "
                        "(default: keep the stored dtype; weights of mixed dtypes take config.json's dtype, else "
                        "the one most parameters have)")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="N",
                        help="megatron-to-hf and neox-to-hf only: keep the first N rows of the embedding and output "
                        "layer, the tokenizer's size (default: the padded vocabulary, as the checkpoint holds it)")
    parser.add_argument("--config", type=Path, default=None, metavar="CONFIG.yaml",
                        help="megatron-to-run and neox-to-run only (and required there): the megamath training config "
                        "the run goes on with (`megamath config from-megatron` / `from-neox` writes one), which must "
                        "describe the checkpoint's model and global batch")
    parser.set_defaults(run=run)


def run(args) -> int:
    import torch

    from megamath.model.model_folder import convert_hf_to_megamath, convert_megamath_to_hf
    from megamath.training.export import export_training_checkpoint_to_hf, is_training_checkpoint

    training = is_training_checkpoint(args.src)
    check_source(args.src, args.direction, training)
    if (args.config is not None) != (args.direction in TO_RUN):
        raise ValueError("--config is megatron-to-run's and neox-to-run's, and they need one: the training config "
                         "the run goes on with")
    if args.direction in TO_RUN:
        return _to_run(args)
    if args.vocab_size is not None and args.direction not in FROM_TRAINERS:
        raise ValueError("--vocab-size applies to megatron-to-hf and neox-to-hf only (the other directions keep "
                         "the vocabulary)")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.direction in FROM_TRAINERS:
        return FROM_TRAINERS[args.direction](args, dtype)
    convert = convert_hf_to_megamath if args.direction == "hf-to-megamath" else convert_megamath_to_hf
    if args.direction == "megamath-to-hf" and training:
        convert = export_training_checkpoint_to_hf  # a run directory or step folder: TP slices merged
    config = convert(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=dtype)
    print(f"converted {args.src} -> {args.dst} ({args.direction}): {config.num_layers} layers, "
          f"hidden {config.hidden_size}, {config.num_params():,} parameters")
    return 0


def _from_megatron(args, dtype) -> int:
    from megamath.compat.megatron_llama import convert_megatron_to_hf

    config, read, special = convert_megatron_to_hf(args.src, args.dst, vocab_size=args.vocab_size,
                                                   max_shard_size=args.max_shard_size, dtype=dtype)
    a = read.args
    print(f"converted {args.src} -> {args.dst} (megatron-to-hf): iteration {read.iteration}, {read.checkpoint_format} "
          f"format, TP {a.get('tensor_model_parallel_size', 1)} PP {a.get('pipeline_model_parallel_size', 1)}; "
          f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_params():,} parameters")
    padded = a.get("padded_vocab_size")
    if args.vocab_size is None:
        known = f" (the args give the tokenizer's size: {a['vocab_size']})" if a.get("vocab_size") else ""
        print(f"vocabulary: Megatron-LM's padded {padded} rows kept; --vocab-size N keeps the tokenizer's N{known}")
    if not a.get("untie_embeddings_and_output_weights", False):
        print("the checkpoint ties the output layer to the embedding: both are written (megamath trains them untied)")
    print(special)
    if isinstance(read.iteration, int) and read.iteration > 0:
        print(continue_hint(args.dst, read.iteration, "megatron", "--train-iters"))
        if read.optimizer_saved:
            print(f"its optimizer state is saved too: `megamath convert megatron-to-run {args.src} RUN_DIR --config "
                  "CONFIG.yaml` keeps the fp32 masters and Adam's moments, and RUN_DIR resumes at update "
                  f"{read.iteration + 1}")
        consumed, batch = a.get("consumed_train_samples"), a.get("global_batch_size")
        if isinstance(consumed, int) and isinstance(batch, int) and consumed != read.iteration * batch:
            print(f"note: its consumed_train_samples {consumed:,} is not iteration × global batch "
                  f"{read.iteration * batch:,} (a batch-size ramp?): init_step continues at sample "
                  f"{read.iteration * batch:,} of the order")
    return 0


def continue_hint(dst, iteration: int, order: str, train_iters: str) -> str:
    """How to go on with the converted run in megamath at the update after `iteration`."""
    return (f"to continue that run in megamath: init_from_hf: {dst}, init_step: {iteration}, data.sample_order: "
            f"{order}, and its train_steps ({train_iters}) and global batch, as `megamath config from-{order}` "
            "writes them (the optimizer's moments start fresh)")


def _from_neox(args, dtype) -> int:
    from megamath.compat.neox_checkpoint import convert_neox_to_hf

    config, read, notes = convert_neox_to_hf(args.src, args.dst, vocab_size=args.vocab_size,
                                             max_shard_size=args.max_shard_size, dtype=dtype)
    print(f"converted {args.src} -> {args.dst} (neox-to-hf): {read.folder.name}, {read.layout} files, TP "
          f"{read.config.get('model_parallel_size') or 1}; {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_params():,} parameters")
    for note in notes[:-1]:
        print(f"note: {note}")
    if args.vocab_size is None:
        print(f"vocabulary: the padded {config.vocab_size} rows kept; --vocab-size N keeps the tokenizer's N")
    print(notes[-1])  # the special token ids written
    if (step := re.fullmatch(r"global_step(\d+)", read.folder.name)) and int(step.group(1)) > 0:
        print(continue_hint(args.dst, int(step.group(1)), "neox", "train_iters"))
        if any(re.search(r"zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$", p.name) for p in read.folder.iterdir()):
            print(f"its optimizer state is saved too: `megamath convert neox-to-run {args.src} RUN_DIR --config "
                  "CONFIG.yaml` keeps the fp32 masters and Adam's moments, and RUN_DIR resumes at update "
                  f"{int(step.group(1)) + 1}")
    return 0


def _to_run(args) -> int:
    from megamath.training.config import load_config

    given = [flag for flag, value in (("--vocab-size", args.vocab_size), ("--dtype", args.dtype)) if value is not None]
    if given or args.max_shard_size != "5GB":
        raise ValueError(f"{', '.join(given) or '--max-shard-size'}: not {args.direction}'s; the config says the "
                         "vocabulary and dtype, and a training checkpoint has one file per rank")
    config = load_config(args.config)
    if args.direction == "megatron-to-run":
        from megamath.compat.megatron_run import convert_megatron_to_run as convert
    else:
        from megamath.compat.neox_run import convert_neox_to_run as convert
    done = convert(args.src, args.dst, config)
    run = done.source
    print(f"converted {args.src} -> {done.checkpoint} ({args.direction}): iteration {run.iteration}, Adam step "
          f"{run.adam_step} (optimizer state {run.optimizer_state}), {run.layout} -> TP {config.parallel.tp_size} × "
          f"DP {done.dp_size}; {config.model.num_layers} layers, {config.model.num_params():,} parameters")
    for note in done.notes:
        print(f"note: {note}")
    print(f"to continue: megamath train --config {args.config} (run_dir {args.dst}) resumes at update "
          f"{run.iteration + 1}")
    return 0


FROM_TRAINERS = {"megatron-to-hf": _from_megatron, "neox-to-hf": _from_neox}
TO_RUN = ("megatron-to-run", "neox-to-run")


def check_source(src: Path, direction: str, training: bool) -> None:
    """Name the fault with SRC itself; the converters would only report its config.json missing."""
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    if not src.is_dir():
        raise ValueError(f"{src} is a file; SRC is a checkpoint folder")
    if direction == "hf-to-megamath" and training:
        raise ValueError(f"{src} is a megamath training checkpoint, not a Hugging Face folder: "
                         "export it with `megamath convert megamath-to-hf`")
