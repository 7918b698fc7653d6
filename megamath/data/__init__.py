"""Data path: ProofPile II jsonl -> Megatron-compatible .bin/.idx -> GPT samples -> blended mixtures."""
