"""Batched autoregressive decoding: prefill the prompts, then one token per step from a KV cache.

Prompts of different lengths share a batch left-padded (kv_cache.py masks the padding and gives each
row its own positions), so the tokens equal Hugging Face `generate`'s. Greedy decoding (temperature 0)
takes the argmax; sampling divides the logits by the temperature, keeps the smallest set of tokens whose
probability reaches top_p, and draws with an exponential race (argmax p / E, E ~ Exp(1)) from a
generator of the row's own: a row's draws depend on its seed only, not on its batch neighbours, so a
seed reproduces a sample whatever the batch size or the tensor-parallel size (every TP rank gathers
the same full-vocabulary logits and draws the same token). That holds bit for bit in float32 on CPU; in
bfloat16 another batch (its padding) or TP layout rounds the logits differently (~1e-2): a near tie can flip.

Each completion stops at EOS, at a stop string (its text is cut before it), or after max_new_tokens.
`logprob` is the sum over its generated tokens of log p(token) under the model itself (temperature 1,
no top-p), the score majority-vote ties and LLMSTEP's ranking use.

`use_cache=False` is the reference: each step runs the model's plain training forward over each row's
whole unpadded sequence. Tests compare the two.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megamath.generation.kv_cache import KVCache
from megamath.parallel.layers import gather_vocab_logits


@dataclass
class SamplingParams:
    """How to decode."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per completion."""
    temperature: float = 0.0
    """0 decodes greedily; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most probable tokens until their probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (the text is cut before the first one)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    """Generated ids, through the EOS or the token that completed a stop string."""
    logprob: float = 0.0
    """Sum of log p(token) over token_ids, under the untempered model."""
    text: str = ""
    """Decoded token_ids, cut before the stop string (empty when no decoder was given)."""
    finish_reason: str = "length"
    """"eos", "stop" or "length"."""


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (B, V) -> the probabilities a sample is drawn from (B, V), those of Hugging Face's temperature
    and top-p warpers: softmax(logits / temperature) with the least probable tokens zeroed while their
    mass stays within 1 - top_p (ties leave in index order, as HF's stable ascending sort has them).

    The logits are shifted to a maximum of 0 before the division: softmax is unchanged, and a temperature
    near 0 (1e-38) gives the greedy token instead of inf / inf = NaN probabilities."""
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature  # (B, V), max 0
    if params.top_p < 1:
        sorted_s, order = scaled.sort(dim=-1, stable=True)  # (B, V) ascending
        tail = sorted_s.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p  # (B, V) in sorted order
        tail[:, -1] = False  # the most probable token always stays
        scaled = scaled.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return torch.softmax(scaled, dim=-1)  # (B, V)


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generators: Sequence[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (tokens (B,), log p(token) (B,) under the untempered model)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # (B, V)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)  # (B,)
    else:
        probs = sampling_probs(logits, params)  # (B, V)
        race = torch.stack([torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
                            for g in generators])  # (B, V) ~ Exp(1), one stream per row
        # An exact 0 from exponential_ (some backends draw them) would make a filtered token's 0 / 0 a NaN,
        # which argmax picks: floored, it leaves that token at 0 and a kept token's draw finite.
        tokens = (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(dim=-1)  # (B,)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def row_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) % (2 ** 63))
        gens.append(g)
    return gens


class _Tracker:
    """Per-row completion state: when a row finishes and why."""

    def __init__(self, batch: int, params: SamplingParams, eos_id: int | None, decode: Callable | None):
        self.params, self.eos_id, self.decode = params, eos_id, decode
        self.out = [Completion() for _ in range(batch)]
        self.done = [False] * batch

    def add(self, tokens: list[int], logps: list[float]) -> bool:
        """Record one step's tokens; True when every row is finished."""
        for b, (tok, lp) in enumerate(zip(tokens, logps)):
            if self.done[b]:
                continue
            c = self.out[b]
            c.token_ids.append(tok)
            c.logprob += lp
            if self.eos_id is not None and tok == self.eos_id:
                c.finish_reason, self.done[b] = "eos", True
            elif self.params.stop and self.decode is not None:
                text = self.decode(c.token_ids)
                if any(s in text for s in self.params.stop):
                    c.finish_reason, self.done[b] = "stop", True
        return all(self.done)

    def finish(self) -> list[Completion]:
        for c in self.out:
            if self.decode is not None:
                ids = c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
                text = self.decode(ids)
                cuts = [text.find(s) for s in self.params.stop if s in text]
                c.text = text[:min(cuts)] if cuts else text
        return self.out


def _last_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """(B, S, V/p) -> the full-vocabulary logits of the last position (B, V): exactly V columns, so a padded
    vocabulary's padding ids (p not dividing V) are never candidates."""
    return gather_vocab_logits(logits[:, -1], model.config.vocab_size, model.parallel.tp_group)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seeds: Sequence[int] | None = None,
             eos_id: int | None = None, decode: Callable[[list[int]], str] | None = None,
             use_cache: bool = True, deadline: float | None = None,
             vocab_limit: int | None = None, check: Callable[[], None] | None = None) -> list[Completion]:
    """Complete each prompt (a list of token ids) once; `seeds` (one per prompt) are needed to sample.

    `vocab_limit`: only ids below it are generated (a model's vocabulary padded past its tokenizer's:
    the demo's holds 2,048 rows for 1,024 pieces); log-probabilities are then over those ids.

    `deadline` (a time.monotonic() value): past it, decoding raises TimeoutError (a server's bound per request).
    `check` is called between decode steps; what it raises ends decoding (a server whose client has left).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if params.temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    longest = max(len(p) for p in prompts)
    limit = model.config.max_seq_length
    if longest + params.max_new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens plus {params.max_new_tokens} new tokens exceeds the "
                         f"model's max_seq_length {limit}")
    device = next(model.parameters()).device
    gens = row_generators(seeds, device) if params.temperature > 0 else None
    tracker = _Tracker(len(prompts), params, eos_id, decode)
    steps = (_cached_steps if use_cache else _uncached_steps)(model, prompts, longest + params.max_new_tokens, device)
    logits = next(steps)  # (B, V): the prefill's
    for i in range(params.max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        tokens, logps = choose_tokens(logits, params, gens)
        if tracker.add(tokens.tolist(), logps.tolist()) or i + 1 == params.max_new_tokens:
            break
        if deadline is not None and time.monotonic() > deadline:
            steps.close()
            raise TimeoutError(f"generation passed its deadline after {i + 1} tokens")
        if check is not None:
            try:
                check()
            except BaseException:
                steps.close()
                raise
        logits = steps.send(tokens)
    steps.close()
    return tracker.finish()


def _cached_steps(model, prompts, capacity: int, device):
    """Prefill the left-padded batch, then decode one token per step; yields logits (B, V), receives tokens (B,)."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)  # (B, L), pad id 0 (masked)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[b, longest - len(p):] = True
    cache = KVCache(model.config.num_layers, len(prompts), capacity, device)
    ones = torch.ones(len(prompts), 1, dtype=torch.bool, device=device)
    while True:
        cache.extend(valid)
        logits = model(tokens, position_offset=cache.length, cache=cache)  # (B, 1, V/p)
        cache.commit(tokens.shape[1])
        tokens, valid = (yield _last_logits(model, logits))[:, None], ones  # (B, 1)


def _uncached_steps(model, prompts, capacity: int, device):
    """The reference: the plain forward over each row's whole sequence at every step."""
    seqs = [list(p) for p in prompts]
    while True:
        rows = [_last_logits(model, model(torch.tensor([s], dtype=torch.long, device=device))) for s in seqs]
        chosen = yield torch.cat(rows)  # (B, V)
        for s, tok in zip(seqs, chosen.tolist()):
            s.append(tok)
