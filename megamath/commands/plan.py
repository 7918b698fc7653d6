"""`megamath plan`: memory per GPU, step time, tokens/s, MFU and GPU-hours of a run, before launching it.

    megamath plan --model llemma-7b --gpu a100-40gb --gpus 256 --tp 2 --micro-batch 4 --grad-accum 2 \\
        --activation-checkpointing --tokens 200e9
    megamath plan --model examples/llemma_34b.yaml --gpu h100-80gb --gpus 64       # search and rank

The arithmetic lives in megamath.planning; this parses and prints.
"""
from __future__ import annotations

import json
import sys


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="size a training run: memory per GPU, step time, tokens/s, MFU, GPU-hours",
        description="Predicts one GPU's memory item by item (ZeRO-1's real buffer sizes, activations, logits, "
        "headroom) and the step time (FLOPs at a stated efficiency plus exposed TP and DP communication), for "
        "one configuration when --tp and --micro-batch are given, else for every TP size, micro-batch, "
        "activation checkpointing and sequence parallelism choice, ranked by throughput among those that fit.")
    parser.add_argument("--model", required=True, metavar="PRESET|CONFIG.yaml",
                        help="a model preset (llemma-7b, llemma-34b, ...) or a training config whose model, parallel, "
                        "optimizer, batch and sequence settings are the defaults of the flags below")
    parser.add_argument("--gpu", required=True, metavar="GPU", help="a100-40gb, a100-80gb, h100-80gb or h200")
    parser.add_argument("--gpus", required=True, type=int, metavar="N", help="GPUs of the whole job")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="K", help="GPUs per node (default 8)")
    parser.add_argument("--tp", type=int, default=None, metavar="T", help="tensor-parallel size (searched if absent)")
    parser.add_argument("--micro-batch", type=int, default=None, metavar="M",
                        help="sequences per micro-batch (searched if absent)")
    parser.add_argument("--grad-accum", type=int, default=None, metavar="G",
                        help="micro-batches per step (default: the config's, else a global batch near 4M tokens)")
    parser.add_argument("--seq-length", type=int, default=None, metavar="S",
                        help="tokens per sequence (default: the config's, else 4096 or the model's max_seq_length "
                        "when shorter)")
    parser.add_argument("--activation-checkpointing", action="store_true", default=None,
                        help="recompute activations (absent: off for one plan, both ways in a search)")
    parser.add_argument("--sequence-parallel", action="store_true", default=None,
                        help="sequence parallelism (absent: off for one plan, both ways in a search)")
    parser.add_argument("--overlap-optimizer-step", action="store_true", default=None,
                        help="AdamW's buckets under the next forward, as parallel.overlap_optimizer_step (default: "
                        "the config's, else off)")
    parser.add_argument("--tokens", type=float, default=None, metavar="N", help="tokens of the run, e.g. 200e9")
    parser.add_argument("--grad-dtype", choices=("auto", "fp32", "bf16"), default=None,
                        help="ZeRO-1 gradient buffer dtype (default: the config's, else auto: bf16 on one GPU with "
                        "one micro-batch, else fp32)")
    parser.add_argument("--efficiency", type=float, default=None, metavar="F",
                        help="fraction of the bf16 peak the compute reaches (default: megamath's MFU measured "
                        "on this GPU by perf/bench_train.py in perf/results/, else the GPU's stated value)")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="folder of perf/bench_train.py's train-*.md results, for an installed package or results "
                        "kept elsewhere (default: perf/results/ of the checkout this package runs from)")
    parser.add_argument("--internode-gbs", type=float, default=None, metavar="GB/s",
                        help="inter-node bandwidth per GPU (default: the GPU's stated value)")
    parser.add_argument("--top", type=int, default=10, metavar="K", help="configurations listed by a search")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    parser.set_defaults(run=run)


def request_from_args(args):
    """A PlanRequest from the flags, with a config file's settings as defaults."""
    from pathlib import Path

    from megamath.model.config import ModelConfig
    from megamath.planning.hardware import get_gpu
    from megamath.planning.plan import PlanRequest

    gpu = get_gpu(args.gpu)
    fields: dict = {}
    if args.model.endswith((".yaml", ".yml")) or Path(args.model).is_file():
        from megamath.training.config import load_config

        config = load_config(args.model)
        model, name = config.model, Path(args.model).stem
        fields = dict(tp=config.parallel.tp_size, micro_batch=config.micro_batch_size,
                      grad_accum=config.grad_accum_steps, seq_length=config.data.seq_length,
                      activation_checkpointing=config.model.activation_checkpointing,
                      sequence_parallel=config.parallel.sequence_parallel, grad_dtype=config.optimizer.grad_dtype,
                      bucket_mb=config.parallel.bucket_mb, overlap_grad_reduce=config.parallel.overlap_grad_reduce,
                      overlap_param_gather=config.parallel.overlap_param_gather,
                      overlap_optimizer_step=config.parallel.overlap_optimizer_step)
    else:
        model, name = ModelConfig.from_preset(args.model), args.model
    flags = dict(tp=args.tp, micro_batch=args.micro_batch, grad_accum=args.grad_accum, seq_length=args.seq_length,
                 activation_checkpointing=args.activation_checkpointing, sequence_parallel=args.sequence_parallel,
                 grad_dtype=args.grad_dtype, overlap_optimizer_step=args.overlap_optimizer_step)
    fields.update({k: v for k, v in flags.items() if v is not None})
    fields.setdefault("seq_length", min(4096, model.max_seq_length))
    if args.results is not None:
        if not Path(args.results).is_dir():
            raise ValueError(f"--results {args.results}: no such folder")
        fields["results_dir"] = Path(args.results)
    return PlanRequest(model=model, model_name=name, gpu=gpu, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                       tokens=args.tokens, efficiency=args.efficiency, internode_gbs=args.internode_gbs, **fields)


def run(args) -> int:
    from megamath.planning.plan import plan
    from megamath.planning.report import assumptions, format_plan, format_ranking

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    req = request_from_args(args)
    plans = plan(req)
    if args.json:
        json.dump({"model": req.model_name, "gpu": req.gpu.name, "gpus": req.gpus, "gpus_per_node": req.gpus_per_node,
                   "plans": [p.to_dict() for p in plans[:max(1, args.top)]]}, sys.stdout, indent=2)
        print()
        return 0
    print(format_plan(req, plans[0]) if len(plans) == 1 and req.tp is not None and req.micro_batch is not None
          else format_ranking(req, plans, args.top))
    print(assumptions(req))
    return 0
