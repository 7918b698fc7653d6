#!/usr/bin/env bash
# The main job, end to end on data the project generates itself (CPU is enough):
# demo corpus -> tokenizer -> preprocess to .bin/.idx -> inspect -> Llemma's 2:4:1 mixture of samples.
set -euo pipefail
OUT=${1:-runs/demo}
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
