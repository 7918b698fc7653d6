"""`megamath generate`: complete the prompts of a jsonl file with a megamath or Hugging Face model.

    megamath generate --model RUN_DIR --tokenizer-model tokenizer.model --prompts in.jsonl --output out.jsonl

Input lines `{"prompt": str, ...}`; output lines keep every input field and add `completions`,
`token_ids` and `logprobs` (one entry per sample). Under torchrun every process is one tensor-parallel
rank of the model; rank 0 writes the output.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from megamath.commands import leaves_process_group

_STOP_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
DTYPES = ("float32", "bfloat16", "float16")


def stop_string(text: str) -> str:
    r"""A --stop value with `\n`, `\t` and `\\` read as a newline, a tab and a backslash: a shell passes
    `--stop "\n"` as the two characters, which a completion never contains, so nothing stopped it."""
    return re.sub(r"\\([nt\\])", lambda m: _STOP_ESCAPES[m.group(1)], text)


def add_generation_flags(parser, max_new_tokens: int | None, temperature: float, batch_size: int,
                         top_p: float = 1.0) -> None:
    """The flags generate, eval and serve share (max_new_tokens None: the task's default)."""
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a training run (its latest checkpoint), a checkpoint step folder, a megamath "
                        "checkpoint or a Hugging Face Llama folder")
    parser.add_argument("--tokenizer-model", required=True, metavar="MODEL", help="SentencePiece tokenizer.model")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help="tokens to generate at most per completion (default "
                        f"{max_new_tokens or 'set by the task'})")
    parser.add_argument("--temperature", type=float, default=temperature, metavar="T",
                        help=f"0 decodes greedily (default {temperature})")
    parser.add_argument("--top-p", type=float, default=top_p, metavar="P",
                        help=f"nucleus sampling mass (default {top_p})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the samples (default 0)")
    parser.add_argument("--batch-size", type=int, default=batch_size, metavar="B",
                        help=f"sequences decoded together (default {batch_size})")
    parser.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                        help="the weights' dtype while decoding (default auto: bfloat16 on a GPU, float32 on CPU). "
                        "A seed gives the same samples at any --batch-size, TP or DP size up to the logits' "
                        "rounding: in bfloat16 another batch or layout can flip a near tie, float32 rarely")


def add_tp_size_flag(parser, items: str) -> None:
    """--tp-size for the commands whose items can be split over model copies (generate, eval)."""
    parser.add_argument("--tp-size", type=int, default=None, metavar="N",
                        help="tensor-parallel size under torchrun (default: every process one TP rank); the "
                        f"WORLD_SIZE / N model copies split the {items} (data parallel)")


def check_generation_flags(args) -> None:
    """The shared flags' checks that need no model, run before it loads (minutes for a large one)."""
    if getattr(args, "tp_size", None) is not None and args.tp_size < 1:
        raise ValueError(f"--tp-size must be at least 1, got {args.tp_size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="generate completions of jsonl prompts",
        description="Reads {\"prompt\": str} lines, writes them back with completions, token_ids and logprobs "
        "(summed log-probability of each completion under the model). Launch with torchrun for tensor "
        "parallelism (every process is one TP rank), or with --tp-size for model copies that split the prompts.")
    add_generation_flags(parser, max_new_tokens=256, temperature=0.0, batch_size=16)
    parser.add_argument("--prompts", required=True, type=Path, metavar="FILE.jsonl", help="input prompts")
    parser.add_argument("--output", required=True, type=Path, metavar="OUT.jsonl",
                        help="output file (replaced when it exists; checked before the model loads)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="K", help="completions per prompt (default 1)")
    parser.add_argument("--stop", nargs="+", type=stop_string, default=[], metavar="STR",
                        help="strings that end a completion (\\n, \\t and \\\\ are a newline, a tab and a backslash)")
    add_tp_size_flag(parser, "prompts")
    parser.set_defaults(run=run)


@leaves_process_group
def run(args) -> int:
    from tqdm import tqdm

    from megamath.atomic_io import write_text_atomically
    from megamath.generation.batching import check_completion_count, complete
    from megamath.generation.generate import SamplingParams
    from megamath.generation.session import gather_shares, open_model, read_prompts
    from megamath.output_path import prepare_output_file

    check_generation_flags(args)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    # written at the end: fail now, not after the run; and never over the prompts, tokenizer or model
    prepare_output_file(args.output, inputs=[args.prompts, args.tokenizer_model, args.model])
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, tuple(args.stop))
    records = read_prompts(args.prompts)
    check_completion_count(len(records), args.num_samples)  # before the model loads
    model, codec, state = open_model(args.model, args.tokenizer_model, args.max_new_tokens, tp_size=args.tp_size,
                                     dtype=args.dtype, flags=vars(args))
    keys = state.dp_share(len(records))
    bar = tqdm(total=len(keys), unit="prompt", disable=state.rank != 0, file=sys.stderr)
    results = complete(model, codec, [records[k]["prompt"] for k in keys], params, args.num_samples, args.seed,
                       args.batch_size, keys, progress=lambda n, _: bar.update(n))
    bar.close()
    results, _ = gather_shares(state, keys, results)  # every model copy's, in prompt order
    if state.rank == 0:
        lines = [json.dumps({**r, "completions": [c.text for c in cs], "token_ids": [c.token_ids for c in cs],
                             "logprobs": [c.logprob for c in cs]}, ensure_ascii=False)
                 for r, cs in zip(records, results)]
        write_text_atomically(args.output, "\n".join(lines) + "\n")
        print(f"wrote {len(records)} prompts x {args.num_samples} completions to {args.output}")
    return 0
