"""Generation: greedy tokens equal Hugging Face `generate` on random tiny Llamas (GQA, odd vocabularies,
RoPE θ 1e6, ragged prompts in one batch); the KV cache equals the plain forward; seeded sampling is
reproducible and independent of the batch; stop strings and EOS; loading every checkpoint kind."""
from __future__ import annotations

import time

import pytest
import torch

from megamath.generation.generate import SamplingParams, choose_tokens, generate, row_generators, sampling_probs
from megamath.generation.kv_cache import rope_at
from megamath.generation.loading import checkpoint_kind, load_model
from megamath.model import Llama, ModelConfig

transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")

HF_SHAPES = {  # (vocab, hidden, ffn, layers, heads, kv heads)
    "gqa": (1001, 64, 176, 2, 4, 2),
    "mqa-odd": (997, 48, 128, 3, 6, 1),
}


def hf_llama(kind: str, root):
    vocab, hidden, ffn, layers, heads, kv = HF_SHAPES[kind]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=96, rope_theta=1e6,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(root / kind)
    return model


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_gen")


@pytest.fixture(scope="module")
def hf_models(hf_root):
    root = hf_root
    return {kind: (hf_llama(kind, root), load_model(root / kind, kernels="reference")) for kind in HF_SHAPES}


def ragged_prompts(vocab: int, lengths=(5, 13, 1, 8), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, max_new_tokens: int, eos=None) -> list[list[int]]:
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as HF wants for decoder-only generation
        ids[b, longest - len(p):], mask[b, longest - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[:, longest:].tolist()


@pytest.mark.parametrize("kind", list(HF_SHAPES))
def test_greedy_equals_hugging_face_generate_on_ragged_batches(hf_models, kind):
    hf, ours = hf_models[kind]
    assert ours.config.rope_theta == 1e6 and ours.config.vocab_size % 2 == 1
    prompts = ragged_prompts(ours.config.vocab_size)
    expected = hf_greedy(hf, prompts, 24)
    got = generate(ours, prompts, SamplingParams(max_new_tokens=24))
    assert [c.token_ids for c in got] == expected
    assert all(c.finish_reason == "length" for c in got)
    # The summed log-probabilities are those HF's own scores give.
    with torch.no_grad():
        for prompt, c in zip(prompts, got):
            seq = torch.tensor([prompt + c.token_ids])
            logp = torch.log_softmax(hf(seq).logits[0, len(prompt) - 1:-1].float(), -1)
            ref = logp.gather(1, torch.tensor(c.token_ids)[:, None]).sum().item()
            assert abs(c.logprob - ref) < 1e-3


def test_greedy_runs_to_max_seq_length_like_hugging_face_on_each_prompt_alone(hf_models):
    """A batch of a 10-token and a 1-token prompt decoded to the model's last position (96) gives the tokens HF
    gives each prompt alone; one token more is refused."""
    hf, ours = hf_models["mqa-odd"]
    prompts = ragged_prompts(ours.config.vocab_size, lengths=(10, 1), seed=4)
    got = generate(ours, prompts, SamplingParams(max_new_tokens=86))
    assert ours.config.max_seq_length == 96
    for prompt, c in zip(prompts, got):
        assert c.token_ids == hf_greedy(hf, [prompt], 86)[0] and len(c.token_ids) == 86
    with pytest.raises(ValueError, match="exceeds the model's max_seq_length 96"):
        generate(ours, prompts, SamplingParams(max_new_tokens=87))


def test_greedy_stops_at_eos_like_hugging_face(hf_models):
    hf, ours = hf_models["gqa"]
    prompts = ragged_prompts(ours.config.vocab_size, seed=5)
    free = generate(ours, prompts, SamplingParams(max_new_tokens=16))
    eos = free[1].token_ids[6]  # a token row 1 produces: it must stop there
    expected = hf_greedy(hf, prompts, 16, eos=eos)
    got = generate(ours, prompts, SamplingParams(max_new_tokens=16), eos_id=eos)
    for row, c in zip(expected, got):
        if eos in row:
            assert c.token_ids == row[:row.index(eos) + 1] and c.finish_reason == "eos"
        else:
            assert c.token_ids == row and c.finish_reason == "length"
    assert got[1].finish_reason == "eos" and len(got[1].token_ids) <= 7


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 1.0), (1.3, 0.8)])
def test_cache_equals_plain_forward(hf_models, temperature, top_p):
    _, ours = hf_models["mqa-odd"]
    prompts = ragged_prompts(ours.config.vocab_size, lengths=(7, 2, 15), seed=2)
    params = SamplingParams(max_new_tokens=14, temperature=temperature, top_p=top_p)
    seeds = [11, 12, 13]
    cached = generate(ours, prompts, params, seeds=seeds)
    plain = generate(ours, prompts, params, seeds=seeds, use_cache=False)
    assert [c.token_ids for c in cached] == [c.token_ids for c in plain]
    for a, b in zip(cached, plain):
        assert abs(a.logprob - b.logprob) < 1e-3


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(hf_models):
    _, ours = hf_models["gqa"]
    prompts = ragged_prompts(ours.config.vocab_size, lengths=(6, 9, 3), seed=3)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95)
    first = generate(ours, prompts, params, seeds=[1, 2, 3])
    again = generate(ours, prompts, params, seeds=[1, 2, 3])
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    other = generate(ours, prompts, params, seeds=[4, 5, 6])
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    alone = generate(ours, prompts[1:2], params, seeds=[2])
    assert alone[0].token_ids == first[1].token_ids
    greedy = generate(ours, prompts, SamplingParams(max_new_tokens=12))
    nucleus_of_one = generate(ours, prompts, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6),
                              seeds=[7, 8, 9])
    assert [c.token_ids for c in nucleus_of_one] == [c.token_ids for c in greedy]


def test_sampling_follows_the_distribution_and_top_p_cuts_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gens = row_generators(range(4000), torch.device("cpu"))
    tokens, logp = choose_tokens(logits, SamplingParams(temperature=1.0), gens)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert torch.allclose(logp, logits[0, tokens].float(), atol=1e-6)
    tokens, _ = choose_tokens(logits, SamplingParams(temperature=1.0, top_p=0.75), gens)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.75; the tail is never drawn


def test_sampling_probabilities_equal_hugging_face_warpers():
    """The filtered distribution is HF's TemperatureLogitsWarper + TopPLogitsWarper's; ties at the top-p
    boundary keep as many tokens (which of them, HF's unstable sort decides); a temperature near 0 gives
    the greedy token, not NaN probabilities (logits / 1e-38 overflowed and token 0 was drawn every step)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    def hf(logits, temperature, top_p):
        return torch.softmax(TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits)), -1)

    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((0.3, 0.95), (0.6, 0.5), (1.0, 0.8), (1.7, 0.1), (1.0, 0.999999)):
        logits = torch.randn(32, 301, generator=g) * 3
        ties = logits.bfloat16().float()  # bf16 logits tie often, at the boundary too
        for x in (logits, ties):
            ours, ref = sampling_probs(x, SamplingParams(temperature=temperature, top_p=top_p)), hf(x, temperature, top_p)
            assert torch.equal((ours > 0).sum(-1), (ref > 0).sum(-1))
            assert torch.allclose(ours.sort(-1).values, ref.sort(-1).values, atol=1e-6, rtol=0)
        assert torch.equal(sampling_probs(logits, SamplingParams(temperature=temperature, top_p=top_p)) > 0,
                           hf(logits, temperature, top_p) > 0)  # no ties: the very same tokens
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.3], [0.3, 0.3, 0.4]]))  # a tie at 0.5's boundary
    expected = torch.tensor([[4 / 7, 0, 3 / 7], [0, 3 / 7, 4 / 7]])  # the later tied index stays, as in HF
    assert torch.allclose(sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.5)), expected)
    logits = torch.randn(4, 50, generator=g) * 3
    logits[0, 7] = logits[0].max()
    for temperature in (1e-6, 1e-38, 1e-45):
        probs = sampling_probs(logits, SamplingParams(temperature=temperature, top_p=0.9))
        assert torch.equal(probs > 0, logits == logits.max(-1, keepdim=True).values)
    tokens, _ = choose_tokens(logits, SamplingParams(temperature=1e-38), row_generators(range(4), torch.device("cpu")))
    assert torch.equal(tokens[1:], logits[1:].argmax(-1)) and tokens[0] in (logits[0].argmax(), 7)
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=float("inf"))


def test_a_zero_from_the_exponential_race_never_draws_a_filtered_token(monkeypatch):
    """exponential_ may return an exact 0 on some backends: probs / race was then 0 / 0 = NaN for a token
    top-p or vocab_limit removed, and argmax chose it."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, generator=None: self.zero_())
    logits = torch.tensor([[float("-inf"), 0.0, 1.0], [3.0, 2.0, -2.0]])  # a limited vocabulary; top-p's tail
    tokens, _ = choose_tokens(logits, SamplingParams(temperature=1.0, top_p=0.6),
                              row_generators([1, 2], torch.device("cpu")))
    assert tokens.tolist() == [2, 0]  # each row's one kept token


def test_stop_strings_cut_the_text():
    class Echo(torch.nn.Module):  # a "model" that always predicts (last token + 1) mod 10
        config = ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                             ffn_hidden_size=8, max_seq_length=64)
        parallel = type("P", (), {"tp_group": None})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, position_offset=0, cache=None):
            return torch.nn.functional.one_hot((tokens[:, -1:] + 1) % 10, 10).float() * 5

    decode = lambda ids: "".join(str(i) for i in ids)  # noqa: E731
    out = generate(Echo(), [[3], [7, 8]], SamplingParams(max_new_tokens=8, stop=("67",)), decode=decode,
                   use_cache=False)
    assert out[0].text == "45" and out[0].token_ids == [4, 5, 6, 7] and out[0].finish_reason == "stop"
    assert out[1].token_ids == [9, 0, 1, 2, 3, 4, 5, 6] and out[1].text == "90123456"
    with pytest.raises(TimeoutError, match="deadline"):  # a server's bound per request
        generate(Echo(), [[3]], SamplingParams(max_new_tokens=8), use_cache=False, deadline=time.monotonic() - 1)


def test_rope_at_equals_the_reference_rope():
    from megamath.kernels.rope import rope_ref

    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    positions = torch.arange(3, 8).repeat(2, 1)
    q_ref, k_ref = rope_ref(q, k, 1e6, position_offset=3)
    assert torch.equal(rope_at(q, positions, 1e6), q_ref) and torch.equal(rope_at(k, positions, 1e6), k_ref)


def test_training_forward_is_unchanged_by_the_cache_argument():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              ffn_hidden_size=64, max_seq_length=32, kernels="reference"))
    tokens = torch.randint(0, 101, (2, 9))
    logits, loss = model(tokens, tokens)
    assert torch.equal(model(tokens), logits) and logits.shape == (2, 9, 101)
    with pytest.raises(ValueError, match="KV cache is for generation"):
        model(tokens, tokens, cache=object())


def test_load_model_from_every_checkpoint_kind(tmp_path, hf_models, hf_root):
    from megamath.model.model_folder import convert_hf_to_megamath

    _, ours = hf_models["gqa"]
    hf_dir = hf_root / "gqa"
    assert checkpoint_kind(hf_dir) == "hf"
    convert_hf_to_megamath(hf_dir, tmp_path / "mm")
    assert checkpoint_kind(tmp_path / "mm") == "megamath"
    mm = load_model(tmp_path / "mm", kernels="reference")
    for (n, a), (_, b) in zip(ours.named_parameters(), mm.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_model(tmp_path)


def test_load_model_from_a_training_run_and_a_step_folder(tmp_path):
    from safetensors.torch import load_file

    from test_train_loop import raw_config, run

    run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=4, checkpoint__save_every=2))
    assert checkpoint_kind(tmp_path / "run") == "train-run"
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert checkpoint_kind(step2) == "train-step"
    for path, step in ((tmp_path / "run", 4), (step2, 2)):  # the run means its latest checkpoint
        saved = load_file(str(tmp_path / "run" / "checkpoints" / f"step_{step:07d}" / "model_tp00.safetensors"))
        model = load_model(path, kernels="reference")
        assert not model.training and model.config.vocab_size == 64
        for name, param in model.named_parameters():
            assert torch.equal(param, saved[name]), name
    assert len(generate(model, [[3, 4, 5]], SamplingParams(max_new_tokens=3))[0].token_ids) == 3
