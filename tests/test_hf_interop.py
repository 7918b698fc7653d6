"""Checkpoint conversion: Hugging Face Llama <-> megamath, sharded and not, with clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megamath.cli import main
from megamath.model import Llama, ModelConfig
from megamath.model.hf_llama import hf_config_to_model_config, to_hf_name
from megamath.model.model_folder import (convert_hf_to_megamath, convert_megamath_to_hf, load_model_folder,
                                         save_model_folder)
from megamath.model.safetensors_io import INDEX_NAME, WEIGHTS_NAME, parse_size
from megamath.model.partition import parameter_shapes

# GQA (4 q heads, 2 kv heads), an odd vocabulary, a non-default RoPE base and norm epsilon.
SMALL = dict(vocab_size=1003, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
             max_seq_length=128, rope_theta=500000.0, norm_eps=1e-5, kernels="reference")
SHARD = 100_000  # bytes: the small model (~880 KB in fp32) spreads over several shards


def read_dir(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by name, whatever its sharding."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture
def megamath_ckpt(tmp_path):
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL))
    return save_model_folder(model, tmp_path / "ours"), model


# ---- without transformers ----------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500kb") == 500_000
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match=r"^cannot parse size '5 GBs'; use e\.g\. 5GB"):
        parse_size("5 GBs")


def test_save_and_load_checkpoint(megamath_ckpt):
    directory, model = megamath_ckpt
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert json.loads((directory / "config.json").read_text()) == model.config.to_dict()
    loaded = load_model_folder(directory, kernels="reference")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = torch.randint(0, 1003, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_and_checkpoints_get_the_umask_permissions(megamath_ckpt, tmp_path, umask):
    """safetensors writes 0600 files: an export on a shared file system was unreadable to the team."""
    import os
    import stat

    from test_train_loop import raw_config, run

    previous = os.umask(umask)
    try:
        convert_megamath_to_hf(megamath_ckpt[0], tmp_path / "hf", max_shard_size=SHARD)
        run(raw_config(tmp_path / "data", tmp_path / "run", train_steps=1))
    finally:
        os.umask(previous)
    files = [*(tmp_path / "hf").glob("*.safetensors"), *(tmp_path / "run").glob("checkpoints/step_*/*.safetensors")]
    assert len(files) > 2
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}


def test_megamath_to_hf_to_megamath_is_bit_exact_when_sharded(megamath_ckpt, tmp_path):
    directory, model = megamath_ckpt
    convert_megamath_to_hf(directory, tmp_path / "hf", max_shard_size=SHARD, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "hf" / INDEX_NAME).read_text())
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:  # every shard within the limit unless it holds one oversized tensor
        with safe_open(str(tmp_path / "hf" / file), "pt") as f:
            sizes = [f.get_tensor(n).numel() * 2 for n in f.keys()]
        assert sum(sizes) <= SHARD or len(sizes) == 1
    exported = read_dir(tmp_path / "hf")
    assert set(exported) == set(index["weight_map"]) == {to_hf_name(n) for n in model.state_dict()}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in exported.values())
    for name, tensor in model.state_dict().items():
        assert torch.equal(exported[to_hf_name(name)], tensor.to(torch.bfloat16)), name
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["torch_dtype"] == "bfloat16" and hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config_to_model_config(hf_config) == ModelConfig(**{**SMALL, "kernels": "auto"})

    convert_hf_to_megamath(tmp_path / "hf", tmp_path / "back")
    back = read_dir(tmp_path / "back")
    assert set(back) == set(parameter_shapes(model.config))
    for name, tensor in back.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, exported[to_hf_name(name)]), name


def test_hf_config_errors():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_attention_heads": 2, "num_hidden_layers": 1}
    cases = [
        ({"tie_word_embeddings": True}, "Hugging Face config: tie_word_embeddings must be false "
                                        "(megamath's Llama has an untied embedding and LM head)"),
        ({"model_type": "mistral"}, "Hugging Face config: model_type must be 'llama', got 'mistral'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
         "Hugging Face config: RoPE scaling 'linear' is not supported (only plain RoPE)"),
        ({"attention_bias": True}, "Hugging Face config: attention_bias must be false (megamath's Llama has no biases)"),
        ({"head_dim": 8}, "Hugging Face config: head_dim 8 must equal hidden_size / num_attention_heads = 4"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError) as err:
            hf_config_to_model_config({**base, **change})
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^Hugging Face config: missing keys intermediate_size$"):
        hf_config_to_model_config({k: v for k, v in base.items() if k != "intermediate_size"})
    # transformers 5 nests θ under rope_parameters; 4.x keeps it top-level.
    assert hf_config_to_model_config({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
                                     ).rope_theta == 1e6
    assert hf_config_to_model_config({**base, "rope_theta": 1e6}).num_kv_heads == 2


def _export(megamath_ckpt, tmp_path):
    directory, _ = megamath_ckpt
    convert_megamath_to_hf(directory, tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_and_unknown_tensors_are_named(megamath_ckpt, tmp_path):
    hf = _export(megamath_ckpt, tmp_path)
    tensors = load_file(hf / WEIGHTS_NAME)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf / WEIGHTS_NAME))
    with pytest.raises(ValueError) as err:
        convert_hf_to_megamath(hf, tmp_path / "out")
    assert str(err.value) == "checkpoint is missing tensors: model.layers.1.mlp.up_proj.weight"
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(176, 64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old HF files: ignored
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(176, 64)
    tensors["transformer.wte.weight"] = torch.zeros(3)
    save_file(tensors, str(hf / WEIGHTS_NAME))
    with pytest.raises(ValueError) as err:
        convert_hf_to_megamath(hf, tmp_path / "out")
    assert str(err.value) == "checkpoint has unknown tensors: transformer.wte.weight"
    del tensors["transformer.wte.weight"]
    save_file(tensors, str(hf / WEIGHTS_NAME))
    with pytest.raises(ValueError) as err:
        convert_hf_to_megamath(hf, tmp_path / "out")
    assert str(err.value) == "checkpoint has unknown tensors: model.layers.2.mlp.up_proj.weight"
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(hf / WEIGHTS_NAME))
    with pytest.raises(ValueError) as err:
        convert_hf_to_megamath(hf, tmp_path / "out")
    assert str(err.value) == "checkpoint tensors have wrong shapes: model.norm.weight (65,) (expected (64,))"
    assert not (tmp_path / "out").exists()


def test_missing_files_and_existing_destination(megamath_ckpt, tmp_path):
    hf = _export(megamath_ckpt, tmp_path)
    with pytest.raises(FileExistsError, match=r"already exists and is not an empty directory$"):
        convert_hf_to_megamath(hf, hf)
    (hf / WEIGHTS_NAME).rename(hf / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as err:
        convert_hf_to_megamath(hf, tmp_path / "out")
    assert str(err.value) == (f"{hf}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found "
                              "(found pytorch_model.bin: only safetensors checkpoints are read)")
    (hf / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        convert_hf_to_megamath(hf, tmp_path / "out")
    assert str(err.value) == f"{hf / 'config.json'} not found"
    with pytest.raises(ValueError, match="this looks like a Hugging Face config.json"):
        convert_megamath_to_hf(_export(megamath_ckpt, tmp_path / "again"), tmp_path / "out")


def test_index_listing_a_missing_shard(megamath_ckpt, tmp_path):
    directory, _ = megamath_ckpt
    convert_megamath_to_hf(directory, tmp_path / "hf", max_shard_size=SHARD)
    shard = sorted((tmp_path / "hf").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError) as err:
        convert_hf_to_megamath(tmp_path / "hf", tmp_path / "out")
    assert str(err.value) == f"{shard} (listed in {INDEX_NAME}) not found"


def test_cli(megamath_ckpt, tmp_path, capsys):
    directory, model = megamath_ckpt
    assert main(["convert", "megamath-to-hf", str(directory), str(tmp_path / "hf"), "--max-shard-size", "200KB"]) == 0
    assert "2 layers, hidden 64, 220,864 parameters" in capsys.readouterr().out
    assert main(["convert", "hf-to-megamath", str(tmp_path / "hf"), str(tmp_path / "back"), "--dtype", "float16"]) == 0
    assert read_dir(tmp_path / "back")["lm_head.weight"].dtype == torch.float16
    assert main(["convert", "hf-to-megamath", str(tmp_path / "hf"), str(tmp_path / "back")]) == 2
    assert capsys.readouterr().err.strip().endswith("back already exists and is not an empty directory")


# ---- against transformers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    config = transformers.LlamaConfig(
        vocab_size=1003, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initializes norms to ones; random ones catch a swapped norm mapping
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    return transformers, model, root


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_import_gives_the_same_logits(hf_model, tmp_path, layout):
    transformers, model, root = hf_model
    assert (root / layout / INDEX_NAME).exists() == (layout == "sharded")
    convert_hf_to_megamath(root / layout, tmp_path / "ours")
    ours = load_model_folder(tmp_path / "ours", kernels="reference").eval()
    assert ours.config.rope_theta == 500000.0 and ours.config.num_kv_heads == 2
    tokens = torch.randint(0, 1003, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-4


def test_hf_export_loads_in_transformers_bit_exactly(hf_model, tmp_path):
    transformers, model, root = hf_model
    convert_hf_to_megamath(root / "sharded", tmp_path / "ours")
    convert_megamath_to_hf(tmp_path / "ours", tmp_path / "hf", max_shard_size="150KB")
    original = read_dir(root / "single")
    exported = read_dir(tmp_path / "hf")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, 1003, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


# ---- what the architecture does not show: RoPE's keys, activation names, special tokens --------------------

BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
        "num_hidden_layers": 1}
DEFAULT = {"rope_type": "default"}
# (legacy and new RoPE keys, θ megamath reads or the refusal), each read as transformers 5 reads it
ROPE_CASES = [
    ({"rope_parameters": DEFAULT, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
     "Hugging Face config: RoPE scaling 'linear' is not supported (only plain RoPE)"),  # rope_scaling wins
    ({"rope_scaling": DEFAULT, "rope_theta": 1e6}, 1e6),  # θ fills what rope_scaling lacks
    ({"rope_scaling": {"type": "default"}, "rope_theta": 1e6, "rope_parameters": {**DEFAULT, "rope_theta": 1e6}}, 1e6),
    ({"rope_theta": 1e6, "rope_parameters": DEFAULT}, 1e6),
    ({"rope_parameters": {**DEFAULT, "rope_theta": 5e5}}, 5e5),
    ({"rope_scaling": None, "rope_theta": 5e5}, 5e5),  # what megamath writes
    ({"rope_scaling": DEFAULT, "rope_theta": 1e6, "rope_parameters": {**DEFAULT, "rope_theta": 1e4}},
     "Hugging Face config: rope_scaling {'rope_type': 'default'} and rope_parameters {'rope_type': 'default', "
     "'rope_theta': 10000.0} disagree (transformers reads rope_scaling); make them match or drop one"),
    ({"rope_theta": 1e6, "rope_parameters": {**DEFAULT, "rope_theta": 1e4}},
     "Hugging Face config: rope_theta 1000000.0 and rope_parameters's rope_theta 10000.0 disagree (transformers 5 "
     "reads rope_parameters's, 4.x the top-level one); make them match"),
    ({"rope_parameters": "default"}, "Hugging Face config: rope_parameters must be an object or null, got 'default'"),
]


@pytest.mark.parametrize("change, expected", ROPE_CASES)
def test_rope_is_read_as_transformers_reads_it_or_refused(change, expected):
    """rope_parameters {'default'} beside rope_scaling {'linear'} converted as plain RoPE, and rope_scaling
    {'default'} beside rope_theta 1e6 as θ 1e4: transformers reads both otherwise."""
    if isinstance(expected, str):
        with pytest.raises(ValueError) as err:
            hf_config_to_model_config({**BASE, **change})
        assert str(err.value) == expected
        return
    assert hf_config_to_model_config({**BASE, **change}).rope_theta == expected
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    theirs = transformers.LlamaConfig.from_dict(json.loads(json.dumps({**BASE, **change}))).rope_parameters
    assert (theirs["rope_type"], theirs["rope_theta"]) == ("default", expected)


def test_transformers_reads_the_refused_linear_case_as_linear():
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    config = transformers.LlamaConfig.from_dict(json.loads(json.dumps({**BASE, **ROPE_CASES[0][0]})))  # a copy
    assert config.rope_parameters["rope_type"] == "linear"


def test_swish_is_silu():
    """transformers' ACT2FN maps "swish" to the same SiLU; it was refused."""
    assert hf_config_to_model_config({**BASE, "hidden_act": "swish"}) == hf_config_to_model_config(BASE)
    with pytest.raises(ValueError, match=r"^Hugging Face config: hidden_act must be 'silu', got 'gelu'$"):
        hf_config_to_model_config({**BASE, "hidden_act": "gelu"})


def test_special_token_ids_and_generation_config_survive_a_round_trip(megamath_ckpt, tmp_path):
    """HF -> megamath -> HF turned bos 0 / eos [5, 6] / pad 3 into Llama 2's 1 / 2 / None and dropped
    generation_config.json: generation of the export never stopped at its end-of-turn token."""
    hf = _export(megamath_ckpt, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # a megamath model folder without ids
    ids = {"bos_token_id": 0, "eos_token_id": [5, 6], "pad_token_id": 3}
    (hf / "config.json").write_text(json.dumps({**config, **ids}))
    generation = '{\n  "bos_token_id": 0,\n  "eos_token_id": [5, 6, 7],\n  "temperature": 0.6\n}\n'
    (hf / "generation_config.json").write_text(generation)
    convert_hf_to_megamath(hf, tmp_path / "mm")
    assert json.loads((tmp_path / "mm" / "token_ids.json").read_text()) == ids
    assert load_model_folder(tmp_path / "mm").config == ModelConfig(**{**SMALL, "kernels": "auto"})
    convert_megamath_to_hf(tmp_path / "mm", tmp_path / "hf2")
    back = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert {k: back[k] for k in ids} == ids
    assert (tmp_path / "hf2" / "generation_config.json").read_text() == generation
    assert not (tmp_path / "hf2" / "token_ids.json").exists()
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2")
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id, loaded.config.pad_token_id) == (0, [5, 6], 3)
    assert loaded.generation_config.eos_token_id == [5, 6, 7]


@pytest.mark.parametrize("value", ["</s>", [5, "6"], True, 1.5])
def test_a_special_token_id_of_the_wrong_type_is_one_line(megamath_ckpt, tmp_path, value):
    hf = _export(megamath_ckpt, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "eos_token_id": value}))
    with pytest.raises(ValueError) as err:
        convert_hf_to_megamath(hf, tmp_path / "mm")
    assert str(err.value) == (f"{hf / 'config.json'}: eos_token_id must be a token id, a list of them or null, "
                              f"got {value!r}")


def test_an_old_configs_pad_of_minus_one_is_carried_as_given(megamath_ckpt, tmp_path):
    hf = _export(megamath_ckpt, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))
    convert_hf_to_megamath(hf, tmp_path / "mm")
    convert_megamath_to_hf(tmp_path / "mm", tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["pad_token_id"] == -1
