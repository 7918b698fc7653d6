"""`megamath convert neox-to-hf` against checkpoints and logits written by GPT-NeoX itself
(tests/fixtures/neox/write_fixtures.py says how): the llemma branch LLEMMA was trained with (multi-head and
grouped-query, sequential files) and GPT-NeoX main (grouped-query, pipeline files), each at TP 2; the
converted model computes GPT-NeoX's logits in megamath and in transformers; faults are one line."""
from __future__ import annotations

import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from megamath.compat.pickle_guard import guarded_load
from megamath.generation.loading import load_model

from foreign_checkpoints import Trainer, rewrite

CHECKPOINTS = {"llemma_tp2": "sequential files, TP 2", "llemma_gqa_tp2": "sequential files, TP 2",
               "main_gqa_tp2": "pipeline files, TP 2"}


convert, fail, copy, written, neox_logits = Trainer("neox", "neox-to-hf").helpers()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_converted_model_computes_neox_logits(name, tmp_path, capsys):
    convert(written(name), tmp_path / "hf")
    out = capsys.readouterr().out
    assert f"(neox-to-hf): global_step10, {CHECKPOINTS[name]}; 2 layers, hidden 32" in out
    assert (f"init_from_hf: {tmp_path / 'hf'}, init_step: 10, data.sample_order: neox, and its train_steps "
            "(train_iters)") in out
    assert ("note: rms_norm_epsilon 1e-10: the llemma branch's RMSNorm" in out) == name.startswith("llemma")
    ids, expected = neox_logits(name)
    model = load_model(tmp_path / "hf", device="cpu", kernels="reference")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_transformers_loads_the_folder_and_computes_neox_logits(name, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    convert(written(name), tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, expected = neox_logits(name)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_save_folder_and_the_step_folder_convert_alike_and_vocab_size_trims(tmp_path):
    convert(written("llemma_gqa_tp2"), tmp_path / "a", "--vocab-size", "50")
    convert(written("llemma_gqa_tp2") / "global_step10", tmp_path / "b", "--vocab-size", "50")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.embed_tokens.weight"].shape == (50, 32) and a["lm_head.weight"].shape == (50, 32)
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # 2 KV heads of 8


# ---- refused, with the cause --------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path, capsys):
    src = copy("llemma_tp2", tmp_path)
    (src / "global_step10" / "mp_rank_01_model_states.pt").unlink()
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'global_step10'}: mp_rank_01_model_states.pt missing "
                                                  "(model_parallel_size 2)")
    src = copy("main_gqa_tp2", tmp_path)
    (src / "global_step10" / "layer_03-model_01-model_states.pt").unlink()
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'global_step10'}: layer_03-model_01-model_states.pt "
                                                  "missing (model_parallel_size 2)")


def test_a_checkpoint_without_its_config_says_where_to_put_it(tmp_path, capsys):
    src = copy("llemma_tp2", tmp_path)
    shutil.rmtree(src / "global_step10" / "configs")
    assert fail(src, tmp_path / "hf", capsys) == (
        f"{src / 'global_step10'}: no configs/*.yml (GPT-NeoX copies the run's YAML files there); copy the run's "
        "config files into that folder")


def test_folders_that_are_not_a_checkpoint_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert fail(tmp_path / "empty", tmp_path / "hf", capsys) == (
        f"{tmp_path / 'empty'}: not a GPT-NeoX checkpoint (no 'latest' file, no mp_rank_00_model_states.pt, no "
        "layer_*-model_*-model_states.pt)")
    src = copy("llemma_tp2", tmp_path)
    (src / "latest").write_text("global_step20")
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'latest'} names 'global_step20', but "
                                                  f"{src / 'global_step20'} is not there")


def test_a_tensor_of_another_architecture_is_refused_by_name(tmp_path, capsys):
    src = copy("llemma_tp2", tmp_path)
    for rank in (0, 1):
        rewrite(src / "global_step10" / f"mp_rank_{rank:02d}_model_states.pt",
                lambda s: s["module"].__setitem__("sequential.2.attention.dense.bias", torch.zeros(32)))
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'global_step10'}: unexpected tensor attention.dense.bias "
                                                  "in layer 0: megamath converts the Llama architecture only "
                                                  "(RMSNorm, SwiGLU, no biases)")


def test_a_config_of_another_architecture_is_refused_by_its_key(tmp_path, capsys):
    src = copy("llemma_tp2", tmp_path)
    config = src / "global_step10" / "configs" / "tiny.yml"
    config.write_text(config.read_text().replace('"no_weight_tying": true', '"no_weight_tying": false'))
    assert fail(src, tmp_path / "hf", capsys) == ("no_weight_tying is False: megamath trains the Llama "
                                                  "architecture only (untied input and output embeddings)")


def test_heads_that_do_not_match_the_weights_are_refused(tmp_path, capsys):
    src = copy("llemma_gqa_tp2", tmp_path)
    config = src / "global_step10" / "configs" / "tiny.yml"
    config.write_text(config.read_text().replace('"num_kv_heads": 2', '"num_kv_heads": 4'))
    assert fail(src, tmp_path / "hf", capsys) == ("layer 0: query_key_value has 32 rows per rank, expected (heads + "
                                                  "2 · kv_heads) · head_dim / TP = 48: the config's heads do not "
                                                  "match the weights")


def test_norms_that_differ_between_tp_ranks_are_averaged_as_neox_averages_them(tmp_path, capsys):
    src = copy("llemma_tp2", tmp_path)
    rewrite(src / "global_step10" / "mp_rank_01_model_states.pt",
            lambda s: s["module"]["sequential.5.norm.scale"].add_(0.5))
    convert(src, tmp_path / "hf")
    assert "note: the final norm: norm.scale differs between TP ranks by up to 0.25; their mean is written" \
        in capsys.readouterr().out
    rank0 = guarded_load(src / "global_step10" / "mp_rank_00_model_states.pt")["module"]["sequential.5.norm.scale"]
    written = load_file(tmp_path / "hf" / "model.safetensors")["model.norm.weight"]
    torch.testing.assert_close(written, rank0 + 0.25)


def test_a_flipped_byte_in_a_weight_is_caught_by_the_files_crc(tmp_path, capsys):
    """torch.load does not check the zip records' CRC-32: the damaged weight converted without a word."""
    src = copy("llemma_tp2", tmp_path)
    path = src / "global_step10" / "mp_rank_01_model_states.pt"
    with zipfile.ZipFile(path) as archive:  # the largest record: a weight's data
        record = max(archive.infolist(), key=lambda info: info.compress_size)
    data = bytearray(path.read_bytes())
    data[record.header_offset + 100 + record.compress_size // 2] ^= 0xFF  # inside that tensor's bytes
    path.write_bytes(bytes(data))
    assert fail(src, tmp_path / "hf", capsys) == (f"{path}: record {record.filename} fails its "
                                                  "CRC-32 check: the file is damaged")


def test_a_config_whose_mlp_width_does_not_match_the_weights_is_refused_before_writing(tmp_path, capsys):
    src = copy("main_gqa_tp2", tmp_path)
    config = src / "global_step10" / "configs" / "tiny.yml"
    config.write_text(config.read_text().replace('"intermediate_size": 96', '"intermediate_size": 192'))
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'global_step10'}: layers.0.mlp.up_proj.weight comes out "
                                                  "of the checkpoint with shape (32, 32), the config gives (64, 32)")


def test_the_special_token_ids_are_those_of_the_configs_sentencepiece_vocab_file(tmp_path, capsys):
    import json

    from test_megatron_checkpoint import spm_with_ids

    src = copy("llemma_tp2", tmp_path)
    tokenizer = spm_with_ids(tmp_path / "tokenizer.model", bos=5, eos=6)
    (src / "global_step10" / "configs" / "tokenizer.yml").write_text(
        f'{{"tokenizer_type": "SPMTokenizer", "vocab_file": "{tokenizer}"}}')
    convert(src, tmp_path / "hf")
    assert f"special tokens from the config's vocab_file {tokenizer}: bos 5, eos 6" in capsys.readouterr().out
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (5, 6)


def test_rank_files_beyond_the_configs_tensor_parallel_size_are_refused(tmp_path, capsys):
    """Reading only the first rank's files would have written half-width weights."""
    src = copy("llemma_tp2", tmp_path)
    config = src / "global_step10" / "configs" / "tiny.yml"
    config.write_text(config.read_text().replace('"model_parallel_size": 2', '"model_parallel_size": 1'))
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'global_step10'}: files of tensor-parallel rank 1, but "
                                                  "the config says model_parallel_size 1")


def test_ranks_that_hold_different_tensors_are_refused(tmp_path, capsys):
    src = copy("llemma_tp2", tmp_path)
    rewrite(src / "global_step10" / "mp_rank_01_model_states.pt",
            lambda s: s["module"].pop("sequential.3.mlp.w3.weight"))
    assert fail(src, tmp_path / "hf", capsys) == (f"{src / 'global_step10'}: module 3 holds other tensors on TP rank 1 "
                                                  "than on rank 0 (mlp.w3.weight)")


def test_a_row_parallel_output_layer_is_refused(tmp_path, capsys):
    src = copy("main_gqa_tp2", tmp_path)
    config = src / "global_step10" / "configs" / "tiny.yml"
    config.write_text(config.read_text().replace('"output_layer_parallelism": "column"',
                                                 '"output_layer_parallelism": "row"'))
    assert fail(src, tmp_path / "hf", capsys).startswith("output_layer_parallelism is 'row': GPT-NeoX's row-parallel "
                                                         "output layer is turned off")


def test_config_from_neox_gives_the_step_to_continue_its_load_checkpoint_from(tmp_path):
    """load without finetune: GPT-NeoX goes on from the checkpoint's step, which the listing now names."""
    from megamath.compat.neox import convert_neox, read_neox_yaml
    from test_config_from_neox import LLEMMA_7B_YML, write_llemma

    load = written("llemma_gqa_tp2")
    text = (LLEMMA_7B_YML.replace('"/path/to/converted/codellama_7b_weights_with_mp2"', f'"{load}"')
            .replace('"finetune": true,', '"finetune": false,'))
    listed = {u.key: u for u in convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).unmapped}
    assert listed["load"].reason.endswith("(and, to go on from its iteration as GPT-NeoX does without finetune, "
                                          f"init_step: 10); or keep its optimizer state too: `megamath convert "
                                          f"neox-to-run {load} RUN_DIR --config` this config")
    for folder, said in ((load / "global_step10", "init_step: 10)"),
                         (tmp_path / "elsewhere", "init_step: the iteration the convert command prints)")):
        said += f"; or keep its optimizer state too: `megamath convert neox-to-run {folder} RUN_DIR --config` this config"
        text = LLEMMA_7B_YML.replace('"/path/to/converted/codellama_7b_weights_with_mp2"', f'"{folder}"').replace(
            '"finetune": true,', '"finetune": false,')
        listed = {u.key: u for u in convert_neox(read_neox_yaml(write_llemma(tmp_path, text)),
                                                 vocab_size=32016).unmapped}
        assert listed["load"].reason.endswith(said)
