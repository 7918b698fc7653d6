"""`megamath eval`: few-shot problem solving on a task, greedy (maj@1) and majority vote (maj@k).

    megamath eval --model RUN_DIR --tokenizer-model tokenizer.model --task gsm8k --data gsm8k_test.jsonl \\
        --maj 16 --temperature 0.6 --top-p 0.95 --output results.jsonl

Writes one line per problem (megamath.evaluation.runner says which fields) and prints the accuracies.
Under torchrun every process is one tensor-parallel rank, or with --tp-size N the WORLD_SIZE / N
data-parallel groups each decode every (WORLD_SIZE / N)-th problem (LLEMMA's maj@256 on MATH is hours of
decoding: spread it over the node's GPUs). Each problem's samples are seeded by its number, so the results
are those of one process; rank 0 gathers them, writes and prints.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megamath.commands import leaves_process_group
from megamath.commands.generate import add_generation_flags, add_tp_size_flag, check_generation_flags


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="evaluate a model on gsm8k, math or demo-arith (maj@1 and maj@k)",
        description="Greedy decoding gives maj@1; with --maj K > 1, K samples at --temperature / --top-p vote "
        "(ties go to the answer whose samples have the higher summed log-probability) for maj@K.")
    add_generation_flags(parser, max_new_tokens=None, temperature=0.6, batch_size=16, top_p=0.95)
    parser.add_argument("--task", required=True, metavar="NAME", help="gsm8k, math or demo-arith")
    parser.add_argument("--data", required=True, type=Path, metavar="FILE|DIR",
                        help="the task's data: a jsonl file, or for math also the MATH release folder")
    parser.add_argument("--shots", type=int, default=None, metavar="N", help="exemplars (default: the task's)")
    parser.add_argument("--maj", type=int, default=1, metavar="K", help="samples per problem for maj@K (default 1)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N problems")
    add_tp_size_flag(parser, "problems")
    parser.add_argument("--output", required=True, type=Path, metavar="RESULTS.jsonl",
                        help="per-problem results (replaced when it exists; checked before the model loads)")
    parser.set_defaults(run=run)


@leaves_process_group
def run(args) -> int:
    from tqdm import tqdm

    from megamath.atomic_io import write_text_atomically
    from megamath.generation.batching import check_completion_count
    from megamath.generation.session import gather_shares, open_model
    from megamath.evaluation.runner import EvalSettings, Stopwatch, breakdown, evaluate, summarize
    from megamath.evaluation.tasks import get_task
    from megamath.output_path import prepare_output_file

    check_generation_flags(args)
    # written at the end: fail now, not after the run; and never over the data, tokenizer or model
    prepare_output_file(args.output, inputs=[p for p in (args.data, args.tokenizer_model, args.model) if p])
    task = get_task(args.task)
    problems = task.read(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be positive, got {args.limit}")
        problems = problems[:args.limit]
    if not problems:
        raise ValueError(f"{args.data}: no problems")
    settings = EvalSettings(args.shots, args.maj, args.temperature, args.top_p, args.max_new_tokens, args.seed,
                            args.batch_size)
    task.prompt(problems[0].question, task.shots if args.shots is None else args.shots)  # bad --shots: fail now
    check_completion_count(len(problems), args.maj)  # before the model loads
    model, codec, state = open_model(args.model, args.tokenizer_model,
                                     args.max_new_tokens or task.max_new_tokens, tp_size=args.tp_size, dtype=args.dtype,
                                     flags=vars(args))
    keys = state.dp_share(len(problems))
    passes = 2 if args.maj > 1 else 1  # greedy, then the maj@k samples: the bar counts each problem twice
    share = f" (1/{state.dp_size} of the problems per group)" if state.dp_size > 1 else ""
    bar = tqdm(total=len(keys) * passes, unit="problem", disable=state.rank != 0, file=sys.stderr,
               desc=(f"greedy + maj@{args.maj} passes" if passes == 2 else "greedy") + share)
    watch = Stopwatch()

    def progress(done: int, tokens: int) -> None:
        bar.set_postfix(watch.rates(done, tokens), refresh=False)
        bar.update(done)

    results = evaluate(model, codec, task, [problems[k] for k in keys], settings, progress, keys=keys)
    bar.close()
    results, watch.tokens = gather_shares(state, keys, results, watch.tokens)  # every group's, in order
    if state.rank != 0:
        return 0
    write_text_atomically(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    summary = summarize(results, args.maj)
    truncated = sum(r["prompt_truncated"] > 0 for r in results)
    seconds = time.perf_counter() - watch.start
    print(f"{args.task}: {summary['problems']} problems in {seconds:.1f} s, {watch.tokens} tokens generated "
          f"({watch.tokens / max(seconds, 1e-9):.1f} tokens/s)")
    print(f"  maj@1  {summary['maj1']:7.2%}  greedy")
    if args.maj > 1:
        print(f"  maj@{args.maj}  {summary[f'maj{args.maj}']:7.2%}  vote of {args.maj} samples at T={args.temperature}, "
              f"top-p={args.top_p}; ties: higher summed log-prob")
    for group, part in breakdown(results, args.maj).items():
        line = f"    {group:<24} {part['problems']:>5} problems  maj@1 {part['maj1']:7.2%}"
        print(line + (f"  maj@{args.maj} {part[f'maj{args.maj}']:7.2%}" if args.maj > 1 else ""))
    if truncated:
        print(f"  {truncated} prompts were cut from the left to fit the model's max_seq_length")
    print(f"results: {args.output}")
    return 0
