"""Generation under tensor parallelism: TP 2 on gloo gives the tokens of TP 1 (greedy and seeded sampling),
with KV heads split over the ranks, with KV heads replicated and expanded (6 query heads, 3 KV heads), and
with a vocabulary TP 2 does not divide (511: the padding row is never a candidate)."""
from __future__ import annotations

import json

import pytest
import torch

from distributed import run_distributed
from generation_fixtures import build_checkpoint
from megamath.generation.generate import SamplingParams, _last_logits, generate
from megamath.generation.loading import load_model

SHAPES = {"kv-split": dict(num_heads=4, num_kv_heads=2, hidden_size=32),
          "kv-replicated": dict(num_heads=6, num_kv_heads=3, hidden_size=48),
          # 2 does not divide 511: rank 1 holds 255 ids and a zero padding row that must never be drawn
          "vocab-padded": dict(num_heads=4, num_kv_heads=2, hidden_size=32, vocab_size=511)}
PROMPTS = [[5, 9, 33, 2, 100], [7], [300, 301, 302, 303, 304, 305, 306, 307, 308], [11, 12]]
PARAMS = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9)]


def _decode_all(model) -> list[dict]:
    out = []
    for params in PARAMS:
        done = generate(model, PROMPTS, params, seeds=[1, 2, 3, 4])
        out.append({"tokens": [c.token_ids for c in done], "logprobs": [c.logprob for c in done]})
    return out


def _worker(rank, world_size, ckpts, out_paths):
    """Both shapes in one launch (one process start per rank); each from_env call builds its own groups."""
    from megamath.parallel.state import ParallelState

    for ckpt, out_path in zip(ckpts, out_paths):
        state = ParallelState.from_env(tp_size=2)
        model = load_model(ckpt, state, kernels="reference")
        result = _decode_all(model)
        result[0]["logits_width"] = _last_logits(model, model(torch.tensor([PROMPTS[0]]))).shape[-1]
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump(result, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{shape: (serial result, [rank 0 result, rank 1 result])}, the TP 2 runs of all shapes in one launch."""
    tmp = tmp_path_factory.mktemp("generation_tp")
    ckpts = {shape: build_checkpoint(tmp / shape / "ckpt", seed=3, **SHAPES[shape]) for shape in SHAPES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = {shape: _decode_all(load_model(ckpts[shape], kernels="reference")) for shape in SHAPES}
    finally:
        torch.set_num_threads(threads)
    run_distributed(_worker, 2, [str(ckpts[s]) for s in SHAPES], [str(tmp / s / "tp") for s in SHAPES])
    return {shape: (serial[shape], [json.loads((tmp / shape / f"tp.{r}").read_text()) for r in range(2)])
            for shape in SHAPES}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tp2_generates_what_tp1_generates(runs, shape):
    serial, ranks = runs[shape]
    assert ranks[0] == ranks[1]  # every rank draws the same tokens from the same gathered logits
    vocab = SHAPES[shape].get("vocab_size", 512)
    for got, expected in zip(ranks[0], serial):
        assert got["tokens"] == expected["tokens"]
        assert got["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-3)
        assert all(0 <= t < vocab for tokens in got["tokens"] for t in tokens)


def test_gathered_logits_are_the_true_vocabulary_wide(runs):
    """Padded ids are never sampled: the gathered last-position logits hold exactly V columns."""
    serial, ranks = runs["vocab-padded"]
    for rank in ranks:
        assert rank[0]["logits_width"] == 511


# ---- `megamath eval` at TP 2 over a padded vocabulary (the tokenizer's 400 pieces + 1, as 32,000 + a pad) ----

def _eval_args(ckpt, tok, data, out) -> list[str]:
    return ["eval", "--model", str(ckpt), "--tokenizer-model", str(tok), "--task", "gsm8k", "--data", str(data),
            "--limit", "3", "--maj", "2", "--max-new-tokens", "8", "--seed", "3", "--output", str(out)]


def _eval_worker(rank, world_size, args):
    import os

    from megamath.cli import main

    os.environ["WORLD_SIZE"] = str(world_size)  # as torchrun sets it: every process one TP rank
    assert main(args) == 0


def test_eval_and_generate_at_tp2_and_at_dp2_equal_one_process_on_a_padded_vocabulary(tmp_path):
    """TP 2 (every process one TP rank), and DP 2 (`--tp-size 1`: each process a whole model and every
    other problem or prompt, gathered back in order), give one process's results."""
    from generation_fixtures import build_tokenizer
    from megamath.cli import main

    ckpt = build_checkpoint(tmp_path / "ckpt", seed=5, vocab_size=401)  # 2 does not divide 401
    tok = build_tokenizer(tmp_path / "tok.model")
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                            for q, a in [("What is 2 + 3?", 5), ("What is 7 - 4?", 3), ("What is 6 + 6?", 12)]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_eval_args(ckpt, tok, data, tmp_path / "tp1.jsonl")) == 0
    finally:
        torch.set_num_threads(threads)
    run_distributed(_eval_worker, 2, _eval_args(ckpt, tok, data, tmp_path / "tp2.jsonl"))
    run_distributed(_eval_worker, 2, _eval_args(ckpt, tok, data, tmp_path / "dp2.jsonl") + ["--tp-size", "1"])
    one, tp2, dp2 = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                     for n in ("tp1", "tp2", "dp2"))
    assert len(one) == 3 and [r["id"] for r in dp2] == [r["id"] for r in one]  # gathered back in problem order
    for a, b, c in zip(one, tp2, dp2):  # greedy and seeded samples token for token: the same texts
        assert (b["greedy"], b["samples"]) == (a["greedy"], a["samples"])
        assert b["logprobs"] == pytest.approx(a["logprobs"], abs=1e-3)
        assert (c["greedy"], c["samples"]) == (a["greedy"], a["samples"])
        assert c["logprobs"] == pytest.approx(a["logprobs"], abs=1e-3)
    # generate's prompts split over two model copies the same way: sampled, two completions each
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "n": i}) + "\n" for i, q in enumerate(["2 +", "7 -", "6 + 6"])))
    gen = ["generate", "--model", str(ckpt), "--tokenizer-model", str(tok), "--prompts", str(prompts),
           "--max-new-tokens", "6", "--temperature", "0.8", "--num-samples", "2", "--seed", "4"]
    torch.set_num_threads(1)
    try:
        assert main([*gen, "--output", str(tmp_path / "gen1.jsonl")]) == 0
    finally:
        torch.set_num_threads(threads)
    run_distributed(_eval_worker, 2, [*gen, "--tp-size", "1", "--output", str(tmp_path / "gen2.jsonl")])
    one, two = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("gen1", "gen2"))
    assert [r["n"] for r in two] == [0, 1, 2] and [r["token_ids"] for r in two] == [r["token_ids"] for r in one]
