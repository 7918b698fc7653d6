"""The Llama model: config validation, parameter and FLOP counts, kernels vs references, checkpointing."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megamath.model import PRESETS, Llama, ModelConfig
from megamath.model.ops import get_ops, resolve_backend

# hidden 64, 2 layers, 4 q heads / 2 kv heads (head_dim 16): small enough for Triton's interpreter.
SMALL = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             max_seq_length=64)


def small_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(**{**SMALL, **overrides}))


def batch(seed: int = 1, b: int = 2, s: int = 33, vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # ignored positions must not count in the mean
    return tokens[:, :-1], targets


# ---- config -----------------------------------------------------------------------------------------------

def test_presets_have_the_published_shapes():
    c7, c34, cc7 = PRESETS["llemma-7b"], PRESETS["llemma-34b"], PRESETS["codellama-7b"]
    assert (c7.hidden_size, c7.num_layers, c7.num_heads, c7.num_kv_heads, c7.ffn_hidden_size, c7.vocab_size,
            c7.rope_theta, c7.max_seq_length) == (4096, 32, 32, 32, 11008, 32016, 1e4, 4096)
    assert (c34.hidden_size, c34.num_layers, c34.num_heads, c34.num_kv_heads, c34.ffn_hidden_size, c34.vocab_size,
            c34.rope_theta, c34.max_seq_length) == (8192, 48, 64, 8, 22016, 32000, 1e6, 4096)
    assert dataclasses.replace(cc7, rope_theta=1e4) == c7
    assert PRESETS["tiny"].head_dim == 32


@pytest.mark.parametrize("fields, message", [
    (dict(num_heads=3), "ModelConfig: hidden_size 64 is not divisible by num_heads 3"),
    (dict(num_kv_heads=3), "ModelConfig: num_heads 4 is not divisible by num_kv_heads 3"),
    (dict(hidden_size=36, num_heads=12, num_kv_heads=4),
     "ModelConfig: head_dim 3 (hidden_size / num_heads) must be even for RoPE"),
    (dict(num_layers=0), "ModelConfig.num_layers must be a positive integer below 2**63, got 0"),
    (dict(vocab_size=97.0), "ModelConfig.vocab_size must be a positive integer below 2**63, got 97.0"),
    (dict(vocab_size=2**63), f"ModelConfig.vocab_size must be a positive integer below 2**63, got {2**63}"),
    (dict(norm_eps=0.0), "ModelConfig.norm_eps must be a positive number, got 0.0"),
    (dict(kernels="cuda"), "ModelConfig.kernels must be one of auto, triton, reference, got 'cuda'"),
    (dict(activation_checkpointing="yes"), "ModelConfig.activation_checkpointing must be true or false, got 'yes'"),
])
def test_config_validation_messages(fields, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**SMALL, **fields})
    assert str(err.value) == message


def test_config_dict_round_trip_and_strictness():
    config = ModelConfig.from_preset("llemma-34b", kernels="reference")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"^ModelConfig: unknown keys hiden_size$"):
        ModelConfig.from_dict({**config.to_dict(), "hiden_size": 1})
    with pytest.raises(ValueError, match="this looks like a Hugging Face config.json"):
        ModelConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"^unknown model preset 'llama-7b'; choose one of codellama-7b, "):
        ModelConfig.from_preset("llama-7b")


# ---- counts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [ModelConfig(**SMALL), PRESETS["tiny"]], ids=["small", "tiny"])
def test_num_params_matches_the_module(config):
    assert config.num_params() == sum(p.numel() for p in Llama(config).parameters())


def test_num_params_of_published_models():
    # Code Llama 7B: Llama 2 7B's 6,738,415,616 plus 16 extra vocabulary rows in embedding and head.
    assert PRESETS["codellama-7b"].num_params() == 6_738_415_616 + 2 * 16 * 4096
    # Code Llama 34B by hand: per layer q, o 8192², k, v 8192·1024, 3 MLP 8192·22016, 2 norms.
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 22016 + 2 * 8192
    assert PRESETS["llemma-34b"].num_params() == 48 * per_layer + 2 * 32000 * 8192 + 8192 == 33_743_970_304


def test_flops_per_token_matches_the_anchor_formula_for_mha():
    c, s = PRESETS["llemma-7b"], 4096
    h, L, V, f = c.hidden_size, c.num_layers, c.vocab_size, c.ffn_hidden_size
    assert c.flops_per_token(s) == 6 * (L * (4 * h * h + 3 * h * f) + V * h) + 6 * L * s * h


def test_flops_per_token_matches_a_counted_training_step():
    """torch's FLOP counter over forward + backward with the reference ops. The reference attention
    computes the full S x S scores, so the counter sees twice the causal attention term."""
    model = small_model()
    config = model.config
    tokens, targets = batch()
    with FlopCounterMode(display=False) as counter:
        _, loss = model(tokens, targets)
        loss.backward()
    b, s = tokens.shape
    causal_attention = 6 * config.num_layers * s * config.num_heads * config.head_dim
    assert counter.get_total_flops() == b * s * (config.flops_per_token(s) + causal_attention)


# ---- model ----------------------------------------------------------------------------------------------------

def test_forward_shapes_loss_and_input_errors():
    model = small_model()
    tokens, targets = batch()
    logits = model(tokens)
    assert logits.shape == (2, 33, 97)
    logits2, loss = model(tokens, targets)
    assert torch.equal(logits, logits2)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"^positions 40\.\.72 exceed max_seq_length 64$"):
        model(tokens, position_offset=40)
    with pytest.raises(ValueError, match=r"^tokens must be an integer tensor of shape \(batch, seq\), got \(66,\)"):
        model(tokens.reshape(-1))
    with pytest.raises(ValueError, match=r"^targets shape \(2, 32\) differs from tokens shape \(2, 33\)$"):
        model(tokens, targets[:, 1:])


def test_init_scales_the_residual_output_projections():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", init_std=0.02)
    model = Llama(config)
    scaled = 0.02 / (2 * config.num_layers) ** 0.5
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1), name
            continue
        expected = scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        assert abs(p.std().item() / expected - 1) < 0.05, name


def test_ops_dispatch(monkeypatch):
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("reference", "cuda") == "reference"
    ops = get_ops("reference", "cpu")
    from megamath.kernels.rms_norm import rms_norm_ref
    assert ops.backend == "reference" and ops.rms_norm is rms_norm_ref
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^kernels='triton' needs CUDA tensors \(got cpu\); set TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")


def _loss_and_grads(model: Llama, tokens, targets):
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_kernels_match_references():
    """Same weights, fp32: Triton kernels (interpreted on CPU) vs the plain-torch references."""
    if not torch.cuda.is_available() and not __import__("os").environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = small_model(kernels="reference").to(device)
    kernel = copy.deepcopy(reference)
    kernel.config = dataclasses.replace(reference.config, kernels="triton")
    assert get_ops(kernel.config.kernels, device).backend == "triton"
    tokens, targets = (t.to(device) for t in batch())
    ref_loss, ref_grads = _loss_and_grads(reference, tokens, targets)
    ker_loss, ker_grads = _loss_and_grads(kernel, tokens, targets)
    torch.testing.assert_close(ker_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ker_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_grad", [0.5, 1 / 3])
def test_loss_grad_lets_the_loss_kernel_write_the_gradient_in_the_forward(loss_grad):
    """model(..., loss_grad=g) then (loss · g).backward(), as the training step does with g = 1/k: the same
    bits as without the hint, and the logits' gradient is the one the forward wrote. Proof of the latter:
    the logits are negated behind autograd's back after the forward, which a backward that read them again
    would see."""
    if not torch.cuda.is_available() and not __import__("os").environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)")
    model = small_model(kernels="triton")
    tokens, targets = batch(s=12)  # short: the kernels run in Triton's interpreter on CPU
    runs = []
    for hint in (None, loss_grad):
        model.zero_grad(set_to_none=True)
        logits, loss = model(tokens, targets, loss_grad=hint)
        if hint is not None:
            logits.data.neg_()
        (loss * loss_grad).backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_activation_checkpointing_gives_identical_grads():
    plain = small_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.config = dataclasses.replace(plain.config, activation_checkpointing=True)
    tokens, targets = batch()
    loss_a, grads_a = _loss_and_grads(plain, tokens, targets)
    loss_b, grads_b = _loss_and_grads(checkpointed, tokens, targets)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_tiny_preset_trains_with_adamw():
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_preset("tiny", num_layers=2))
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay=0.1), lr=3e-3)
    tokens = torch.randint(0, 2048, (4, 33), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(2048.0)).item()) < 0.2  # starts near uniform
    assert losses[-1] < losses[0] - 1.0
