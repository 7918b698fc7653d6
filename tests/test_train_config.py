"""The training config: YAML ⇄ dataclasses round trip, dotted overrides, and errors that name the key."""
from pathlib import Path

import pytest
import yaml

from megamath.cli import main
from megamath.model.config import ModelConfig
from megamath.training.config import TrainConfig, apply_overrides, dump_config, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE = """
model:
  preset: tiny
  num_layers: 2
  rope_theta: 1e6          # YAML 1.1 reads this as a string; it must still become 1000000.0
optimizer:
  lr: 3e-4
data:
  data_path: [2, a/arxiv, 1, b/web]
  valid_data: {arxiv: a/arxiv_val}
  seq_length: 64
schedule:
  warmup_steps: 10
  decay_steps: 100
run_dir: out/run
micro_batch_size: 2
train_steps: 50
eval_every: 10
"""


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_maps_onto_the_dataclasses(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.model == ModelConfig.from_preset("tiny", num_layers=2, rope_theta=1e6)
    assert config.optimizer.lr == 3e-4 and isinstance(config.optimizer.lr, float)
    assert config.data.train_blend() == ([2.0, 1.0], ["a/arxiv", "b/web"])
    assert config.data.valid_sets() == {"arxiv": "a/arxiv_val"}
    assert (config.schedule.warmup_steps, config.schedule.decay_steps) == (10, 100)
    assert config.schedule.min_lr_ratio == pytest.approx(1 / 30)  # default
    assert (config.micro_batch_size, config.grad_accum_steps, config.train_steps) == (2, 1, 50)
    assert config.global_batch_size(dp_size=4) == 8


def test_round_trip(tmp_path):
    config = load_config(write(tmp_path, BASE))
    dumped = dump_config(config)
    again = load_config(write(tmp_path, dumped, "again.yaml"))
    assert again == config
    assert "preset" not in yaml.safe_load(dumped)["model"]  # the model is written out in full
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_dotted_overrides(tmp_path):
    config = load_config(write(tmp_path, BASE), [
        "optimizer.lr=1e-4", "model.num_layers=3", "data.data_path=[1, x/only]", "init_from_hf=null",
        "model.activation_checkpointing=true", "checkpoint.resume=never", "schedule.min_lr_ratio=0.1"])
    assert config.optimizer.lr == 1e-4
    assert config.model.num_layers == 3 and config.model.activation_checkpointing is True
    assert config.data.train_blend() == ([1.0], ["x/only"])
    assert config.init_from_hf is None and config.checkpoint.resume == "never"
    assert config.schedule.min_lr_ratio == 0.1
    # the raw mapping is copied, not changed
    raw = {"optimizer": {"lr": 1.0}}
    assert apply_overrides(raw, ["optimizer.lr=2"]) == {"optimizer": {"lr": 2}} and raw == {"optimizer": {"lr": 1.0}}


def test_llemma_mixture_expands_from_data_dir():
    config = TrainConfig.from_dict({"data": {"data_path": "llemma", "valid_data": "llemma", "data_dir": "pp2",
                                             "seq_length": 64}, "eval_every": 5})
    assert config.data.train_blend() == ([2.0, 4.0, 1.0], ["pp2/arxiv_train_text_document",
                                                           "pp2/open-web-math_train_text_document",
                                                           "pp2/algebraic-stack_train_text_document"])
    assert config.data.valid_sets() == {"arxiv": "pp2/arxiv_validation_text_document",
                                        "open-web-math": "pp2/open-web-math_validation_text_document",
                                        "algebraic-stack": "pp2/algebraic-stack_validation_text_document"}


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": {"lrr": 1}}, "unknown key 'optimizer.lrr'; optimizer takes: lr, beta1, beta2, eps, weight_decay, "
                                "clip_grad, grad_dtype, decoupled_lr, decoupled_min_lr, gradient_accumulation_fusion"),
    ({"modle": {}}, "unknown key 'modle'; config takes: model, parallel, optimizer, data, schedule, checkpoint, "
                    "profile, logging, metrics, run_dir, micro_batch_size, grad_accum_steps, train_steps, eval_every, "
                    "eval_batches, init_from_hf, init_step, param_dtype, seed, max_consecutive_nonfinite, log_every, exit_every, exit_after_minutes, evaluation, skip_train"),
    ({"model": {"preset": "tiny", "hidden": 64}}, "unknown key 'model.hidden'; model takes: preset, vocab_size, "
     "hidden_size, num_layers, num_heads, num_kv_heads, ffn_hidden_size, max_seq_length, rope_theta, norm_eps, "
     "init_std, activation_checkpointing, kernels, attention"),
    ({"micro_batch_size": "two"}, "micro_batch_size must be int, got 'two'"),
    ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1, got 0"),
    # past 64 bits: a pybind11 or torch TypeError traceback, or a bare "Overflow when unpacking long long"
    *[(raw, f"{key} must fit in 64 bits (at most {2**63 - 1}), got {10**20}") for key, raw in (
        ("train_steps", {"train_steps": 10**20}), ("seed", {"seed": 10**20}),
        ("model.vocab_size", {"model": {"preset": "tiny", "vocab_size": 10**20}}))],
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr must be float, got 'fast'"),
    ({"init_from_hf": 3}, "init_from_hf must be str or null, got 3"),
    ({"model": {"preset": "huge"}}, "unknown model preset 'huge'; choose one of codellama-7b, llemma-34b, "
                                    "llemma-7b, tiny"),
    ({"data": "x"}, "data must be a mapping of keys, got 'x'"),
    ({"data": {"data_path": "llemma"}}, "data.data_dir is needed to find the 'llemma' datasets"),
    ({"data": {"data_path": [2, "a", 1]}}, "data.data_path: --data-path takes WEIGHT PREFIX pairs (or one PREFIX "
                                           "alone), got 3 items: 2 a 1"),
    ({"data": {"data_path": ["a"], "seq_length": 1024}}, "data.seq_length 1024 exceeds model.max_seq_length 512"),
    ({"data": {"data_path": ["a"], "seq_length": 64}, "eval_every": 10},
     "eval_every is 10 but data.valid_data is empty (and no data.split holds validation documents out)"),
    ({"data": {"data_path": ["a"], "split": "0,1"}},
     "data.split '0,1' gives training no documents: its first share must be positive"),
    ({"data": {"data_path": ["a"], "split": "99,x"}}, "data.split '99,x': 'x' is not a number; expected shares such as '969,30,1'"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel needs parallel.tp_size > 1"),
    ({"parallel": {"overlap_optimizer_step": "yes"}}, "parallel.overlap_optimizer_step must be bool, got 'yes'"),
    ({"optimizer": {"gradient_accumulation_fusion": 1}}, "optimizer.gradient_accumulation_fusion must be bool, got 1"),
    ({"param_dtype": "fp16"}, "param_dtype must be one of auto, float32, bfloat16, got 'fp16'"),
    *[({"parallel": {"timeout_minutes": bad}}, f"parallel.timeout_minutes must be a finite number of minutes > 0, "
                                              f"got {bad!r}") for bad in (0.0, -1.0, float("inf"))],
    *[({"metrics": {"peak_tflops": bad}}, f"metrics.peak_tflops must be a positive number of TFLOP/s or null, got {bad!r}")
      for bad in (0.0, -989.0, float("inf"), float("nan"))],
    ({"metrics": {"peak_tflops": True}}, "metrics.peak_tflops must be float or null, got True"),
])
def test_errors_name_the_key(raw, message):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict(raw)
    assert str(err.value) == message


def test_override_and_file_errors(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ValueError, match=r"^override 'optimizer.lr' must look like dotted.key=value$"):
        load_config(path, ["optimizer.lr"])
    with pytest.raises(ValueError, match=r"^override 'micro_batch_size.x=1': micro_batch_size is not a section$"):
        load_config(path, ["micro_batch_size.x=1"])
    with pytest.raises(ValueError, match=r"^unknown key 'optimizer.betas'"):
        load_config(path, ["optimizer.betas=[0.9, 0.95]"])
    with pytest.raises(FileNotFoundError, match=r"^config file not found: .*missing.yaml$"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"the top level must be a mapping of keys, got list$"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    # an empty file used to mean "all defaults" and failed on one of them: data.seq_length 4096 exceeds ...
    for text in ("", "# only a comment\n"):
        with pytest.raises(ValueError, match=r"^config file .*empty.yaml is empty \(a config of the defaults only "
                                             r"is written \{\}\)$"):
            load_config(write(tmp_path, text, "empty.yaml"))


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    path = write(tmp_path, BASE + "warmup: 5\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == ("megamath train: error: unknown key 'warmup'; config takes: model, parallel, optimizer, data, "
                   "schedule, checkpoint, profile, logging, metrics, run_dir, micro_batch_size, grad_accum_steps, train_steps, "
                   "eval_every, eval_batches, init_from_hf, init_step, param_dtype, seed, max_consecutive_nonfinite, log_every, exit_every, exit_after_minutes, evaluation, skip_train\n")


@pytest.mark.parametrize("name", ["tiny.yaml", "llemma_7b.yaml", "llemma_34b.yaml"])
def test_examples_load(name):
    config = load_config(EXAMPLES / name)
    assert config.data.train_blend()[0] == [2.0, 4.0, 1.0]  # LLEMMA's ProofPile II weights
    if name == "llemma_7b.yaml":
        assert (config.parallel.tp_size, config.micro_batch_size, config.grad_accum_steps) == (2, 4, 2)
        assert (config.optimizer.lr, config.data.seq_length, config.model.rope_theta) == (1e-4, 4096, 1e4)
        assert config.global_batch_size(dp_size=128) * config.data.seq_length == 4 * 2**20  # 4M tokens
        assert (config.schedule.warmup_steps, config.schedule.decay_steps) == (500, 48000)
    if name == "llemma_34b.yaml":
        assert (config.parallel.tp_size, config.model.rope_theta, config.optimizer.lr) == (8, 1e6, 5e-5)
        assert config.global_batch_size(dp_size=32) == 1024


def test_llemma_34b_schedule_is_the_published_one():
    """LLEMMA's published GPT-NeoX config for the 34B (configs/llemma_34b.yml on NeoX's llemma branch):
    lr_decay_iters 12000 = train_iters, decay_lr_to 0.033, warmup 500, eval_interval 250 with eval_iters 25,
    checkpoint_factor 250. A 48,000-step horizon would end the 12,000 steps near 87% of the peak lr."""
    config = load_config(EXAMPLES / "llemma_34b.yaml")
    assert config.train_steps == 12000
    assert (config.schedule.warmup_steps, config.schedule.decay_steps, config.schedule.min_lr_ratio) == (500, 12000, 0.033)
    assert (config.eval_every, config.checkpoint.save_every) == (250, 250)
    # NeoX evaluates eval_iters × accumulation = 25 × 16 = 400 micro-batches; megamath splits them over 3 sets
    assert config.eval_batches == 134


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads_and_plans(path, capsys):
    """Every shipped example (not a fixed list: a new one is covered too) loads and passes `megamath plan`."""
    load_config(path)
    assert main(["plan", "--model", str(path), "--gpu", "a100-80gb", "--gpus", "8", "--json"]) == 0, capsys.readouterr().err
