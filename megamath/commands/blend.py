"""`megamath blend`: build (or load from cache) the blended sample index and show weights vs realized shares.

Useful before a long run: it checks every `--data-path` dataset opens and is large enough, warms the
index cache that training will read, and shows how close the mixture comes to the requested weights.
"""
from __future__ import annotations

import time

from megamath.data.blended_dataset import BlendedDataset
from megamath.data.blending import parse_data_path
from megamath.data.indexed_dataset import IndexedDataset
from megamath.data.megatron_order import SAMPLE_ORDERS, blend_surplus, split_rule
from megamath.data.splits import canonical_split, cut_splits


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="build a blended sample index and print its realized mixture",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", nargs="+", required=True, metavar="W P",
                        help="Megatron-style WEIGHT PREFIX pairs (or one PREFIX alone)")
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per sample, excluding the shared one")
    parser.add_argument("--num-samples", type=int, required=True, help="samples in the blend")
    parser.add_argument("--seed", type=int, default=1234, help="shuffling seed (default 1234)")
    parser.add_argument("--split", default=None, metavar="TRAIN,VALID,TEST",
                        help="blend only each dataset's train part of this cut, as data.split does (e.g. 969,30,1)")
    parser.add_argument("--sample-order", choices=SAMPLE_ORDERS, default="megamath",
                        help="megamath's order, or Megatron-LM's or GPT-NeoX's (data.sample_order; default megamath)")
    parser.add_argument("--cache-dir", default=None, help="where to cache the indices (default: none)")
    parser.set_defaults(run=run)


def format_table(blend: BlendedDataset) -> str:
    rows = blend.summary_rows()
    width = max([len("dataset")] + [len(r.name) for r in rows])
    lines = [f"{'dataset':<{width}}  {'weight':>8}  {'realized':>8}  {'samples':>12}  {'epochs':>6}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.weight:>8.4%}  {r.share:>8.4%}  {r.samples:>12,}  {r.epochs:>6}")
    return "\n".join(lines)


def run(args) -> int:
    weights, prefixes = parse_data_path(args.data_path)
    datasets = [_open(prefix) for prefix in prefixes]
    split = None if args.split is None else canonical_split(args.split, "--split")
    cut = cut_splits(datasets, prefixes, split, args.seq_length, key="--split",
                     rule=split_rule(args.sample_order))
    start = time.perf_counter()
    blend = BlendedDataset(datasets, weights, args.num_samples, args.seq_length, seed=args.seed,
                           cache_dir=args.cache_dir, documents=cut.train, sample_order=args.sample_order,
                           surplus=blend_surplus(args.data_path))
    elapsed = time.perf_counter() - start
    for line in cut.lines:
        print(line)
    print(format_table(blend))
    print(f"{len(blend):,} samples of {args.seq_length + 1} tokens from {len(datasets)} dataset(s), "
          f"indices built in {elapsed:.2f} s" + (f" (cache: {args.cache_dir})" if args.cache_dir else ""))
    return 0


def _open(prefix: str) -> IndexedDataset:
    """The dataset; a prefix given with its extension is named as the slip it is (training refuses it too)."""
    try:
        return IndexedDataset(prefix)
    except FileNotFoundError as err:
        if prefix.endswith((".bin", ".idx")):  # the error said "x.bin.idx not found", true but puzzling
            raise FileNotFoundError(f"{err} (--data-path takes prefixes, without .bin/.idx, as training does)") from None
        raise
