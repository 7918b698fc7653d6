"""The trainer on a CUDA GPU: the bf16 model with the Triton kernels against the reference ops, a hot
path (forward, backward, SP/DP-free gradient accumulation) without device-to-host syncs, grad_dtype
auto's bf16 buffer stepping as the fp32 one, and linear weights' gradients written into it by their matmul.

CPU coverage of the same features: test_convergence.py (kernels under Triton's interpreter against the
references, over 50 training steps), test_train_loop.py (the step and its metrics), test_zero.py (the
auto gradient buffer, bit-identical there) and test_grad_into_buffer.py.
"""
import pytest
import torch

from megamath.model import Llama, ModelConfig
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="compiled kernels, sync checks and the GPU's own sums need CUDA")

CONFIG = dict(vocab_size=4096, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=1408,
              max_seq_length=1024)


def grads_and_loss(model, tokens):
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def zero_grads_and_loss(model, tokens):
    """As grads_and_loss, with the weights in ZeRO-1's buffer, as training runs them: q/k/v and gate/up are
    then one matmul each, RoPE rotates in place in the projection's output, and the kernels' gradients reach
    the matmuls without a joining copy. The gradients are read from the optimizer's fp32 buffer."""
    optimizer = ZeroOptimizer(model, ParallelState.single("cuda"), OptimizerConfig(),
                              split_names=model.split_parameter_names())
    optimizer.zero_grad()
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {n: optimizer.grad_view(p).float() for n, p in model.named_parameters()}
    optimizer.remove_hooks()
    return loss.detach().float(), grads


def one_gpu_step_setup(config: OptimizerConfig):
    """The seed-0 bf16 model on the GPU in a ZeRO-1 optimizer told of one micro-batch per step (as `megamath train`
    with grad_accum_steps 1 tells it): grad_dtype auto then takes a bf16 buffer."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(**CONFIG)).cuda().to(torch.bfloat16)
    return model, ZeroOptimizer(model, ParallelState.single("cuda"), config, split_names=model.split_parameter_names(),
                                micro_batches=1)


def test_bf16_kernels_match_the_reference_ops_within_the_bf16_error():
    """|kernels - fp32 ref| <= 2 |bf16 ref - fp32 ref| + atol, for the loss and every gradient; the kernels both
    on a plain model and with ZeRO-1's buffer (the fused projections a training run takes)."""
    torch.manual_seed(0)
    fp32 = Llama(ModelConfig(**CONFIG, kernels="reference")).cuda()
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 513), device="cuda")
    runs = {}
    for name, kernels, dtype, run in (("ref32", "reference", torch.float32, grads_and_loss),
                                      ("ref16", "reference", torch.bfloat16, grads_and_loss),
                                      ("kernels", "triton", torch.bfloat16, grads_and_loss),
                                      ("kernels+zero", "triton", torch.bfloat16, zero_grads_and_loss)):
        model = Llama(ModelConfig(**CONFIG, kernels=kernels)).cuda()
        model.load_state_dict(fp32.state_dict())
        runs[name] = run(model.to(dtype), tokens)
    (loss32, g32), (loss16, g16) = runs["ref32"], runs["ref16"]
    for name in ("kernels", "kernels+zero"):
        lossk, gk = runs[name]
        assert abs(lossk - loss32) <= 2 * abs(loss16 - loss32) + 1e-2, name
        for param in g32:
            bound = 2 * (g16[param] - g32[param]).abs().max() + 1e-3 * g32[param].abs().max()
            assert (gk[param] - g32[param]).abs().max() <= bound, (name, param)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_training_step_makes_no_host_sync_until_its_one_read(overlap):
    """The micro-batch loop and the whole optimizer step (DP reduction, norm, clip factor, the skip decision,
    AdamW, the parameter all-gather) run under sync-debug mode "error": any device-to-host sync fails. The
    step's figures are then read once (train_step reads them together with the loss). With the optimizer step
    overlapped (its side stream, events and waits) as well.
    """
    torch.manual_seed(0)
    state = ParallelState.single("cuda")
    model = Llama(ModelConfig(**CONFIG)).cuda().to(torch.bfloat16)
    optimizer = ZeroOptimizer(model, state, OptimizerConfig(), split_names=model.split_parameter_names(),
                              bucket_mb=2 if overlap else 0.0, overlap_optimizer_step=overlap)
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 513), device="cuda")
    for checked in (False, True):  # the first pass compiles kernels and builds cached tensors
        optimizer.zero_grad()
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            for _ in range(2):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
                (loss / 2).backward()
            stats = optimizer.launch_step(1e-4, finite=torch.isfinite(loss))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result = optimizer.finish_step(stats.tolist())
        assert not result.skipped and result.grad_norm > 0


def test_the_auto_bf16_gradient_buffer_steps_as_the_fp32_one():
    """grad_dtype auto on one GPU with one micro-batch: a bf16 buffer holding the values of an fp32 one that takes
    autograd's bf16 gradients (without gradient-accumulation fusion, which keeps the products' fp32 bits: the
    next tests). The CPU test
    (test_zero.py) finds the steps bit-identical; here the norm's fp64 sum may run in another order, and the
    GPU's backward need not be bit-reproducible, so the bar is calibrated by a second fp32 run: after three
    clipped steps the bf16 buffer's weights are as close to the fp32 run's as a repeat of that run is, up to a
    few fp32 ulps, and the first loss is the same."""
    from megamath.parallel import grad_into_buffer

    generator = torch.Generator("cuda").manual_seed(1)
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 513), device="cuda", generator=generator)
    runs = {}
    for name, grad_dtype in (("auto", "auto"), ("fp32", "fp32"), ("fp32 again", "fp32")):
        model, optimizer = one_gpu_step_setup(OptimizerConfig(lr=1e-3, clip_grad=0.05, grad_dtype=grad_dtype,
                                                              gradient_accumulation_fusion=False))
        # The table's gradient by autograd in every run: the bf16 buffer would take it from the embedding_backward
        # kernel, whose fp32 sums may round differently from torch's (their order; the next test).
        grad_into_buffer.unregister(model.embed_tokens.weight)
        losses = []
        for _ in range(3):
            optimizer.zero_grad(1)
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            assert optimizer.step(1e-3).clip_coef < 1
            losses.append(loss.item())
        runs[name] = (optimizer.flat_grad.dtype, losses, optimizer.master.clone())
    assert (runs["auto"][0], runs["fp32"][0]) == (torch.bfloat16, torch.float32)
    assert runs["auto"][1][0] == runs["fp32"][1][0]
    repeat = (runs["fp32 again"][2] - runs["fp32"][2]).abs()
    off = (runs["auto"][2] - runs["fp32"][2]).abs()
    assert (off <= 2 * repeat.max() + 1e-6 * runs["fp32"][2].abs() + 1e-7).all(), (off.max(), repeat.max())


def test_linear_gradients_written_into_the_buffer_are_the_hooks_bits():
    """bf16 weights into the auto bf16 buffer (one GPU, one micro-batch): each linear weight's gradient written
    by its matmul into the buffer (grad_into_buffer.py) is what the hook's copy of autograd's gradient holds (the
    same cuBLAS call; only the output's address differs). Calibrated like the test above: no further from the
    hook's buffer than a repeat of the hook's run is (zero when this GPU's backward is reproducible). The
    embedding's, written by the embedding_backward kernel, sums each row's tokens in fp32 as torch's backward
    does, in token order where torch's may differ: within one bf16 rounding of the hook's, and reproducible."""
    from megamath.parallel import grad_into_buffer

    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 513), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    grads = {}
    for name in ("direct", "direct again", "hook", "hook again"):
        model, optimizer = one_gpu_step_setup(OptimizerConfig())
        assert optimizer.flat_grad.dtype == torch.bfloat16
        if not name.startswith("direct"):
            for p in model.parameters():
                grad_into_buffer.unregister(p)
        optimizer.zero_grad(1)
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        grads[name] = {n: optimizer.grad_view(p).float().clone() for n, p in model.named_parameters()}
        optimizer.remove_hooks()
    embedding = "embed_tokens.weight"
    for name, hook in grads["hook"].items():
        repeat = (grads["hook again"][name] - hook).abs().max()
        if name == embedding:
            assert torch.equal(grads["direct"][name], grads["direct again"][name])
            torch.testing.assert_close(grads["direct"][name], hook, rtol=2 ** -8,
                                       atol=2 ** -8 * hook.abs().max().item())
        else:
            assert (grads["direct"][name] - hook).abs().max() <= repeat, (name, repeat)
    assert embedding in grads["hook"]


def test_fused_accumulation_sums_bf16_gradients_in_fp32():
    """Gradient-accumulation fusion on CUDA: torch's fp32-output GEMMs for bf16 operands exist and add in place
    (grad_into_buffer.mixed_dtype_gemm), and bf16 weights into an fp32 buffer over two micro-batches hold, after
    the first, fp32 products (values no bf16 holds, where the hook's copy holds bf16 ones) and, after the second,
    sums within bf16's rounding of the hook's: a linear weight's by its matmul, a norm weight's by the norm
    kernel's fp32 partial sums."""
    from megamath.parallel import grad_into_buffer

    assert grad_into_buffer.mixed_dtype_gemm("cuda")
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 513), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    sums = {}
    for fusion in (True, False):
        torch.manual_seed(0)
        model = Llama(ModelConfig(**CONFIG)).cuda().to(torch.bfloat16)
        optimizer = ZeroOptimizer(model, ParallelState.single("cuda"),
                                  OptimizerConfig(grad_dtype="fp32", gradient_accumulation_fusion=fusion),
                                  split_names=model.split_parameter_names(), micro_batches=2)
        assert optimizer.gradient_accumulation_fusion is fusion
        weights = {"down_proj": model.layers[0].mlp.down_proj.weight,
                   "post_attention_layernorm": model.layers[0].post_attention_layernorm.weight}
        optimizer.zero_grad(2)
        for micro in range(2):
            x, y = tokens[micro:micro + 1, :-1], tokens[micro:micro + 1, 1:]
            (model(x, y)[1] / 2).backward()
            if micro == 0:
                for name, weight in weights.items():
                    first = optimizer.grad_view(weight)
                    assert torch.equal(first, first.bfloat16().float()) is not fusion, name
        sums[fusion] = {name: optimizer.grad_view(weight).clone() for name, weight in weights.items()}
        optimizer.remove_hooks()
    for name, unfused in sums[False].items():
        scale = unfused.abs().max().item()
        torch.testing.assert_close(sums[True][name], unfused, rtol=2 ** -6, atol=2 ** -7 * scale, msg=name)


def test_an_overlapped_optimizer_step_steps_as_the_plain_one():
    """overlap_optimizer_step on CUDA: AdamW bucket by bucket on a side stream, each bucket waited for by the next
    forward's pre-hooks. Three clipped steps of two micro-batches over a dozen buckets: the same step figures,
    masters and weights as the plain step (the same kernels on the same ranges; only their stream and moment
    differ). A race between an update and the forward reading its weights would show as a difference; the bar
    is calibrated by a repeat of the plain run (zero when this GPU's backward is reproducible)."""
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 513), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    for name, overlap in (("plain", False), ("overlapped", True), ("plain again", False)):
        torch.manual_seed(0)
        model = Llama(ModelConfig(**CONFIG)).cuda().to(torch.bfloat16)
        optimizer = ZeroOptimizer(model, ParallelState.single("cuda"), OptimizerConfig(lr=1e-3, clip_grad=0.05),
                                  split_names=model.split_parameter_names(), bucket_mb=2, micro_batches=2,
                                  overlap_optimizer_step=overlap)
        assert len(optimizer.buckets) > 4
        results = []
        for _ in range(3):
            optimizer.zero_grad(2)
            for micro in range(2):
                (model(tokens[micro:micro + 1, :-1], tokens[micro:micro + 1, 1:])[1] / 2).backward()
            stats = optimizer.launch_step(1e-3)
            assert all(w is not None for w in optimizer._update_work) is overlap  # left to the next forward
            results.append(optimizer.finish_step(stats.tolist()))
        assert all(r.clip_coef < 1 and not r.skipped for r in results)
        optimizer.finish_param_sync()  # the last step's updates, before the buffers are read
        runs[name] = (results, optimizer.master.clone(), optimizer.flat_param.float())
        optimizer.remove_hooks()
    for i in (1, 2):
        repeat = (runs["plain again"][i] - runs["plain"][i]).abs().max()
        assert (runs["overlapped"][i] - runs["plain"][i]).abs().max() <= repeat, (i, repeat)
    if runs["plain again"][0] == runs["plain"][0]:
        assert runs["overlapped"][0] == runs["plain"][0]
