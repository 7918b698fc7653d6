"""`megamath generate` and `megamath eval` end to end on a tiny random checkpoint and tokenizer: the plumbing
(fields, seeds, stop strings, maj@k records, errors), scored answers through a stubbed generator, and
GSM8K's real test file when it is there."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from generation_fixtures import build_checkpoint, build_tokenizer
from megamath.cli import main
from megamath.evaluation import runner
from megamath.evaluation.runner import EvalSettings, breakdown, evaluate, summarize
from megamath.evaluation.tasks import Problem, get_task
from megamath.generation.generate import Completion

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "gsm8k_test.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    return build_checkpoint(root / "ckpt"), build_tokenizer(root / "tok.model")


def _args(tiny, *rest) -> list[str]:
    return ["--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), *rest]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_keeps_fields_and_is_seeded(tiny, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q: 2 + 3?\\nA:", "id": 7}\n\n{"prompt": "[GOAL]x : ℕ ⊢ x = x[PROOFSTEP]"}\n')
    flags = ["--prompts", str(prompts), "--num-samples", "3", "--temperature", "0.8", "--top-p", "0.9",
             "--max-new-tokens", "12", "--seed", "5", "--stop", "\n", "--batch-size", "4"]
    assert main(["generate", *_args(tiny, *flags, "--output", str(tmp_path / "a.jsonl"))]) == 0
    assert main(["generate", *_args(tiny, *flags, "--batch-size", "2", "--output", str(tmp_path / "b.jsonl"))]) == 0
    a, b = _lines(tmp_path / "a.jsonl"), _lines(tmp_path / "b.jsonl")
    assert a[0]["id"] == 7 and a[0]["prompt"].startswith("Q: 2") and len(a) == 2
    for record in a:
        assert len(record["completions"]) == len(record["token_ids"]) == len(record["logprobs"]) == 3
        assert all("\n" not in c for c in record["completions"])
        assert all(0 < len(ids) <= 12 and lp < 0 for ids, lp in zip(record["token_ids"], record["logprobs"]))
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]  # the seed, not the batching, decides
    assert "wrote 2 prompts x 3 completions" in capsys.readouterr().out
    # --dtype: float32 is CPU's default (the same bits); bfloat16 weights give other log-probabilities
    assert main(["generate", *_args(tiny, *flags, "--dtype", "float32", "--output", str(tmp_path / "f.jsonl"))]) == 0
    assert _lines(tmp_path / "f.jsonl") == a
    assert main(["generate", *_args(tiny, *flags, "--dtype", "bfloat16", "--output", str(tmp_path / "h.jsonl"))]) == 0
    assert [r["logprobs"] for r in _lines(tmp_path / "h.jsonl")] != [r["logprobs"] for r in a]


def test_generate_bad_input_is_one_line(tiny, tmp_path, capsys):
    assert main(["generate", *_args(tiny, "--prompts", str(tmp_path / "none.jsonl"), "--output",
                                    str(tmp_path / "o.jsonl"))]) == 2
    assert "megamath generate: error: prompts file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    assert main(["generate", *_args(tiny, "--prompts", str(tmp_path / "bad.jsonl"), "--output",
                                    str(tmp_path / "o.jsonl"))]) == 2
    assert 'bad.jsonl:1: expected an object with a string "prompt"' in capsys.readouterr().err
    # JSON's \ud800 escape: a traceback from the tokenizer once the model had loaded
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"prompt": "2 + 2 = \\ud800"}\n')
    assert main(["generate", *_args(tiny, "--prompts", str(tmp_path / "bad.jsonl"), "--output",
                                    str(tmp_path / "o.jsonl"))]) == 2
    assert capsys.readouterr().err == (f'megamath generate: error: {tmp_path / "bad.jsonl"}:2: "prompt" holds a lone '
                                       'surrogate escape (\\ud800-\\udfff), not text\n')
    (tmp_path / "ok.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["generate", *_args(tiny, "--prompts", str(tmp_path / "ok.jsonl"), "--output", str(tmp_path / "o"),
                                    "--max-new-tokens", "5000")]) == 2
    assert "leaves no room for a prompt" in capsys.readouterr().err


def _gsm8k_file(path: Path) -> Path:
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "A box holds 1,200 pens. How many in 2 boxes?", "answer": "#### 2,400"},
            {"question": "What is 5 - 5?", "answer": "#### 0"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_gsm8k_with_majority_vote(tiny, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(_gsm8k_file(tmp_path / "g.jsonl")),
                                "--limit", "2", "--maj", "3", "--max-new-tokens", "10", "--output", str(out))]) == 0
    results = _lines(out)
    assert [r["id"] for r in results] == ["0", "1"] and [r["gold"] for r in results] == ["7", "2400"]
    for r in results:
        assert isinstance(r["correct"], bool) and isinstance(r["correct_maj"], bool)
        assert len(r["samples"]) == len(r["answers"]) == len(r["logprobs"]) == 3
        assert r["vote"] is None or r["vote"] in r["answers"]
    printed = capsys.readouterr().out
    assert "maj@1" in printed and "greedy" in printed and "maj@3" in printed
    assert "ties: higher summed log-prob" in printed


def test_votes_at_temperature_zero_are_the_greedy_answer(tiny, tmp_path):
    """maj@k at temperature 0 samples the greedy completion k times: its vote and score are maj@1's."""
    out = tmp_path / "results.jsonl"
    assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(_gsm8k_file(tmp_path / "g.jsonl")),
                                "--limit", "2", "--maj", "3", "--temperature", "0", "--max-new-tokens", "10",
                                "--output", str(out))]) == 0
    for r in _lines(out):
        assert r["samples"] == [r["greedy"]] * 3 and r["answers"] == [r["greedy_answer"]] * 3
        assert r["vote"] == r["greedy_answer"] and r["correct_maj"] == r["correct"]


def test_eval_math_release_layout_keeps_level(tiny, tmp_path, capsys):
    folder = tmp_path / "MATH" / "test" / "algebra"
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps({"problem": "Compute $2+2$.", "level": "Level 1", "type": "Algebra",
                                               "solution": r"$2+2=\boxed{4}$."}))
    out = tmp_path / "math.jsonl"
    assert main(["eval", *_args(tiny, "--task", "math", "--data", str(tmp_path / "MATH"), "--shots", "2",
                                "--max-new-tokens", "8", "--output", str(out))]) == 0
    assert "level Level 1" in capsys.readouterr().out
    (record,) = _lines(out)
    assert record["id"] == "test/algebra/1" and record["level"] == "Level 1" and record["gold"] == "4"
    assert isinstance(record["correct"], bool) and "vote" not in record


def test_eval_errors(tiny, tmp_path, capsys):
    data = _gsm8k_file(tmp_path / "g.jsonl")
    assert main(["eval", *_args(tiny, "--task", "nope", "--data", str(data), "--output", str(tmp_path / "o"))]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(data), "--shots", "12",
                                "--output", str(tmp_path / "o"))]) == 2
    assert "--shots must be 0..8" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(tmp_path / "empty.jsonl"),
                                "--output", str(tmp_path / "o"))]) == 2
    assert "no problems" in capsys.readouterr().err
    for tp, message in (("0", "--tp-size must be at least 1, got 0"),
                        ("2", "tensor parallel size 2 needs a distributed launch (torchrun)")):
        assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(data), "--tp-size", tp,
                                    "--output", str(tmp_path / "o"))]) == 2
        assert capsys.readouterr().err == f"megamath eval: error: {message}\n"


def test_bad_vote_sampling_settings_stop_eval_before_the_greedy_pass(tiny, tmp_path, capsys, monkeypatch):
    """--temperature / --top-p only matter for the maj@k votes, which run after the greedy pass: a bad value
    must not cost that pass first."""
    calls = []
    monkeypatch.setattr(runner, "complete", lambda *a, **k: calls.append(a[3]) or [])
    data = _gsm8k_file(tmp_path / "g.jsonl")
    for flags, message in ((["--top-p", "0"], "top_p must be in (0, 1]"),
                           (["--temperature", "-1"], "temperature must be >= 0"),
                           (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer")):
        assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(data), "--maj", "4", *flags,
                                    "--output", str(tmp_path / "o.jsonl"))]) == 2
        assert message in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "o.jsonl").exists()
    EvalSettings(maj=1, top_p=0.0)  # greedy only: the sampling settings are not used


def test_scores_and_votes_follow_the_completions(monkeypatch):
    """With the generator stubbed, the records say exactly which answers were right and how the vote went."""
    script = {  # problem -> (greedy text, sampled texts with their log-probs)
        "a": (" 3 + 4 = 7. The answer is 7.", [(" The answer is 7.", -5.0), (" The answer is 8.", -1.0),
                                               (" The answer is 7.", -6.0)]),
        "b": (" The answer is 1.", [(" The answer is 5.", -2.0), (" The answer is 6.", -1.0)] + [(" none", -0.1)]),
    }

    def fake_complete(model, codec, prompts, params, num_samples, seed, batch_size, keys, progress=None):
        ids = ["a" if "apples" in p else "b" for p in prompts]
        if params.temperature == 0:
            return [[Completion([1], -1.0, script[i][0])] for i in ids]
        return [[Completion([1], lp, t) for t, lp in script[i][1]] for i in ids]

    monkeypatch.setattr(runner, "complete", fake_complete)

    class Codec:
        def encode(self, text):
            return [1], 0

    problems = [Problem("a", "3 apples and 4 apples?", "7"), Problem("b", "What is 2 + 4?", "6")]
    results = evaluate(None, Codec(), get_task("gsm8k"), problems, EvalSettings(maj=3))
    assert [r["correct"] for r in results] == [True, False]
    assert results[0]["vote"] == "7" and results[0]["correct_maj"]  # 2 votes beat 1 likelier vote
    assert results[1]["answers"] == ["5", "6", None] and results[1]["vote"] == "6"  # tie -> higher log-prob
    assert summarize(results, 3) == {"problems": 2, "maj1": 0.5, "maj3": 1.0}
    results[0]["level"], results[1]["level"] = "Level 1", "Level 2"
    assert breakdown(results, 3) == {"level Level 1": {"problems": 1, "maj1": 1.0, "maj3": 1.0},
                                     "level Level 2": {"problems": 1, "maj1": 0.0, "maj3": 1.0}}


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="the shared GSM8K test file is not on this machine")
def test_eval_on_the_gsm8k_test_file(tiny, tmp_path, capsys):
    out = tmp_path / "gsm8k.jsonl"
    assert main(["eval", *_args(tiny, "--task", "gsm8k", "--data", str(SHARED_GSM8K), "--limit", "8",
                                "--max-new-tokens", "16", "--output", str(out))]) == 0
    results = _lines(out)
    assert len(results) == 8 and results[0]["gold"] == "18"
    assert "gsm8k: 8 problems" in capsys.readouterr().out
