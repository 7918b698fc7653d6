"""The tokenizing side of `megamath preprocess`: worker processes that parse and encode batches of raw lines.

Each worker parses, validates and tokenizes a whole ~1 MB batch and returns one flat token array; the
pool keeps at most `2 * workers` batches in flight, two per worker, and hands results back in input
order. Workers die with their parent however it dies (PR_SET_PDEATHSIG on Linux; elsewhere their task pipe
ends), so a killed preprocess never leaves orphans behind; a killed or failing worker, or a Ctrl-C, never hangs or
garbles the main process (`megamath/workers.py`, shared with `megamath overlap`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from megamath.data.sources import EMPTY_TEXT, LineBatch, parse_lines
from megamath.data.tokenizer import SentencePieceTokenizer
from megamath.workers import Workers, failure, failure_error, task_stream, worker_started


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs, small and picklable (workers load the tokenizer themselves)."""

    tokenizer_model: str
    newline_cuts: bool
    json_key: str
    eod_id: int | None
    dtype: str
    sentence_lists: bool = False
    """Read a list of strings as one document of several sequences (PreprocessConfig.sentence_lists)."""


@dataclass
class Encoded:
    tokens: np.ndarray  # (sum(lengths),) in the dataset dtype
    lengths: np.ndarray  # (sequences,) int64; one sequence per document unless `sequences` says otherwise
    bad: list[tuple[int, str, str]]  # (line offset in the batch, reason, detail)
    input_bytes: int
    sequences: np.ndarray | None = None  # (documents,) int64 sequences per document; None: one each

    @property
    def documents(self) -> int:
        return len(self.lengths) if self.sequences is None else len(self.sequences)


class BatchEncoder:
    """Raw lines -> validated texts -> one flat token array."""

    def __init__(self, spec: EncoderSpec, tokenizer: SentencePieceTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or SentencePieceTokenizer(spec.tokenizer_model, newline_cuts=spec.newline_cuts)
        self.spec = spec

    def __call__(self, data: bytes) -> Encoded:
        texts, bad = parse_lines(data, self.spec.json_key, self.spec.sentence_lists)
        if self.spec.sentence_lists and any(type(text) is list for text in texts):
            return self._encode_sentences(texts, bad, len(data))
        tokens, lengths = self.tokenizer.encode_flat(texts, self.spec.eod_id, self.spec.dtype)
        extra = int(self.spec.eod_id is not None)
        if len(lengths) and int(lengths.min()) == extra:  # rare: a text the model maps to no tokens
            tokens, lengths, bad = self._drop_tokenless(tokens, lengths, bad, extra)
        return Encoded(tokens, lengths, bad, len(data))

    def _encode_sentences(self, texts: list, bad: list, input_bytes: int) -> Encoded:
        """Megatron's Encoder.encode for a batch holding lists of sentences: each sentence that encodes to
        some tokens is one sequence of its document, and the EOS (when appended) ends the last sequence.
        A plain string is a one-sentence list, so its document is what the one-sequence path writes."""
        docs = [text if type(text) is list else [text] for text in texts]
        tokens, lengths = self.tokenizer.encode_flat([s for doc in docs for s in doc], None, self.spec.dtype)
        counts = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))  # (documents,) sentences
        kept = lengths > 0  # (sentences,) Megatron drops a sentence with no tokens
        sequences = np.bincount(np.repeat(np.arange(len(docs)), counts)[kept], minlength=len(docs))  # (documents,)
        lengths = lengths[kept]  # (sequences,)
        if not sequences.all():  # a document of no tokens: skipped, as the one-sequence path skips it
            bad_offsets = {offset for offset, _, _ in bad}
            good_offsets = [i for i in range(len(docs) + len(bad)) if i not in bad_offsets]  # (documents,)
            bad = sorted(bad + [(good_offsets[d], EMPTY_TEXT, f"{self.spec.json_key!r} encodes to no tokens")
                                for d in np.flatnonzero(sequences == 0)])
            sequences = sequences[sequences > 0]
        if self.spec.eod_id is not None and len(sequences):
            last = np.cumsum(sequences) - 1  # (documents,) each document's last sequence
            tokens = np.insert(tokens, np.cumsum(lengths)[last], np.asarray(self.spec.eod_id, tokens.dtype))
            lengths[last] += 1
        return Encoded(tokens, lengths, bad, input_bytes, sequences.astype(np.int64))

    def _drop_tokenless(self, tokens, lengths, bad, extra):
        bad_offsets = {offset for offset, _, _ in bad}
        good_offsets = [i for i in range(len(lengths) + len(bad)) if i not in bad_offsets]  # (documents,)
        empty = lengths == extra  # (documents,)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        keep_tokens = np.ones(len(tokens), dtype=bool)
        for doc in np.flatnonzero(empty):
            keep_tokens[starts[doc]:starts[doc] + lengths[doc]] = False
            bad.append((good_offsets[doc], EMPTY_TEXT, f"{self.spec.json_key!r} encodes to no tokens"))
        bad.sort()
        return tokens[keep_tokens], lengths[~empty], bad


def _worker_main(spec: EncoderSpec, tasks, results, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it and stops the workers.
    worker_started(parent_pid)
    seq = -1
    try:
        encode = BatchEncoder(spec)
        for seq, data in task_stream(tasks):
            results.send((seq, encode(data)))
    except Exception as err:
        results.send((seq, failure(err)))


# --- main side: running batches -------------------------------------------------------------------


class InProcess:
    """--workers 1: encode in this process, no pickling."""

    def __init__(self, spec: EncoderSpec, tokenizer: SentencePieceTokenizer) -> None:
        self._encode = BatchEncoder(spec, tokenizer)

    def map_ordered(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, Encoded]]:
        for batch in batches:
            yield batch, self._encode(batch.data)

    def close(self, terminate: bool = False) -> None:
        pass


class ProcessPool:
    """Worker processes fed a batch at a time, with at most `2 * workers` batches in flight.

    Unlike `Pool.imap`, nothing is read ahead of that window, and a worker that dies (OOM killer) or fails
    raises a one-line `WorkerError` here instead of hanging the run (`megamath/workers.py`).
    """

    def __init__(self, spec: EncoderSpec, workers: int) -> None:
        self._max_in_flight = 2 * workers  # sent and not yet yielded, results held for order included
        self._workers = Workers(_worker_main, (spec,), workers, "megamath-preprocess", "preprocessing worker")
        self._procs = self._workers.procs

    def map_ordered(self, batches: Iterable[LineBatch]) -> Iterator[tuple[LineBatch, Encoded]]:
        batches = iter(batches)
        in_flight: dict[int, LineBatch] = {}
        done: dict[int, Encoded] = {}
        sent = received = 0
        while True:
            while (len(in_flight) < self._max_in_flight and (i := self._workers.free()) is not None
                   and (batch := next(batches, None)) is not None):
                self._workers.send(i, (sent, batch.data))
                in_flight[sent] = batch
                sent += 1
            if not in_flight:
                return
            while received not in done:
                i, (seq, result) = self._workers.receive()
                self._workers.task_done(i)
                if isinstance(result, tuple):  # a worker's exception
                    where = f" on {in_flight[seq].file} from line {in_flight[seq].first_line}" if seq >= 0 else ""
                    raise failure_error(f"a preprocessing worker failed{where}", result)
                done[seq] = result
            yield in_flight.pop(received), done.pop(received)
            received += 1

    def close(self, terminate: bool = False) -> None:
        """Stop the workers: after their current task, or at once when the run failed."""
        self._workers.stop(terminate)


# --- main side: writing datasets --------------------------------------------------------------------
