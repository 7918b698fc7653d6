"""`megamath convert megamath-to-hf` on what training writes: a run directory or a step folder, any TP size."""
import json

import pytest
import torch
from safetensors.torch import load_file

from megamath.cli import main
from megamath.model.safetensors_io import SafetensorsReader
from megamath.model.llama import Llama
from megamath.training.config import TrainConfig
from megamath.training.reshard import reshard_checkpoint
from test_train_loop import one_thread, raw_config, run  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trained")
    raw = raw_config(tmp / "data", tmp / "run", train_steps=4, checkpoint__save_every=0)
    run(raw)
    reshard_checkpoint(tmp / "run", tmp / "tp2", tp_size=2)  # the same state as TP 2 slices
    torch.set_num_threads(before)
    return tmp, TrainConfig.from_dict(raw)


def megamath_logits(config: TrainConfig, step_dir, tokens):
    with torch.device("meta"):
        model = Llama(config.model)
    model.to_empty(device="cpu").load_state_dict(load_file(str(step_dir / "model_tp00.safetensors")))
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("source", ["run", "step", "tp2"])
def test_export_of_a_training_checkpoint_loads_in_transformers_with_equal_logits(trained, tmp_path, capsys,
                                                                                 source):
    transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")
    tmp, config = trained
    step_dir = tmp / "run" / "checkpoints" / "step_0000004"
    src = {"run": tmp / "run", "step": step_dir, "tp2": tmp / "tp2"}[source]
    assert main(["convert", "megamath-to-hf", str(src), str(tmp_path / "hf")]) == 0
    assert "2 layers, hidden 32" in capsys.readouterr().out
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "llama" and hf_config["torch_dtype"] == "float32"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(tokens).logits
    expected = megamath_logits(config, step_dir, tokens)
    assert (got - expected).abs().max().item() <= 1e-5


def test_export_checks_the_model_files_and_refuses_a_damaged_one(trained, tmp_path, capsys):
    import shutil

    tmp, _ = trained
    shutil.copytree(tmp / "tp2", tmp_path / "tp2")
    shard = tmp_path / "tp2" / "checkpoints" / "step_0000004" / "model_tp01.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["convert", "megamath-to-hf", str(tmp_path / "tp2"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megamath convert: error: checkpoint file {shard} is ") and "expected" in err
    assert not (tmp_path / "hf").exists()


def test_hf_index_entries_outside_the_folder_are_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/x"}}))
    with pytest.raises(ValueError, match=r"weight_map names '\.\./\.\./etc/x', not a file name inside"):
        SafetensorsReader(tmp_path)


def test_a_run_started_from_a_model_folder_exports_its_special_tokens(tmp_path):
    """The export wrote Llama 2's bos 1 / eos 2 whatever the model the run started from said, and no
    generation_config.json; they are the init folder's, recorded in the checkpoints' metadata."""
    import shutil

    from megamath.model.config import ModelConfig
    from megamath.model.model_folder import save_model_folder
    from megamath.training.checkpoint_integrity import sealed_metadata_text

    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=1, checkpoint__save_every=0)
    save_model_folder(Llama(ModelConfig(**raw["model"])), tmp_path / "init")
    ids = {"bos_token_id": 0, "eos_token_id": [5, 6], "pad_token_id": 3}
    (tmp_path / "init" / "token_ids.json").write_text(json.dumps(ids))
    (tmp_path / "init" / "generation_config.json").write_text('{"eos_token_id": [5, 6, 7]}\n')
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run({**raw, "init_from_hf": str(tmp_path / "init")})
    finally:
        torch.set_num_threads(before)
    shutil.move(tmp_path / "init", tmp_path / "moved")  # the record, not the folder, is what the export reads
    assert main(["convert", "megamath-to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in ids} == ids
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"eos_token_id": [5, 6, 7]}
    # A checkpoint saved before the record: the folder's ids when it is there with the run's vocabulary,
    # Llama 2's when it holds another tokenizer's model (its ids would be wrong, not missing).
    step = tmp_path / "run" / "checkpoints" / "step_0000001"
    meta = json.loads((step / "metadata.json").read_text())
    assert meta["hf_extras"] == {"token_ids": ids, "generation_config": {"eos_token_id": [5, 6, 7]}}
    del meta["hf_extras"]
    (step / "metadata.json").write_text(sealed_metadata_text(meta))
    shutil.move(tmp_path / "moved", tmp_path / "init")
    assert main(["convert", "megamath-to-hf", str(tmp_path / "run"), str(tmp_path / "hf1")]) == 0
    assert {k: json.loads((tmp_path / "hf1" / "config.json").read_text())[k] for k in ids} == ids
    (tmp_path / "init" / "config.json").write_text(json.dumps({**raw["model"], "vocab_size": 65}))
    assert main(["convert", "megamath-to-hf", str(tmp_path / "run"), str(tmp_path / "hf2")]) == 0
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], "pad_token_id" in config) == (1, 2, False)
    assert not (tmp_path / "hf2" / "generation_config.json").exists()


def test_an_export_cast_that_overflows_is_refused(trained, tmp_path, capsys):
    """--dtype float16 on weights beyond ±65504 wrote inf with exit status 0."""
    import shutil

    from safetensors.torch import save_file

    from megamath.training.checkpoint_integrity import file_digest, sealed_metadata_text

    tmp, _ = trained
    step = shutil.copytree(tmp / "run" / "checkpoints" / "step_0000004", tmp_path / "step_0000004")
    tensors = load_file(str(step / "model_tp00.safetensors"))
    tensors["layers.1.mlp.down_proj.weight"][0, :2] = 1e6
    save_file(tensors, str(step / "model_tp00.safetensors"))
    meta = json.loads((step / "metadata.json").read_text())
    meta["checksums"] = {name: file_digest(step / name) for name in meta["files"]}
    (step / "metadata.json").write_text(sealed_metadata_text(meta))
    assert main(["convert", "megamath-to-hf", str(step), str(tmp_path / "hf"), "--dtype", "float16"]) == 2
    assert capsys.readouterr().err == (
        "megamath convert: error: tensor model.layers.1.mlp.down_proj.weight: casting float32 to float16 turns 2 "
        "finite values into inf (largest 1e+06, the most float16 holds is 65504); keep the stored dtype or choose "
        "a wider one\n")
    assert not (tmp_path / "hf").exists()
    assert main(["convert", "megamath-to-hf", str(step), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0


def test_a_resumed_run_keeps_its_checkpoints_record_and_a_bad_record_is_one_line(tmp_path):
    from megamath.model.model_folder import read_hf_extras_record
    from megamath.training.loop import hf_extras_of_run

    raw = raw_config(tmp_path / "data", tmp_path / "run")
    config = TrainConfig.from_dict({**raw, "init_from_hf": str(tmp_path / "gone")})
    record = {"token_ids": {"eos_token_id": 9}, "generation_config": None}
    assert hf_extras_of_run(config, {"hf_extras": record}) is record  # the folder, gone, is not read again
    assert hf_extras_of_run(TrainConfig.from_dict(raw), None) is None  # a run from scratch records nothing
    for bad in ({"token_ids": [9], "generation_config": None}, {"token_ids": {}, "generation_config": 3}, "x"):
        with pytest.raises(ValueError, match=r"^m\.json: hf_extras must map token_ids to a mapping"):
            read_hf_extras_record(bad, "m.json")
    with pytest.raises(ValueError, match=r"^m\.json: eos_token_id must be a token id"):
        read_hf_extras_record({"token_ids": {"eos_token_id": "</s>"}, "generation_config": None}, "m.json")
