"""`megamath config from-megatron`: a Megatron-LM Llama command line converts to a megamath config that
`megamath train --config` accepts; the global batch becomes accumulation steps for the job's size; what
megamath cannot train is an error naming the flag; unknown flags are listed."""
from __future__ import annotations

import json
import shlex

import pytest

from megamath.cli import main
from megamath.compat.megatron import convert_megatron, parse_flags, read_command_line
from megamath.training.config import load_config

# A Llama-2-7B-shaped continued-pretraining launch on 4 nodes × 8 GPUs, in the form Megatron-LM's examples use.
SCRIPT = """\
#!/bin/bash
# Llama 7B on ProofPile II
torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 \\
    pretrain_gpt.py \\
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel \\
    --use-distributed-optimizer --overlap-grad-reduce \\
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 \\
    --group-query-attention --num-query-groups 8 \\
    --seq-length 4096 --max-position-embeddings 4096 \\
    --position-embedding-type rope --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-5 \\
    --swiglu --disable-bias-linear --untie-embeddings-and-output-weights \\
    --attention-dropout 0.0 --hidden-dropout 0.0 \\
    --micro-batch-size 4 --global-batch-size 1024 \\
    --lr 1e-4 --min-lr 3.3e-6 --lr-decay-style cosine --lr-warmup-iters 500 --lr-decay-iters 48000 \\
    --train-iters 48000 --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 \\
    --bf16 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \\
    --use-flash-attn --my-site-flag 7 \\
    --data-path 2 data/arxiv_train_text_document 4 data/open-web-math_train_text_document \\
    --valid-data-path data/arxiv_validation_text_document \\
    --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model \\
    --save-interval 500 --eval-interval 250 --eval-iters 50 --log-interval 10 \\
    --save runs/megatron-7b --wandb-project math --wandb-exp-name llama7b
"""


def test_script_converts(tmp_path):
    path = tmp_path / "train.sh"
    path.write_text(SCRIPT)
    words, source = read_command_line([str(path)])
    conversion = convert_megatron(words, vocab_size=32000, source=source)
    config = conversion.validate()
    assert (config.parallel.tp_size, config.parallel.sequence_parallel) == (2, True)
    m = config.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.ffn_hidden_size) == (32, 4096, 32, 8, 11008)
    assert (m.vocab_size, m.rope_theta, m.norm_eps, m.activation_checkpointing) == (32000, 1e4, 1e-5, True)
    # 32 GPUs / TP 2 = DP 16: 1024 = 4 × 16 × 16.
    assert (config.micro_batch_size, config.grad_accum_steps) == (4, 16)
    assert (config.optimizer.lr, config.optimizer.beta2, config.optimizer.weight_decay) == (1e-4, 0.95, 0.1)
    assert (config.optimizer.grad_dtype, config.optimizer.gradient_accumulation_fusion) == ("fp32", True)
    assert (config.schedule.warmup_steps, config.schedule.decay_steps) == (500, 48000)
    assert config.schedule.min_lr_ratio == pytest.approx(0.033)
    assert config.data.train_blend() == ([2.0, 4.0], ["data/arxiv_train_text_document",
                                                      "data/open-web-math_train_text_document"])
    assert config.data.valid_sets() == {"arxiv": "data/arxiv_validation_text_document"}
    assert (config.eval_every, config.eval_batches) == (250, 50 * 16)
    assert (config.checkpoint.save_every, config.run_dir, config.param_dtype) == (500, "runs/megatron-7b", "auto")
    assert (config.logging.wandb.project, config.logging.wandb.name) == ("math", "llama7b")
    listed = {u.key: u for u in conversion.unmapped}
    assert listed["--my-site-flag"].reason.startswith("not a Megatron-LM training flag")
    assert listed["--use-distributed-optimizer"].kind == "not needed"
    assert "--use-flash-attn" in listed and "--overlap-grad-reduce" in listed


def test_flags_after_double_dash_and_world_size(tmp_path, capsys):
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ").split()
    with pytest.raises(ValueError, match="pass --world-size N"):
        convert_megatron(read_command_line(["--", *flags])[0], vocab_size=32000)
    config = convert_megatron(flags, world_size=256, vocab_size=32000).validate()
    assert config.grad_accum_steps == 2  # DP 128: 1024 = 4 × 2 × 128, LLEMMA's run
    out = tmp_path / "c.yaml"
    assert main(["config", "from-megatron", "--world-size", "256", "--vocab-size", "32000", "--output", str(out),
                 "--", *flags]) == 0
    assert load_config(out).grad_accum_steps == 2
    assert "--my-site-flag: no equivalent" in capsys.readouterr().out
    unfused = convert_megatron([*flags, "--no-gradient-accumulation-fusion"], world_size=256, vocab_size=32000)
    assert not unfused.validate().optimizer.gradient_accumulation_fusion
    assert "--no-gradient-accumulation-fusion" not in {u.key for u in unfused.unmapped}


def test_launcher_and_parsing():
    _, world, _ = parse_flags(["torchrun", "--nnodes=2", "--nproc-per-node", "8", "pretrain_gpt.py", "--lr", "1"])
    assert world == 16
    parsed, world, repeated = parse_flags(["--data-path", "1", "a", "2", "b", "--bf16", "--lr=3e-4"])
    assert parsed == {"data_path": ["1", "a", "2", "b"], "bf16": [], "lr": ["3e-4"]} and world is None
    assert repeated == {}
    with pytest.raises(ValueError, match="expand shell variables"):
        parse_flags(["--lr", "$LR"])


@pytest.mark.parametrize("edit, message", [
    (("--pipeline-model-parallel-size 1", "--pipeline-model-parallel-size 4"), "--pipeline-model-parallel-size: "
                                                                              "megamath has no pipeline"),
    (("--attention-dropout 0.0", ""), "--attention-dropout is not given (Megatron's default: 0.1)"),
    (("--normalization RMSNorm", ""), "--normalization is not given (Megatron's default: LayerNorm)"),
    (("--swiglu", ""), "--swiglu is not given"),
    (("--bf16", "--fp16"), "--fp16: megamath cannot train that"),
    (("--lr-decay-style cosine", ""), "--lr-decay-style is not given (Megatron's default: linear)"),
    (("--global-batch-size 1024", "--global-batch-size 1000"), "--global-batch-size 1000 is not divisible"),
    # RoPE variants megamath does not compute: an error, not an "ignored" line under a converted config.
    (("--rotary-base 10000", "--rotary-base 10000 --rotary-interleaved"), "--rotary-interleaved: megamath"),
    (("--rotary-base 10000", "--rotary-base 10000 --rotary-seq-len-interpolation-factor 4"),
     "--rotary-seq-len-interpolation-factor 4: megamath"),
    (("--rotary-base 10000", "--rotary-base 10000 --use-rope-scaling"), "--use-rope-scaling: megamath"),
    (("--swiglu", "--swiglu --apply-residual-connection-post-layernorm"),
     "--apply-residual-connection-post-layernorm: megamath cannot train that"),
    # Megatron-LM's examples/gpt3 script: a batch-size schedule was dropped as "unknown".
    (("--micro-batch-size 4", "--micro-batch-size 4 --step-batch-size-schedule 0:16 2.4B:320"),
     "--step-batch-size-schedule: megamath trains with one global batch size"),
    # A slip in a flag it reads would drop that setting (TP 1, the default): an error, as in Megatron-LM.
    (("--tensor-model-parallel-size 2", "--tensor-model-paralel-size 2"),
     "--tensor-model-paralel-size is not a key this converter knows; did you mean --tensor-model-parallel-size? "
     "(as written it would be left out, and its setting lost)"),
])
def test_what_megamath_cannot_train_is_an_error(tmp_path, edit, message):
    text = SCRIPT.replace(*edit)
    assert text != SCRIPT
    path = tmp_path / "train.sh"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        convert_megatron(read_command_line([str(path)])[0], vocab_size=32000)
    assert message in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (("--micro-batch-size 4", "--micro-batch-size 0"), "--micro-batch-size must be at least 1, got 0"),
    (("--nproc_per_node 8", "--nproc_per_node 0"), "--nproc_per_node must be at least 1, got 0"),
    (("--nnodes 4", "--nnodes=0"), "--nnodes must be at least 1, got 0"),
    (("--tensor-model-parallel-size 2", "--tensor-model-parallel-size 0"),
     "--tensor-model-parallel-size must be at least 1, got 0"),
    (("--num-attention-heads 32", "--num-attention-heads 0"), "--num-attention-heads must be at least 1, got 0"),
    (("--swiglu", "--swiglu --make-vocab-size-divisible-by 0"),
     "--make-vocab-size-divisible-by must be at least 1, got 0"),
    (("--lr 1e-4", "--lr 0"), "--lr must be positive, got 0"),  # the schedule's floor: --min-lr / --lr
    # 0 was replaced by the default (--train-iters, --seq-length); Megatron-LM asserts on it
    (("--lr-decay-iters 48000", "--lr-decay-iters 0"), "--lr-decay-iters must be at least 1, got 0"),
    (("--max-position-embeddings 4096", "--max-position-embeddings 0"),
     "--max-position-embeddings must be at least 1, got 0"),
    (("--num-query-groups 8", "--num-query-groups 0"), "--num-query-groups must be at least 1, got 0"),
    (("--train-iters 48000", "--train-iters 0"), "--train-iters must be at least 1, got 0"),
])
def test_a_zero_size_is_a_one_line_error_naming_the_flag(tmp_path, capsys, edit, message):
    """Each of these sizes is divided by in the conversion: at 0 the CLI printed a ZeroDivisionError traceback."""
    text = SCRIPT.replace(*edit)
    assert text != SCRIPT
    path = tmp_path / "train.sh"
    path.write_text(text)
    assert main(["config", "from-megatron", "--vocab-size", "32000", str(path)]) == 2
    assert capsys.readouterr().err == f"megamath config: error: {message}\n"


def test_converted_config_trains_shrunk_on_cpu(tmp_path):
    from test_train_loop import metrics, write_corpus

    path = tmp_path / "train.sh"
    path.write_text(SCRIPT)
    out = tmp_path / "c.yaml"
    assert main(["config", "from-megatron", "--vocab-size", "32000", "--output", str(out), str(path)]) == 0
    prefixes = write_corpus(tmp_path / "data")
    shrink = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_length=32", "model.kernels=reference",
              "data.seq_length=32", "parallel.tp_size=1", "parallel.sequence_parallel=false", "micro_batch_size=2",
              "grad_accum_steps=2", f"data.data_path=[1, {prefixes['arxiv']}]", "data.valid_data={}", "eval_every=0",
              "train_steps=2", "schedule.warmup_steps=1", "schedule.decay_steps=2", f"run_dir={tmp_path / 'run'}",
              "logging.wandb.mode=disabled"]
    assert main(["train", "--config", str(out), *shrink]) == 0
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


def test_group_query_attention_without_num_query_groups_is_megatrons_default_of_one_group():
    """Megatron's --num-query-groups defaults to 1: --group-query-attention alone is multi-query attention
    (one KV head), not multi-head; --num-query-groups without --group-query-attention is ignored there."""
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ")
    alone = flags.replace("--num-query-groups 8", "").split()
    assert convert_megatron(alone, world_size=32, vocab_size=32000).validate().model.num_kv_heads == 1
    ignored = flags.replace("--group-query-attention", "").split()
    assert convert_megatron(ignored, world_size=32, vocab_size=32000).validate().model.num_kv_heads == 32


def test_sequence_parallel_without_tensor_parallelism_is_off_as_in_megatron():
    """Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh passes --sequence-parallel with TP 1, which
    Megatron turns off; the conversion failed with "parallel.sequence_parallel needs parallel.tp_size > 1".
    Its --fp8-format was listed as an unknown flag; it is a precision megamath does not run."""
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ")
    flags = flags.replace("--tensor-model-parallel-size 2", "--tensor-model-parallel-size 1 --fp8-format hybrid")
    conversion = convert_megatron(flags.split(), world_size=32, vocab_size=32000)
    assert (conversion.validate().parallel.tp_size, conversion.validate().parallel.sequence_parallel) == (1, False)
    assert any(n.startswith("--sequence-parallel with --tensor-model-parallel-size 1") for n in conversion.notes)
    assert {u.key: u.kind for u in conversion.unmapped}["--fp8-format"] == "unsupported"  # not "unknown"


def test_rope_interpolation_factor_one_is_plain_rope():
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ")
    flags = flags.replace("--rotary-base 10000", "--rotary-base 10000 --rotary-seq-len-interpolation-factor 1")
    conversion = convert_megatron(flags.split(), world_size=32, vocab_size=32000)
    assert conversion.validate().model.rope_theta == 1e4
    assert "--rotary-seq-len-interpolation-factor" not in {u.key for u in conversion.unmapped}


def test_layernorm_epsilon_is_the_older_name_of_norm_epsilon():
    """Megatron-LM versions with --normalization RMSNorm but before the rename spell the epsilon
    --layernorm-epsilon; it sets the RMSNorm epsilon there, so it must here (not fall back to 1e-5)."""
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ")
    older = flags.replace("--norm-epsilon 1e-5", "--layernorm-epsilon 1e-6").split()
    conversion = convert_megatron(older, world_size=32, vocab_size=32000)
    assert conversion.validate().model.norm_eps == 1e-6
    assert "--layernorm-epsilon" not in {u.key for u in conversion.unmapped}
    both = flags.replace("--norm-epsilon 1e-5", "--norm-epsilon 1e-5 --layernorm-epsilon 1e-6").split()
    with pytest.raises(ValueError, match="--layernorm-epsilon"):
        convert_megatron(both, world_size=32, vocab_size=32000)


@pytest.mark.parametrize("text", ["", "#!/bin/bash\n# the real launch is in run.sh\nbash run.sh node0\n"])
def test_a_file_without_flags_says_so(tmp_path, capsys, text):
    """An empty or wrong file was reported as '--position-embedding-type is not given', a flag of a command
    line that is not there at all."""
    path = tmp_path / "train.sh"
    path.write_text(text)
    assert main(["config", "from-megatron", str(path)]) == 2
    assert capsys.readouterr().err == (f"megamath config: error: {path}: no Megatron-LM flags in it (expected its "
                                       "command line, e.g. `torchrun ... pretrain_gpt.py --num-layers 32 ...`)\n")


def test_vocab_size_flag_is_read_when_the_size_is_also_given():
    """Megatron-LM's examples/llama script passes --vocab-size 128256; with `megamath config --vocab-size` too,
    the script's flag was listed as "not a Megatron-LM training flag this converter knows; ignored"."""
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ") + " --vocab-size 32001"
    conversion = convert_megatron(flags.split(), world_size=32, vocab_size=32000)
    assert "--vocab-size" not in {u.key for u in conversion.unmapped}
    assert conversion.validate().model.vocab_size == 32000  # 128 × TP 2 divides it: `megamath config`'s value
    assert any(n.startswith("--vocab-size 32001 of the command line is replaced by the 32000")
               for n in conversion.notes)


def test_a_quoted_string_over_several_lines_is_shell_not_a_quoting_error(tmp_path):
    """Megatron-LM's examples/t5 script sets DISTRIBUTED_ARGS="<newline> --nproc_per_node $GPUS ..." over several
    lines; read line by line that was "No closing quotation", not the variables the user must expand."""
    path = tmp_path / "train.sh"
    path.write_text('DISTRIBUTED_ARGS="\n    --nproc_per_node $GPUS_PER_NODE\n"\ntorchrun $DISTRIBUTED_ARGS '
                    'pretrain_gpt.py --num-layers 2\n')
    with pytest.raises(ValueError, match="expand shell variables first"):
        parse_flags(read_command_line([str(path)])[0])
    path.write_text('# it\'s the launch\ntorchrun --nproc_per_node 8 pretrain_gpt.py --save "runs/a b" \\\n'
                    '    --num-layers 2\n')
    assert parse_flags(read_command_line([str(path)])[0]) == ({"save": ["runs/a b"], "num_layers": ["2"]}, 8, {})


def test_a_flag_given_again_takes_its_last_value_as_argparse_does():
    """A launch script's base flags followed by overrides (`--eval-iters 10 ... --eval-iters 50`) was refused as
    "given twice"; Megatron-LM's argparse takes the last value, and so does the conversion, with a note."""
    parsed, _, repeated = parse_flags(["--lr", "1e-4", "--bf16", "--lr=3e-4", "--bf16", "--lr", "2e-4"])
    assert parsed == {"bf16": [], "lr": ["2e-4"]} and repeated == {"--lr": 3, "--bf16": 2}
    conversion = convert_megatron(_words("--eval-iters 10 --lr 3e-4"), vocab_size=32000, world_size=32)
    assert conversion.validate().optimizer.lr == 3e-4  # SCRIPT's --lr 1e-4, then this one
    assert "--lr is given 2 times: Megatron-LM's argparse takes the last (3e-4), and so does this conversion" in \
        conversion.notes


def _schedule_of(*flags: str):
    script = SCRIPT.replace("--lr-warmup-iters 500 ", "")
    words = script.split("pretrain_gpt.py")[1].replace("\\\n", " ").split() + list(flags)
    conversion = convert_megatron(words, vocab_size=32000, world_size=32)
    return conversion.validate().schedule, conversion.notes


def test_a_warmup_fraction_counts_beside_zero_warmup_iterations():
    """Megatron-LM takes --lr-warmup-fraction when --lr-warmup-iters is 0 (its default); the converted run
    started at the peak lr instead."""
    assert _schedule_of("--lr-warmup-iters", "0", "--lr-warmup-fraction", "0.05")[0].warmup_steps == 2400
    assert _schedule_of("--lr-warmup-fraction", "0.05")[0].warmup_steps == 2400  # 0.05 × decay 48,000
    assert _schedule_of()[0].warmup_steps == 0  # neither: Megatron's 0
    schedule, notes = _schedule_of("--lr-warmup-fraction", "0.0000123")
    assert schedule.warmup_steps == 1 and any("0.5904 iterations in Megatron-LM, rounded to 1 steps" in n
                                              for n in notes), notes
    with pytest.raises(ValueError, match="--lr-warmup-iters and --lr-warmup-fraction are both set"):
        _schedule_of("--lr-warmup-iters", "10", "--lr-warmup-fraction", "0.05")


def _sample_based(*flags: str, world_size: int | None = 32, global_batch: bool = True):
    """The script made sample-based (Megatron-LM's examples/gpt3 style): (config, notes)."""
    script = SCRIPT.replace("--lr-warmup-iters 500 --lr-decay-iters 48000", "").replace("--train-iters 48000", "")
    script = script if global_batch else script.replace("--global-batch-size 1024", "")
    words = script.split("pretrain_gpt.py")[1].replace("\\\n", " ").split() + list(flags)
    conversion = convert_megatron(words, vocab_size=32000, world_size=world_size)
    return conversion.validate(), conversion.notes


def test_a_sample_based_run_is_the_same_schedule_in_steps_of_the_global_batch():
    """Megatron-LM trains --train-samples // G iterations, and its scheduler, advanced by G samples each
    iteration, draws the curve over samples: the same curve over decay / G and warmup / G steps."""
    config, notes = _sample_based("--train-samples", "1024000", "--lr-decay-samples", "1000000",
                                  "--lr-warmup-samples", "10240")
    assert config.train_steps == 1000 and config.data.sample_order == "megatron"
    assert (config.schedule.warmup_steps, config.schedule.decay_steps) == (10, 977)
    assert any(n.startswith("--lr-decay-samples: 1e+06 samples, 976.562 steps of 1024 in Megatron-LM, rounded to "
                            "977 steps") for n in notes), notes
    config, _ = _sample_based("--train-samples", "1024000", "--lr-warmup-fraction", "0.01")
    assert (config.schedule.warmup_steps, config.schedule.decay_steps) == (10, 1000)  # decay: all the samples
    config, notes = _sample_based("--train-samples", "1024500")
    assert config.train_steps == 1000 and any("--train-samples 1024500 is not a multiple of the global batch 1024: "
                                              "1000 steps" in n for n in notes)


def test_without_global_batch_size_a_sample_based_run_takes_megatrons_default_batch():
    """Megatron-LM's default global batch is the micro-batch on every data-parallel rank: 4 × 16 here."""
    config, _ = _sample_based("--train-samples", "6400", global_batch=False)
    assert (config.train_steps, config.micro_batch_size, config.grad_accum_steps) == (100, 4, 1)
    with pytest.raises(ValueError, match="^--train-samples: megamath counts steps of one global batch, so the "
                                         "global batch is needed; give --global-batch-size, or the world size"):
        _sample_based("--train-samples", "6400", world_size=None, global_batch=False)


@pytest.mark.parametrize("flags, message", [
    (("--train-samples", "1024000", "--train-iters", "1000"),
     "^--train-iters and --train-samples are both set: Megatron-LM asserts one of them"),
    (("--train-samples", "1024000", "--lr-decay-iters", "900"),
     "^--lr-decay-iters / --lr-warmup-iters beside --train-samples"),
    (("--train-samples", "1000"), "^--train-samples 1000 is less than one global batch"),
    (("--train-iters", "1000", "--lr-decay-samples", "100000"),
     "^--lr-decay-samples / --lr-warmup-samples beside --train-iters"),
])
def test_mixed_iteration_and_sample_settings_are_one_line_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        _sample_based(*flags)


@pytest.mark.parametrize("flags, message", [
    (("--weight-decay-incr-style", "linear", "--start-weight-decay", "0", "--end-weight-decay", "0.1"),
     "--weight-decay-incr-style linear: megamath trains with one weight decay"),
    (("--start-weight-decay", "0.1"), "--start-weight-decay/--end-weight-decay: megamath trains with one weight"),
])
def test_a_weight_decay_schedule_is_refused_not_dropped(flags, message):
    with pytest.raises(ValueError, match=message):
        _schedule_of(*flags)


def _data_of(data_flags: str):
    """The script with its data flags replaced by `data_flags`: (config, conversion)."""
    start = SCRIPT.index("--data-path")
    script = SCRIPT[:start] + data_flags + " \\\n    " + SCRIPT[SCRIPT.index("--tokenizer-type"):]
    words = shlex.split(script.split("pretrain_gpt.py")[1].replace("\\\n", " "))
    conversion = convert_megatron(words, vocab_size=32000, world_size=32)
    return conversion.validate(), conversion


def test_data_path_alone_is_cut_by_megatrons_default_split():
    config, conversion = _data_of("--data-path data/pp2_text_document")
    assert config.data.split == "969,30,1" and config.data.valid_sets() == {}
    assert (config.eval_every, config.eval_batches) == (250, 50 * 16)  # the one validation part gets all the work
    assert any("not given, so Megatron-LM's default 969,30,1" in note for note in conversion.notes)


def test_the_converted_run_reads_megatrons_samples_in_megatrons_order():
    config, conversion = _data_of("--data-path data/a_text_document")
    assert config.data.sample_order == "megatron" and config.data.lone_prefix()  # unblended, as Megatron-LM reads it
    config, conversion = _data_of("--data-path 1 data/a_text_document")
    assert not config.data.lone_prefix()  # a weight makes it a blend of one, built with Megatron-LM's surplus
    assert "--mid-level-dataset-surplus" not in {u.key for u in conversion.unmapped}
    _, conversion = _data_of("--data-path 1 data/a_text_document --mid-level-dataset-surplus 0.005")
    assert "--mid-level-dataset-surplus" not in {u.key for u in conversion.unmapped}  # the default
    _, conversion = _data_of("--data-path 1 data/a_text_document --mid-level-dataset-surplus 0.01")
    listed = {u.key: u for u in conversion.unmapped}["--mid-level-dataset-surplus"]
    assert listed.kind == "unsupported" and "another order" in listed.reason


def test_an_explicit_split_is_taken_and_its_validation_parts_share_the_work():
    config, conversion = _data_of("--data-path 2 data/a_text_document 4 data/b_text_document --split '99, 1, 0'")
    assert config.data.split == "99,1,0" and config.data.split_shares()[1] == pytest.approx(0.01)
    assert (config.eval_every, config.eval_batches) == (250, 50 * 16 // 2)  # two prefixes, two validation parts
    config, _ = _data_of("--data-path data/a_text_document --split 100")
    assert (config.data.split, config.eval_every) == ("100", 0)  # nothing held out: no evaluation


def test_split_beside_per_split_paths_is_ignored_as_megatron_ignores_it():
    config, conversion = _data_of("--train-data-path data/a_text_document --valid-data-path data/a_validation "
                                  "--split 98,2,0")
    assert config.data.split is None and config.data.valid_sets() == {"a": "data/a_validation"}
    listed = {u.key: u for u in conversion.unmapped}
    assert listed["--split"].kind == "not needed" and "beside per-split data" in listed["--split"].reason
    config, conversion = _data_of("--data-path data/a_text_document --valid-data-path data/a_validation")
    assert config.data.split is None  # the validation data is named; every --data-path document trains
    assert any("set data.split to hold documents out as well" in note for note in conversion.notes)


def test_data_paths_read_from_megatrons_files(tmp_path, monkeypatch):
    """--data-args-path holds --data-path's words; --per-split-data-args-path a JSON of train, valid and test
    blends. Both are read from the current folder, as Megatron-LM reads them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blend.txt").write_text("2 data/a_text_document\n4 data/b_text_document\n")
    config, _ = _data_of("--data-args-path blend.txt --split 98,2,0")
    assert config.data.train_blend() == ([2.0, 4.0], ["data/a_text_document", "data/b_text_document"])
    assert (config.data.split, config.eval_every) == ("98,2,0", 250)
    (tmp_path / "splits.json").write_text(json.dumps({"train": "1 data/a_text_document", "valid": ["data/a_val"],
                                                      "test": ["data/a_test"]}))
    config, conversion = _data_of("--per-split-data-args-path splits.json")
    assert config.data.train_blend() == ([1.0], ["data/a_text_document"]) and config.data.split is None
    assert config.data.lone_prefix()  # Megatron-LM reads a lone per-split prefix unblended, its weight unused
    assert config.data.valid_sets() == {"a": "data/a_val"} and config.data.test_sets() == {"a": "data/a_test"}
    assert "--per-split-data-args-path" not in {u.key for u in conversion.unmapped}  # its test blend is mapped


def test_test_data_path_maps_to_test_sets_taken_after_the_last_step():
    """--test-data-path (a blend, weights or not) was listed as having no equivalent: each of its prefixes is now a
    data.test_data set, evaluated once after the last step as Megatron-LM evaluates its test blend."""
    config, conversion = _data_of("--train-data-path data/a_text_document --valid-data-path data/a_validation "
                                  "--test-data-path 1 data/a_test_text_document 3 data/b_test")
    assert config.data.test_sets() == {"a": "data/a_test_text_document", "b": "data/b_test"}
    assert "--test-data-path" not in {u.key for u in conversion.unmapped}
    config, _ = _data_of("--data-path data/a_text_document --split 98,1,1")
    assert config.data.test_sets() == {}  # the test part of the split is data.split's


@pytest.mark.parametrize("flags, files, message", [
    ("--data-args-path blend.txt", {"blend.txt": "data/a"}, "--data-args-path without --split: Megatron-LM stops"),
    ("--data-args-path blend.txt --data-path data/a --split 99,1", {"blend.txt": "data/a"},
     "--data-path and --data-args-path are both given"),
    ("--data-args-path nope.txt --split 99,1", {}, "nope.txt"),
    ("--data-args-path blend.txt --split 99,1", {"blend.txt": "\n"}, "blend.txt holds no weights or prefixes"),
    ("--data-path data/a --train-data-path data/b", {}, "--data-path beside --train-data-path or --per-split"),
    ("--data-path data/a --per-split-data-args-path s.json", {"s.json": "{}"}, "--data-path beside --train-data-path"),
    ("--data-path data/a --split ''", {}, "^--split '': '' is not a number"),
    ("--per-split-data-args-path s.json", {"s.json": '{"train": ["data/a"]}'},
     r"--per-split-data-args-path s.json: expected JSON with train, valid and test.*KeyError\('valid'\)"),
])
def test_bad_data_files_are_one_line_errors(tmp_path, monkeypatch, flags, files, message):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        _data_of(flags)
    assert "\n" not in str(err.value)


def test_exit_and_timeout_flags_map_to_the_run_s_own_settings():
    """--exit-interval and --exit-duration-in-mins were listed as having no equivalent, --distributed-timeout-minutes
    as not needed (megamath's timeout was fixed at 10 minutes); a script that relies on them now keeps them."""
    flags = SCRIPT.split("pretrain_gpt.py \\\n", 1)[1].replace("\\\n", " ")
    plain = convert_megatron(flags.split(), world_size=32, vocab_size=32000).validate()
    assert (plain.exit_every, plain.exit_after_minutes) == (0, 0.0)
    timed = flags + " --exit-interval 2000 --exit-duration-in-mins 230"
    conversion = convert_megatron(timed.split(), world_size=32, vocab_size=32000)
    assert (conversion.validate().exit_every, conversion.validate().exit_after_minutes) == (2000, 230.0)
    assert not {"--exit-interval", "--exit-duration-in-mins"} & {u.key for u in conversion.unmapped}
    assert conversion.validate().parallel.timeout_minutes == 10.0  # Megatron-LM's default too
    longer = convert_megatron((flags + " --distributed-timeout-minutes 60").split(), world_size=32, vocab_size=32000)
    assert longer.validate().parallel.timeout_minutes == 60.0
    assert "--distributed-timeout-minutes" not in {u.key for u in longer.unmapped}
    with pytest.raises(ValueError, match=r"^--exit-duration-in-mins must be at least 0, got -5$"):
        convert_megatron((flags + " --exit-duration-in-mins -5").split(), world_size=32, vocab_size=32000)


def test_tensorboard_dir_maps_to_the_events_folder():
    """--tensorboard-dir was listed as having no equivalent (the folder was fixed at RUN_DIR/tensorboard)."""
    words = shlex.split(SCRIPT.split("pretrain_gpt.py")[1].replace("\\\n", " ")) + ["--tensorboard-dir", "tb/7b"]
    conversion = convert_megatron(words, vocab_size=32000, world_size=32)
    config = conversion.validate()
    assert (config.logging.tensorboard, config.logging.tensorboard_dir) == (True, "tb/7b")
    assert config.logging.wandb.project == "math"  # beside W&B
    assert "--tensorboard-dir" not in {u.key for u in conversion.unmapped}
    config = convert_megatron(words[:-2], vocab_size=32000, world_size=32).validate()
    assert (config.logging.tensorboard, config.logging.tensorboard_dir) == (False, None)


def _words(extra: str) -> list[str]:
    return shlex.split(SCRIPT.split("pretrain_gpt.py")[1].replace("\\\n", " ")) + extra.split()


@pytest.mark.parametrize("extra, message", [
    ("--window-size 4096,0", "--window-size 4096,0: this trains sliding-window attention"),
    ("--multi-latent-attention", "--multi-latent-attention: this trains multi-latent attention"),
    ("--squared-relu", "--squared-relu: this trains another activation than SwiGLU"),
    ("--mtp-num-layers 1", "--mtp-num-layers 1: this trains multi-token prediction layers"),
    ("--softmax-type learnable", "--softmax-type learnable: this trains another attention softmax"),
    ("--hybrid-layer-pattern M*M*", "--hybrid-layer-pattern M\\*M\\*: this trains Mamba/hybrid layers"),
    ("--qk-l2-norm", "--qk-l2-norm: this trains L2-normalized queries and keys"),
    ("--yaml-cfg run.yaml", "--yaml-cfg: Megatron-LM then reads the settings from that YAML file"),
])
def test_flags_that_make_another_model_are_refused(extra, message):
    """They were listed as unknown flags and the conversion went on: the config then trained a Llama in place of
    the model the script trains, and only a read of the list would tell."""
    with pytest.raises(ValueError, match="^" + message) as err:
        convert_megatron(_words(extra), vocab_size=32000, world_size=32)
    assert "\n" not in str(err.value)
    assert "megamath trains the Llama architecture only" in str(err.value) or "yaml" in extra


def test_settings_that_change_nothing_are_listed_as_not_needed():
    conversion = convert_megatron(_words("--mtp-num-layers 0 --softmax-type vanilla --moe-router-topk 2 "
                                         "--kv-lora-rank 512 --mamba-num-heads 4 --use-dist-ckpt --ckpt-format "
                                         "torch_dist --num-layers-per-virtual-pipeline-stage 2 "
                                         "--check-for-nan-in-loss-and-grad --no-save-optim"),
                                  vocab_size=32000, world_size=32)
    listed = {u.key: u for u in conversion.unmapped}
    assert "--mtp-num-layers" not in listed and "--softmax-type" not in listed  # Megatron-LM's defaults, taken
    topk = listed["--moe-router-topk"]
    assert topk.kind == "not needed" and "without --num-experts" in topk.reason
    assert "inert without --multi-latent-attention" in listed["--kv-lora-rank"].reason
    assert listed["--mamba-num-heads"].kind == listed["--use-dist-ckpt"].kind == "not needed"
    assert "no pipeline parallelism" in listed["--num-layers-per-virtual-pipeline-stage"].reason
    assert "max_consecutive_nonfinite" in listed["--check-for-nan-in-loss-and-grad"].reason
    assert listed["--no-save-optim"].kind == "no equivalent"
    assert not [u for u in conversion.unmapped if "this converter knows" in u.reason and u.key != "--my-site-flag"]


def test_profile_flags_map_to_the_profile_window():
    """Megatron-LM's torch.profiler is active over steps start..end-1; its nsys bracket is steps start+1..end."""
    conversion = convert_megatron(_words("--profile --use-pytorch-profiler --profile-step-start 3 "
                                         "--profile-step-end 5 --record-memory-history --profile-ranks 0"),
                                  vocab_size=32000, world_size=32)
    assert (conversion.validate().profile.steps, conversion.validate().profile.memory) == ([3, 4], True)
    assert {u.key: u.kind for u in conversion.unmapped}["--profile-ranks"] == "not needed"
    conversion = convert_megatron(_words("--profile"), vocab_size=32000, world_size=32)  # defaults 10 and 12, nsys
    assert conversion.validate().profile.steps == [11, 12]
    assert any(n.startswith("--profile without --use-pytorch-profiler: Megatron-LM brackets steps 11..12 for nsys")
               for n in conversion.notes)
    config = convert_megatron(_words("--profile-step-start 4"), vocab_size=32000, world_size=32).validate()
    assert config.profile.steps == [] and not config.profile.memory  # no --profile: nothing traced
    with pytest.raises(ValueError, match="--profile-step-end 5 leaves no step to profile after --profile-step-start 5"):
        convert_megatron(_words("--profile --profile-step-start 5 --profile-step-end 5"), vocab_size=32000,
                         world_size=32)


@pytest.mark.parametrize("extra, message", [
    ("--model-parallel-size 2", "--model-parallel-size: Megatron-LM refuses it too \\(no longer valid\\); use "
                                "--tensor-model-parallel-size"),
    ("--checkpoint-activations", "--checkpoint-activations: Megatron-LM refuses it too"),
    ("--freeze-all-layers", "--freeze-all-layers: this trains no weight"),
    ("--fim-data", "--fim-data: this trains fill-in-the-middle rearranged samples"),
    ("--sft", "--sft: this trains supervised fine-tuning"),
    ("--perform-rl-step", "--perform-rl-step: this trains reinforcement learning"),
    ("--iterations-to-skip 120 121", "--iterations-to-skip 120 121: megamath trains every step's samples"),
    ("--phase-transition-iterations 1000,2000", "--phase-transition-iterations 1000,2000: Megatron-LM stops at each"),
    ("--mtp-num-layer 2", "--mtp-num-layer is not a key this converter knows; did you mean --mtp-num-layers\\?"),
])
def test_flags_that_would_convert_into_another_run_are_refused(extra, message):
    """Each was listed as an unknown flag and the conversion went on: old scripts' flags that Megatron-LM now stops
    on (a TP size silently 1), runs that train something else (frozen, FIM, SFT, RL), batches meant to be skipped,
    and a slip inside a family of listed settings."""
    with pytest.raises(ValueError, match="^" + message) as err:
        convert_megatron(_words(extra), vocab_size=32000, world_size=32)
    assert "\n" not in str(err.value)


def test_real_flags_near_a_read_one_are_listed_not_taken_for_typos():
    """--mtp-hybrid-override-pattern (a real flag) is one slip from --hybrid-override-pattern: it was refused as a
    typo; settings of whole families of features are listed with why, not as unknown flags."""
    conversion = convert_megatron(_words("--mtp-hybrid-override-pattern M --inference-max-requests 8 "
                                         "--tp-comm-overlap-cfg x.yaml --manual-gc --main-grads-dtype bf16"),
                                  vocab_size=32000, world_size=32)
    listed = {u.key: u for u in conversion.unmapped}
    assert "inert without --mtp-num-layers" in listed["--mtp-hybrid-override-pattern"].reason
    assert listed["--inference-max-requests"].reason.startswith("inference-server settings")
    assert "not overlapped" in listed["--tp-comm-overlap-cfg"].reason
    assert listed["--manual-gc"].kind == "no equivalent" and listed["--main-grads-dtype"].kind == "unsupported"


def test_the_vocabulary_follows_padded_vocab_size_and_no_pad_vocab_size():
    """Megatron-LM's model has --padded-vocab-size rows as given, or the tokenizer's size with --no-pad-vocab-size;
    both were ignored, so the converted model had another vocabulary size than the run's."""
    assert convert_megatron(_words(""), vocab_size=32000, world_size=32).validate().model.vocab_size == 32000
    conversion = convert_megatron(_words("--padded-vocab-size 32256"), vocab_size=32000, world_size=32)
    assert conversion.validate().model.vocab_size == 32256
    sizing = {u.key: u for u in conversion.unmapped}["--tokenizer-type"].reason
    assert "32256 rows as --padded-vocab-size gives" in sizing
    assert convert_megatron(_words("--no-pad-vocab-size --make-vocab-size-divisible-by 256"), vocab_size=32001,
                            world_size=32).validate().model.vocab_size == 32001
    with pytest.raises(ValueError, match="--padded-vocab-size 100 is below the tokenizer's 32000 tokens"):
        convert_megatron(_words("--padded-vocab-size 100"), vocab_size=32000, world_size=32)


def test_zero_centered_norms_are_a_llama_with_a_note():
    """--apply-layernorm-1p (γ − 1 stored) was refused; it is the same model and the same Adam updates."""
    conversion = convert_megatron(_words("--apply-layernorm-1p"), vocab_size=32000, world_size=32)
    conversion.validate()
    assert any(note.startswith("--apply-layernorm-1p: Megatron-LM stores each norm weight as γ − 1")
               for note in conversion.notes)
    assert "--apply-layernorm-1p" not in {u.key for u in conversion.unmapped}


# Megatron-LM's own examples/llama/train_llama3_8b_h100_fp8.sh (main of 2026-08-22) with real data, as `bash -x`
# prints its command (the variables expanded).
LLAMA3_EXAMPLE = """\
torchrun --nproc_per_node 8 --nnodes 1 --node_rank 0 --master_addr localhost --master_port 29500 pretrain_gpt.py \
 --use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 \
 --group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192 --max-position-embeddings 8192 \
 --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0 \
 --hidden-dropout 0.0 --swiglu --normalization RMSNorm --init-method-std 0.0134 --attention-backend fused \
 --apply-layernorm-1p --untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 1 \
 --global-batch-size 128 --train-samples 1953125000 --lr-decay-samples 1949218748 --lr-warmup-samples 3906252 \
 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine \
 --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 \
 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1 \
 --exit-duration-in-mins 235 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-param-gather \
 --tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel --data-path data/pp2_text_document \
 --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer --data-cache-path cache --split '99,1,0' \
 --no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1 --vocab-size 128256 \
 --log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput --profile \
 --profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60 \
 --save checkpoints/llama3_8b_fp8 --load checkpoints/llama3_8b_fp8 --tensorboard-dir tensorboard_logs/llama3_8b_fp8
"""


def test_megatrons_own_llama3_example_converts():
    """Every flag of the example is mapped or listed with its reason, its decoupled learning rate of the embedding
    and output layer (refused until megamath trained one) included."""
    words = shlex.split(LLAMA3_EXAMPLE.replace("\\\n", " "))
    conversion = convert_megatron(words, vocab_size=None)
    config = conversion.validate()
    assert (config.model.num_kv_heads, config.model.ffn_hidden_size, config.model.vocab_size) == (8, 14336, 128256)
    assert (config.optimizer.lr, config.optimizer.decoupled_lr, config.optimizer.decoupled_min_lr) == (1.5e-4, 5e-4,
                                                                                                      4.5e-5)
    assert (config.grad_accum_steps, config.exit_after_minutes, config.parallel.timeout_minutes) == (16, 235, 60)
    assert (config.profile.steps, config.logging.tensorboard_dir) == ([5, 6], "tensorboard_logs/llama3_8b_fp8")
    assert not [u.key for u in conversion.unmapped if "this converter knows" in u.reason]
    assert {u.key for u in conversion.unmapped if u.kind == "unsupported"} >= {"--fp8-format", "--load"}
    alone = convert_megatron(_words("--decoupled-min-lr 1e-5"), vocab_size=32000, world_size=32)
    assert {u.key: u.reason for u in alone.unmapped}["--decoupled-min-lr"] == "read only with --decoupled-lr"
