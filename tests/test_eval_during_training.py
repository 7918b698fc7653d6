"""Evaluation during training: the config section, `eval/<task>/maj1` and `eval/<task>/maj<k>` in
metrics.jsonl, the same accuracies on 1 and 2 data-parallel ranks, and through a sequence-parallel model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from generation_fixtures import build_checkpoint, build_tokenizer
from megamath.evaluation.config import EvaluationConfig
from megamath.evaluation.during_training import evaluate_tasks
from megamath.evaluation.demo_arith import write_problems
from megamath.generation.loading import load_model
from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from test_train_loop import metrics, raw_config, run


def _gsm8k_digits(path: Path) -> Path:
    """Problems whose answers are single digits: a random model that writes digits gets some right."""
    rows = [{"question": f"What is {d} + 0?", "answer": f"#### {d}"} for d in [3, 1, 4, 1, 5, 9, 2, 6]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _evaluation(root: Path, tokenizer: Path) -> dict:
    write_problems(root / "demo-arith.jsonl", count=5)
    _gsm8k_digits(root / "digits.jsonl")
    return {"tokenizer_model": str(tokenizer), "data_dir": str(root),
            "tasks": [{"name": "demo-arith", "data": "demo-arith.jsonl", "maj": 2},
                      {"name": "gsm8k", "data": "digits.jsonl", "shots": 0, "maj": 3, "max_new_tokens": 8}]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_train")
    tokenizer = build_tokenizer(root / "tok.model")
    return root, tokenizer, _evaluation(root, tokenizer)


def test_tasks_are_logged_to_metrics_jsonl(tmp_path, assets):
    _, _, evaluation = assets
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=3, eval_every=2, model__vocab_size=512,
                     model__max_seq_length=256)
    raw["evaluation"] = evaluation
    config = TrainConfig.from_dict(raw)
    assert TrainConfig.from_dict(config.to_dict()) == config  # the section round-trips through config.yaml
    run(raw)
    records = {r["step"]: r for r in metrics(tmp_path / "run")}
    keys = {k for k in records[2] if k.startswith("eval/")}
    assert keys == {"eval/demo-arith/maj1", "eval/demo-arith/maj2", "eval/gsm8k/maj1", "eval/gsm8k/maj3"}
    assert all(0.0 <= records[2][k] <= 1.0 for k in keys)
    assert not any(k.startswith("eval/") for k in records[1]) and not any(k.startswith("eval/") for k in records[3])


def test_config_errors(assets):
    _, tokenizer, _ = assets
    with pytest.raises(ValueError, match="unknown; choose one of"):
        EvaluationConfig(tasks=[{"name": "mmlu", "data": "x"}], tokenizer_model=str(tokenizer))
    with pytest.raises(ValueError, match="needs name and data"):
        EvaluationConfig(tasks=[{"name": "gsm8k"}], tokenizer_model=str(tokenizer))
    with pytest.raises(ValueError, match="tokenizer_model is required"):
        EvaluationConfig(tasks=[{"name": "gsm8k", "data": "x"}])
    with pytest.raises(ValueError, match=r"^evaluation\.tasks\[0\]: maj must be an integer >= 1, got 0$"):
        EvaluationConfig(tasks=[{"name": "gsm8k", "data": "x", "maj": 0}], tokenizer_model=str(tokenizer))
    # YAML's lists, numbers and nulls where a string belongs: a traceback (unhashable list, a path of an int)
    for task, message in (({"name": ["gsm8k"], "data": "x"}, "name must be a non-empty string, got ['gsm8k']"),
                          ({"name": "gsm8k", "data": 5}, "data must be a non-empty string, got 5"),
                          ({"name": "gsm8k", "data": None}, "data must be a non-empty string, got None")):
        with pytest.raises(ValueError, match=rf"^evaluation\.tasks\[1\]: {re.escape(message)}$"):
            EvaluationConfig(tasks=[{"name": "gsm8k", "data": "x"}, task], tokenizer_model=str(tokenizer))
    with pytest.raises(ValueError, match=r"^evaluation\.tasks must be a list of mappings, got \{'name': 'gsm8k'"):
        EvaluationConfig(tasks={"name": "gsm8k", "data": "x"}, tokenizer_model=str(tokenizer))
    with pytest.raises(ValueError, match=r"^evaluation\.tokenizer_model must be a non-empty path or null, got 7$"):
        EvaluationConfig(tasks=[{"name": "gsm8k", "data": "x"}], tokenizer_model=7)


def test_sampling_and_length_errors_come_at_load_not_at_the_first_eval_step(tmp_path, assets):
    """These settings used to pass the config and stop the run when the first evaluation began."""
    _, tokenizer, evaluation = assets
    task = [{"name": "gsm8k", "data": "x", "maj": 4}]
    for key, value, message in (("top_p", 0.0, "top_p must be in"), ("top_p", 1.5, "top_p must be in"),
                                ("temperature", -1.0, "temperature must be >= 0"),
                                ("batch_size", 0, "batch_size must be an integer >= 1"),
                                ("seed", -1, "seed must be an integer >= 0")):
        with pytest.raises(ValueError, match=f"evaluation.{message}"):
            EvaluationConfig(tasks=task, tokenizer_model=str(tokenizer), **{key: value})
    raw = raw_config(tmp_path / "data", tmp_path / "run", eval_every=2, model__vocab_size=512,
                     model__max_seq_length=256)
    raw["evaluation"] = {**evaluation, "tasks": [{"name": "gsm8k", "data": "digits.jsonl"}]}  # 256 new tokens
    with pytest.raises(ValueError, match="gsm8k: max_new_tokens 256 leaves no room for a prompt in "
                                         "model.max_seq_length 256"):
        TrainConfig.from_dict(raw)
    raw["evaluation"]["tasks"][0]["max_new_tokens"] = 254
    TrainConfig.from_dict(raw)


def _worker(rank, world_size, root, ckpt, evaluation, out):
    for tp in (1, 2):  # DP 2, then TP 2 with sequence parallelism: one launch, each from_env builds its groups
        _evaluate_on_layout(rank, ckpt, evaluation, tp, f"{out}{tp}")


def _evaluate_on_layout(rank, ckpt, evaluation, tp, out):
    state = ParallelState.from_env(tp_size=tp)
    if tp == 1:
        model = load_model(ckpt, state, kernels="reference")
    else:  # a training-style model with sequence parallelism, holding this rank's slices
        from megamath.model.llama import Llama
        from megamath.model.tp_state_dict import shard_state_dict

        serial = load_model(ckpt, kernels="reference")
        model = Llama(serial.config, state, sequence_parallel=True)
        model.load_state_dict(shard_state_dict(serial.state_dict(), serial.config, tp, state.tp_rank))
        model.train()
    result = evaluate_tasks(model, EvaluationConfig(**evaluation), state, say=lambda line: None)
    assert model.training or tp == 1
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def test_dp_and_sequence_parallel_ranks_give_the_serial_accuracies(tmp_path, assets):
    _, _, evaluation = assets
    ckpt = build_checkpoint(tmp_path / "ckpt", seed=1, max_seq_length=512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = evaluate_tasks(load_model(ckpt, kernels="reference"), EvaluationConfig(**evaluation),
                                ParallelState.single(), say=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert any(v > 0 for v in serial.values())  # something was answered right: the comparison has content
    run_distributed(_worker, 2, str(tmp_path), str(ckpt), evaluation, str(tmp_path / "tp"))
    for tp in (1, 2):  # DP 2, then TP 2 with sequence parallelism
        for rank in range(2):
            assert json.loads((tmp_path / f"tp{tp}.{rank}").read_text()) == pytest.approx(serial), (tp, rank)
