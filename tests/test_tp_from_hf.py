"""Tensor-parallel training from a Hugging Face checkpoint equals serial training and transformers itself.

LLEMMA's setup: start from pretrained weights (`init_from_hf`), TP 2, gradient clipping 1.0. The model is
then built on the meta device and materialised with `to_empty`, which re-creates every parameter; a
gradient norm or an SP gradient sum that read attributes on the parameter tensors silently went wrong
there (TP 2 logged a norm of 2.21 where transformers computes 3.08, and clipping made the runs diverge).

A tiny Llama saved by transformers (hidden 48, 6 heads, rope θ 1e6, fp32, vocab 64), in two GQA cases:
    kv2  2 KV heads: k/v split over TP 2
    kv3  3 KV heads: k/v replicated over TP 2 (3 does not divide 2)
Each is trained 10 steps with clipping active (the norm is checked to be above the threshold) by
    TP 1 (this process), TP 2, TP 2 with sequence parallelism (2 gloo ranks),
and kv2 also by TP 2 × DP 2 with SP (4 gloo ranks) against TP 1 with the same global batch, by a TP-2
run resumed from its step-5 checkpoint, and by a TP-1 run resumed from that checkpoint resharded.
Step 1's loss and pre-clipping gradient norm must equal transformers' on the same batch to fp32 precision;
losses, norms and weights must agree between the layouts for all 10 steps.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distributed import run_distributed
from megamath.model.tp_state_dict import merge_state_dicts
from megamath.parallel.state import ParallelState
from megamath.training import reshard as rs
from megamath.training.config import TrainConfig
from megamath.training.data import TrainData
from megamath.training.loop import train
from test_train_loop import metrics, untimed, write_corpus
from tp_from_hf_runs import CLIP, KV_CASES, SAVE_AT, STEPS, raw, tp2_dp2_worker, tp2_worker

transformers = pytest.importorskip("transformers", reason="the reference implementation for this test")

RTOL = 2e-5  # fp32; TP and serial add partial sums in different orders


def save_hf_model(directory: Path, kv_heads: int) -> None:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(kv_heads)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_from_hf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_corpus(tmp / "data")
        for case, kv in KV_CASES.items():
            save_hf_model(tmp / case / "hf", kv)
            train(TrainConfig.from_dict(raw(tmp, case, "tp1")), ParallelState.single())
        train(TrainConfig.from_dict(raw(tmp, "kv2", "tp1_accum2", grad_accum_steps=2)), ParallelState.single())
        run_distributed(tp2_worker, 2, tmp)
        run_distributed(tp2_dp2_worker, 4, tmp)
        source = tmp / "kv2" / "tp2_sp" / "checkpoints" / f"step_{SAVE_AT:07d}"
        rs.reshard_checkpoint(source, tmp / "kv2" / "resharded_tp1", 1, 1)
        train(TrainConfig.from_dict(raw(tmp, "kv2", "resharded_tp1")), ParallelState.single())
        yield tmp
    finally:
        torch.set_num_threads(threads)


def transformers_step1(tmp: Path, case: str) -> tuple[float, float]:
    """Loss and gradient norm that transformers computes on the batch of megamath's step 1."""
    config = TrainConfig.from_dict(raw(tmp, case, "tp1"))
    tokens, targets = TrainData(config, ParallelState.single(), tmp / case / "tp1" / "index-cache").micro_batches(1)[0]
    model = transformers.LlamaForCausalLM.from_pretrained(tmp / case / "hf", torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    logits = model(input_ids=tokens).logits  # (b, S, V)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    return loss.detach().item(), norm.item()


def model_tensors(run_dir: Path, step: int, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / f"model_tp{tp_rank:02d}.safetensors"))


def series(tmp: Path, case: str, run: str, key: str) -> list[float]:
    return [r[key] for r in metrics(tmp / case / run)]


@pytest.mark.parametrize("case", list(KV_CASES))
def test_step1_loss_and_grad_norm_equal_transformers(runs, case):
    want_loss, want_norm = transformers_step1(runs, case)
    assert want_norm > CLIP, "clipping must be active for the runs below to test it"
    for run in ("tp1", "tp2", "tp2_sp"):
        first = metrics(runs / case / run)[0]
        np.testing.assert_allclose(first["loss"], want_loss, rtol=1e-5, err_msg=f"{case} {run}: step-1 loss")
        np.testing.assert_allclose(first["grad_norm"], want_norm, rtol=1e-5, err_msg=f"{case} {run}: step-1 norm")


@pytest.mark.parametrize("case", list(KV_CASES))
def test_tp2_with_and_without_sp_equals_tp1_with_clipping(runs, case):
    config = TrainConfig.from_dict(raw(runs, case, "tp1")).model
    norms = series(runs, case, "tp1", "grad_norm")
    assert sum(n > CLIP for n in norms) >= 3, f"clipping active on several steps: {norms}"
    serial = model_tensors(runs / case / "tp1", STEPS)
    before = model_tensors(runs / case / "tp1", SAVE_AT)
    for run in ("tp2", "tp2_sp"):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(series(runs, case, run, key), series(runs, case, "tp1", key), rtol=RTOL,
                                       err_msg=f"{case} {run}: {key}")
        merged = merge_state_dicts([model_tensors(runs / case / run, STEPS, t) for t in (0, 1)], config)
        for name, tensor in merged.items():
            moved = (serial[name] - before[name]).abs().max()
            assert (tensor - serial[name]).abs().max() < 1e-3 * moved, f"{case} {run}: weight {name}"


def test_tp2_dp2_with_sp_equals_tp1_with_the_same_global_batch(runs):
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(series(runs, "kv2", "tp2_dp2_sp", key), series(runs, "kv2", "tp1_accum2", key),
                                   rtol=RTOL, err_msg=key)


def test_resumed_tp2_run_continues_exactly(runs):
    resumed = untimed(metrics(runs / "kv2" / "tp2_sp_resumed"))
    assert [r["step"] for r in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed == untimed(metrics(runs / "kv2" / "tp2_sp"))[SAVE_AT:]


def test_resharded_to_tp1_continues_like_the_tp1_run(runs):
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(series(runs, "kv2", "resharded_tp1", key), series(runs, "kv2", "tp1", key)[SAVE_AT:],
                                   rtol=RTOL, err_msg=key)
