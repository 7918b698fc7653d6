"""ZeRO-1 against torch.optim.AdamW on one process: same weights after several clipped, accumulated steps.

Two gloo ranks each see half of every batch (in two micro-batches); the serial run sees the whole batch
with the mean loss, so both average the same gradient. The model is fp32 so the comparison is tight.
One launch runs every multi-rank check; the tests below read what it wrote.
"""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from distributed import native_collectives_supported, run_distributed
from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.parallel import mappings
from megamath.parallel.grad_clip import clip_coefficient
from megamath.parallel.state import ParallelState
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.zero import StepResult, ZeroOptimizer
from megamath.parallel.zero_layout import ALIGN, resolve_grad_dtype

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=48,
                    max_seq_length=16, kernels="reference")
BATCH, SEQ = 8, 8
LRS = [1e-2, 8e-3, 6e-3, 5e-3, 4e-3, 3e-3]  # a schedule: step() takes the lr of each step
HP = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
CLIP = 1.13  # the tiny model's norms are 1.10-1.15: some steps are clipped, some not
STEPS = 4
TP_CLIP = 0.1


def make_model(dtype=torch.float32) -> Llama:
    torch.manual_seed(0)
    return Llama(MODEL).to(dtype)


def batch(step: int):
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    return tokens[:, :-1], tokens[:, 1:]


def serial_adamw(steps: int, clip: float = CLIP, model: Llama | None = None):
    """The reference: torch.optim.AdamW with the model's param_groups and clip_grad_norm_ (full batch)."""
    model = model or make_model()
    opt = torch.optim.AdamW(model.param_groups(HP["weight_decay"]), lr=LRS[0], betas=(HP["beta1"], HP["beta2"]),
                            eps=HP["eps"], foreach=False)
    norms = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        opt.step()
    return model, norms


def zero_train(model, opt: ZeroOptimizer, steps, dp_rank, dp_size, start=0, micro=2) -> list[StepResult]:
    """Steps start..start+steps-1 on this rank's rows of each batch, in `micro` micro-batches."""
    results = []
    rows = BATCH // dp_size
    for step in range(start, start + steps):
        x, y = (t[dp_rank * rows:(dp_rank + 1) * rows] for t in batch(step))
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            (model(xm, ym)[1] / micro).backward()
        results.append(opt.step(LRS[step]))
    return results


def zero_config(**overrides) -> OptimizerConfig:
    return OptimizerConfig(**{**dict(lr=LRS[0], clip_grad=CLIP, grad_dtype="fp32", **HP), **overrides})


# ---- the multi-rank worker ---------------------------------------------------------------------------


def _worker(rank, world_size, out_dir):
    state = ParallelState.from_env(1)
    modes = ("portable", "native") if native_collectives_supported(state.dp_group) else ("portable",)
    for mode in modes:  # native: the in-place reduce-scatter / all-gather path of NCCL runs, here on gloo
        os.environ[mappings.COLLECTIVES_ENV] = mode  # this process only: the test's own worker
        for bucket_mb in (0.0, 0.004):  # one in-place collective; ~20 buckets of ~1,000 elements
            model = make_model()
            opt = ZeroOptimizer(model, state, zero_config(), bucket_mb=bucket_mb)
            results = zero_train(model, opt, STEPS, state.dp_rank, state.dp_size)
            torch.save({"params": model.state_dict(), "results": [dataclasses.asdict(r) for r in results]},
                       out_dir / f"dp-{mode}-{bucket_mb}-{rank}.pt")
    os.environ.pop(mappings.COLLECTIVES_ENV)
    _nan_skip(opt, model, state, out_dir)
    _bf16(state, out_dir)
    _tp_norm(ParallelState.from_env(2), out_dir)


def _nan_skip(opt, model, state, out_dir):
    """A NaN on rank 1 only, in an element of rank 1's shard: rank 0 must learn of it through the norm."""
    opt.zero_grad()
    x, y = batch(10)
    model(x, y)[1].backward()
    if state.dp_rank == 1:
        opt.flat_grad[opt.numel - 1] = float("nan")
    before = [t.clone() for t in (opt.master, opt.exp_avg, opt.exp_avg_sq, opt.flat_param)]
    skipped = opt.step(1e-2)
    after = [opt.master, opt.exp_avg, opt.exp_avg_sq, opt.flat_param]
    unchanged = [torch.equal(a, b) for a, b in zip(before, after)]
    step_after_skip = opt.step_count
    opt.zero_grad()
    model(x, y)[1].backward()
    normal = opt.step(1e-2)
    torch.save({"skipped": dataclasses.asdict(skipped), "unchanged": unchanged, "step_after_skip": step_after_skip,
                "normal": dataclasses.asdict(normal), "step_after_normal": opt.step_count},
               out_dir / f"nan-{state.rank}.pt")


def _bf16(state, out_dir):
    """bf16 model: after the all-gather every bf16 weight is its fp32 master rounded to bf16."""
    report = {}
    for grad_dtype in ("bf16", "fp32"):
        model = make_model(torch.bfloat16)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = ZeroOptimizer(model, state, zero_config(grad_dtype=grad_dtype))
        zero_train(model, opt, 2, state.dp_rank, state.dp_size)
        masters = [torch.empty_like(opt.master) for _ in range(state.dp_size)]
        dist.all_gather(masters, opt.master, group=state.dp_group)
        full_master = torch.cat(masters)  # (dp·S,) fp32
        report[grad_dtype] = dict(
            flat_param=opt.flat_param.clone(), full_master=full_master, grad_dtype=opt.flat_grad.dtype,
            params={n: p.detach().clone() for n, p in model.named_parameters()}, initial=initial,
            offsets={s.name: (s.offset, s.numel) for s in opt.slots})
    torch.save(report, out_dir / f"bf16-{state.rank}.pt")


def tp_grads(tp_rank):
    """Gradients of the TP check: a split (TP-marked) weight differs per rank, the replicated one does not."""
    split = torch.arange(12, dtype=torch.float32).view(3, 4) * 0.1 - 0.3 * tp_rank  # (3, 4)
    replicated = torch.linspace(-1.0, 2.0, 5)  # (5,)
    return split, replicated


def _tp_norm(state, out_dir):
    module = nn.Module()
    module.split = nn.Parameter(torch.ones(3, 4))
    module.norm = nn.Parameter(torch.ones(5))
    opt = ZeroOptimizer(module, state, OptimizerConfig(lr=0.1, clip_grad=TP_CLIP), split_names={"split"})
    g_split, g_repl = tp_grads(state.tp_rank)
    ((module.split * g_split).sum() + (module.norm * g_repl).sum()).backward()
    result = opt.step(0.1)
    # A non-finite replicated gradient on TP rank 1 only: both TP ranks must skip.
    opt.zero_grad()
    ((module.split * g_split).sum() + (module.norm * g_repl).sum()).backward()
    if state.tp_rank == 1:
        opt.flat_grad[opt.numel - 1] = float("inf")  # the last parameter element (padding follows)
    skipped = opt.step(0.1)
    torch.save({"first": dataclasses.asdict(result), "inf": dataclasses.asdict(skipped)},
               out_dir / f"tp-{state.rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("zero")
    run_distributed(_worker, 2, out_dir)
    return out_dir


# ---- tests -------------------------------------------------------------------------------------------


def _assert_params_close(got: dict, want: nn.Module, what: str):
    """rtol 1e-5, atol 1e-6 = 1e-4 · lr: the DP sum adds in another order than the serial backward, and
    Adam's m / sqrt(v) turns a last-bit gradient difference into up to ~5e-7 where a gradient is near 0."""
    for name, p in want.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("mode", ["portable", "native"])
@pytest.mark.parametrize("bucket_mb", [0.0, 0.004])
def test_two_ranks_match_serial_adamw(two_ranks, bucket_mb, mode):
    """Weight decay on matrices only, clipping active on some steps, 2 micro-batches, a varying lr."""
    if not (two_ranks / f"dp-{mode}-{bucket_mb}-0.pt").exists():
        pytest.skip("this torch's gloo has no single-tensor reduce-scatter; the portable path is tested")
    serial, norms = serial_adamw(STEPS)
    for rank in range(2):
        saved = torch.load(two_ranks / f"dp-{mode}-{bucket_mb}-{rank}.pt")
        _assert_params_close(saved["params"], serial, f"rank {rank} {mode} bucket_mb {bucket_mb}")
        got_norms = [r["grad_norm"] for r in saved["results"]]
        torch.testing.assert_close(torch.tensor(got_norms), torch.tensor(norms), rtol=1e-5, atol=0)
        coefs = [r["clip_coef"] for r in saved["results"]]
        assert coefs == [clip_coefficient(torch.tensor(n), CLIP).item() for n in got_norms]  # fp32, on the device
        assert any(c < 1.0 for c in coefs) and any(c == 1.0 for c in coefs), coefs  # both regimes were hit
        assert not any(r["skipped"] for r in saved["results"])


def test_nan_on_one_rank_skips_on_every_rank(two_ranks):
    for rank in range(2):
        saved = torch.load(two_ranks / f"nan-{rank}.pt")
        skipped = saved["skipped"]
        assert skipped["skipped"] and skipped["clip_coef"] == 0.0
        assert torch.tensor(skipped["grad_norm"]).isnan()
        assert saved["unchanged"] == [True, True, True, True], "master, exp_avg, exp_avg_sq, params"
        assert saved["step_after_skip"] == STEPS
        assert not saved["normal"]["skipped"] and saved["step_after_normal"] == STEPS + 1


@pytest.mark.parametrize("grad_dtype", ["bf16", "fp32"])
def test_bf16_params_are_rounded_masters(two_ranks, grad_dtype):
    reports = [torch.load(two_ranks / f"bf16-{rank}.pt")[grad_dtype] for rank in range(2)]
    assert reports[0]["grad_dtype"] == {"bf16": torch.bfloat16, "fp32": torch.float32}[grad_dtype]
    full_master = reports[0]["full_master"]
    assert torch.equal(full_master, reports[1]["full_master"])
    for rank, report in enumerate(reports):
        assert report["flat_param"].dtype == torch.bfloat16
        assert torch.equal(report["flat_param"], full_master.to(torch.bfloat16)), f"rank {rank}"
        for name, (offset, numel) in report["offsets"].items():
            param = report["params"][name]
            assert torch.equal(param.flatten(), full_master[offset:offset + numel].to(torch.bfloat16)), name
            if name == "lm_head.weight":
                assert not torch.equal(param, report["initial"][name]), "the step changed nothing"


def test_tp_norm_counts_split_weights_per_rank_and_replicated_once(two_ranks):
    split0, repl = tp_grads(0)
    split1, _ = tp_grads(1)
    want = (split0.square().sum() + split1.square().sum() + repl.square().sum()).sqrt().item()
    for rank in range(2):
        saved = torch.load(two_ranks / f"tp-{rank}.pt")
        result = saved["first"]
        assert result["grad_norm"] == pytest.approx(want, rel=1e-6)
        assert result["clip_coef"] == pytest.approx(TP_CLIP / (want + 1e-6), rel=1e-6)
        assert saved["inf"]["skipped"], f"TP rank {rank} did not skip an inf on TP rank 1"


# ---- one process -------------------------------------------------------------------------------------


def test_single_process_matches_serial_adamw():
    """dp = 1 (ParallelState.single()): no collectives, the same update as torch's."""
    serial, norms = serial_adamw(STEPS)
    model = make_model()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config())
    results = zero_train(model, opt, STEPS, 0, 1)
    _assert_params_close(dict(model.named_parameters()), serial, "single")
    torch.testing.assert_close(torch.tensor([r.grad_norm for r in results]), torch.tensor(norms), rtol=1e-5, atol=0)


def test_a_false_finite_flag_skips_on_the_device_and_leaves_the_next_step_exact():
    """launch_step(finite=False) (the loop's non-finite loss) updates nothing, and finish_step takes the step
    count back, so the next update equals that of a run which never saw the skipped step."""
    def one_step(model, opt, finite):
        opt.zero_grad()
        x, y = batch(0)
        model(x, y)[1].backward()
        flag = None if finite is None else torch.tensor(finite)
        return opt.finish_step(opt.launch_step(LRS[0], finite=flag).tolist())

    model, plain = make_model(), make_model()
    opt, plain_opt = ZeroOptimizer(model, ParallelState.single(), zero_config()), \
        ZeroOptimizer(plain, ParallelState.single(), zero_config())
    before = [t.clone() for t in (opt.master, opt.exp_avg, opt.exp_avg_sq, opt.flat_param)]
    skipped = one_step(model, opt, False)
    assert skipped.skipped and skipped.clip_coef == 0.0 and skipped.grad_norm > 0 and opt.step_count == 0
    for a, b in zip(before, (opt.master, opt.exp_avg, opt.exp_avg_sq, opt.flat_param)):
        assert torch.equal(a, b)
    applied, want = one_step(model, opt, True), one_step(plain, plain_opt, None)
    assert not applied.skipped and opt.step_count == 1
    assert applied == want
    assert torch.equal(opt.flat_param, plain_opt.flat_param) and torch.equal(opt.exp_avg_sq, plain_opt.exp_avg_sq)


def test_clipping_off_matches_unclipped_adamw():
    serial, _ = serial_adamw(2, clip=float("inf"))
    model = make_model()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config(clip_grad=0))
    results = zero_train(model, opt, 2, 0, 1)
    assert [r.clip_coef for r in results] == [1.0, 1.0]
    _assert_params_close(dict(model.named_parameters()), serial, "no clip")


def test_grad_norm_of_millions_of_elements_is_exact_to_fp32():
    """A long fp32 accumulation on CPU drifts by ~1e-4 relative at this size; the norm must not."""
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(4_000_000))
    opt = ZeroOptimizer(module, ParallelState.single(), OptimizerConfig(clip_grad=0.0))
    grad = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    (module.weight * grad).sum().backward()
    want = grad.double().norm().item()
    assert abs(opt.step(0.0).grad_norm - want) <= 1e-6 * want


def test_layout_views_and_padding():
    model = make_model()
    state = dataclasses.replace(ParallelState.single(), dp_size=3, dp_rank=2)  # layout only: no step
    opt = ZeroOptimizer(model, state, zero_config(), model.split_parameter_names(), bucket_mb=0.004)
    numel = sum(p.numel() for p in model.parameters())
    assert opt.numel == numel and len(opt.buckets) > 3
    names = [n for n, _ in model.named_parameters()]
    assert [s.name for s in opt.slots] == names[::-1], "backward order: lm_head first, embed_tokens last"
    for a, b in zip(opt.buckets, opt.buckets[1:]):
        assert a.end == b.start and (a.end - a.start) % (3 * ALIGN) == 0
    assert opt.padded_numel == opt.buckets[-1].end and opt.padded_numel - numel < len(opt.buckets) * 3 * ALIGN
    assert opt.master.numel() == opt.shard_size == opt.padded_numel // 3 and opt.master.dtype == torch.float32
    for b, (f0, f1, s0) in zip(opt.buckets, opt.pieces):  # rank 2 owns the last third of every bucket
        assert (f0, f1) == (b.start + 2 * (b.end - b.start) // 3, b.end) and s0 == b.shard_offset
    params = dict(model.named_parameters())
    for slot in opt.slots:
        p = params[slot.name]
        assert p.data_ptr() == opt.flat_param[slot.offset:].data_ptr(), slot.name
        assert slot.decay == (p.dim() >= 2)
        bucket = opt.buckets[slot.bucket]
        assert bucket.start <= slot.offset and slot.offset + slot.numel <= bucket.end, "a parameter is never split"
    # The ranges tile the rank's parameter elements; each element's (decay, TP) is its parameter's.
    owned = sum(max(0, min(s.offset + s.numel, f1) - max(s.offset, f0))
                for s in opt.slots for f0, f1, _ in [opt.pieces[s.bucket]])
    assert sum(r.end - r.start for r in opt.ranges) == owned
    for r in opt.ranges:
        for slot in opt.slots:
            if r.flat.start < slot.offset + slot.numel and slot.offset < r.flat.stop:
                split = slot.name in model.split_parameter_names()
                assert (r.decay, r.tensor_parallel) == (params[slot.name].dim() >= 2, split), slot.name


def test_gradients_accumulate_into_the_flat_buffer():
    model = make_model()
    reference = make_model()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config())
    x, y = batch(0)
    for _ in range(2):
        model(x, y)[1].backward()
        reference(x, y)[1].backward()
    ref = dict(reference.named_parameters())
    for slot in opt.slots:
        assert dict(model.named_parameters())[slot.name].grad is None, "the hook frees p.grad"
        got = opt.flat_grad[slot.offset:slot.offset + slot.numel]
        torch.testing.assert_close(got, ref[slot.name].grad.flatten(), rtol=0, atol=0, msg=slot.name)
    opt.zero_grad()
    assert all(not opt.grad_view(p).any() for p in model.parameters())


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b: bool):
        y = self.a(x)
        return (self.b(y) if use_b else y).square().sum()


@pytest.mark.parametrize("read_first", [True, False])
def test_a_gradient_that_does_not_arrive_counts_as_zero(read_first):
    """zero_grad() writes nothing: each parameter's first gradient overwrites its slot. A parameter left out
    of the next backward must count as zero, not as the last step's gradient: in grad_view, and in the
    step's norm whether or not anything read the buffer first."""
    model, reference = _TwoBranches(), _TwoBranches()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config(clip_grad=0.0))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    model(x, True).backward()  # every slot now holds a gradient
    opt.zero_grad()
    model(x, False).backward()  # b's gradients do not arrive
    reference(x, False).backward()
    if read_first:
        assert not opt.grad_view(model.b.weight).any() and not opt.grad_view(model.b.bias).any()
        assert torch.equal(opt.grad_view(model.a.weight), reference.a.weight.grad)
    result = opt.step(1e-3)
    want = torch.cat([reference.a.weight.grad.flatten(), reference.a.bias.grad]).norm()
    assert result.grad_norm == pytest.approx(want.item(), rel=1e-6)


def test_the_first_gradient_after_zero_grad_overwrites_the_slot_exactly():
    """The hook's copy for the first micro-batch, its add for the next: bit-identical to summing autograd's bf16
    gradients into zeros (without gradient-accumulation fusion, which keeps the products' fp32 bits:
    test_grad_into_buffer.py)."""
    model, reference = make_model(torch.bfloat16), make_model(torch.bfloat16)
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config(gradient_accumulation_fusion=False))
    for window in range(2):
        opt.zero_grad()
        reference.zero_grad(set_to_none=True)
        sums = {n: torch.zeros(p.shape) for n, p in reference.named_parameters()}  # fp32, as the buffer
        for micro in range(2):
            x, y = batch(10 * window + micro)
            model(x, y)[1].backward()
            reference(x, y)[1].backward()
            for n, p in reference.named_parameters():
                sums[n] += p.grad.float()
                p.grad = None
        for n, p in model.named_parameters():
            assert torch.equal(opt.grad_view(p), sums[n]), (window, n)


def test_moved_model_is_refused():
    model = make_model()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config())
    model.double()
    with pytest.raises(RuntimeError, match=r"^ZeroOptimizer: parameter lm_head.weight no longer lives in the "
                                           r"optimizer's flat buffer \(was the model moved or cast"):
        opt.step(1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match=r"^OptimizerConfig.grad_dtype must be one of auto, bf16, fp32, got 'fp16'$"):
        OptimizerConfig(grad_dtype="fp16")
    with pytest.raises(ValueError, match=r"^OptimizerConfig.beta2 must be in \[0, 1\), got 1.0$"):
        OptimizerConfig(beta2=1.0)
    with pytest.raises(ValueError, match=r"^OptimizerConfig.clip_grad must be a number >= 0, got -1$"):
        OptimizerConfig(clip_grad=-1)
    with pytest.raises(ValueError, match=r"^ZeroOptimizer: all parameters must share one dtype and device"):
        mixed = nn.Module()
        mixed.a = nn.Parameter(torch.ones(2))
        mixed.b = nn.Parameter(torch.ones(2, dtype=torch.float64))
        ZeroOptimizer(mixed, ParallelState.single(), OptimizerConfig())


@pytest.mark.parametrize("weights, micro_batches, want", [
    (torch.bfloat16, 1, "bf16"),     # one bf16 gradient per slot and step: bf16 holds it exactly
    (torch.bfloat16, None, "fp32"),  # the count unknown: micro-batches may be summed
    (torch.bfloat16, 2, "fp32"),     # two micro-batches are summed
    (torch.float32, 1, "fp32"),      # fp32 gradients would be rounded
])
def test_auto_grad_dtype_is_bf16_only_where_nothing_is_summed(weights, micro_batches, want):
    model = make_model(weights)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names(),
                        micro_batches=micro_batches)
    assert opt.grad_dtype == want and opt.flat_grad.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[want]
    assert resolve_grad_dtype("auto", True, 2, 1, 1) == "fp32"  # the DP reduce-scatter sums
    assert resolve_grad_dtype("auto", True, 1, 2, 1) == "fp32"  # sequence parallelism sums over TP
    assert resolve_grad_dtype("bf16", False, 4, 2, None) == "bf16"  # an explicit setting stands
    assert resolve_grad_dtype("fp32", True, 1, 1, 1) == "fp32"


def test_auto_bf16_buffer_steps_exactly_as_an_fp32_buffer():
    """bf16 weights, one micro-batch, one process: the bf16 buffer auto picks gives the losses, norms, master
    weights and moments of an fp32 buffer holding autograd's bf16 gradients bit for bit (clipping active: the norm
    feeds every update). With gradient-accumulation fusion an fp32 buffer holds more: the products' fp32 bits."""
    runs = {}
    for grad_dtype in ("auto", "fp32"):
        model = make_model(torch.bfloat16)
        config = zero_config(grad_dtype=grad_dtype, clip_grad=0.5, gradient_accumulation_fusion=False)
        opt = ZeroOptimizer(model, ParallelState.single(), config, model.split_parameter_names(), micro_batches=1)
        results = zero_train(model, opt, STEPS, 0, 1, micro=1)
        assert all(r.clip_coef < 1 for r in results)
        runs[grad_dtype] = (opt.flat_grad.dtype, [dataclasses.astuple(r) for r in results],
                            opt.master, opt.exp_avg, opt.exp_avg_sq, opt.flat_param)
    auto, fp32 = runs["auto"], runs["fp32"]
    assert (auto[0], fp32[0]) == (torch.bfloat16, torch.float32)
    assert auto[1] == fp32[1]
    for a, b in zip(auto[2:], fp32[2:]):
        assert torch.equal(a, b)


def test_a_second_micro_batch_into_an_auto_bf16_buffer_is_refused():
    model = make_model(torch.bfloat16)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names(),
                        micro_batches=1)
    x, y = batch(0)
    opt.zero_grad()
    model(x, y)[1].backward()
    with pytest.raises(RuntimeError, match=r"^ZeroOptimizer: a second gradient of lm_head.weight in one step, but "
                                           r"grad_dtype auto chose a bf16 buffer for one micro-batch per step"):
        model(x, y)[1].backward()
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match=rf"^ZeroOptimizer: micro_batches must be an integer >= 1 or None, "
                                             rf"got {bad!r}$"):
            ZeroOptimizer(make_model(), ParallelState.single(), OptimizerConfig(), micro_batches=bad)


DECOUPLED_LRS = [3e-2, 2e-2, 1e-2, 5e-3, 4e-3, 3e-3]  # optimizer.decoupled_lr's schedule (--decoupled-lr)


@pytest.mark.parametrize("bucket_mb, overlap", [(0.0, False), (0.004, True)])
def test_decoupled_parameters_step_at_their_own_learning_rate(bucket_mb, overlap):
    """The embedding and the LM head at decoupled_lr, the rest at lr: torch's AdamW with them in a group of their
    own (weight-decayed, as matrices are), whether the update runs whole or bucket by bucket."""
    decoupled = ("embed_tokens.weight", "lm_head.weight")
    reference = make_model()
    params = dict(reference.named_parameters())
    groups = [{"params": [p for n, p in params.items() if n not in decoupled and p.ndim >= 2],
               "weight_decay": HP["weight_decay"]},
              {"params": [p for n, p in params.items() if p.ndim < 2], "weight_decay": 0.0},
              {"params": [params[n] for n in decoupled], "weight_decay": HP["weight_decay"]}]
    opt = torch.optim.AdamW(groups, lr=LRS[0], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], foreach=False)
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        reference(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        for i, group in enumerate(opt.param_groups):
            group["lr"] = DECOUPLED_LRS[step] if i == 2 else LRS[step]
        opt.step()
    model = make_model()
    zero = ZeroOptimizer(model, ParallelState.single(), zero_config(decoupled_lr=DECOUPLED_LRS[0]),
                         decoupled_names=decoupled, bucket_mb=bucket_mb, overlap_optimizer_step=overlap)
    assert any(r.decoupled for r in zero.ranges) and not all(r.decoupled for r in zero.ranges)
    for step in range(STEPS):
        x, y = batch(step)
        zero.zero_grad()
        for xm, ym in zip(x.chunk(2), y.chunk(2)):
            (model(xm, ym)[1] / 2).backward()
        zero.step(LRS[step], decoupled_lr=DECOUPLED_LRS[step])
    zero.finish_param_sync()
    _assert_params_close(dict(model.named_parameters()), reference, f"decoupled bucket_mb {bucket_mb}")
    plain = make_model()  # and the decoupled lr does move them: without it they end elsewhere
    plain_opt = ZeroOptimizer(plain, ParallelState.single(), zero_config())
    zero_train(plain, plain_opt, STEPS, 0, 1)
    assert not torch.allclose(dict(plain.named_parameters())["embed_tokens.weight"],
                              dict(model.named_parameters())["embed_tokens.weight"])


def test_decoupled_names_must_name_parameters():
    with pytest.raises(ValueError, match="decoupled_names names no trainable parameter of the model: embed.weight"):
        ZeroOptimizer(make_model(), ParallelState.single(), zero_config(), decoupled_names=["embed.weight"])


def test_the_norm_sums_touching_ranges_in_one_launch(monkeypatch):
    """The gradient norm does not need the decay or learning-rate runs: ranges that touch in the buffer are
    summed in one launch (one bucket at DP 1: all of them), covering exactly the ranges' elements; under TP the
    split and replicated runs stay apart, since only the split squares are summed over TP."""
    from megamath.parallel import zero

    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1,
                         ffn_hidden_size=48, max_seq_length=16, kernels="reference")
    model = Llama(config)
    opt = ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(clip_grad=1.0), model.split_parameter_names())
    assert len(opt.ranges) > 10 and len(opt._norm_runs) == 1
    (flat, _), = opt._norm_runs
    assert (flat.start, flat.stop) == (opt.ranges[0].flat.start, opt.ranges[-1].flat.stop)
    assert sum(r.flat.stop - r.flat.start for r in opt.ranges) == flat.stop - flat.start  # no gap, no padding
    calls = []
    real = zero._sum_of_squares_fn
    monkeypatch.setattr(zero, "_sum_of_squares_fn", lambda device: lambda x: calls.append(x.numel()) or real(device)(x))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    opt.zero_grad(1)
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    grads = torch.cat([opt.grad_view(p).flatten() for p in model.parameters()]).double()
    result = opt.step(1e-3)
    assert calls == [flat.stop - flat.start]
    assert result.grad_norm == pytest.approx(grads.norm().item(), rel=1e-6)

    opt.state = dataclasses.replace(opt.state, tp_group=object())  # as under TP: flags kept apart
    runs = opt._runs_for_the_norm()
    assert len(runs) > 1 and all(a[1] != b[1] for a, b in zip(runs, runs[1:]))
    assert runs[0][0].start == flat.start and runs[-1][0].stop == flat.stop
    opt.remove_hooks()
