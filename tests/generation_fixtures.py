"""A tiny SentencePiece tokenizer and a tiny random megamath checkpoint for the generation, eval and serve
tests (built in seconds, no downloads)."""
from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
import torch

from megamath.evaluation import gsm8k, minerva_math
from megamath.model import Llama, ModelConfig
from megamath.model.model_folder import save_model_folder


def _sentences():
    for q, a in gsm8k.EXEMPLARS + minerva_math.EXEMPLARS:
        yield from (q + " " + a).splitlines()
    for i in range(200):
        yield f"[GOAL]x y : ℕ ⊢ x + {i} = {i} + x[PROOFSTEP]rw [Nat.add_comm] -- {i * 7}"


def build_tokenizer(path: Path) -> Path:
    """Llama-like: BPE, byte fallback, unk 0 / bos 1 / eos 2, digits split."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_sentences(), model_writer=model, vocab_size=400,
                                   model_type="bpe", hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  max_seq_length=4096, kernels="reference", init_std=0.3)
    return ModelConfig(**{**fields, **overrides})


def build_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    return save_model_folder(Llama(tiny_config(**overrides)), path)
