"""`megamath convert megatron-to-run`: a Megatron-LM checkpoint with its Adam state becomes a megamath run that
resumes where it stopped.

The checkpoints are written in Megatron-LM's torch_dist layout by tests/trainer_checkpoints.py (checked against
checkpoints Megatron-LM itself wrote in tests/test_trainer_files.py). The end-to-end test moves a megamath
run's own state through Megatron-LM's layout and back: the continued run must train exactly as the original.
"""
from __future__ import annotations

import json

import pytest
import torch

from megamath.cli import main
from megamath.compat.megatron_run import convert_megatron_to_run
from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from megamath.training.reshard import TrainCheckpoint
from megamath.training.schedule import lr_at
from test_train_loop import metrics, one_thread, raw_config  # noqa: F401  (one_thread is a fixture)
from trainer_checkpoints import source_model, write_megatron_torch, write_megatron_torch_dist

SHARDINGS = ("per parameter", "fully_reshardable", "dp_reshardable")


def random_states(model, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Distinct fp32 values per state and element, so that any misplaced element shows. The masters are the
    weights moved below bfloat16's resolution (the norms, float32 parameters, are their weights), as a bf16
    run's masters are, so that each rounds to the stored weight."""
    g = torch.Generator().manual_seed(seed)
    states = {}
    for key in ("exp_avg", "exp_avg_sq"):
        states[key] = {n: torch.randn(p.shape, generator=g) for n, p in model.state_dict().items()}
    states["exp_avg_sq"] = {n: t.square() for n, t in states["exp_avg_sq"].items()}
    states["master"] = {n: w.clone() if "norm" in n else w + w * 2**-10 * (2 * torch.rand(w.shape, generator=g) - 1)
                        for n, w in model.state_dict().items()}
    return states


def small_config(tmp_path, **top) -> TrainConfig:
    """raw_config's run with the Megatron checkpoints' model (4 layers, FFN 48) at micro-batch 2: DP 4 of 8."""
    raw = raw_config(tmp_path / "corpus", tmp_path / "run", **{"train_steps": 20, **top})
    raw["model"].update(num_layers=4, ffn_hidden_size=48, max_seq_length=32, norm_eps=1e-5)
    raw["data"]["seq_length"] = 16
    return TrainConfig.from_dict(raw)


@pytest.mark.parametrize("sharding, stages", [*((s, {}) for s in SHARDINGS),
                                              ("dp_reshardable", {"pp": 2}),
                                              ("dp_reshardable", {"pp": 2, "first_stage_layers": 1}),
                                              ("dp_reshardable", {"pp": 2, "vp": 2}),
                                              ("dp_reshardable", {"pp": 2, "virtual_stage_layers": [[0, 2], [1, 1]],
                                                                  "args": {"pipeline_model_parallel_layout":
                                                                           "E|t*2|t|,tL"}}),
                                              ("dp_reshardable", {"pp": 3, "virtual_stage_layers": [[1, 2, 1]],
                                                                  "args": {"account_for_embedding_in_pipeline_split":
                                                                           True, "account_for_loss_in_pipeline_split":
                                                                           True}})])
def test_the_run_holds_megatrons_masters_moments_and_step(tmp_path, sharding, stages):
    model = source_model()
    states = random_states(model, 1)
    src = write_megatron_torch_dist(model, tmp_path / "megatron", tp=2,  # buckets of ~1000: several per buffer
                                    adam={"sharding": sharding, "step": 9, "bucket_numel": 1000, **stages, **states})
    config = small_config(tmp_path, parallel__tp_size=2)
    done = convert_megatron_to_run(src, tmp_path / "run", config)
    assert done.checkpoint == tmp_path / "run" / "checkpoints" / "step_0000010"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000010\n"
    saved = TrainCheckpoint(done.checkpoint)
    assert (saved.tp_size, saved.dp_size, saved.step_count) == (2, 4, 9)
    assert (saved.meta["consumed_samples"], saved.meta["global_batch_size"]) == (80, 8)
    assert saved.meta["converted_from"]["optimizer_state"].startswith(sharding)
    assert done.source.layout == "TP 2" + "".join(f" × {key.upper()} {stages[key]}" for key in ("pp", "vp")
                                                  if key in stages)
    for name in model.state_dict():
        got = saved.param_state(name)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key], states[key][name]), (name, key)
        assert torch.equal(saved.weight(name), model.state_dict()[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("sharding, pp, vp", [("per parameter", 1, None), ("per parameter", 2, 2),
                                              ("distributed", 1, None), ("distributed", 2, 2)])
def test_the_torch_formats_optimizer_state_lands_on_each_parameter(tmp_path, sharding, pp, vp):
    """The legacy torch format records no parameter names in its optimizer state: the non-distributed
    optimizer's indices and the distributed optimizer's flat buffers (distrib_optim.pt) are mapped by
    Megatron-LM's rules, over pipeline and virtual stages, every state checked on its own parameter."""
    model = source_model()
    states = random_states(model, 8)
    src = write_megatron_torch(model, tmp_path / "megatron", tp=2, pp=pp, vp=vp,
                               adam={"sharding": sharding, "step": 9, **states})
    done = convert_megatron_to_run(src, tmp_path / "run", small_config(tmp_path, parallel__tp_size=2))
    saved = TrainCheckpoint(done.checkpoint)
    assert (saved.step_count, saved.meta["step"]) == (9, 10)
    assert done.source.optimizer_state == f"{sharding}, torch format (local order)"
    for name in model.state_dict():
        got = saved.param_state(name)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key], states[key][name]), (name, key)


@pytest.mark.parametrize("sharding, stages", [("fully_reshardable", {}), ("dp_reshardable", {"pp": 2})])
def test_a_run_continued_from_megatrons_layout_trains_as_the_original(tmp_path, one_thread, sharding, stages):
    """A megamath run's step-3 state, written as Megatron-LM stores it and converted back, trains steps 4..6
    exactly as the run itself did: weights, masters, moments and step all landed on the right parameters."""
    full = raw_config(tmp_path / "corpus", tmp_path / "full", train_steps=6, checkpoint__save_every=3)
    full["model"]["norm_eps"] = 1e-5
    train(TrainConfig.from_dict(full), ParallelState.single())
    saved = TrainCheckpoint(tmp_path / "full" / "checkpoints" / "step_0000003")
    model = source_model(num_layers=2, ffn_hidden_size=64, max_seq_length=32)
    model.load_state_dict({n: saved.weight(n) for n in model.state_dict()})
    states = {key: {} for key in ("master", "exp_avg", "exp_avg_sq")}
    for name in model.state_dict():
        for key, value in saved.param_state(name).items():
            states[key][name] = value
    src = write_megatron_torch_dist(model, tmp_path / "megatron", tp=1, iteration=3, global_batch=2,
                                    adam={"sharding": sharding, "step": saved.step_count, **stages, **states})
    later = TrainConfig.from_dict({**full, "run_dir": str(tmp_path / "later")})
    convert_megatron_to_run(src, tmp_path / "later", later)
    train(later, ParallelState.single())
    assert_trains_as(tmp_path / "later", tmp_path / "full", after=3)


def assert_trains_as(later, full, after: int) -> None:
    """Run `later`, continued from `full`'s step `after`, logged the same steps, losses, gradient norms, learning
    rates and data positions, bit for bit."""
    ours = [r for r in metrics(later) if "step" in r]
    theirs = [r for r in metrics(full) if r.get("step", 0) > after]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] and ours
    for key in ("loss", "grad_norm", "lr", "consumed_samples"):
        assert [r[key] for r in ours] == [r[key] for r in theirs], key


def test_the_cli_converts_and_says_how_to_continue(tmp_path, capsys):
    src = write_megatron_torch_dist(source_model(), tmp_path / "megatron", tp=2,
                                    adam={"sharding": "per parameter", "step": 10, **random_states(source_model(), 2)})
    config = small_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({**config.to_dict(), "run_dir": str(tmp_path / "out")}))
    assert main(["convert", "megatron-to-run", str(src), str(tmp_path / "out"), "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "iteration 10, Adam step 10 (optimizer state per parameter), TP 2 -> TP 1 × DP 4" in out
    assert "resumes at update 11" in out
    assert "note: the config's data.sample_order is megamath" in out
    assert TrainCheckpoint(tmp_path / "out" / "checkpoints" / "step_0000010").step_count == 10


def write(tmp_path, **adam):
    model = source_model()
    return write_megatron_torch_dist(model, tmp_path / "megatron", tp=2,
                                     adam={"sharding": "per parameter", "step": 10, **random_states(model, 3), **adam})


@pytest.mark.parametrize("case, message", [
    ("bucket order", r"the distributed optimizer's bucketed state \(dp_reshardable\) fits none of the parameter "
                     r"orders megamath knows \(local, transformer_engine, transformer_engine, weight first\); save it "
                     "once with --dist-ckpt-optim-fully-reshardable"),
    ("no optimizer", r"the checkpoint holds no optimizer state \(saved with --no-save-optim\?\); convert the weights "
                     "alone with `megamath convert megatron-to-hf`"),
    ("custom layout", r"--pipeline-model-parallel-layout Et\|tt\|ttL: 3 virtual stages do not divide among 2 "
                      "pipeline stages$"),
    ("layout ends", r"--pipeline-model-parallel-layout tE\|t\|t\|tL: the embedding \(E\) must open the first stage "
                    r"and the loss \(L\) close the last, once each$"),
    ("layout layers", r"--pipeline-model-parallel-layout holds m: megamath reads embedding \(E\), decoder \(t\) and "
                      r"loss \(L\) stages only$"),
    ("torch format", r"mp_rank_00/model_optim_rng.pt: the checkpoint holds no optimizer state \(saved with "
                     r"--no-save-optim\?\); convert the weights alone with `megamath convert megatron-to-hf`"),
    ("torch buckets apart", r"distrib_optim.pt: an older distributed-optimizer layout \(buckets stored apart\), "
                            "which megamath does not read; re-save the checkpoint with Megatron-LM in the torch_dist "
                            "format"),
    ("torch order", r"the optimizer's parameter indices fit none of the parameter orders megamath knows \(local, "
                    r"transformer_engine, transformer_engine, weight first\); re-save the checkpoint with Megatron-LM "
                    r"in the torch_dist format \(the run's launch with --ckpt-convert-format torch_dist "
                    "--ckpt-convert-save DIR writes DIR/torch_dist"),
    ("tied", r"the checkpoint ties the output layer to the embedding \(one parameter, one Adam state\); megamath "
             "trains them untied, so its optimizer state has no counterpart here$"),
    ("shape", r"^the config describes another model than the checkpoint's: model.hidden_size 64 \(config\) vs 32 "),
    ("rope", r"model.rope_theta 500000.0 \(config\) vs 10000.0 \(checkpoint\)"),
    ("batch", r"global batch 8 is not a multiple of the config's micro_batch_size · grad_accum_steps = 3"),
    ("steps", r"^config train_steps 10 leaves nothing to train after iteration 10"),
    ("vocabulary", r"^config model.vocab_size 128 exceeds the checkpoint's padded vocabulary 64$"),
])
def test_what_cannot_continue_is_one_line_that_says_what_to_do(tmp_path, case, message, monkeypatch):
    top = {"shape": {"model__hidden_size": 64}, "rope": {"model__rope_theta": 500000.0},
           "batch": {"micro_batch_size": 3}, "steps": {"train_steps": 10},
           "vocabulary": {"model__vocab_size": 128}}.get(case, {})
    if case == "torch format":
        src = write_megatron_torch(source_model(), tmp_path / "megatron", tp=2, pp=1)
    elif case == "torch buckets apart":  # Megatron-LM before `buckets_coalesced`: a list of buckets per state
        model = source_model()
        src = write_megatron_torch(model, tmp_path / "megatron", tp=2, pp=1,
                                   adam={"sharding": "distributed", "step": 10, **random_states(model, 4)})
        for file in src.glob("iter_0000010/mp_rank_*/distrib_optim.pt"):
            state = torch.load(file)
            del state["buckets_coalesced"]
            torch.save(state, file)
    elif case == "torch order":  # masters that are not the weights': no order is confirmed
        model = source_model()
        states = {**random_states(model, 4), "master": random_states(source_model(seed=5), 4)["master"]}
        src = write_megatron_torch(model, tmp_path / "megatron", tp=2, pp=1,
                                   adam={"sharding": "per parameter", "step": 10, **states})
    elif case == "no optimizer":
        src = write_megatron_torch_dist(source_model(), tmp_path / "megatron", tp=2)
    elif case.startswith(("custom layout", "layout")):
        layout = {"custom layout": "Et|tt|ttL", "layout ends": "tE|t|t|tL", "layout layers": "Et|t|t|tmL"}[case]
        src = write(tmp_path, sharding="dp_reshardable", pp=2, args={"pipeline_model_parallel_layout": layout})
    elif case == "bucket order":  # masters that are not the weights': no order is confirmed
        model = source_model()
        states = {**random_states(model, 4), "master": random_states(source_model(seed=5), 4)["master"]}
        src = write_megatron_torch_dist(model, tmp_path / "megatron", tp=2,
                                        adam={"sharding": "dp_reshardable", "step": 10, **states})
    else:
        src = write(tmp_path)
    if case == "tied":  # Megatron-LM's default: no output_layer.weight, the embedding serves both
        from megamath.compat import megatron_run

        def tied(path):
            weights = read(path)
            weights.tensors.pop("output")
            return weights

        read = megatron_run.read_megatron_checkpoint
        monkeypatch.setattr(megatron_run, "read_megatron_checkpoint", tied)
    raw = small_config(tmp_path).to_dict()
    for key, value in top.items():
        section, _, field = key.rpartition("__")
        (raw[section] if section else raw)[field] = value
    with pytest.raises(ValueError, match=message):
        convert_megatron_to_run(src, tmp_path / "run", TrainConfig.from_dict(raw))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_each_bucketed_master_is_checked_against_its_weight_element_for_element(tmp_path):
    """An order is chosen on each parameter's first row; a master elsewhere that does not round to its weight
    (here one element of layer 2's linear_fc2, past its first row) still stops the conversion."""
    model = source_model()
    states = random_states(model, 6)
    states["master"]["layers.2.mlp.down_proj.weight"][5, 7] += 1.0
    src = write_megatron_torch_dist(model, tmp_path / "megatron", tp=2,
                                    adam={"sharding": "dp_reshardable", "step": 10, **states})
    with pytest.raises(ValueError, match=r"the bucketed param of layers.2.fc2 does not round to its weight: the "
                                         "bucket layout megamath rebuilt is not this checkpoint's"):
        convert_megatron_to_run(src, tmp_path / "run", small_config(tmp_path))
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_run_directory_with_checkpoints_is_not_written_into(tmp_path):
    src = write(tmp_path)
    config = small_config(tmp_path)
    convert_megatron_to_run(src, tmp_path / "run", config)
    with pytest.raises(FileExistsError, match="already holds checkpoints .*convert into a new run directory"):
        convert_megatron_to_run(src, tmp_path / "run", config)


def test_config_is_megatron_to_runs_alone(tmp_path, capsys):
    src = write(tmp_path)
    assert main(["convert", "megatron-to-run", str(src), str(tmp_path / "out")]) == 2
    assert "error: --config is megatron-to-run's and neox-to-run's, and they need one" in capsys.readouterr().err
    assert main(["convert", "megatron-to-hf", str(src), str(tmp_path / "out"), "--config", "x.yaml"]) == 2
    assert "error: --config is megatron-to-run's" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_megatron_to_hf_points_at_megatron_to_run_when_the_optimizer_is_saved(tmp_path, capsys):
    src = write(tmp_path)
    assert main(["convert", "megatron-to-hf", str(src), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"its optimizer state is saved too: `megamath convert megatron-to-run {src} RUN_DIR" in out
    plain = write_megatron_torch_dist(source_model(), tmp_path / "plain", tp=2)
    assert main(["convert", "megatron-to-hf", str(plain), str(tmp_path / "hf2")]) == 0
    assert "its optimizer state is saved too" not in capsys.readouterr().out
    model = source_model()  # the torch format, with and without its optimizer
    legacy = write_megatron_torch(model, tmp_path / "legacy", tp=2, pp=1,
                                  adam={"sharding": "distributed", "step": 10, **random_states(model, 4)})
    assert main(["convert", "megatron-to-hf", str(legacy), str(tmp_path / "hf3")]) == 0
    assert f"its optimizer state is saved too: `megamath convert megatron-to-run {legacy} RUN_DIR" in \
        capsys.readouterr().out
    bare = write_megatron_torch(model, tmp_path / "bare", tp=2, pp=1)
    assert main(["convert", "megatron-to-hf", str(bare), str(tmp_path / "hf4")]) == 0
    assert "its optimizer state is saved too" not in capsys.readouterr().out


def test_a_flipped_byte_in_a_moment_is_caught_and_nothing_is_written(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    src = write(tmp_path)
    folder = src / "iter_0000010"
    key = "optimizer.state.exp_avg_sq.decoder.layers.mlp.linear_fc2.weight"
    info = FileSystemReader(str(folder)).read_metadata().storage_data[MetadataIndex(key, torch.Size([3, 0, 0]))]
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"the stored chunk of {key} at \\[3, 0, 0\\] fails its CRC-32 check"):
        convert_megatron_to_run(src, tmp_path / "run", small_config(tmp_path))
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # no step folder, no latest, no temporary


def test_a_write_that_fails_midway_leaves_no_checkpoint_and_a_retry_succeeds(tmp_path, monkeypatch):
    import megamath.compat.run_writer as run_writer

    src, config = write(tmp_path), small_config(tmp_path)
    real = run_writer.zero_shards

    def disk_full(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise OSError("No space left on device")

    monkeypatch.setattr(run_writer, "zero_shards", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        convert_megatron_to_run(src, tmp_path / "run", config)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    monkeypatch.setattr(run_writer, "zero_shards", real)
    assert convert_megatron_to_run(src, tmp_path / "run", config).checkpoint.name == "step_0000010"


def test_after_a_batch_size_ramp_the_run_reads_on_from_megatrons_consumed_samples(tmp_path, capsys, monkeypatch):
    """Megatron-LM's --rampup-batch-size leaves consumed_train_samples below iteration × global batch, and its
    sampler goes on from there: so does the continued run (and its checkpoints and metrics count from there).
    Its scheduler counts samples too, so the learning rate goes on from 70 / 8 = 8.75 global batches, not 10."""
    from megamath.training import data as training_data

    model = source_model()
    src = write_megatron_torch_dist(model, tmp_path / "megatron", tp=1, consumed=70,  # 10 iterations, batch up to 8
                                    adam={"sharding": "per parameter", "step": 10, **random_states(model, 7)})
    config = small_config(tmp_path, train_steps=11, checkpoint__save_every=11, micro_batch_size=8)
    done = convert_megatron_to_run(src, tmp_path / "run", config)
    assert ("its consumed samples 70 are fewer than iteration × global batch 80 (a batch-size ramp): the run reads "
            "on from sample 70 of the order, as Megatron-LM would; its steps count on from 10, its learning rate "
            "from schedule position 8.75, not 10 (samples / global batch, as Megatron-LM's scheduler counts)"
            ) in done.notes
    meta = TrainCheckpoint(done.checkpoint).meta
    assert meta["consumed_samples"] == 70
    assert meta["schedule"]["lr"] == lr_at(8.75, config.optimizer.lr, config.schedule)
    read = []
    original = training_data.TrainData._batch

    def recording(self, dataset, rows):
        if dataset is self.train:
            read.extend(rows)
        return original(self, dataset, rows)

    monkeypatch.setattr(training_data.TrainData, "_batch", recording)
    train(config, ParallelState.single())
    assert read == list(range(70, 78))  # update 11: the 8 samples after the 70 read
    assert [r["consumed_samples"] for r in metrics(tmp_path / "run") if "step" in r] == [78]
    lr = lr_at(9.75, config.optimizer.lr, config.schedule)  # Megatron-LM's lr after 70 + 8 samples of batch 8
    assert lr != lr_at(11, config.optimizer.lr, config.schedule)
    assert [r["lr"] for r in metrics(tmp_path / "run") if "step" in r] == [lr]
    assert TrainCheckpoint(tmp_path / "run" / "checkpoints" / "step_0000011").meta["consumed_samples"] == 78


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_zero_centered_norms_continue_with_their_masters_shifted_and_their_moments_kept(tmp_path, sharding):
    """--apply-layernorm-1p: Megatron-LM's norm weights and fp32 masters are γ − 1; the run's are γ. Adam's
    moments are those of the same gradients, so they carry over as they are."""
    model = source_model()
    states = random_states(model, 1)
    src = write_megatron_torch_dist(model, tmp_path / "megatron", tp=2, zero_centered_gamma=True,
                                    adam={"sharding": sharding, "step": 9, "bucket_numel": 1000, **states})
    done = convert_megatron_to_run(src, tmp_path / "run", small_config(tmp_path, parallel__tp_size=2))
    saved = TrainCheckpoint(done.checkpoint)
    for name in model.state_dict():
        got = saved.param_state(name)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[key], states[key][name], rtol=0, atol=3e-7, msg=f"{name} {key}")
        torch.testing.assert_close(saved.weight(name).float(), model.state_dict()[name].to(torch.bfloat16).float(),
                                   rtol=0, atol=2**-7, msg=name)
