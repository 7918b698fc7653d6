"""`megamath config from-neox`: LLEMMA's own GPT-NeoX config converts to examples/llemma_7b.yaml in every
training-relevant field and trains (shrunk) on CPU; unmapped keys are listed with reasons; what megamath
cannot honour is an error naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megamath.cli import main
from megamath.compat.neox import convert_neox, read_neox_yaml
from megamath.training.config import TrainConfig, load_config
from test_train_loop import metrics, write_corpus

REPO = Path(__file__).resolve().parents[1]

# LLEMMA 7B's GPT-NeoX config as published (configs/llemma_7b.yml on GPT-NeoX's llemma branch), written
# out from its values with its layout: JSON-style YAML, comments, and one key spelt with `-`.
LLEMMA_7B_YML = """\
{
  "pipe_parallel_size": 0,
  "model_parallel_size": 2,
  "make_vocab_size_divisible_by": 1,

  # model settings
  "num_layers": 32,
  "hidden_size": 4096,
  "num_attention_heads": 32,
  "seq_length": 4096,
  "max_position_embeddings": 4096,
  "pos_emb": "rotary",
  "rotary_pct": 1,
  "rotary_emb_base": 10000,
  "no_weight_tying": true,
  "gpt_j_residual": false,
  "output_layer_parallelism": "column",
  "norm": "rmsnorm",
  "rms_norm_epsilon": 1.0e-5,

  "attention_config": [[["flash"], 32]],

  "scaled_upper_triang_masked_softmax_fusion": true,
  "bias_gelu_fusion": false,
  "use_bias_in_norms": false,
  "use_bias_in_attn_linear": false,
  "mlp_type": "llama",
  "activation": "silu",

   "optimizer": {
     "type": "Adam",
     "params": {
       "lr": 0.0001,
       "betas": [0.9, 0.95],
       "eps": 1.0e-8
     }
   },

   "zero_optimization": {
    "stage": 1,
    "allgather_partitions": true,
    "allgather_bucket_size": 1260000000,
    "overlap_comm": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 1260000000,
    "contiguous_gradients": true,
    "cpu_offload": false
  },

   "train_micro_batch_size_per_gpu": 4,
   "gradient_accumulation_steps": 2,
   "data_impl": "mmap",

   "checkpoint_activations": true,
   "checkpoint_num_layers": 1,
   "partition_activations": true,
   "synchronize_each_layer": true,

   "gradient_clipping": 1.0,
   "weight_decay": 0.1,
   "hidden_dropout": 0,
   "attention_dropout": 0,

   "precision": "bfloat16",
   "fp32_allreduce": true,
   "bf16": {
     "enabled": true
   },
   "data_types": {
     "grad_accum_dtype": "fp32"
   },

   "train_iters": 48000,
   "lr_decay_iters": 48000,
   "distributed_backend": "nccl",
   "lr_decay_style": "cosine",
   "decay_lr_to": 0.033,
   "warmup_iters": 500,
   "checkpoint_factor": 500,
   "eval_interval": 250,
   "eval_iters": 50,

   "log_interval": 1,
   "steps_per_print": 1,
   "wall_clock_breakdown": true,

   "tokenizer_type": "SPMTokenizer",
   "vocab-file": "codellama/tokenizer.model", # use tokenizer.model from Meta CodeLlama download

   "save": "/path/to/save/llema-replication",
   #"load": "", # once run is started, to restart from intermediate ckpt use "load" = "save"
   "load": "/path/to/converted/codellama_7b_weights_with_mp2",

   "finetune": true, # set to false once resuming from intermediate finetuning step
   "checkpoint_validation_with_forward_pass": true,

   "use_wandb": true,
   "wandb_group": "llemma_7b_replication",
   "wandb_project": "your-project-name",
   "wandb_team": "your-teamname-here",
   "wandb_host": "https://api.wandb.ai",

   "launcher": "slurm",
   "deepspeed_slurm": true
}
"""

# A data config in GPT-NeoX's form (LLEMMA's own, configs/data_mixture.yml, lists its cluster's paths) for
# the ProofPile II datasets `megamath preprocess` writes, at LLEMMA's weights.
DATA_YML = """\
{
  "train-data-paths": ["data/proof-pile-2/arxiv_train_text_document",
                       "data/proof-pile-2/open-web-math_train_text_document",
                       "data/proof-pile-2/algebraic-stack_train_text_document"],
  "train-data-weights": [2, 4, 1],
  "valid-data-paths": ["data/proof-pile-2/arxiv_validation_text_document",
                       "data/proof-pile-2/open-web-math_validation_text_document",
                       "data/proof-pile-2/algebraic-stack_validation_text_document"],
  "test-data-paths": ["data/proof-pile-2/arxiv_test_text_document",
                      "data/proof-pile-2/open-web-math_test_text_document",
                      "data/proof-pile-2/algebraic-stack_test_text_document"],
}
"""

# Fields that name places on a cluster or how much is printed, not what is trained.
SITE_FIELDS = {"run_dir", "init_from_hf", "log_every", "logging"}
SITE_DATA_FIELDS = {"data_path", "data_dir", "valid_data", "test_data", "cache_dir"}


def write_llemma(tmp_path: Path, text: str = LLEMMA_7B_YML) -> list[str]:
    (tmp_path / "llemma_7b.yml").write_text(text)
    (tmp_path / "data.yml").write_text(DATA_YML)
    return [str(tmp_path / "llemma_7b.yml"), str(tmp_path / "data.yml")]


def training_fields(config: TrainConfig) -> dict:
    d = config.to_dict()
    for key in SITE_FIELDS:
        d.pop(key)
    d["checkpoint"].pop("keep")  # disk space, not training
    for key in SITE_DATA_FIELDS:
        d["data"].pop(key)
    d["data"]["train_blend"] = config.data.train_blend()
    d["data"]["valid_sets"] = config.data.valid_sets()
    d["data"]["test_sets"] = config.data.test_sets()
    return d


def test_llemma_7b_converts_to_the_example(tmp_path):
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path)), vocab_size=32016)  # Code Llama's tokenizer
    converted = conversion.validate()
    example = load_config(REPO / "examples" / "llemma_7b.yaml")
    assert training_fields(converted) == training_fields(example)
    # Spelled out, the values the issue lists:
    assert (converted.parallel.tp_size, converted.micro_batch_size, converted.grad_accum_steps) == (2, 4, 2)
    assert (converted.optimizer.lr, converted.optimizer.clip_grad, converted.optimizer.weight_decay) == (1e-4, 1.0, 0.1)
    assert (converted.schedule.warmup_steps, converted.schedule.decay_steps,
            converted.schedule.min_lr_ratio) == (500, 48000, 0.033)
    assert (converted.model.rope_theta, converted.model.ffn_hidden_size, converted.model.norm_eps) == (1e4, 11008, 1e-5)
    assert converted.model.activation_checkpointing and converted.param_dtype == "auto"
    assert (converted.eval_every, converted.eval_batches, converted.checkpoint.save_every) == (250, 34, 500)
    assert converted.logging.wandb.project == "your-project-name"
    assert converted.logging.wandb.group == "llemma_7b_replication"


def test_every_key_is_mapped_or_listed(tmp_path):
    text = LLEMMA_7B_YML.replace('"launcher": "slurm",', '"launcher": "slurm", "my_cluster_knob": 3, '
                                 '"tensorboard-dir": "tb",')
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)
    listed = {u.key.split(".")[0]: u for u in conversion.unmapped}
    assert listed["my_cluster_knob"].kind == "no equivalent" and "not a GPT-NeoX" in listed["my_cluster_knob"].reason
    assert "tensorboard_dir" not in listed  # `-` spelling read as `_`, and mapped:
    assert conversion.config["logging"]["tensorboard_dir"] == "tb" and conversion.config["logging"]["tensorboard"]
    assert conversion.config["logging"]["wandb"]["project"] == "your-project-name"  # beside W&B
    assert listed["load"].kind == "unsupported" and listed["load"].reason.endswith(
        "a GPT-NeoX checkpoint; convert it with `megamath convert neox-to-hf /path/to/converted/codellama_7b_weights_"
        "with_mp2 HF_DIR` and set init_from_hf: HF_DIR")
    assert listed["partition_activations"].reason and listed["launcher"].kind == "not needed"
    assert {"zero_optimization", "tokenizer_type", "finetune"} <= set(listed)
    mapped = {"pipe_parallel_size", "model_parallel_size", "make_vocab_size_divisible_by", "num_layers",
              "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings", "pos_emb",
              "rotary_pct", "rotary_emb_base", "no_weight_tying", "gpt_j_residual", "norm", "rms_norm_epsilon",
              "attention_config", "use_bias_in_norms", "use_bias_in_attn_linear", "mlp_type", "activation",
              "optimizer", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "checkpoint_activations", "checkpoint_num_layers", "gradient_clipping", "weight_decay",
              "hidden_dropout", "attention_dropout", "precision", "fp32_allreduce", "bf16", "data_types",
              "train_iters", "lr_decay_iters", "lr_decay_style", "decay_lr_to", "warmup_iters",
              "checkpoint_factor", "eval_interval", "eval_iters", "log_interval", "vocab_file", "save",
              "use_wandb", "wandb_group", "wandb_project", "wandb_team", "wandb_host", "train_data_paths",
              "train_data_weights", "valid_data_paths", "test_data_paths", "tensorboard_dir"}
    raw = read_neox_yaml(write_llemma(tmp_path, text))
    assert set(raw) <= mapped | set(listed), set(raw) - mapped - set(listed)
    report = conversion.report()
    assert "schedule:" in report and "eval_iters 50" in report  # formula and eval differences said


@pytest.mark.parametrize("edit, message", [
    (('"pipe_parallel_size": 0', '"pipe_parallel_size": 2'), "pipe_parallel_size is 2: megamath has no pipeline"),
    (('"hidden_dropout": 0,', '"hidden_dropout": 0.1,'), "hidden_dropout is 0.1: megamath trains without dropout"),
    (('"hidden_dropout": 0,', ''), "hidden_dropout is not set (GPT-NeoX's default: 0.1)"),
    (('"mlp_type": "llama",', '"mlp_type": "regular",'), "mlp_type is 'regular': megamath trains the Llama"),
    (('"norm": "rmsnorm",', ''), "norm is not set (GPT-NeoX's default: 'layernorm')"),
    (('"no_weight_tying": true,', '"no_weight_tying": false,'), "no_weight_tying is False"),
    (('"precision": "bfloat16",', '"precision": "fp16",'), "precision fp16: megamath trains in bfloat16"),
    (('"lr_decay_style": "cosine",', '"lr_decay_style": "linear",'), "lr_decay_style is 'linear'"),
    (('"type": "Adam",', '"type": "Lion",'), "optimizer.type is 'Lion'"),
    (('[["flash"], 32]', '[["local"], 32]'), "attention_config has ['local']"),
    (('"seq_length": 4096,', '"seq_length": 4096, "sliding_window_width": 2048,'),
     "sliding_window_width is 2048: megamath has dense causal attention only"),  # was dropped as "unknown"
    (('"model_parallel_size": 2,', '"model_paralel_size": 2,'),
     "model_paralel_size is not a key this converter knows; did you mean model_parallel_size?"),
])
def test_what_megamath_cannot_train_is_an_error_naming_the_key(tmp_path, edit, message):
    text = LLEMMA_7B_YML.replace(*edit)
    assert text != LLEMMA_7B_YML
    with pytest.raises(ValueError) as err:
        convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)
    assert message in str(err.value)


def test_spellings_duplicates_and_vocab(tmp_path):
    (tmp_path / "a.yml").write_text("train-iters: 10\n")
    (tmp_path / "b.yml").write_text("train_iters: 20\n")
    with pytest.raises(ValueError, match="'train_iters' is already set by an earlier file"):
        read_neox_yaml([tmp_path / "a.yml", tmp_path / "b.yml"])
    # both spellings in one file were blamed on "an earlier file", and an empty file was "got NoneType"
    (tmp_path / "c.yml").write_text('{"train-iters": 10, "train_iters": 20}\n')
    with pytest.raises(ValueError, match=r"c.yml: key 'train_iters' is set twice in this file \('train-iters' and "
                                         r"'train_iters'\)$"):
        read_neox_yaml([tmp_path / "c.yml"])
    (tmp_path / "empty.yml").write_text("")
    with pytest.raises(ValueError, match=r"empty.yml: a GPT-NeoX config is a mapping of keys, got an empty file$"):
        read_neox_yaml([tmp_path / "empty.yml"])
    paths = write_llemma(tmp_path)
    with pytest.raises(ValueError, match="vocab_file codellama/tokenizer.model not found"):
        convert_neox(read_neox_yaml(paths))
    # GPT-NeoX pads the tokenizer's size to make_vocab_size_divisible_by × model_parallel_size.
    padded = convert_neox(read_neox_yaml(paths), vocab_size=32001).config["model"]["vocab_size"]
    assert padded == 32002
    text = LLEMMA_7B_YML.replace('"make_vocab_size_divisible_by": 1,', '')
    assert convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32000).config["model"][
        "vocab_size"] == 32000  # 128 × 2 divides it
    assert convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).config["model"][
        "vocab_size"] == 32256


def test_cli_output_trains_shrunk_on_cpu(tmp_path, capsys):
    paths = write_llemma(tmp_path)
    out = tmp_path / "llemma_7b.yaml"
    assert main(["config", "from-neox", *paths, "--vocab-size", "32016", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not converted" in printed and "load: unsupported" in printed
    assert main(["config", "from-neox", *paths, "--vocab-size", "32016", "--output", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert TrainConfig.from_dict(yaml.safe_load(out.read_text())) == load_config(out)  # comments are comments
    prefixes = write_corpus(tmp_path / "data")
    shrink = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=4", "model.ffn_hidden_size=64", "model.max_seq_length=32",
              "model.kernels=reference", "data.seq_length=32", "parallel.tp_size=1", "micro_batch_size=2",
              f"data.data_path=[2, {prefixes['arxiv']}, 4, {prefixes['web']}]",
              f"data.valid_data={{arxiv: {prefixes['arxiv']}}}", f"data.test_data={{web: {prefixes['web']}}}",
              "train_steps=4", "eval_every=2", "eval_batches=1",
              "schedule.warmup_steps=1", "schedule.decay_steps=4", f"run_dir={tmp_path / 'run'}",
              "logging.wandb.mode=disabled"]
    assert main(["train", "--config", str(out), *shrink]) == 0
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[1]
    assert [r["step"] for r in records if "test_loss" in r] == [4] and set(records[-1]["test_loss"]) == {"web"}
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.activation_checkpointing and saved.grad_accum_steps == 2 and saved.schedule.min_lr_ratio == 0.033


def test_cli_error_names_the_key(tmp_path, capsys):
    paths = write_llemma(tmp_path, LLEMMA_7B_YML.replace('"pipe_parallel_size": 0', '"pipe-parallel-size": 4'))
    assert main(["config", "from-neox", *paths, "--vocab-size", "32016"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megamath config: error: pipe_parallel_size is 4") and err.count("\n") == 1


@pytest.mark.parametrize("edits, message", [
    ([('"make_vocab_size_divisible_by": 1,', '"make_vocab_size_divisible_by": 0,')],
     "make_vocab_size_divisible_by must be at least 1, got 0"),
    ([('"model_parallel_size": 2,', '"model_parallel_size": 0,')], "model_parallel_size must be at least 1, got 0"),
    # No decay_lr_to: the schedule's floor is min_lr / lr.
    ([('"lr": 0.0001,', '"lr": 0,'), ('"decay_lr_to": 0.033,', '"min_lr": 0.0000033,')],
     "optimizer.params.lr must be positive, got 0"),
    ([('"train_micro_batch_size_per_gpu": 4,', '"train_micro_batch_size_per_gpu": 0,')],
     "train_micro_batch_size_per_gpu must be at least 1, got 0"),  # was micro_batch_size 1
    ([('"gradient_accumulation_steps": 2,', '"gradient_accumulation_steps": 0,')],
     "gradient_accumulation_steps must be at least 1, got 0"),  # was grad_accum_steps 1
    # GPT-NeoX main's MLP width is rounded up to a multiple of mlp_multiple_of.
    ([('"mlp_type": "llama",', ''), ('"activation": "silu",', '"activation": "swiglu", "mlp_multiple_of": 0, '
                                     '"intermediate_size": 32768, "use_bias_in_mlp": false,')],
     "mlp_multiple_of must be at least 1, got 0"),
    # 0 was replaced by the default (seq_length, save_interval, one KV head per query head)
    ([('"max_position_embeddings": 4096,', '"max_position_embeddings": 0,')],
     "max_position_embeddings must be at least 1, got 0"),
    ([('"checkpoint_factor": 500,', '"checkpoint_factor": 0,')], "checkpoint_factor must be at least 1, got 0"),
    ([('"mlp_type": "llama",', ''), ('"num_attention_heads": 32,', '"num_attention_heads": 32, "num_kv_heads": 0,'),
      ('"activation": "silu",', '"activation": "swiglu", "intermediate_size": 32768, "use_bias_in_mlp": false,')],
     "num_kv_heads must be at least 1, got 0"),  # GPT-NeoX main, which always reads num_kv_heads
])
def test_a_zero_size_is_a_one_line_error_naming_the_key(tmp_path, capsys, edits, message):
    """A size the conversion divides by was a ZeroDivisionError traceback at 0; a zero batch was replaced by 1."""
    text = LLEMMA_7B_YML
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    assert main(["config", "from-neox", *write_llemma(tmp_path, text), "--vocab-size", "32016"]) == 2
    assert capsys.readouterr().err == f"megamath config: error: {message}\n"


def test_batch_aliases_count_only_when_the_keys_are_absent(tmp_path):
    """batch_size and gas are GPT-NeoX's aliases of train_micro_batch_size_per_gpu and
    gradient_accumulation_steps: an absent key takes the alias (else 1); a key set to 0 was replaced by it."""
    text = LLEMMA_7B_YML.replace('"train_micro_batch_size_per_gpu": 4,', '"batch_size": 8,')
    text = text.replace('"gradient_accumulation_steps": 2,', '')
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).validate()
    assert (config.micro_batch_size, config.grad_accum_steps) == (8, 1)
    zero = LLEMMA_7B_YML.replace('"gradient_accumulation_steps": 2,', '"gradient_accumulation_steps": 0, "gas": 4,')
    with pytest.raises(ValueError, match=r"^gradient_accumulation_steps must be at least 1, got 0$"):
        convert_neox(read_neox_yaml(write_llemma(tmp_path, zero)), vocab_size=32016)


def test_hf_load_single_data_path_and_constant_schedule(tmp_path):
    hf = tmp_path / "CodeLlama-7b-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    text = (LLEMMA_7B_YML.replace('"/path/to/converted/codellama_7b_weights_with_mp2"', f'"{hf}"')
            .replace('"lr_decay_style": "cosine",', '"lr_decay_style": "constant", "data-path": "data/all_text_document",'))
    (tmp_path / "one.yml").write_text(text)
    conversion = convert_neox(read_neox_yaml([tmp_path / "one.yml"]), vocab_size=32016)
    config = conversion.validate()
    assert config.init_from_hf == str(hf) and config.schedule.min_lr_ratio == 1.0
    assert config.data.train_blend() == ([1.0], ["data/all_text_document"])
    assert config.data.sample_order == "neox" and config.data.lone_prefix()  # read unblended, as GPT-NeoX reads it
    # GPT-NeoX cuts data_path by its default split: the validation part is evaluated with all of the work
    assert (config.data.split, config.eval_every) == ("969,30,1", 250)
    listed = {u.key: u for u in conversion.unmapped}
    assert "split" not in listed and "load" not in listed
    assert any(note.startswith("split 969,30,1 (GPT-NeoX default): data_path's documents are cut")
               for note in conversion.notes)
    (tmp_path / "one.yml").write_text(text.replace('"data-path":', '"split": "100", "data-path":'))
    conversion = convert_neox(read_neox_yaml([tmp_path / "one.yml"]), vocab_size=32016)
    assert (conversion.validate().data.split, conversion.validate().eval_every) == ("100", 0)  # nothing held out
    assert any(note.startswith("eval_interval 250: no valid_data_paths and no validation share in split")
               for note in conversion.notes)


def test_warmup_left_out_is_gpt_neoxs_default_of_one_percent(tmp_path):
    """GPT-NeoX's `warmup` defaults to 0.01: a config without warmup_iters or warmup warms up over 1% of the
    decay iterations there, so the converted run must too (not start at the peak lr)."""
    text = LLEMMA_7B_YML.replace('"warmup_iters": 500,', '')
    assert text != LLEMMA_7B_YML
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).validate()
    assert config.schedule.warmup_steps == 480  # 0.01 × lr_decay_iters 48,000
    with_iters = convert_neox(read_neox_yaml(write_llemma(tmp_path)), vocab_size=32016)
    assert with_iters.validate().schedule.warmup_steps == 500  # from warmup_iters, and no note about `warmup`
    assert not [note for note in with_iters.notes if note.startswith("warmup")]
    both = LLEMMA_7B_YML.replace('"warmup_iters": 500,', '"warmup_iters": 500, "warmup": 0.01,')
    with pytest.raises(ValueError, match="warmup_iters and warmup are both set"):
        convert_neox(read_neox_yaml(write_llemma(tmp_path, both)), vocab_size=32016)
    text = LLEMMA_7B_YML.replace('"warmup_iters": 500,', '"warmup": 0,')
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).validate()
    assert config.schedule.warmup_steps == 0  # explicitly off
    # warmup_iters 0 is GPT-NeoX's "not set": a warmup fraction beside it counts (it used to start at the peak)
    text = LLEMMA_7B_YML.replace('"warmup_iters": 500,', '"warmup_iters": 0, "warmup": 0.01,')
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).validate()
    assert config.schedule.warmup_steps == 480
    text = LLEMMA_7B_YML.replace('"warmup_iters": 500,', '"warmup_iters": 0,')
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).validate()
    assert config.schedule.warmup_steps == 0  # alone, 0 iterations are 0


def test_gradient_clipping_left_out_is_gpt_neoxs_default_of_one(tmp_path):
    """GPT-NeoX (the llemma branch and main alike) clips at gradient_clipping = 1.0 unless told otherwise;
    clip_grad is not an input there (it is overwritten with gradient_clipping)."""
    text = LLEMMA_7B_YML.replace('"gradient_clipping": 1.0,', '')
    assert text != LLEMMA_7B_YML
    assert convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016).validate() \
        .optimizer.clip_grad == 1.0
    off = LLEMMA_7B_YML.replace('"gradient_clipping": 1.0,', '"gradient_clipping": 0.0, "clip_grad": 0.5,')
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path, off)), vocab_size=32016)
    assert conversion.validate().optimizer.clip_grad == 0.0
    assert {u.key: u.kind for u in conversion.unmapped}["clip_grad"] == "not needed"


def test_rmsnorm_epsilon_placement_is_noted(tmp_path):
    """GPT-NeoX's RMSNorm divides by rms + eps, megamath's (Llama's) by sqrt(mean square + eps): mapped, with
    a note, since for Code Llama's small early activations the two differ by more than rounding."""
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path)), vocab_size=32016)
    assert conversion.validate().model.norm_eps == 1e-5
    assert any(note.startswith("rms_norm_epsilon 1e-05: the llemma branch's RMSNorm") for note in conversion.notes)
    main_branch = LLEMMA_7B_YML.replace('"mlp_type": "llama",', '').replace(
        '"activation": "silu",', '"activation": "swiglu", "intermediate_size": 32768, "use_bias_in_mlp": false,')
    assert main_branch != LLEMMA_7B_YML
    notes = convert_neox(read_neox_yaml(write_llemma(tmp_path, main_branch)), vocab_size=32016).notes
    assert not any(note.startswith("rms_norm_epsilon") for note in notes)  # main's RMSNorm is Llama's


def test_force_never_overwrites_a_source_file(tmp_path, capsys):
    """`--output` naming one of the converted files, with --force, replaced the GPT-NeoX config (or the
    Megatron script) by its conversion: the source was gone."""
    from test_config_from_megatron import SCRIPT

    paths = write_llemma(tmp_path)
    (tmp_path / "train.sh").write_text(SCRIPT)
    for argv, source in (
            (["from-neox", *paths, "--vocab-size", "32016", "--output", paths[1], "--force"], paths[1]),
            (["from-megatron", "--vocab-size", "32000", "--output", str(tmp_path / "train.sh"), "--force",
              str(tmp_path / "train.sh")], str(tmp_path / "train.sh"))):
        before = Path(source).read_text()
        assert main(["config", *argv]) == 2
        assert capsys.readouterr().err.endswith(f"error: --output {source} is also an input ({source}); "
                                                "writing it would replace that input\n")
        assert Path(source).read_text() == before


def test_gpt_neox_main_llama_dialect_and_defaults(tmp_path):
    """GPT-NeoX main's Llama configs (configs/llama2/7B.yml there) spell the MLP `activation: swiglu` with
    intermediate_size and mlp_multiple_of, and main defaults to MLP biases, no dropout and weight decay 0.1.
    Such a config was refused with "mlp_type is not set", and then "activation is 'swiglu'" (misleading)."""
    llama = '"activation": "swiglu", "mlp_multiple_of": 256, "intermediate_size": 32768, "use_bias_in_mlp": false,'
    main_text = LLEMMA_7B_YML.replace('"mlp_type": "llama",', '').replace('"activation": "silu",', llama)
    main_text = main_text.replace('"weight_decay": 0.1,', '').replace('"hidden_dropout": 0,', '')
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, main_text)), vocab_size=32016).validate()
    assert config.model.ffn_hidden_size == 11008  # 256·⌈⌊⌊2·32768/3⌋/2⌋/256⌉, Llama 2 7B's width
    assert config.optimizer.weight_decay == 0.1  # main's default (the llemma branch's is 0.01)
    no_size = convert_neox(read_neox_yaml(write_llemma(tmp_path, main_text.replace('"intermediate_size": 32768,',
                                                                                   ''))), vocab_size=32016)
    assert no_size.validate().model.ffn_hidden_size == 5632  # GPT-NeoX main's 4h rule, noted
    assert any(n.startswith("activation swiglu without intermediate_size") for n in no_size.notes)
    with pytest.raises(ValueError, match=r"use_bias_in_mlp is not set \(GPT-NeoX's default: True\)"):
        convert_neox(read_neox_yaml(write_llemma(tmp_path, main_text.replace('"use_bias_in_mlp": false,', ''))),
                     vocab_size=32016)


def test_one_part_of_a_split_config_says_the_model_file_is_missing(tmp_path):
    """GPT-NeoX configs are often split (a model .yml, then local_setup.yml with paths); given only
    local_setup.yml the error was "pos_emb is not set (GPT-NeoX's default: 'learned')", which blames the
    architecture instead of the missing file."""
    (tmp_path / "local_setup.yml").write_text('{"data_path": "data/enwik8/enwik8_text_document", '
                                              '"save": "checkpoints", "load": "checkpoints"}\n')
    with pytest.raises(ValueError, match=r"^num_layers, hidden_size, num_attention_heads, seq_length not set: .*"
                                         r"split over several files"):
        convert_neox(read_neox_yaml([tmp_path / "local_setup.yml"]), vocab_size=32000)


def test_a_mamba_model_is_refused_for_its_layers(tmp_path):
    """GPT-NeoX's configs/mamba/*.yml (no pos_emb) were refused for "pos_emb is not set", not for being Mamba."""
    text = LLEMMA_7B_YML.replace('"pos_emb": "rotary",', '').replace('[["flash"], 32]', '[["mamba"], 32]')
    with pytest.raises(ValueError, match=r"^attention_config has \['mamba'\]: megamath has dense causal attention"):
        convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)


def test_num_kv_heads_counts_only_with_a_grouped_attention_type(tmp_path):
    """The llemma branch builds one KV head per query head unless attention_type is groupedquery or multiquery
    (llemma_34b.yml sets groupedquery with num_kv_heads 8): num_kv_heads alone was mapped to grouped-query
    attention, a model GPT-NeoX does not build, and attention_type was listed as an unknown key."""
    alone = LLEMMA_7B_YML.replace('"num_attention_heads": 32,', '"num_attention_heads": 32, "num_kv_heads": 8,')
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path, alone)), vocab_size=32016)
    assert conversion.validate().model.num_kv_heads == 32
    assert {u.key: u.kind for u in conversion.unmapped}["num_kv_heads"] == "not needed"
    grouped = alone.replace('"num_kv_heads": 8,', '"num_kv_heads": 8, "attention_type": "groupedquery",')
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path, grouped)), vocab_size=32016)
    assert conversion.validate().model.num_kv_heads == 8
    assert "attention_type" not in {u.key for u in conversion.unmapped}


def test_split_beside_train_data_paths_is_ignored_as_gpt_neox_ignores_it(tmp_path):
    text = LLEMMA_7B_YML.replace('"launcher": "slurm",', '"launcher": "slurm", "split": "949,50,1",')
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)
    assert conversion.validate().data.split is None  # LLEMMA's data.yml names its train and validation files
    listed = {u.key: u for u in conversion.unmapped}
    assert listed["split"].kind == "not needed" and "beside train_data_paths" in listed["split"].reason


def test_the_converted_run_reads_gpt_neoxs_samples_in_its_order(tmp_path):
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path)), vocab_size=32016).validate()
    assert config.data.sample_order == "neox" and not config.data.lone_prefix()
    text = LLEMMA_7B_YML.replace('"launcher": "slurm",', '"launcher": "slurm", "train_data_paths": ["data/a"], '
                                 '"train_data_weights": [1.0],')
    config = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)[:1]), vocab_size=32016).validate()  # no data.yml
    assert config.data.train_blend() == ([1.0], ["data/a"])
    assert not config.data.lone_prefix()  # one train_data_paths entry is still a blend (built with its surplus)


@pytest.mark.parametrize("extra, message", [
    ('"pack_impl": "unpacked",', "^pack_impl is 'unpacked': megamath packs documents into samples across their "),
    ('"train_epochs": 2,', "^train_epochs is set: give train_iters instead"),
])
def test_data_settings_that_change_what_a_sample_is_are_refused(tmp_path, extra, message):
    text = LLEMMA_7B_YML.replace('"launcher": "slurm",', f'"launcher": "slurm", {extra}')
    with pytest.raises(ValueError, match=message):
        convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)
    text = LLEMMA_7B_YML.replace('"launcher": "slurm",', '"launcher": "slurm", "pack_impl": "packed", '
                                 '"allow_chopped": true,')
    conversion = convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)
    assert not {"pack_impl", "allow_chopped"} & {u.key for u in conversion.unmapped}


def test_exit_interval_maps_to_exit_every_and_says_megamath_saves_there(tmp_path):
    (tmp_path / "exit.yml").write_text(LLEMMA_7B_YML.replace('"log_interval": 1,', '"log_interval": 1, "exit_interval": 1000,'))
    conversion = convert_neox(read_neox_yaml([tmp_path / "exit.yml"]), vocab_size=32016)
    assert conversion.validate().exit_every == 1000 and "exit_interval" not in {u.key for u in conversion.unmapped}
    assert ("exit_interval 1000: megamath saves a checkpoint when it stops there (exit_every); GPT-NeoX only exits, "
            "keeping what its last checkpoint_factor save holds") in conversion.notes


def _convert_with(tmp_path, extra: str):
    text = LLEMMA_7B_YML.replace('"launcher": "slurm",', f'"launcher": "slurm", {extra}')
    return convert_neox(read_neox_yaml(write_llemma(tmp_path, text)), vocab_size=32016)


@pytest.mark.parametrize("extra, message", [
    ('"use_qk_layernorm": true,', r"use_qk_layernorm is True: megamath trains the Llama architecture only \(no "
                                  "query/key norms"),
    ('"moe_num_experts": 8,', r"moe_num_experts is 8: megamath trains dense Llama models only \(no MoE\)"),
    ('"train_impl": "dpo",', "train_impl is 'dpo': megamath trains language modelling only"),
    ('"dataset_impl": "pairwise",', "dataset_impl is 'pairwise': megamath reads GPT-style token datasets only"),
    ('"soft_prompt_tuning": {"enabled": true},', "soft_prompt_tuning is enabled: it trains a soft prompt alone"),
    ('"curriculum_learning": {"enabled": true},', "curriculum_learning is enabled: it trains a sequence-length "),
    ('"init_method_std": null,', "init_method_std must be a number, got None"),
    ('"seed": null,', r"seed is null: give an integer \(GPT-NeoX's default: 1234\)"),
    ('"sliding_window_width": "wide",', "sliding_window_width must be an integer, got 'wide'"),
])
def test_keys_that_train_something_else_or_are_malformed_are_refused(tmp_path, extra, message):
    """They were listed as unknown keys (the conversion trained a Llama in place of the model asked for) or crashed
    with a TypeError."""
    with pytest.raises(ValueError, match="^" + message) as err:
        _convert_with(tmp_path, extra)
    assert "\n" not in str(err.value)


def test_neox_settings_left_at_rest_are_listed_with_why(tmp_path):
    conversion = _convert_with(tmp_path, '"moe_num_experts": 1, "moe_top_k": 2, "soft_prompt_tuning": {"enabled": '
                               'false}, "te_mha": true, "mup_width_scale": 2, "dpo_beta": 0.1, "rpe_num_buckets": 32, '
                               '"hysteresis": 2, "use_bnb_optimizer": true, "comet_project": "x", "prescale_gradients": '
                               'false,')
    listed = {u.key: u for u in conversion.unmapped}
    assert "moe_num_experts" not in listed and "soft_prompt_tuning" not in listed  # their defaults, taken
    assert "inert without moe_num_experts > 1" in listed["moe_top_k"].reason
    assert {listed[k].kind for k in ("te_mha", "mup_width_scale", "dpo_beta", "rpe_num_buckets", "hysteresis",
                                     "prescale_gradients")} == {"not needed"}
    assert listed["use_bnb_optimizer"].kind == "unsupported" and listed["comet_project"].reason.startswith("Comet")
    assert not [u for u in conversion.unmapped if "this converter knows" in u.reason]


def test_profile_keys_map_to_the_profile_window_and_the_run_name_to_w_and_b(tmp_path):
    """GPT-NeoX's torch.profiler waits profile_step_start steps and warms up one: it traces steps start+1..stop."""
    config = _convert_with(tmp_path, '"profile": true, "profile_step_start": 3, "profile_step_stop": 5, '
                           '"memory_profiling": true, "memory_profiling_path": "mem", "wandb_run_name": "r1",').validate()
    assert (config.profile.steps, config.profile.memory, config.logging.wandb.name) == ([4, 5], True, "r1")
    config = _convert_with(tmp_path, '"profile_step_start": 3,').validate()
    assert config.profile.steps == [] and not config.profile.memory
    with pytest.raises(ValueError, match="profile_step_stop 3 leaves no step to profile after profile_step_start 3"):
        _convert_with(tmp_path, '"profile": true, "profile_step_start": 3, "profile_step_stop": 3,')


@pytest.mark.parametrize("old, new, message", [
    ('"betas": [0.9, 0.95],', '"betas": null,', r"optimizer.params.betas must be two numbers .*, got None"),
    ('"betas": [0.9, 0.95],', '"betas": [0.9],', r"optimizer.params.betas must be two numbers .*, got \[0.9\]"),
    ('"betas": [0.9, 0.95],', '"betas": [0.9, "x"],', r"optimizer.params.betas\[1\] must be a number, got 'x'"),
    ('"zero_optimization": {', '"zero_optimization": true, "unused": {', "zero_optimization must be a mapping of keys"),
    ('"data_types": {', '"data_types": "bf16", "unused2": {', "data_types must be a mapping of keys, got 'bf16'"),
    ('"hidden_dropout": 0,', '"hidden_dropout": [0],', r"hidden_dropout is \[0\]: megamath trains without dropout"),
    ('"train_iters": 48000,', '"train_iters": [48000],', r"train_iters must be an integer, got \[48000\]"),
    ('"lr_decay_iters": 48000,', '"lr_decay_iters": "all",', "lr_decay_iters must be an integer, got 'all'"),
])
def test_malformed_values_are_one_line_errors(tmp_path, old, new, message):
    """A null or short betas, a section that is not a mapping, a list where a number goes crashed the converter
    with a TypeError, an IndexError or an AttributeError."""
    assert old in LLEMMA_7B_YML
    with pytest.raises(ValueError, match="^" + message):
        convert_neox(read_neox_yaml(write_llemma(tmp_path, LLEMMA_7B_YML.replace(old, new))), vocab_size=32016)


def test_a_null_wandb_host_is_wandb_s_own(tmp_path):
    """wandb_host: null crashed on .rstrip; W&B then uses its own host, and so does the conversion."""
    raw = read_neox_yaml(write_llemma(tmp_path, LLEMMA_7B_YML.replace('"wandb_host": "https://api.wandb.ai",',
                                                                      '"wandb_host": null,')))
    conversion = convert_neox(raw, vocab_size=32016)
    assert "wandb_host" not in {u.key for u in conversion.unmapped} and conversion.validate().logging.wandb.project


@pytest.mark.parametrize("edit, message", [
    (('"train-data-paths": [', '"train-data-paths": "data/x", "unused": ['),
     "train_data_paths must be a list \\(of prefixes, or of weights\\), got 'data/x'"),
    (('"train-data-weights": [2, 4, 1]', '"train-data-weights": true'), "train_data_weights must be a list"),
    (('"train-data-weights": [2, 4, 1]', '"train-data-weights": [2, "many", 1]'),
     "train_data_weights must be a number, got 'many'"),
    (('"valid-data-paths": [', '"valid-data-paths": 3, "unused": ['), "valid_data_paths must be a list"),
])
def test_data_lists_that_are_not_lists_are_refused(tmp_path, edit, message):
    """A lone string was read letter by letter as that many prefixes; a number or a flag crashed on len()."""
    paths = write_llemma(tmp_path)
    Path(paths[1]).write_text(DATA_YML.replace(*edit))
    with pytest.raises(ValueError, match="^" + message):
        convert_neox(read_neox_yaml(paths), vocab_size=32016)


def test_null_is_the_default_where_gpt_neox_defaults_to_null(tmp_path):
    """exit_interval, batch_size and gas default to null in GPT-NeoX (unset); a config that writes the null is
    converted as if it left them out, while a null seed (GPT-NeoX's default 1234) is refused above."""
    config = _convert_with(tmp_path, '"exit_interval": null, "batch_size": null, "gas": null,').validate()
    assert (config.exit_every, config.micro_batch_size, config.grad_accum_steps) == (0, 4, 2)
