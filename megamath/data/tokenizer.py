"""SentencePiece tokenization for preprocessing: Llama-family `tokenizer.model`s, batch in, flat ids out.

Ids are exactly `sp.encode(text)` (no BOS), plus EOS when asked, the way Megatron-LM's SentencePiece
tokenizers store documents. Two things make it faster than encoding one document at a time:

* One `sp.encode(list)` call per batch, and one flat numpy array out (`encode_flat`), so the per-token
  work stays in C and the result pickles as a single buffer.
* Long documents are cut at newlines and the pieces encoded separately. SentencePiece's BPE merge
  queue makes encoding superlinear in the text length (a 200 KB LaTeX paper encodes about 2x slower
  per byte than its 2 KB pieces). The cut is exact when no vocabulary piece can contain a newline:
  BPE merges never cross the cut, so the ids of the whole text are the concatenation of the pieces'.
  A piece after a cut is encoded as `"\\n" + piece` so that it sees the same left context (no dummy
  prefix of its own), and the ids of that leading `"\\n"` are dropped. `newline_cuts_are_exact`
  decides from the model (BPE, no normalization map, byte fallback, no piece holding `\\n`) and
  checks probe strings; other models (unigram, NFKC) encode whole documents. Every cut is also checked
  as it is used: if the dropped ids are not those of `"\\n"`, the document is re-encoded whole.

`encode_flat_ref` is the plain per-document reference that tests compare against.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from megamath.input_path import require_file

SEGMENT_CHARS = 2048  # per-byte speed is flat for pieces of 0.25-4 K characters, and drops beyond
_PROBES = ("a\nb", "x  \n  y\n\n z \n", "\n\nfoo\n", "caf\u00e9\n\u0301x\n\u00e9", "1 2\n 3\t\n4\r\n5",
           "  lead\n\ntrail  ", "\u4e2d\u6587\n\U0001d400\n\u2028 z")


def load_sentencepiece(path: str | Path) -> sentencepiece.SentencePieceProcessor:
    """A loaded `tokenizer.model`; a missing file, or one SentencePiece cannot parse, is one error naming it."""
    path = require_file(path, "tokenizer model")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{path}: not a SentencePiece model ({err})") from err
    return processor


class SentencePieceTokenizer:
    """A loaded `tokenizer.model` with the ids preprocessing needs and a fast batch encoder."""

    def __init__(self, model_path: str | Path, newline_cuts: bool | None = None,
                 segment_chars: int = SEGMENT_CHARS) -> None:
        """`newline_cuts`: None decides from the model; workers get the main process's decision."""
        self.model_path = Path(model_path)
        self.sp = load_sentencepiece(self.model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.segment_chars = segment_chars
        self._newline_ids = self.sp.encode("\n")
        self.newline_cuts = newline_cuts_are_exact(self.sp) if newline_cuts is None else newline_cuts

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_flat(self, texts: Sequence[str], append_id: int | None = None,
                    dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents into `(tokens (sum(lengths),), lengths (len(texts),) int64)`, each document
        followed by `append_id` when given. Equal to `encode_flat_ref`, faster."""
        pieces: list[str] = []
        counts: list[int] = []  # pieces per text
        for text in texts:
            if self.newline_cuts and len(text) > self.segment_chars:
                parts = split_at_newlines(text, self.segment_chars)
                pieces.append(parts[0])
                pieces.extend("\n" + part for part in parts[1:])
                counts.append(len(parts))
            else:
                pieces.append(text)
                counts.append(1)
        # num_threads=1: parallelism comes from worker processes; SentencePiece would otherwise start
        # one thread per core in every worker.
        encoded = self.sp.encode(pieces, num_threads=1)
        if len(pieces) != len(texts):
            encoded = self._join_pieces(texts, encoded, counts)
        return _flatten(encoded, append_id, dtype)

    def _join_pieces(self, texts: Sequence[str], encoded: list[list[int]], counts: list[int]) -> list[list[int]]:
        docs, k, newline = [], len(self._newline_ids), self._newline_ids
        start = 0
        for text, count in zip(texts, counts):
            ids = encoded[start]
            for part in encoded[start + 1:start + count]:
                if part[:k] != newline:  # the cut did not behave as proven: be exact, not fast
                    ids = self.sp.encode(text)
                    break
                ids.extend(part[k:])
            docs.append(ids)
            start += count
        return docs


def split_at_newlines(text: str, size: int) -> list[str]:
    """Cut `text` right after the first newline at or beyond every `size` characters.

    Every part but the last ends with `\\n`; `"".join(parts) == text`. No cut leaves an empty part.
    """
    parts, start, n = [], 0, len(text)
    while n - start > size:
        cut = text.find("\n", start + size, n - 1)
        if cut < 0:
            break
        parts.append(text[start:cut + 1])
        start = cut + 1
    parts.append(text[start:])
    return parts


def _flatten(docs: list[list[int]], append_id: int | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    if append_id is not None:
        for ids in docs:
            ids.append(append_id)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))  # (n_docs,)
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def encode_flat_ref(sp: sentencepiece.SentencePieceProcessor, texts: Sequence[str],
                    append_id: int | None = None, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Reference: `sp.encode(text)` one document at a time, `append_id` after each."""
    return _flatten([sp.encode(text) for text in texts], append_id, dtype)


def newline_cuts_are_exact(sp: sentencepiece.SentencePieceProcessor) -> bool:
    """Whether cutting texts after newlines leaves the ids unchanged (see the module docstring)."""
    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(sp.serialized_model_proto())
    except DecodeError:
        return False
    if model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        return False  # unigram's Viterbi sums float scores: keep whole documents
    if model.trainer_spec.treat_whitespace_as_suffix:  # moves the dummy "▁" to the end
        return False
    if model.normalizer_spec.precompiled_charsmap:  # a precompiled map (NFKC, nmt) may rewrite or join "\n"
        return False
    newline = sp.piece_to_id("<0x0A>")
    if not sp.is_byte(newline):  # without byte fallback "\n" is <unk>, and runs of <unk> are joined
        return False
    if any("\n" in piece for piece in sp.id_to_piece(list(range(sp.get_piece_size())))):
        return False
    k, newline_ids = len(sp.encode("\n")), sp.encode("\n")
    for probe in _PROBES:
        parts = split_at_newlines(probe, 0)
        ids = list(sp.encode(parts[0]))
        for part in parts[1:]:
            part_ids = sp.encode("\n" + part)
            if part_ids[:k] != newline_ids:
                return False
            ids.extend(part_ids[k:])
        if ids != sp.encode(probe):
            return False
    return True
