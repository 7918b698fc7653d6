"""Text in, completions out: tokenize prompts, fan out K samples each, batch by length, decode.

Why a layer above `generate`: the commands (generate, eval, serve) and evaluation during training all
need the same prompt handling (BOS first, as Llama's tokenizer does; too-long prompts cut from the left
so the question at the end survives), the same seeds (sample j of prompt key i draws from a stream
derived from (seed, i, j), so a sample does not depend on the batch size, only on its prompt's number) and
the same batching (rows sorted by prompt length, so a batch pads little).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from megamath.generation.generate import Completion, SamplingParams, generate


MAX_COMPLETIONS = 10_000_000
"""Completions in one call: every (prompt, sample) row and its result are held in memory, so a count far past
what any run generates (`--num-samples 1e20`) must be refused at once, not met by the kernel's OOM killer."""


def check_completion_count(num_prompts: int, num_samples: int) -> None:
    """Refuse a number of samples below 1, or more than MAX_COMPLETIONS completions in all; one line."""
    if num_samples < 1:
        raise ValueError(f"samples per prompt must be at least 1, got {num_samples}")
    if num_prompts * num_samples > MAX_COMPLETIONS:
        raise ValueError(f"{num_samples:,} samples of each of {num_prompts:,} prompts is {num_prompts * num_samples:,} "
                         f"completions; at most {MAX_COMPLETIONS:,} in one run (split the prompts or take fewer samples)")


def row_seed(seed: int, key: int, sample: int) -> int:
    """A 63-bit seed for sample `sample` of prompt `key` under the user's seed."""
    return int(np.random.SeedSequence([seed, key, sample]).generate_state(2, np.uint64)[0]) >> 1


@dataclass
class PromptCodec:
    """Prompt text <-> ids for one tokenizer (anything with encode / decode / bos_id / eos_id)."""

    tokenizer: object
    max_prompt_tokens: int
    add_bos: bool = True

    def encode(self, text: str) -> tuple[list[int], int]:
        """(ids, number of tokens cut from the left to fit max_prompt_tokens)."""
        ids = list(self.tokenizer.encode(text))
        bos = [self.tokenizer.bos_id] if self.add_bos and self.tokenizer.bos_id is not None else []
        room = self.max_prompt_tokens - len(bos)
        cut = max(0, len(ids) - room)
        return bos + ids[cut:], cut

    def decode(self, ids: list[int]) -> str:
        """The text of generated ids as a continuation of the prompt.

        SentencePiece drops the space of a text's first piece ("▁h" alone decodes to "h"): right at the
        start of a text, wrong after a prompt ("intro" + "▁h" is "intro h"). So the ids are decoded behind
        an anchor piece, whose own text is then cut off.
        """
        anchor, head = self._anchor
        text = self.tokenizer.decode(anchor + list(ids))
        return text[len(head):] if text.startswith(head) else self.tokenizer.decode(ids)

    @cached_property
    def _anchor(self) -> tuple[list[int], str]:
        """(ids of a plain one-letter text, their decoded text)."""
        anchor = list(self.tokenizer.encode("a"))
        return anchor, self.tokenizer.decode(anchor)


def complete(model, codec: PromptCodec, prompts: Sequence[str], params: SamplingParams, num_samples: int = 1,
             seed: int = 0, batch_size: int = 16, keys: Sequence[int] | None = None,
             progress: Callable[[int, int], None] | None = None, deadline: float | None = None,
             check: Callable[[], None] | None = None) -> list[list[Completion]]:
    """num_samples completions of each prompt; `keys` (default 0, 1, ...) name the prompts in the seeds.

    `progress(prompts_finished, tokens_generated)` is called after each batch; `deadline` and `check` are
    generate's (a server's time bound, and its test of a client still there).
    """
    check_completion_count(len(prompts), num_samples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    encoded = [codec.encode(p)[0] for p in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    rows.sort(key=lambda r: len(encoded[r[0]]))
    out: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    remaining = [num_samples] * len(prompts)
    eos = getattr(codec.tokenizer, "eos_id", None)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        seeds = [row_seed(seed, keys[i], j) for i, j in batch]
        done = generate(model, [encoded[i] for i, _ in batch], params, seeds=seeds, eos_id=eos, decode=codec.decode,
                        deadline=deadline, vocab_limit=getattr(codec.tokenizer, "vocab_size", None), check=check)
        finished = 0
        for (i, j), completion in zip(batch, done):
            out[i][j] = completion
            remaining[i] -= 1
            finished += remaining[i] == 0
        if progress is not None:
            progress(finished, sum(len(c.token_ids) for c in done))
    return out
