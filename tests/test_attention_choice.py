"""model.attention: SDPA behind the flash_attention signature equals the reference; `auto` settles once."""
import dataclasses
import os

import pytest
import torch

from megamath.model import Llama, ModelConfig
from megamath.model.attention import (SDPA_BACKENDS, QKVLayout, choose_attention, projection_attention_step, race,
                                      sdpa_attention, sdpa_backend_attention, with_attention)
from megamath.model.ops import get_ops, load_ops
from megamath.kernels.flash_attention import flash_attention_ref
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from test_fused_linear import _Cats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run: the GPU check compiles these
CONFIG = ModelConfig(vocab_size=64, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, ffn_hidden_size=64,
                     max_seq_length=32, kernels="reference")


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_sdpa_matches_the_reference_forward_and_backward(kv_heads):
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(2, 13, 6, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 13, kv_heads, 8, generator=g, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 13, 6, 8, generator=g)
    grads = []
    for attend in (flash_attention_ref, sdpa_attention):
        out = attend(q, k, v, causal=True)
        grads.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_model_with_sdpa_equals_the_reference_model():
    torch.manual_seed(0)
    model = Llama(CONFIG)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = model(tokens)
    model.attention = "sdpa"
    torch.testing.assert_close(model(tokens), ours, rtol=1e-5, atol=1e-5)
    sdpa_model = Llama(dataclasses.replace(CONFIG, attention="sdpa"))
    assert sdpa_model.attention == "sdpa"


def test_sdpa_pinned_to_a_backend_is_sdpa_or_refuses():
    """`auto` may settle on one SDPA backend; pinned, it computes what SDPA computes, and a backend that cannot
    take the inputs (on this CPU: cuDNN and memory-efficient attention) raises instead of falling back."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 13, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    dout = torch.randn(2, 13, 4, 16, generator=g)
    want = torch.autograd.grad(sdpa_attention(q, k, v), (q, k, v), dout)
    pinned = sdpa_backend_attention("sdpa-flash")
    for got, ref in zip(torch.autograd.grad(pinned(q, k, v), (q, k, v), dout), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for name in ("sdpa-cudnn", "sdpa-efficient"):
        with pytest.raises(RuntimeError):
            sdpa_backend_attention(name)(q, k, v)
    assert sdpa_backend_attention("sdpa-cudnn") is sdpa_backend_attention("sdpa-cudnn")  # one per backend
    ops = get_ops("reference", "cpu")
    assert with_attention(ops, "sdpa-flash").flash_attention is pinned
    with pytest.raises(ValueError, match=r"^model.attention must be one of auto, megamath, sdpa \(settled: also "
                                         r"sdpa-flash, sdpa-cudnn, sdpa-efficient\), got 'sdpa-math'$"):
        with_attention(ops, "sdpa-math")
    model = Llama(CONFIG)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = model(tokens)
    model.attention = "sdpa-flash"  # as a run settled on it
    torch.testing.assert_close(model(tokens), ours, rtol=1e-5, atol=1e-5)


def test_the_race_times_each_sdpa_backend_and_skips_those_that_cannot_run(monkeypatch):
    """Our kernel and each SDPA backend on its own; a backend that cannot take the inputs is named as skipped, and
    cuDNN (a non-deterministic backward) is not tried under deterministic algorithms."""
    times = {"megamath": 2.0, "sdpa-flash": 1.5}
    ran = []

    def time_ms(step):
        step()  # raises for a backend that cannot run
        name = next(n for n in times if n not in ran)
        ran.append(name)
        return times[name]

    timings, detail = race(get_ops("reference", "cpu"), (1, 16, 4, 2, 16), torch.float32, torch.device("cpu"),
                           QKVLayout((2, 1, 0), False), time_ms)
    assert timings == times and set(SDPA_BACKENDS) == {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient"}
    assert detail.startswith("megamath 2.000 ms, sdpa-flash 1.500 ms, sdpa-cudnn skipped (No ")
    assert "sdpa-efficient skipped (No " in detail and "This is likely" not in detail  # its first sentence only
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    ran.clear()
    _, detail = race(get_ops("reference", "cpu"), (1, 16, 4, 2, 16), torch.float32, torch.device("cpu"),
                     QKVLayout(), time_ms)
    assert "sdpa-cudnn skipped (its backward is not deterministic)" in detail


def test_a_backend_that_computes_something_else_is_rejected_untimed(monkeypatch):
    """A backend that accepts inputs it gets wrong must never win the race by being fast."""
    from megamath.model import attention

    real = attention.sdpa_backend_attention
    monkeypatch.setattr(attention, "sdpa_backend_attention", lambda name: (
        (lambda q, k, v, causal=True: 1.05 * real(name)(q, k, v, causal)) if name == "sdpa-flash" else real(name)))
    timed = []
    timings, detail = race(get_ops("reference", "cpu"), (1, 16, 4, 2, 16), torch.float32, torch.device("cpu"),
                           QKVLayout(), lambda step: timed.append(step) or 1.0)
    assert timings == {"megamath": 1.0} and len(timed) == 1
    assert "sdpa-flash rejected (its results differ from megamath's)" in detail


def test_choice_rules_and_errors():
    ops = get_ops("reference", "cpu")
    assert with_attention(ops, "sdpa").flash_attention is sdpa_attention
    assert with_attention(ops, "auto") is ops and with_attention(ops, "megamath") is ops
    cpu = torch.device("cpu")
    auto = choose_attention("auto", ops, (1, 8, 2, 1, 8), torch.float32, cpu)
    assert (auto.attention, auto.timings_ms) == ("megamath", {}) and "nothing to time off a GPU" in auto.reason
    assert choose_attention("sdpa", ops, (1, 8, 2, 1, 8), torch.float32, cpu).attention == "sdpa"
    with pytest.raises(ValueError, match=r"^ModelConfig.attention must be one of auto, megamath, sdpa, got 'flash'$"):
        ModelConfig(attention="flash")


def test_auto_takes_sdpa_for_a_shape_our_kernel_refuses(monkeypatch):
    # Decided from the shape alone, before any GPU work: this runs on a CPU too, and on a GPU machine, where
    # TRITON_INTERPRET is unset (the kernel modules are imported first, as this session runs them).
    load_ops("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops, gpu = get_ops("triton", "cuda"), torch.device("cuda")  # resolving the table touches no GPU
    choice = choose_attention("auto", ops, (1, 256, 4, 2, 80), torch.bfloat16, gpu)
    assert (choice.attention, choice.timings_ms, choice.tiles) == ("sdpa", {}, None)
    assert choice.reason == ("attention: sdpa (auto: our kernel does not take this shape: flash_attention: head_dim 80 "
                             "is not supported; use one of (16, 32, 64, 128))"), choice.reason
    with pytest.raises(ValueError, match="^flash_attention: head_dim 80 is not supported"):
        choose_attention("megamath", ops, (1, 256, 4, 2, 80), torch.bfloat16, gpu)  # asked for by name: refused


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU interpreter's case; on a GPU, "
                    "test_auto_takes_sdpa_for_a_shape_our_kernel_refuses is the same rule")
def test_on_a_cpu_too_a_shape_our_kernel_refuses_is_settled_before_the_first_forward(tmp_path):
    """With the Triton kernels under the CPU interpreter, `auto` used to keep our kernel ("nothing to time off a
    GPU") for a head_dim it refuses, and the run failed at its first forward, after its data was built."""
    ops, cpu = get_ops("triton", "cpu"), torch.device("cpu")
    choice = choose_attention("auto", ops, (1, 16, 4, 2, 8), torch.float32, cpu)
    assert (choice.attention, choice.timings_ms) == ("sdpa", {})
    assert "our kernel does not take this shape: flash_attention: head_dim 8 is not supported" in choice.reason
    with pytest.raises(ValueError, match="^flash_attention: head_dim 8 is not supported"):
        choose_attention("megamath", ops, (1, 16, 4, 2, 8), torch.float32, cpu)
    assert choose_attention("auto", ops, (1, 16, 4, 2, 16), torch.float32, cpu).attention == "megamath"
    assert choose_attention("auto", get_ops("reference", "cpu"), (1, 16, 4, 2, 8), torch.float32, cpu).attention \
        == "megamath"  # the reference attention takes any head_dim


@pytest.mark.skipif(not torch.cuda.is_available(), reason="timing our attention and each SDPA backend needs a CUDA GPU")
def test_auto_times_every_candidate_on_a_gpu():
    ops = get_ops("auto", "cuda")
    for layout in (QKVLayout(), QKVLayout((2, 1, 0), False)):  # sequence first: CPU tests (its TMA tiles compile anew)
        choice = choose_attention("auto", ops, (1, 256, 4, 2, 64), torch.bfloat16, torch.device("cuda"), repeats=3,
                                  layout=layout)
        timings = choice.timings_ms  # ours and each SDPA backend that takes bf16 GQA at head_dim 64 here
        assert {"megamath", "sdpa-flash"} <= set(timings) <= {"megamath", *SDPA_BACKENDS}, choice.reason
        assert choice.attention == min(timings, key=timings.get)
        assert f"D 64, {layout.describe()}: megamath " in choice.reason, choice.reason
        assert "flash-attention tiles: forward" in choice.reason, choice.reason  # ours was tuned before the race
        assert choice.tile_timings.count("\n") + 1 == 15, choice.tile_timings  # every candidate's time, for the log


def test_a_tuned_choice_carries_every_candidates_timing(monkeypatch):
    """The one-line reason names the fastest tiles; tile_timings keeps each candidate's time (or why it was
    skipped) for the benchmark's log, so one GPU run shows what each tile set, TMA included, is worth."""
    import importlib

    load_ops("triton")
    tuning = importlib.import_module("megamath.kernels.flash_attention_tuning")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tuned = tuning.TunedBlocks("tiles", {"64x64 w4 s3": 0.9, "64x64 w4 s3 TMA": 0.8},
                               {"32x64x64x32 w4 s4": 2.0, "32x64 w8 s4 atomic dQ": "skipped: RuntimeError"})
    monkeypatch.setattr(tuning, "tune_flash_attention", lambda *args, **kwargs: tuned)
    choice = choose_attention("megamath", get_ops("triton", "cuda"), (1, 256, 4, 2, 64), torch.bfloat16,
                              torch.device("cuda"))
    assert choice.tiles == "tiles" and "forward 64x64 w4 s3 TMA 0.800 ms" in choice.reason
    assert choice.tile_timings.splitlines() == ["  forward 64x64 w4 s3: 0.900 ms", "  forward 64x64 w4 s3 TMA: 0.800 ms",
                                                "  backward 32x64x64x32 w4 s4: 2.000 ms",
                                                "  backward 32x64 w8 s4 atomic dQ: skipped: RuntimeError"]


def test_the_model_reports_the_q_k_v_layout_its_forward_uses():
    """Fused only with the kernels and with weights back to back (ZeRO's buffer: v, k, q in memory)."""
    for kernels, zero, want in [("reference", True, None), ("triton", False, None), ("triton", True, (2, 1, 0))]:
        model = Llama(dataclasses.replace(CONFIG, kernels=kernels))
        if zero:
            ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), model.split_parameter_names())
        layout = model.layers[0].self_attn.qkv_layout(get_ops(kernels, DEVICE))
        assert layout == QKVLayout(want, False), (kernels, zero)


class _Recorded:
    """What one projection_attention_step handed attention (q, k, v), the gradient its output got back, and
    the projections' gradients, each as q, k, v in (B, S, H, D)."""

    def __init__(self, attend, layout: QKVLayout, device: str = "cpu"):
        self.inputs, self.out_grad = None, None

        def recording(q, k, v, causal):
            self.inputs = (q, k, v)
            o = attend(q, k, v, causal=causal)
            o.register_hook(lambda g: setattr(self, "out_grad", g))
            return o

        step, leaves = projection_attention_step(recording, (2, 5, 6, 2, 16), torch.float32, torch.device(device),
                                                 layout, torch.Generator(device).manual_seed(0))
        step()
        if layout.fused_order is None:
            grads = [t.grad for t in leaves]
        else:
            order = list(layout.fused_order)
            grads = [None] * 3
            for i, g in zip(order, leaves[0].grad.split([(96, 32, 32)[i] for i in order], dim=-1)):
                grads[i] = g
        self.grads = [g.transpose(0, 1) if layout.sequence_first else g for g in grads]  # (B, S, H·D)
        self.grads = [g.unflatten(-1, (-1, 16)) for g in self.grads]


@pytest.mark.parametrize("sequence_first", [False, True])
@pytest.mark.parametrize("fused_order", [(2, 1, 0), None])
def test_the_race_runs_attention_on_the_models_layout(fused_order, sequence_first):
    """choose_attention times each candidate on q, k, v laid out as the layer lays them out (head views of
    slices of one projection output, in ZeRO's v, k, q memory order, or of three outputs; sequence first under
    SP) and returns their gradients to the projections through the model's own split (fused_linear)."""
    run = _Recorded(flash_attention_ref, QKVLayout(fused_order, sequence_first))
    q, k, v = run.inputs
    assert q.shape == (2, 5, 6, 16) and k.shape == v.shape == (2, 5, 2, 16)
    storages = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    if fused_order is not None:
        assert len(storages) == 1 and v.data_ptr() < k.data_ptr() < q.data_ptr()  # one output, ZeRO's order
        assert q.stride(0 if sequence_first else 1) == 160 and q.stride()[2:] == (16, 1)  # rows of all 10 heads
    else:
        assert len(storages) == 3
    assert (q.stride(0) < q.stride(1)) == sequence_first  # (S, B, ·) memory seen as (B, S, H, D)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(flash_attention_ref(*leaves, causal=True), leaves, run.out_grad)
    for got, ref in zip(run.grads, want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_the_race_charges_sdpa_the_join_our_kernel_spares():
    """With fused q/k/v our kernel's gradients are slices of one tensor, which the join takes as they stand; SDPA's
    are separate and the join concatenates them: a copy the model pays and the race now includes."""
    load_ops("triton")
    from megamath.kernels.flash_attention import flash_attention

    widths = {}
    for name, attend in (("megamath", flash_attention), ("sdpa", sdpa_attention)):
        with _Cats() as cats:
            _Recorded(attend, QKVLayout((2, 1, 0), False), DEVICE)
        widths[name] = cats.widths
    assert widths == {"megamath": [], "sdpa": [160]}  # 6·16 + 2·2·16: the whole q/k/v projection


def test_local_heads_are_what_the_attention_kernel_sees():
    assert Llama(CONFIG).layers[0].self_attn.local_heads() == (6, 2)
