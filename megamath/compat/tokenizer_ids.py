"""The special token ids of the tokenizer another trainer's run named, for the Hugging Face folder its
checkpoint converts to.

Megatron-LM's args and GPT-NeoX's config name the tokenizer file, not its ids, and a Hugging Face
config's bos/eos ids are what generation starts and stops with. When the file (a SentencePiece model,
as Llama's) is at hand, its ids are written; otherwise Llama's bos 1 / eos 2, and the output says so.
"""
from __future__ import annotations

from pathlib import Path

from megamath.data.tokenizer import load_sentencepiece

LLAMA_IDS = "Llama's bos 1 / eos 2"


def sentencepiece_token_ids(path: str | None, named_by: str) -> tuple[dict, str]:
    """({bos,eos,pad}_token_id: ...} of the SentencePiece model at `path`, or {} for Llama's), and a line
    saying which were written; `named_by` is the setting that named the file (for that line)."""
    if not path:
        return {}, f"special tokens: {LLAMA_IDS} written ({named_by} names no SentencePiece model); edit " \
                   "config.json if the tokenizer differs"
    if not Path(path).is_file():
        return {}, f"special tokens: {LLAMA_IDS} written ({named_by} {path} is not here); edit config.json if " \
                   "the tokenizer differs"
    sp = load_sentencepiece(path)
    ids = {key: (i if i >= 0 else None)
           for key, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id()))}
    return ids, f"special tokens from {named_by} {path}: bos {ids['bos_token_id']}, eos {ids['eos_token_id']}"
