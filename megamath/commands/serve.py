"""`megamath serve`: a Lean copilot endpoint (LLMSTEP's HTTP protocol) backed by a megamath model.

    megamath serve --model RUN_DIR --tokenizer-model tokenizer.model --port 6000

Then point Lean's llmstep at it (LLMSTEP_HOST=localhost, LLMSTEP_PORT=6000). One process, one model;
megamath.generation.server describes the protocol and its limits.
"""
from __future__ import annotations

import os

from megamath.commands.generate import add_generation_flags, check_generation_flags


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="serve tactic suggestions over HTTP (LLMSTEP's protocol) for Lean's llmstep",
        description="POST / {\"tactic_state\", \"prefix\", \"context\"} -> {\"suggestions\": [...]}: N samples "
        "of [GOAL]state[PROOFSTEP]prefix (or of the request's context then the prefix: --prompts) per "
        "temperature, cut at a newline, deduplicated, without sorry and admit, ranked by mean log-probability. "
        "Binds to 127.0.0.1 unless --host says otherwise; SIGTERM stops it cleanly.")
    add_generation_flags(parser, max_new_tokens=64, temperature=0.5, batch_size=16)
    parser.set_defaults(temperature=None)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address or name to bind (default 127.0.0.1: this machine only; :: every IPv6 "
                        "interface, and IPv4 too where the OS allows; ::1 IPv6 loopback)")
    parser.add_argument("--port", type=int, default=6000, help="TCP port (default 6000; 0 picks a free one)")
    parser.add_argument("--num-samples", type=int, default=10, metavar="N",
                        help="samples per temperature of each request, as LLMSTEP's (default 10; one at "
                        "temperature 0)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=None, metavar="T",
                        help="several temperatures, --num-samples at each (instead of --temperature)")
    parser.add_argument("--prompts", nargs="+", default=["proofstep"], metavar="NAME",
                        help="prompts whose suggestions are merged: proofstep ([GOAL]state[PROOFSTEP]prefix, for "
                        "a model tuned on proof steps; the default), context (the Lean file text the request sends as "
                        "context, then the prefix: for a model pretrained on Lean such as LLEMMA)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="largest request body accepted (default 1 MiB)")
    parser.add_argument("--request-timeout", type=float, default=60.0, metavar="S",
                        help="seconds a request may take, reading and generating (default 60)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from megamath.generation.generate import SamplingParams
    from megamath.generation.session import open_model
    from megamath.generation.batching import check_completion_count
    from megamath.generation.server import MAX_REQUEST_TIMEOUT_S, PROMPTS, ServeConfig, format_address, listen, serve

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("megamath serve runs as one process (no torchrun)")
    if args.temperatures is not None and args.temperature is not None:  # one would be dropped without a word
        raise ValueError("give --temperature or --temperatures, not both")
    temperatures = tuple(args.temperatures or [0.5 if args.temperature is None else args.temperature])
    unknown = [name for name in args.prompts if name not in PROMPTS]
    if unknown or len(set(args.prompts)) < len(args.prompts):
        raise ValueError(f"--prompts takes each of {', '.join(PROMPTS)} at most once, got {' '.join(args.prompts)}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")
    check_completion_count(1, args.num_samples)  # as generate's: past it, every request failed with a 500
    for temperature in temperatures:  # each request's settings, checked now: a bad one failed every request
        SamplingParams(args.max_new_tokens, temperature, args.top_p)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    check_generation_flags(args)
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    if not 0 < args.request_timeout <= MAX_REQUEST_TIMEOUT_S:  # inf: the server dropped every request
        raise ValueError(f"--request-timeout must be > 0 and at most {MAX_REQUEST_TIMEOUT_S:g} seconds, "
                         f"got {args.request_timeout}")
    config = ServeConfig(args.host, args.port, args.num_samples, temperatures, args.max_new_tokens, args.top_p,
                         args.max_body_bytes, args.request_timeout, args.seed, args.batch_size, tuple(args.prompts))
    server = listen(config)  # before the model loads: a port in use fails now, not after minutes
    try:
        model, codec, _ = open_model(args.model, args.tokenizer_model, args.max_new_tokens, dtype=args.dtype)
    except BaseException:
        server.server_close()
        raise

    def ready(host, port):
        print(f"megamath serve: listening on http://{format_address(host, port)}/ (LLMSTEP protocol; SIGTERM stops)",
              flush=True)

    serve(model, codec, config, ready, server)
    print("megamath serve: stopped", flush=True)
    return 0
