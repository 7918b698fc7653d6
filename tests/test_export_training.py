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
