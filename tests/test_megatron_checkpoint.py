"""`megamath convert megatron-to-hf` against checkpoints and logits written by Megatron-LM itself
(tests/fixtures/megatron/write_fixtures.py says how): the converted model computes Megatron-LM's logits,
in megamath and in transformers, for both checkpoint formats and with tensor and pipeline parallelism;
and what cannot be converted is refused with one line naming the cause."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megamath.cli import main
from megamath.compat.megatron_checkpoint import read_megatron_checkpoint
from megamath.compat.megatron_llama import llama_config
from megamath.compat.pickle_guard import Foreign, guarded_load, plain_args
from megamath.generation.loading import load_model

import foreign_checkpoints
import trainer_checkpoints as tc
from foreign_checkpoints import Trainer, rewrite

# Megatron-LM's two formats: TP 2 × PP 2, PP 2 with 2 virtual stages each (layers 0 2 on stage 0, 1 3 on 1), TP 2
CHECKPOINTS = {"torch_tp2_pp2": "torch format, TP 2 PP 2", "torch_pp2_vp2": "torch format, TP 1 PP 2",
               "torch_dist_tp2": "torch_dist format, TP 2 PP 1"}
RANK_FILE = "iter_0000010/mp_rank_{}/model_optim_rng.pt"


convert, fail, copy, written, megatron_logits = Trainer("megatron", "megatron-to-hf").helpers()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_converted_model_computes_megatrons_logits(name, tmp_path, capsys):
    convert(written(name), tmp_path / "hf")
    out = capsys.readouterr().out
    assert f"iteration 10, {CHECKPOINTS[name]}; 4 layers" in out
    assert "vocabulary: Megatron-LM's padded 64 rows kept" in out and "tokenizer's size: 60" in out
    assert (f"to continue that run in megamath: init_from_hf: {tmp_path / 'hf'}, init_step: 10, data.sample_order: "
            "megatron, and its train_steps (--train-iters) and global batch") in out
    assert "consumed_train_samples" not in out  # 80 = 10 iterations × 8
    ids, expected = megatron_logits(name)
    model = load_model(tmp_path / "hf", device="cpu", kernels="reference")
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits.float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_transformers_loads_the_folder_and_computes_megatrons_logits(name, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    convert(written(name), tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, expected = megatron_logits(name)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_vocab_size_keeps_the_tokenizers_rows_and_the_default_dtype_is_the_training_dtype(tmp_path):
    assert main(["convert", "megatron-to-hf", str(written("torch_tp2_pp2")), str(tmp_path / "hf"),
                 "--vocab-size", "60"]) == 0
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].shape == (60, 32) and tensors["lm_head.weight"].shape == (60, 32)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # --bf16; the fp32 norms are cast
    ids, expected = megatron_logits("torch_tp2_pp2")
    model = load_model(tmp_path / "hf", device="cpu", dtype=torch.float32, kernels="reference")
    with torch.no_grad():
        logits = model(ids)
    # bf16 norms: Megatron-LM kept them in fp32, so the logits agree to bf16's precision
    torch.testing.assert_close(logits, expected[..., :60], rtol=0, atol=0.02)


def test_a_save_folder_an_iteration_folder_and_both_formats_give_the_same_kind_of_weights():
    by_save = read_megatron_checkpoint(written("torch_dist_tp2"))
    by_iter = read_megatron_checkpoint(written("torch_dist_tp2") / "iter_0000010")
    assert by_save.tensors.keys() == by_iter.tensors.keys()
    assert all(torch.equal(by_save.tensor(k), by_iter.tensor(k)) for k in by_save.tensors)
    legacy = read_megatron_checkpoint(written("torch_tp2_pp2"))
    assert legacy.tensors.keys() == by_save.tensors.keys() and legacy.num_layers == 4
    assert {k: v.shape for k, v in legacy.tensors.items()} == {k: v.shape for k, v in by_save.tensors.items()}


# ---- the args are read, not run -----------------------------------------------------------------------------

class _Runs:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_pickle_naming_a_function_does_not_run_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"args": argparse.Namespace(x=_Runs(str(marker))), "w": torch.ones(2)}, tmp_path / "evil.pt")
    loaded = guarded_load(tmp_path / "evil.pt")
    assert not marker.exists()
    assert isinstance(loaded["args"].x, Foreign) and loaded["args"].x.qualname.endswith(".system")
    assert torch.equal(loaded["w"], torch.ones(2))


def test_a_tensor_pickled_with_its_attributes_loads_as_a_tensor(tmp_path):
    """Megatron-LM's fp32 masters carry attributes (tensor_model_parallel, ...), so torch pickles them through
    _rebuild_from_type_v2 naming torch.Tensor itself; that class is loaded as the real one."""
    master = torch.arange(4.0)
    master.tensor_model_parallel = True
    torch.save({"fp32_from_fp16_params": [[master]]}, tmp_path / "optimizer.pt")
    loaded = guarded_load(tmp_path / "optimizer.pt")["fp32_from_fp16_params"][0][0]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, master) and loaded.tensor_model_parallel is True


def test_megatrons_own_classes_in_the_args_load_without_megatron():
    args = plain_args(guarded_load(written("torch_tp2_pp2") / RANK_FILE.format("00_000"))["args"])
    assert repr(args["attention_backend"]) == "<megatron.core.transformer.enums.AttnBackend(5)>"
    assert args["params_dtype"] is torch.bfloat16 and args["padded_vocab_size"] == 64


# ---- refused, with the cause --------------------------------------------------------------------------------


def test_a_missing_rank_file_is_named(tmp_path, capsys):
    src = copy("torch_tp2_pp2", tmp_path)
    (src / RANK_FILE.format("01_001")).unlink()
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'iter_0000010'}: model_optim_rng.pt missing for "
                                                  "mp_rank_01_001 (tensor-parallel size 2, pipeline size 2)")


def test_tp_copies_of_a_norm_that_differ_are_refused(tmp_path, capsys):
    src = copy("torch_tp2_pp2", tmp_path)
    rewrite(src / RANK_FILE.format("01_001"),
            lambda s: s["model"]["decoder.final_layernorm.weight"].add_(1))
    assert fail(src, tmp_path / "hf", capsys).endswith(": final_norm: replicated over tensor parallelism, yet TP "
                                                       "rank 1's copy differs from rank 0's")


def test_a_tensor_of_another_architecture_is_refused_by_name(tmp_path, capsys):
    src = copy("torch_tp2_pp2", tmp_path)
    for rank in ("00_000", "01_000"):
        rewrite(src / RANK_FILE.format(rank),
                lambda s: s["model"].__setitem__("decoder.layers.0.self_attention.linear_qkv.bias", torch.zeros(32)))
    assert "unexpected tensor decoder.layers.0.self_attention.linear_qkv.bias: megamath converts the Llama " \
           "architecture only" in fail(src, tmp_path / "hf", capsys)


def test_tied_embeddings_write_the_embedding_as_the_output_layer(tmp_path, capsys):
    src = copy("torch_tp2_pp2", tmp_path)
    for rank in ("00_000", "01_000", "00_001", "01_001"):
        def tie(state):
            state["args"].untie_embeddings_and_output_weights = False
            state["model"].pop("output_layer.weight", None)
        rewrite(src / RANK_FILE.format(rank), tie)
    convert(src, tmp_path / "hf")
    assert "ties the output layer to the embedding" in capsys.readouterr().out
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_a_legacy_model_is_sent_to_megatrons_converter(tmp_path, capsys):
    src = copy("torch_tp2_pp2", tmp_path)
    rewrite(src / RANK_FILE.format("00_000"), lambda s: s.__setitem__("model", {"language_model": {}}))
    assert "a legacy (pre-Megatron-Core) model; convert it to Megatron Core first" in fail(src, tmp_path / "hf", capsys)


@pytest.mark.parametrize("change, message", [
    ({"add_bias_linear": True}, "checkpoint args: add_bias_linear is set: megamath converts the Llama architecture "
                                "only"),
    ({"normalization": "LayerNorm"}, "checkpoint args: normalization is 'LayerNorm': megamath converts the Llama "
                                     "architecture only (normalization 'RMSNorm')"),
    ({"swiglu": False}, "checkpoint args: swiglu is False: megamath converts the Llama architecture only "
                        "(swiglu True)"),
    ({"rotary_interleaved": True}, "checkpoint args: rotary_interleaved is set: megamath converts the Llama "
                                   "architecture only"),
    ({"num_experts": 8}, "checkpoint args: num_experts is 8: megamath converts the Llama architecture only (dense)"),
    ({"window_size": (4096, 0)}, "checkpoint args: window_size is (4096, 0): megamath converts the Llama architecture "
                                 "only (this model has sliding-window attention)"),
    ({"softmax_type": "learnable"}, "checkpoint args: softmax_type is 'learnable': megamath converts the Llama "
                                    "architecture only (this model has another attention softmax)"),
    ({"no_rope_freq": [0, 0, 0, 1]}, "checkpoint args: no_rope_freq is [0, 0, 0, 1]: megamath converts the Llama "
                                     "architecture only (this model has layers without RoPE)"),
    ({"squared_relu": True}, "checkpoint args: squared_relu is True: megamath converts the Llama architecture only "
                             "(this model has another activation than SwiGLU)"),
    ({"kv_channels": 16}, "checkpoint args: kv_channels 16 differs from hidden_size / num_attention_heads = 8; "
                          "megamath's head size is that quotient"),
])
def test_args_of_another_architecture_are_refused_by_name(change, message):
    args = read_megatron_checkpoint(written("torch_dist_tp2")).args
    with pytest.raises(ValueError) as err:
        llama_config({**args, **change})
    assert str(err.value) == message


def test_args_at_megatrons_defaults_are_a_llama():
    """Features' switches at their defaults (None, False, 0, `vanilla`) are not refused: checkpoints record them."""
    args = read_megatron_checkpoint(written("torch_dist_tp2")).args
    rest = {"window_size": None, "softmax_type": "vanilla", "mtp_num_layers": None, "is_hybrid_model": False,
            "glu_linear_offset": 0.0, "no_rope_freq": None, "use_mup": False}
    assert llama_config({**args, **rest}) == llama_config(args)


@pytest.mark.parametrize("bad", ["0", "65"])
def test_a_vocab_size_outside_the_padded_vocabulary_is_refused(bad, tmp_path, capsys):
    assert fail(written("torch_dist_tp2"), tmp_path / "hf", capsys, "--vocab-size", bad) == \
        f"--vocab-size {bad}: must be between 1 and the checkpoint's padded vocabulary 64"


def test_folders_that_are_not_a_checkpoint_are_named(tmp_path, capsys):
    assert fail(tmp_path / "nowhere", tmp_path / "hf", capsys) == f"{tmp_path / 'nowhere'} not found"
    (tmp_path / "empty").mkdir()
    assert fail(tmp_path / "empty", tmp_path / "hf", capsys) == (
        f"{tmp_path / 'empty'}: not a Megatron-LM checkpoint (no latest_checkpointed_iteration.txt, and not an "
        "iter_NNNNNNN or release folder)")
    src = copy("torch_dist_tp2", tmp_path)
    (src / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'latest_checkpointed_iteration.txt'} names iteration 20, "
                                                  f"but {src / 'iter_0000020'} is not there")
    (src / "latest_checkpointed_iteration.txt").write_text("latest\n")
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'latest_checkpointed_iteration.txt'}: expected an "
                                                  "iteration number or 'release', got 'latest'")


def test_vocab_size_belongs_to_megatron_to_hf(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert main(["convert", "hf-to-megamath", str(tmp_path / "hf"), str(tmp_path / "out"), "--vocab-size", "5"]) == 2
    assert "--vocab-size applies to megatron-to-hf and neox-to-hf only" in capsys.readouterr().err


# ---- the way in: a Megatron-LM run continued in megamath -----------------------------------------------------

def test_a_megamath_run_starts_from_the_converted_folder(tmp_path):
    from megamath.parallel.state import ParallelState
    from megamath.training import loop
    from megamath.training.config import TrainConfig
    from test_train_loop import metrics, raw_config, run

    convert(written("torch_dist_tp2"), tmp_path / "hf")
    raw = raw_config(tmp_path / "data", tmp_path / "run", init_from_hf=str(tmp_path / "hf"), train_steps=2,
                     model__num_layers=4, model__ffn_hidden_size=48, model__max_seq_length=16, data__seq_length=16,
                     checkpoint__save_every=2)
    model = loop.build_model(TrainConfig.from_dict(raw), ParallelState.single())
    ids, expected = megatron_logits("torch_dist_tp2")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert run(raw).step == 2 and [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    # the run converted at iteration 10 goes on at 11, in Megatron-LM's order, as the converter says
    later = {**raw, "run_dir": str(tmp_path / "later"), "init_step": 10, "train_steps": 12,
             "data": {**raw["data"], "sample_order": "megatron"}}
    assert run(later).step == 12 and [r["step"] for r in metrics(tmp_path / "later") if "step" in r] == [11, 12]
    assert [p.name for p in (tmp_path / "later" / "checkpoints").glob("step_*")] == ["step_0000012"]


def test_config_from_megatron_names_the_command_that_converts_its_load_folder():
    from megamath.compat.megatron import convert_megatron
    from test_config_from_megatron import SCRIPT

    load = str(written("torch_tp2_pp2"))
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ").split() + ["--load", load]
    unmapped = {u.key: u for u in convert_megatron(flags, world_size=32, vocab_size=32000).unmapped}
    assert unmapped["--load"].reason == (f"{load} is not a Hugging Face folder (no config.json): convert the "
                                         f"Megatron checkpoint with `megamath convert megatron-to-hf {load} "
                                         "HF_DIR` and set init_from_hf: HF_DIR (and, to go on from its iteration "
                                         "as Megatron-LM does without --finetune, init_step: 10); or keep its "
                                         f"optimizer state too: `megamath convert megatron-to-run {load} RUN_DIR "
                                         "--config` this config")
    finetune = {u.key: u for u in convert_megatron(flags + ["--finetune"], world_size=32, vocab_size=32000).unmapped}
    assert finetune["--load"].reason.endswith("and set init_from_hf: HF_DIR")  # it starts at iteration 0
    assert finetune["--finetune"].kind == "not needed"
    elsewhere = {u.key: u for u in convert_megatron(flags[:-1] + ["/not/on/this/machine"], world_size=32,
                                                    vocab_size=32000).unmapped}
    assert elsewhere["--load"].reason.endswith("init_step: the iteration the convert command prints); or keep its "
                                               "optimizer state too: `megamath convert megatron-to-run /not/on/this/"
                                               "machine RUN_DIR --config` this config")


def test_an_older_torch_dist_checkpoint_with_its_args_in_common_pt(tmp_path, capsys):
    """Megatron-LM kept the common state (args, iteration) in common.pt before moving it into the
    distributed checkpoint's data; both are read."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    src = copy("torch_dist_tp2", tmp_path)
    folder = src / "iter_0000010"
    metadata = FileSystemReader(str(folder)).read_metadata()
    args = read_megatron_checkpoint(src).args
    for key in [k for k in metadata.state_dict_metadata if k.startswith("common_state")]:
        del metadata.state_dict_metadata[key]
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    plain = argparse.Namespace(**{k: v for k, v in args.items() if not isinstance(v, Foreign)})
    torch.save({"args": plain, "iteration": 10, "checkpoint_version": 3.0}, folder / "common.pt")
    convert(src, tmp_path / "hf")
    ids, expected = megatron_logits("torch_dist_tp2")
    model = load_model(tmp_path / "hf", device="cpu", kernels="reference")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    (folder / "common.pt").unlink()
    assert fail(src, tmp_path / "hf2", capsys) == f"{folder}: no common state (args) in the checkpoint and no common.pt"


def test_a_truncated_rank_file_is_named(tmp_path, capsys):
    src = copy("torch_tp2_pp2", tmp_path)
    path = src / RANK_FILE.format("01_001")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    message = fail(src, tmp_path / "hf", capsys)
    assert message.startswith(f"{path}: not a readable torch.save file (") and message.endswith(
        "); is it truncated or damaged?")


def test_a_release_checkpoint_is_read_from_its_tracker_or_its_folder(tmp_path):
    src = copy("torch_dist_tp2", tmp_path)
    (src / "iter_0000010").rename(src / "release")
    (src / "latest_checkpointed_iteration.txt").write_text("release")
    for path in (src, src / "release"):
        weights = read_megatron_checkpoint(path)
        assert weights.iteration == "release" and weights.num_layers == 4


def test_transformer_engine_names_of_the_norms_in_the_torch_format(tmp_path):
    """With --transformer-impl transformer_engine (Megatron-LM's default) the norms live in the fused
    norm+linear modules: linear_qkv.layer_norm_weight, linear_fc1.layer_norm_weight."""
    src = copy("torch_tp2_pp2", tmp_path)
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}

    def rename(state):
        state["model"] = {next((k.replace(a, b) for a, b in te_names.items() if k.endswith(a)), k): v
                          for k, v in state["model"].items()}
    for rank in ("00_000", "01_000", "00_001", "01_001"):
        rewrite(src / RANK_FILE.format(rank), rename)
    convert(src, tmp_path / "hf")
    ids, expected = megatron_logits("torch_tp2_pp2")
    with torch.no_grad():
        logits = load_model(tmp_path / "hf", device="cpu", kernels="reference")(ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_rank_slices_are_joined_one_shard_at_a_time_as_they_are_written(tmp_path, monkeypatch):
    """A 34B checkpoint must not be held whole in memory: the TP slices (memory-mapped) are joined only when
    the writer asks for a tensor, and joined tensors live no longer than the shard being written."""
    import weakref

    from megamath.compat import megatron_checkpoint
    from megamath.compat.megatron_llama import convert_megatron_to_hf

    alive, most = [], [0]
    join = megatron_checkpoint.join_tp_slices

    def counting_join(*args):
        alive[:] = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(alive) + 1)
        joined = join(*args)
        if args[1] in megatron_checkpoint.TP_DIM:  # a norm is one rank's mapped copy, not a new tensor
            alive.append(weakref.ref(joined))
        return joined
    monkeypatch.setattr(megatron_checkpoint, "join_tp_slices", counting_join)
    weights = read_megatron_checkpoint(written("torch_tp2_pp2"))
    from megamath.compat.megatron_llama import llama_state_dict
    llama_state_dict(weights, llama_config(weights.args))
    assert most[0] == 0  # reading and planning join nothing
    convert_megatron_to_hf(written("torch_tp2_pp2"), tmp_path / "hf", max_shard_size="8KB")
    import json
    files = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    per_shard = max(list(files.values()).count(f) for f in set(files.values()))
    assert len(set(files.values())) > 10 and per_shard <= 5
    assert 0 < most[0] <= per_shard + 1  # a shard's worth of joined tensors, not the model's 30


def test_args_that_do_not_match_the_weights_are_refused_before_writing(tmp_path, capsys):
    src = copy("torch_dist_tp2", tmp_path)
    weights = read_megatron_checkpoint(src)
    from megamath.compat.megatron_llama import llama_state_dict
    with pytest.raises(ValueError) as err:
        llama_state_dict(weights, llama_config({**weights.args, "ffn_hidden_size": 40}))
    assert str(err.value) == ("layers.0.fc1: the checkpoint holds shape (96, 32), its args give (80, 32) (linear_qkv: "
                              "(heads + 2 · query groups) · head_dim rows; linear_fc1: 2 · ffn rows)")


def test_torch_dist_layer_weights_are_read_one_layer_window_at_a_time(monkeypatch):
    """A stacked key ([layers, ...]) read whole would hold every layer's copy at once: each read takes one
    layer's window, and the windows equal the whole tensor's slices."""
    from megamath.compat.megatron_torch_dist import DistCheckpoint

    weights = read_megatron_checkpoint(written("torch_dist_tp2"))
    source = weights.tensors["layers.0.qkv"].source
    stacked = [k for k in source.tensor_keys() if k.startswith("decoder.layers.")]
    assert len(stacked) == 6
    for key in stacked:
        whole = source.read(key)
        assert whole.shape[0] == 4
        assert all(torch.equal(source.read(key, i), whole[i]) for i in range(4))
    reads = []
    read = DistCheckpoint.read
    monkeypatch.setattr(DistCheckpoint, "read", lambda self, key, layer=None: reads.append((key, layer)) or
                        read(self, key, layer))
    from megamath.compat.megatron_llama import llama_state_dict
    state = llama_state_dict(weights, llama_config(weights.args))
    assert reads == []  # planning reads nothing
    state["layers.2.mlp.up_proj.weight"].read()
    assert reads == [("decoder.layers.mlp.linear_fc1.weight", 2)]


@pytest.mark.parametrize("fixture, trainer, direction", [
    ("megatron/torch_tp2_pp2", "Megatron-LM", "megatron-to-hf"),
    ("megatron/torch_dist_tp2", "Megatron-LM", "megatron-to-hf"),
    ("neox/llemma_tp2", "GPT-NeoX", "neox-to-hf"), ("neox/main_gqa_tp2", "GPT-NeoX", "neox-to-hf")])
def test_a_foreign_checkpoint_given_as_a_model_names_the_command_that_converts_it(fixture, trainer, direction,
                                                                                  tmp_path):
    """init_from_hf or --model naming a Megatron-LM or GPT-NeoX folder said only "config.json not found"."""
    from megamath.parallel.state import ParallelState
    from megamath.training import loop
    from megamath.training.config import TrainConfig
    from test_train_loop import raw_config

    path = foreign_checkpoints.written(fixture)
    advice = f"is a {trainer} checkpoint: convert it with `megamath convert {direction} {path} HF_DIR`"
    with pytest.raises(ValueError) as err:
        load_model(path, device="cpu")
    assert str(err.value) == f"{path} {advice} and use HF_DIR"
    config = TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / "run", init_from_hf=str(path)))
    with pytest.raises(ValueError) as err:
        loop.build_model(config, ParallelState.single())
    assert str(err.value) == f"init_from_hf: {path} {advice} and set init_from_hf: HF_DIR"


def spm_with_ids(path: Path, bos: int, eos: int) -> Path:
    """A tiny SentencePiece model whose bos/eos are not Llama's 1/2."""
    import io as _io

    import sentencepiece as spm

    model = _io.BytesIO()
    sentences = [f"x + {i} = {i} + x, so the sum is {i * 7}" for i in range(50)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
                                   model_type="bpe", hard_vocab_limit=False, unk_id=0, pad_id=-1, bos_id=bos,
                                   eos_id=eos, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def test_the_special_token_ids_are_those_of_the_runs_sentencepiece_model(tmp_path, capsys):
    import json

    src = copy("torch_tp2_pp2", tmp_path)
    tokenizer = spm_with_ids(tmp_path / "tokenizer.model", bos=3, eos=4)

    def name_tokenizer(state):
        state["args"].tokenizer_type, state["args"].tokenizer_model = "GPTSentencePieceTokenizer", str(tokenizer)
    rewrite(src / RANK_FILE.format("00_000"), name_tokenizer)  # the args are read from TP 0, PP 0
    convert(src, tmp_path / "hf")
    assert f"special tokens from the args' tokenizer_model {tokenizer}: bos 3, eos 4" in capsys.readouterr().out
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (3, 4, None)
    tokenizer.unlink()  # named but not here (the run's path on another machine): Llama's, said so
    convert(src, tmp_path / "hf2")
    assert (f"special tokens: Llama's bos 1 / eos 2 written (the args' tokenizer_model {tokenizer} is not here); "
            "edit config.json if the tokenizer differs") in capsys.readouterr().out
    convert(written("torch_dist_tp2"), tmp_path / "hf3")  # NullTokenizer
    assert ("special tokens: Llama's bos 1 / eos 2 written (tokenizer_type NullTokenizer names no SentencePiece "
            "model)") in capsys.readouterr().out


def test_a_flipped_byte_in_torch_dist_data_is_caught_by_the_chunks_crc(tmp_path, capsys):
    """Each stored chunk of a distributed checkpoint is a torch.save record whose CRC-32 the loader does not
    check: the damaged weight converted silently."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    src = copy("torch_dist_tp2", tmp_path)
    folder = src / "iter_0000010"
    metadata = FileSystemReader(str(folder)).read_metadata()
    key = "decoder.layers.mlp.linear_fc2.weight"
    info = metadata.storage_data[MetadataIndex(key, torch.Size([2, 0, 0]))]
    path = folder / info.relative_path
    original = path.read_bytes()
    data = bytearray(original)
    data[info.offset + info.length // 2] ^= 0x01  # in its tensor data
    path.write_bytes(bytes(data))
    assert fail(src, tmp_path / "hf", capsys) == (f"{path}: the stored chunk of {key} at [2, 0, 0] fails its "
                                                  "CRC-32 check: the file is damaged")
    data = bytearray(original)
    data[info.offset + info.length - 30] ^= 0x01  # in its zip directory, which torch's reader refuses
    path.write_bytes(bytes(data))
    message = fail(src, tmp_path / "hf", capsys)  # one line, not the loader's traceback
    assert message.startswith(f"{folder}: reading {key} failed: ") and "\n" not in message


def test_a_batch_size_ramp_is_noted_beside_the_continue_hint(tmp_path, capsys, monkeypatch):
    """init_step continues at iteration × global batch; after a ramp the run had read fewer samples."""
    from megamath.compat import megatron_llama

    real = megatron_llama.convert_megatron_to_hf

    def ramped(*args, **kwargs):
        config, read, special = real(*args, **kwargs)
        read.args["consumed_train_samples"] = 72
        return config, read, special

    monkeypatch.setattr(megatron_llama, "convert_megatron_to_hf", ramped)
    convert(written("torch_tp2_pp2"), tmp_path / "hf")
    assert ("note: its consumed_train_samples 72 is not iteration × global batch 80 (a batch-size ramp?): init_step "
            "continues at sample 80 of the order") in capsys.readouterr().out


def test_zero_centered_norms_convert_with_the_one_added_back(tmp_path):
    """--apply-layernorm-1p (Megatron-LM's own Llama 3 example sets it) stores each norm weight as γ − 1; it was
    refused. The converted model computes the model's own logits, its norms γ."""
    model = tc.source_model(seed=7)
    src = tc.write_megatron_torch_dist(model, tmp_path / "megatron", tp=2, zero_centered_gamma=True)
    stored = read_megatron_checkpoint(src).tensors
    norm = next(name for name in stored if name.endswith("final_norm"))
    assert read_megatron_checkpoint(src).tensor(norm).abs().max() < 0.5  # around 0, not 1: γ − 1 is stored
    convert(src, tmp_path / "hf")
    converted = load_model(tmp_path / "hf", device="cpu", kernels="reference")
    with torch.no_grad():
        torch.testing.assert_close(converted(tc.INPUT_IDS).float(), tc.logits(model).float(), rtol=1e-5, atol=1e-5)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    torch.testing.assert_close(weights["model.norm.weight"].float(), model.state_dict()["norm.weight"].float())
