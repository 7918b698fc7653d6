"""megamath convert on what it must refuse or fix, not convert into garbage: non-float and mixed dtypes,
casts that overflow, malformed indexes; and how it publishes DST (fsynced, '.', symlinks)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from megamath.cli import main
from megamath.generation.loading import load_model
from megamath.model import Llama, ModelConfig
from megamath.model import safetensors_io
from megamath.model.model_folder import (convert_hf_to_megamath, convert_megamath_to_hf, load_model_folder,
                                         save_model_folder)
from megamath.model.safetensors_io import INDEX_NAME, WEIGHTS_NAME
from test_hf_interop import SHARD, SMALL, read_dir

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def hf_dir(tmp_path):
    """A Hugging Face folder (one file, fp32) of the small model."""
    torch.manual_seed(0)
    save_model_folder(Llama(ModelConfig(**SMALL)), tmp_path / "source")
    convert_megamath_to_hf(tmp_path / "source", tmp_path / "hf")
    return tmp_path / "hf"


def edit(folder, change: dict) -> None:
    """Replace tensors of a one-file folder: name -> function of the tensor."""
    tensors = load_file(folder / WEIGHTS_NAME)
    for name, fn in change.items():
        tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


# ---- dtypes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, code", [(torch.int8, "I8"), (torch.int32, "I32"), (torch.bool, "BOOL"),
                                         (torch.float8_e4m3fn, "F8_E4M3")])
def test_a_weight_that_is_not_float_is_refused_naming_it(hf_dir, tmp_path, capsys, dtype, code):
    """int8 converted "successfully" into quantized codes without their scales; float8 and bool were a
    KeyError traceback."""
    edit(hf_dir, {Q: lambda t: t.to(dtype)})
    message = (f"{hf_dir / WEIGHTS_NAME}: tensor {Q} is stored as {code}; only F64, F32, BF16, F16 weights are "
               "read (dequantize the checkpoint first)")
    with pytest.raises(ValueError) as err:
        convert_hf_to_megamath(hf_dir, tmp_path / "out")
    assert str(err.value) == message
    assert main(["convert", "hf-to-megamath", str(hf_dir), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"megamath convert: error: {message}\n"
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError) as err:  # nor loaded, for generation or init_from_hf
        load_model(hf_dir, device="cpu", kernels="reference")
    assert str(err.value) == message


@pytest.mark.parametrize("named, expected", [(None, torch.float32), ("float32", torch.float32),
                                             ("bfloat16", torch.bfloat16)])
def test_mixed_float_dtypes_are_cast_to_one(hf_dir, tmp_path, named, expected):
    """A bf16 embedding among fp32 layers converted as is, and the model failed at its first forward. It takes
    config.json's dtype (what from_pretrained loads it as), else the dtype of most parameters (fp32 here)."""
    edit(hf_dir, {"model.embed_tokens.weight": lambda t: t.to(torch.bfloat16)})
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("torch_dtype")
    if named:
        config["dtype"] = named
    (hf_dir / "config.json").write_text(json.dumps(config))
    convert_hf_to_megamath(hf_dir, tmp_path / "ours")
    assert {t.dtype for t in read_dir(tmp_path / "ours").values()} == {expected}
    model = load_model_folder(tmp_path / "ours", kernels="reference")
    assert model(torch.randint(0, 1003, (1, 5))).isfinite().all()

    # A megamath folder that mixes them (written before this check) exports as one dtype, and loads.
    edit_ours = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    edit_ours["norm.weight"] = edit_ours["norm.weight"].to(torch.float16)
    save_file(edit_ours, str(tmp_path / "ours" / WEIGHTS_NAME), metadata={"format": "pt"})
    convert_megamath_to_hf(tmp_path / "ours", tmp_path / "hf2")
    assert {t.dtype for t in read_dir(tmp_path / "hf2").values()} == {expected}
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["torch_dtype"] == str(expected)[6:]
    assert {p.dtype for p in load_model_folder(tmp_path / "ours", kernels="reference").parameters()} == {expected}


def test_a_cast_that_overflows_is_refused_naming_the_tensor(hf_dir, tmp_path, capsys):
    """--dtype float16 on a bf16 weight of 1e5 wrote inf with exit status 0."""
    edit(hf_dir, {name: lambda t: t.to(torch.bfloat16) for name in load_file(hf_dir / WEIGHTS_NAME)})
    edit(hf_dir, {"model.norm.weight": lambda t: t.index_fill(0, torch.tensor([0]), 1e5)})
    message = ("tensor model.norm.weight: casting bfloat16 to float16 turns 1 finite values into inf (largest "
               "99840, the most float16 holds is 65504); keep the stored dtype or choose a wider one")
    assert main(["convert", "hf-to-megamath", str(hf_dir), str(tmp_path / "out"), "--dtype", "float16"]) == 2
    assert capsys.readouterr().err == f"megamath convert: error: {message}\n"
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "source"]
    convert_hf_to_megamath(hf_dir, tmp_path / "bf16")
    with pytest.raises(ValueError) as err:
        convert_megamath_to_hf(tmp_path / "bf16", tmp_path / "out", dtype=torch.float16)
    assert str(err.value) == message.replace("model.norm", "norm")
    convert_megamath_to_hf(tmp_path / "bf16", tmp_path / "fp32", dtype=torch.float32)  # a wider one is fine


# ---- index -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [5, None, ["model-00001-of-00002.safetensors"]])
def test_an_index_entry_that_is_not_a_file_name_is_one_line(hf_dir, tmp_path, capsys, value):
    """A non-string weight_map value was a TypeError traceback (sorted() ran before the check)."""
    convert_hf_to_megamath(hf_dir, tmp_path / "ours")
    convert_megamath_to_hf(tmp_path / "ours", tmp_path / "sharded", max_shard_size=SHARD)
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = value
    (tmp_path / "sharded" / INDEX_NAME).write_text(json.dumps(index))
    assert main(["convert", "hf-to-megamath", str(tmp_path / "sharded"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"megamath convert: error: {tmp_path / 'sharded' / INDEX_NAME}: weight_map "
                                       f"names {value!r}, not a file name inside {tmp_path / 'sharded'} "
                                       "(for lm_head.weight)\n")


# ---- publishing DST ----------------------------------------------------------------------------------------

def record_fsyncs(monkeypatch) -> list:
    """Every os.fsync's path, and every rename's ("rename", destination), in order."""
    events, fsync, rename, replace = [], os.fsync, os.rename, os.replace

    def recording_fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b))[1])
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsync's files through /proc")
@pytest.mark.parametrize("existing", [False, True])
def test_every_file_and_folder_is_fsynced_before_and_after_publishing(hf_dir, tmp_path, monkeypatch, existing):
    """The temp folder was renamed into place without an fsync: after a power loss DST could hold empty shards."""
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()  # kept and filled: its entries are renamed into it
    events = record_fsyncs(monkeypatch)
    convert_hf_to_megamath(hf_dir, dst, max_shard_size=SHARD)
    names = sorted(p.name for p in dst.iterdir())
    assert len(names) > 4 and INDEX_NAME in names
    renames = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    before, after = events[:renames[0]], events[renames[-1] + 1:]
    assert sorted(os.path.basename(p) for p in before[:-1]) == names, "every file, before any rename"
    assert "tmp-" in os.path.basename(before[-1]), "then the temp folder holding them"
    assert after == [str(dst if existing else tmp_path)], "then the folder the renames changed"
    if existing:
        assert events[renames[-1]] == ("rename", str(dst / "config.json")), "config.json last"


def test_dst_is_resolved_and_checked_before_writing(hf_dir, tmp_path, monkeypatch):
    """DST '.' failed as "PosixPath('.') has an empty name"; a symlink to an empty folder was written in full,
    then refused as "Not a directory"."""
    expected = read_dir(hf_dir)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    convert_hf_to_megamath(hf_dir, ".")
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == ["config.json", WEIGHTS_NAME, "token_ids.json"]
    assert os.path.samefile(".", tmp_path / "cwd"), "the current folder is filled, not replaced"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert convert_hf_to_megamath(hf_dir, tmp_path / "link").num_layers == 2
    assert (tmp_path / "link").is_symlink() and read_dir(tmp_path / "real").keys() == \
        {n.removeprefix("model.") for n in expected}
    for target in (tmp_path / "real", hf_dir / WEIGHTS_NAME):  # a symlink to a full folder, or to a file
        (tmp_path / "link2").unlink(missing_ok=True)
        (tmp_path / "link2").symlink_to(target)
        with pytest.raises(FileExistsError) as err:
            convert_hf_to_megamath(hf_dir, tmp_path / "link2")
        assert str(err.value) == f"{target} already exists and is not an empty directory"
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]


def test_a_killed_converts_temporary_inside_an_empty_dst_is_swept(hf_dir, tmp_path):
    dst = tmp_path / "out"
    (dst / f".megamath-tmp-{socket.gethostname()}-999999999").mkdir(parents=True)  # a pid that is gone
    convert_hf_to_megamath(hf_dir, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", WEIGHTS_NAME, "token_ids.json"]


def test_a_failed_write_leaves_an_empty_dst_empty(hf_dir, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="could not write .*out .*No space left on device; nothing of it was kept"):
        convert_hf_to_megamath(hf_dir, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
