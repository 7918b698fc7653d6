#!/usr/bin/env bash
# The main job, end to end on data the project generates itself (CPU is enough):
# demo corpus -> tokenizer -> preprocess to .bin/.idx -> inspect -> Llemma's 2:4:1 mixture of samples
# -> the untrained model's held-out losses -> training with demo-arith accuracy every eval_every steps
# -> megamath eval on the final model -> the report.
set -euo pipefail
OUT=${1:-runs/demo}
EXAMPLES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # tiny.yaml beside this script, from any folder
SEQ_LENGTH=${SEQ_LENGTH:-256}

megamath demo-corpus --output "$OUT"
megamath preprocess --input "$OUT/corpus" --tokenizer-model "$OUT/tokenizer.model" \
    --output-dir "$OUT/data" --workers 2
megamath inspect "$OUT/data/arxiv_train_text_document" --tokenizer-model "$OUT/tokenizer.model" --show 1
# Llemma's ProofPile II weights: arxiv 2, open-web-math 4, algebraic-stack 1.
megamath blend --seq-length "$SEQ_LENGTH" --num-samples 2000 --cache-dir "$OUT/index-cache" --data-path \
    2 "$OUT/data/arxiv_train_text_document" \
    4 "$OUT/data/open-web-math_train_text_document" \
    1 "$OUT/data/algebraic-stack_train_text_document"
# Where training starts: the model's loss on each subset's validation and test split before any step
# (skip_train trains and saves nothing; $OUT/train/held_out_step0000000.json keeps the numbers).
torchrun --standalone --nproc_per_node 2 -m megamath.cli train --config "$EXAMPLES/tiny.yaml" \
    data.data_dir="$OUT/data" data.cache_dir="$OUT/index-cache" run_dir="$OUT/train" \
    evaluation.tokenizer_model="$OUT/tokenizer.model" evaluation.data_dir="$OUT/eval" "evaluation.tasks=[]" \
    skip_train=true
# Train the tiny model on that mixture: 2 CPU processes, ZeRO-1 data parallel, a few minutes; the loss
# falls from ~7.6 and a validation loss per subset is printed every 100 steps. Rerunning resumes from
# $OUT/train/checkpoints/latest (and stops at once when the run is complete).
torchrun --standalone --nproc_per_node 2 -m megamath.cli train --config "$EXAMPLES/tiny.yaml" \
    data.data_dir="$OUT/data" data.cache_dir="$OUT/index-cache" run_dir="$OUT/train" \
    evaluation.tokenizer_model="$OUT/tokenizer.model" evaluation.data_dir="$OUT/eval"
# The trained model on held-out arithmetic from the corpus templates (greedy, then a vote of 4 samples);
# per-problem results in $OUT/demo-arith-results.jsonl.
megamath eval --model "$OUT/train" --tokenizer-model "$OUT/tokenizer.model" --task demo-arith \
    --data "$OUT/eval/demo-arith.jsonl" --maj 4 --output "$OUT/demo-arith-results.jsonl"
# The run's report: summary table, notes, plots of loss, throughput and where each step's time goes.
REPORT=$(megamath report "$OUT/train" --output "$OUT/train/report.html")
echo "report: $REPORT"
