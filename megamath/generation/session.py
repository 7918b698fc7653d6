"""An inference session as the generate, eval and serve commands open one: the model at a path (a run, a
checkpoint step, a megamath or Hugging Face folder), its tokenizer codec, and the process group that
torchrun set up (every process one tensor-parallel rank); and the prompts file those commands read.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from megamath.data.tokenizer import SentencePieceTokenizer
from megamath.generation.batching import PromptCodec
from megamath.generation.loading import load_model
from megamath.jsonl import is_text, read_jsonl_objects
from megamath.parallel.mappings import all_gather_objects
from megamath.parallel.state import ParallelState


def read_prompts(path: Path) -> list[dict]:
    """The records of a prompts jsonl file, each with a string "prompt" (other fields are kept)."""
    records = []
    for n, record in read_jsonl_objects(path, "prompts file"):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected an object with a string "prompt"')
        if not is_text(record["prompt"]):
            raise ValueError(f'{path}:{n}: "prompt" holds a lone surrogate escape (\\ud800-\\udfff), not text')
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def open_model(model_path: str | Path, tokenizer_model: str | Path, max_new_tokens: int, tp_size: int | None = None,
               dtype: str = "auto", flags: dict | None = None):
    """(model, codec, parallel state) for generating up to max_new_tokens per completion; under torchrun
    every process is one tensor-parallel rank, or with `tp_size` the processes form WORLD_SIZE / tp_size
    data-parallel groups of tp_size ranks (each group a whole model). `dtype`: a torch dtype's name, or
    "auto" (loading.default_dtype). `flags`, the command's, are compared across the ranks first (a rank
    launched with another --seed or --model would decode other samples, or hang the job)."""
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    settings = {key: str(value) for key, value in (flags or {}).items() if not callable(value)}
    state = ParallelState.from_env(tp_size=int(os.environ.get("WORLD_SIZE", 1)) if tp_size is None else tp_size,
                                   same_on_every_rank=settings)
    model = load_model(model_path, state, dtype=None if dtype == "auto" else getattr(torch, dtype))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than the model's vocabulary "
                         f"{model.config.vocab_size}")
    room = model.config.max_seq_length - max_new_tokens
    if room < 2:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_length {model.config.max_seq_length}")
    return model, PromptCodec(tokenizer, room), state


def gather_shares(state: ParallelState, keys: list[int], items: list, tokens: int = 0) -> tuple[list, int]:
    """Every data-parallel group's `items` (numbered by `keys`, its ParallelState.dp_share) back in order, and
    the groups' tokens summed."""
    if state.dp_size == 1:
        return items, tokens
    shares = all_gather_objects((keys, items, tokens), state.dp_group)
    ordered = sorted(((k, item) for ks, its, _ in shares for k, item in zip(ks, its)), key=lambda pair: pair[0])
    return [item for _, item in ordered], sum(t for _, _, t in shares)
