"""megamath plan: its ZeRO bytes equal what the trainer allocates; LLEMMA's runs fit at about their cost; errors.

The byte check runs the trainer's own builders (loop.build_model, loop.build_optimizer) on 4 gloo ranks
as TP 1 × DP 4, TP 2 × DP 2 and TP 4 × DP 1 (KV heads replicated at TP 4), with fp32 and bf16 gradient
buffers and one or many buckets, and compares every buffer's bytes with the plan's prediction.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megamath.cli import main
from megamath.model.config import ModelConfig
from megamath.parallel.state import ParallelState
from megamath.planning import measured
from megamath.planning.hardware import get_gpu
from megamath.planning.memory import RunShape, zero_buffer_bytes, zero_layout_for
from megamath.planning.plan import PlanRequest, evaluate, plan
from megamath.planning.step_time import hardware_flops_per_token
from megamath.training import loop
from megamath.training.config import TrainConfig

MODEL = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             max_seq_length=32, kernels="reference")
SHAPES = [(1, 4), (2, 2), (4, 1)]
VARIANTS = [("fp32", 0.0), ("fp32", 0.02), ("bf16", 0.02)]  # 0.02 MiB: several buckets


@pytest.fixture(autouse=True)
def no_measured_results(tmp_path_factory, monkeypatch):
    """The figures below assume the stated efficiencies, whatever perf/results/ holds in this checkout."""
    monkeypatch.setattr(measured, "RESULTS_DIR", tmp_path_factory.mktemp("no_results"))


def _config(tp: int, grad_dtype: str, bucket_mb: float) -> TrainConfig:
    return TrainConfig.from_dict({"model": MODEL, "param_dtype": "bfloat16", "data": {"seq_length": 32},
                                  "parallel": {"tp_size": tp, "bucket_mb": bucket_mb},
                                  "optimizer": {"grad_dtype": grad_dtype}})


def _worker(rank, world_size, out_dir):
    allocated = {}
    for tp, dp in SHAPES:
        state = ParallelState.from_env(tp)
        assert state.dp_size == dp
        for grad_dtype, bucket_mb in VARIANTS:
            config = _config(tp, grad_dtype, bucket_mb)
            model = loop.build_model(config, state)
            opt = loop.build_optimizer(config, model, state)
            allocated[(tp, dp, grad_dtype, bucket_mb)] = {
                "params": opt.flat_param.nbytes, "grads": opt.flat_grad.nbytes,
                "optimizer": opt.master.nbytes + opt.exp_avg.nbytes + opt.exp_avg_sq.nbytes,
                "model_bytes": sum(p.nbytes for p in model.parameters())}
            opt.remove_hooks()
    torch.save(allocated, out_dir / f"bytes-{rank}.pt")


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("plan")
    run_distributed(_worker, 4, out_dir)
    return [torch.load(out_dir / f"bytes-{rank}.pt") for rank in range(4)]


@pytest.mark.parametrize("tp, dp", SHAPES)
@pytest.mark.parametrize("grad_dtype, bucket_mb", VARIANTS)
def test_predicted_zero_bytes_equal_the_trainers(allocated, tp, dp, grad_dtype, bucket_mb):
    model = ModelConfig(**MODEL)
    shape = RunShape(tp=tp, dp=dp, micro_batch=1, grad_accum=1, seq_length=32, activation_checkpointing=False,
                     sequence_parallel=False, grad_dtype=grad_dtype, bucket_mb=bucket_mb)
    want = zero_buffer_bytes(model, shape)
    for rank in range(4):
        got = allocated[rank][(tp, dp, grad_dtype, bucket_mb)]
        assert {k: got[k] for k in want} == want, (rank, tp, dp)
        assert got["params"] >= got["model_bytes"]  # the buffer holds the model, plus the buckets' padding


# ---- LLEMMA ---------------------------------------------------------------------------------------------

PUBLISHED = {"7b": 23_000, "34b": 47_000}  # A100-hours (LLEMMA paper): 200B tokens, 50B tokens
FACTOR = 2.0
"""The plan's GPU-hours are within 2x of LLEMMA's: it models a steady-state step at a stated 50 % matmul
efficiency and leaves out restarts, evaluation, checkpointing, data loading and NeoX's own speed (LLEMMA's
numbers imply 33 % MFU for 7B and 20 % for 34B); so it is optimistic, most for the TP 8 model."""


def _llemma(name: str, **overrides) -> PlanRequest:
    base = {"7b": dict(tp=2, micro_batch=4, grad_accum=2, sequence_parallel=False, tokens=200e9),
            "34b": dict(tp=8, micro_batch=2, grad_accum=16, sequence_parallel=True, tokens=50e9)}[name]
    return PlanRequest(model=ModelConfig.from_preset(f"llemma-{name}"), model_name=f"llemma-{name}",
                       gpu=get_gpu("a100-40gb"), gpus=256, activation_checkpointing=True, **{**base, **overrides})


@pytest.mark.parametrize("name", ["7b", "34b"])
def test_llemma_runs_fit_and_cost_about_what_they_cost(name):
    (p,) = plan(_llemma(name))
    assert p.fits and p.shape.dp == 256 // p.shape.tp
    assert p.tokens_per_step == 1024 * 4096
    ratio = PUBLISHED[name] / p.gpu_hours
    assert 1 / FACTOR <= ratio <= FACTOR, (name, p.gpu_hours)


def test_34b_bf16_gradients_save_2_bytes_per_parameter_per_tp_rank():
    fp32, = plan(_llemma("34b", grad_dtype="fp32"))
    bf16, = plan(_llemma("34b", grad_dtype="bf16"))
    local_params = zero_layout_for(ModelConfig.from_preset("llemma-34b"), 8, 32, "fp32", 128.0).numel
    saved = fp32.memory["grads"] - bf16.memory["grads"]
    assert abs(saved / local_params - 2.0) < 1e-3, saved / local_params  # only the buckets' padding differs
    assert abs(fp32.memory["params"] - bf16.memory["params"]) < 1e-3 * fp32.memory["params"]
    for key in ("activations", "backward_transient", "logits_and_loss", "runtime_reserve"):
        assert fp32.memory[key] == bf16.memory[key], key
    assert fp32.total_bytes > bf16.total_bytes


def test_auto_gradients_are_bf16_only_for_a_single_gpu_step_of_one_micro_batch():
    """The plan resolves grad_dtype "auto" per layout as ZeroOptimizer does: bf16 only where nothing is summed."""
    model = ModelConfig.from_preset("llemma-7b")
    grads = {}
    for gpus, grad_accum in [(1, 1), (1, 4), (8, 1)]:
        p, = plan(PlanRequest(model=model, model_name="7b", gpu=get_gpu("h100-80gb"), gpus=gpus, tp=1, micro_batch=1,
                              grad_accum=grad_accum, activation_checkpointing=True))
        grads[(gpus, grad_accum)] = p.shape.grad_dtype
    assert grads == {(1, 1): "bf16", (1, 4): "fp32", (8, 1): "fp32"}
    # the optimizer's memory traffic per element: 26 bytes + the norm's and AdamW's reads of the gradient
    times = {}
    for dtype in ("fp32", "bf16"):
        p, = plan(PlanRequest(model=model, model_name="7b", gpu=get_gpu("h100-80gb"), gpus=1, tp=1, micro_batch=1,
                              grad_accum=1, activation_checkpointing=True, grad_dtype=dtype))
        times[dtype] = p.time["optimizer"]
    assert times["fp32"] / times["bf16"] == pytest.approx(34 / 30, rel=1e-3)  # buckets' padding differs a little


def test_an_overlapped_optimizer_step_leaves_the_norm_and_the_first_buckets_update_exposed():
    """On one GPU the updates of all buckets but the embedding's hide behind the next forward; under DP their
    all-gathers follow them, and without overlap_param_gather the step waits for them, so nothing hides."""
    model = ModelConfig.from_preset("llemma-7b")

    def step(gpus, overlap_step, **kw):
        req = PlanRequest(model=model, model_name="7b", gpu=get_gpu("h100-80gb"), gpus=gpus, tp=1, micro_batch=1,
                          grad_accum=1, activation_checkpointing=True, bucket_mb=64, overlap_optimizer_step=overlap_step,
                          **kw)
        p = evaluate(req, 1, 1, True, False)
        return p.time, zero_layout_for(model, 1, gpus, p.shape.grad_dtype, 64)

    plain, layout = step(1, False)
    overlapped, _ = step(1, True)
    hbm = get_gpu("h100-80gb").hbm_gbs * 1e9
    first = layout.buckets[-1].end - layout.buckets[-1].start  # the embedding's bucket, the forward's first
    assert len(layout.buckets) > 10 and layout.slots[-1].name.endswith("embed_tokens.weight")
    norm, first_update = layout.shard_size * 2 / hbm, first * (26 + 2) / hbm  # bf16 gradients on one GPU
    assert overlapped["optimizer"] == pytest.approx(norm + first_update)
    assert plain["optimizer"] == pytest.approx(layout.shard_size * 30 / hbm) == overlapped["optimizer_unhidden"]
    assert plain["total"] - overlapped["total"] == pytest.approx(plain["optimizer"] - overlapped["optimizer"])

    dp_plain, dp_layout = step(8, False)
    dp_overlapped, _ = step(8, True)
    assert dp_overlapped["optimizer"] < dp_plain["optimizer"]
    assert dp_overlapped["dp_all_gather"] >= dp_plain["dp_all_gather"]  # the gathers wait for the updates
    assert dp_overlapped["total"] < dp_plain["total"]
    waits, _ = step(8, True, overlap_param_gather=False)
    assert waits["optimizer"] == pytest.approx(dp_plain["optimizer"])

    slow, _ = step(1, True, efficiency=1.0, seq_length=256)  # a forward too short to hide them: they add up
    slow_plain, _ = step(1, False, efficiency=1.0, seq_length=256)
    flops = model.flops_per_token(256)  # with checkpointing: the forward's share of the step's FLOPs
    forward = slow["compute"] * flops / 3 / hardware_flops_per_token(model, 256, True)
    assert forward < slow_plain["optimizer"] / 2
    assert slow["optimizer"] == pytest.approx(slow_plain["optimizer"] - forward)


def test_search_ranks_fitting_options_by_throughput():
    req = PlanRequest(model=ModelConfig.from_preset("llemma-7b"), model_name="llemma-7b", gpu=get_gpu("a100-40gb"),
                      gpus=256)
    plans = plan(req)
    assert len(plans) > 5 and all(p.fits for p in plans)
    speeds = [p.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    assert {p.shape.tp for p in plans} <= {1, 2, 4, 8}
    only_tp4 = plan(PlanRequest(model=req.model, model_name="x", gpu=req.gpu, gpus=256, tp=4))
    assert {p.shape.tp for p in only_tp4} == {4}


def test_search_offers_sequence_parallelism_only_where_tp_divides_the_sequence():
    """The model refuses SP when TP does not divide the sequence length: a search must not recommend it."""
    model = ModelConfig.from_preset("llemma-7b")
    for seq, sp in ((4095, None), (4094, True)):
        plans = plan(PlanRequest(model=model, model_name="7b", gpu=get_gpu("h100-80gb"), gpus=8, seq_length=seq,
                                 sequence_parallel=sp))
        assert all(seq % p.shape.tp == 0 for p in plans if p.shape.sequence_parallel)
        assert {p.shape.tp for p in plans if p.shape.sequence_parallel} == ({2} if seq == 4094 else set())


def test_a_job_that_leaves_its_last_node_partly_empty_is_planned():
    """8 GPUs at 3 per node (3 + 3 + 2): the plan counts no nodes, it asks only whether the job spans more than
    one (DP then runs over the inter-node network, each GPU its own NIC) and which TP sizes keep a group in one
    node (those dividing 3 and 8: TP 1)."""
    model = ModelConfig.from_preset("llemma-7b")

    def request(gpus_per_node):
        return PlanRequest(model=model, model_name="llemma-7b", gpu=get_gpu("h200"), gpus=8,
                           gpus_per_node=gpus_per_node)

    assert {p.shape.tp for p in plan(request(3))} == {1}
    three, four, eight = (evaluate(request(n), 1, 1, True, False).time for n in (3, 4, 8))
    assert three == four and three["dp_reduce_scatter_unhidden"] > eight["dp_reduce_scatter_unhidden"]


# ---- efficiency: measured where this project has measured it ------------------------------------------

def _bench_result(folder, date: str, device: str, mfus: list[float]) -> None:
    """A perf/results/train-DATE.md as perf/bench_train.py writes it (title, table; other rows too)."""
    rows = [f"| megamath | {i + 1} | 500.0 | 8,192 | 400.0 | {100 * m:.1f} % | 30.1 | 29.0 | 1.00 |"
            for i, m in enumerate(mfus)]
    (folder / f"train-{date}.md").write_text("\n".join([
        f"# Training step, {date}: {device}", "",
        f"torch 2.11; model: L 4, h 4096, heads 32/32, ffn 11008, vocab 32016, S 4096; 1 micro-batch(es) per optimizer "
        f"step; median of 10 steps after 3 warm-up; model FLOPs/token 6.05e+09 (causal attention halved, same for "
        f"every system); peak {989.0 if 'H100' in device else 312.0} TFLOP/s", "",
        "| system | micro-batch | step ms | tokens/s | model TFLOP/s | MFU | peak GiB | plan GiB | vs ours |",
        "|---|---|---|---|---|---|---|---|---|", *rows,
        "| hf-eager | 1 | 700.0 | 5,000 | 300.0 | 30.0 % | 40.0 |  | 1.40 |"]) + "\n")


def test_the_newest_step_measured_on_the_planned_gpu_sets_the_efficiency(tmp_path):
    _bench_result(tmp_path, "2026-12-02", "NVIDIA H100 80GB HBM3", [0.50, 0.54])
    _bench_result(tmp_path, "2026-12-05", "NVIDIA H100 80GB HBM3", [0.55, 0.57])
    _bench_result(tmp_path, "2026-12-09", "NVIDIA A100-SXM4-80GB", [0.61, 0.61])
    (tmp_path / "train-2026-12-10.md").write_text("# Training step, 2026-12-10: CPU smoke run: tiny model, fp32 -- "
                                                  "NOT a measurement\n\n| megamath | 2 | 3.7 | 1 | 0.0 | 99.0 % |\n")
    model = ModelConfig.from_preset("llemma-7b")

    def request(gpu, **kw):
        return PlanRequest(model=model, model_name="llemma-7b", gpu=get_gpu(gpu), gpus=8, tp=1, micro_batch=1,
                           activation_checkpointing=True, results_dir=tmp_path, **kw)

    h100 = request("h100-80gb")
    assert h100.efficiency == pytest.approx(0.56)  # the newest H100 file, median of its megamath rows
    assert h100.efficiency_source == "measured: megamath's MFU in train-2026-12-05.md on NVIDIA H100 80GB HBM3"
    assert request("a100-80gb").efficiency == pytest.approx(0.61)
    a100_40 = request("a100-40gb")  # an 80GB A100 is not a 40GB one
    assert a100_40.efficiency == get_gpu("a100-40gb").efficiency and a100_40.efficiency_source.startswith("stated")
    assert request("h200").efficiency_source.startswith("stated default")  # the CPU smoke file counts for nothing
    forced = request("h100-80gb", efficiency=0.3)
    assert (forced.efficiency, forced.efficiency_source) == (0.3, "--efficiency")
    (p,) = plan(h100)
    assert p.efficiency == pytest.approx(0.56)


# ---- the command --------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_config_file_and_json(capsys):
    code, out, _ = _cli(capsys, "--model", "examples/llemma_7b.yaml", "--gpu", "a100-40gb", "--gpus", "256",
                        "--tokens", "200e9", "--json")
    assert code == 0
    (p,) = json.loads(out)["plans"]
    assert (p["shape"]["tp"], p["shape"]["micro_batch"], p["shape"]["grad_accum"]) == (2, 4, 2)
    assert p["shape"]["activation_checkpointing"] and p["fits"]
    want, = plan(_llemma("7b"))
    assert p["memory_bytes"] == want.memory and p["gpu_hours"] == pytest.approx(want.gpu_hours)
    code, out, _ = _cli(capsys, "--model", "llemma-34b", "--gpu", "a100-40gb", "--gpus", "256", "--tp", "8",
                        "--micro-batch", "2", "--grad-accum", "16", "--activation-checkpointing",
                        "--sequence-parallel", "--tokens", "50e9")
    assert code == 0 and "fits," in out and "GPU-hours" in out and "gradient buffer (fp32)" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "llemma-7b", "--gpu", "v100", "--gpus", "8"],
     "unknown GPU 'v100'; choose one of a100-40gb, a100-80gb, h100-80gb, h200"),
    (["--model", "llemma-7b", "--gpu", "a100-40gb", "--gpus", "8", "--tp", "3"],
     "tensor-parallel size 3 does not divide num_heads 32"),
    (["--model", "llemma-7b", "--gpu", "a100-40gb", "--gpus", "256", "--micro-batch", "512"],
     "micro-batch 512 of llemma-7b does not fit on a100-40gb at any TP size: the smallest needs "),
    (["--model", "llemma-13b", "--gpu", "a100-40gb", "--gpus", "8"], "unknown model preset 'llemma-13b'"),
    (["--model", "llemma-7b", "--gpu", "a100-40gb", "--gpus", "8", "--tp", "2", "--micro-batch", "1",
      "--sequence-parallel", "--seq-length", "4095"], "--seq-length 4095 is not divisible by --tp 2: "),
    (["--model", "llemma-7b", "--gpu", "a100-40gb", "--gpus", "8", "--results", "no/such/folder"],
     "--results no/such/folder: no such folder"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"megamath plan: error: {message}") and err.count("\n") == 1, err


def test_cli_results_folder_gives_the_measured_efficiency(tmp_path, capsys):
    """An installed package has no checkout's perf/results: --results names where the measurements are."""
    _bench_result(tmp_path, "2026-12-05", "NVIDIA H100 80GB HBM3", [0.55, 0.57])
    argv = ["--model", "llemma-7b", "--gpu", "h100-80gb", "--gpus", "8", "--tp", "1", "--micro-batch", "1"]
    code, out, _ = _cli(capsys, *argv, "--results", str(tmp_path))
    assert code == 0 and "measured: megamath's MFU in train-2026-12-05.md on NVIDIA H100 80GB HBM3" in out
    code, out, _ = _cli(capsys, *argv)
    assert code == 0 and "stated default" in out and "measured:" not in out


def _readme_plan_transcripts() -> list[tuple[list[str], list[str]]]:
    """(argv, printed lines) of each `$ megamath plan ...` transcript in the README (which leaves out the
    assumptions line, and a search's itemised plan after its ranking)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme, re.S):
        for transcript in re.split(r"^(?=\$ megamath plan )", block, flags=re.M):
            if transcript.startswith("$ megamath plan "):
                command, *printed = transcript.rstrip("\n").split("\n")
                out.append((command.split()[3:], printed))
    return out


@pytest.mark.parametrize("argv, printed", _readme_plan_transcripts())
def test_the_readmes_plans_are_what_the_command_prints(capsys, argv, printed):
    code, out, _ = _cli(capsys, *argv)
    assert code == 0
    assert out.splitlines()[:len(printed)] == printed


def test_the_readme_shows_plans():
    assert len(_readme_plan_transcripts()) == 3
