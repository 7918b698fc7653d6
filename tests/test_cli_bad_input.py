"""The command surface under bad input: every case is one `megamath CMD: error: ...` line and exit 2 (never a
traceback), checked before the slow work starts, and no input or existing output is destroyed.

Inputs are built here in milliseconds: a tiny random model folder and SentencePiece model, hand-written
run folders and jsonl files."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from generation_fixtures import build_checkpoint, build_tokenizer
from megamath.cli import main
from megamath.data.indexed_dataset_writer import IndexedDatasetWriter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cli")
    return build_checkpoint(root / "ckpt"), build_tokenizer(root / "tok.model")


def _tiny_dataset(prefix):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_item(np.arange(5))
        w.end_document()


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command, without its `megamath CMD: error: ` prefix."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    prefix = f"megamath {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


# ---- model folders: convert, and the loading generate / eval / serve share ---------------------------------

def _copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("size", [0, 7, 4000])
def test_convert_truncated_safetensors_is_one_line(tiny, tmp_path, capsys, size):
    src = _copy_folder(tiny[0], tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:size])
    assert main(["convert", "megamath-to-hf", str(src), str(tmp_path / "out")]) == 2
    assert one_error_line(capsys, "convert").startswith(f"{weights}: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ('{"vocab_size":', "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
])
def test_model_folder_config_json_errors_name_the_file(tiny, tmp_path, capsys, text, message):
    src = _copy_folder(tiny[0], tmp_path / "src")
    (src / "config.json").write_text(text)
    for argv, command in ((["convert", "megamath-to-hf", str(src), str(tmp_path / "out")], "convert"),
                          (["convert", "hf-to-megamath", str(src), str(tmp_path / "out")], "convert"),
                          (["generate", "--model", str(src), "--tokenizer-model", str(tiny[1]), "--prompts",
                            str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "g.jsonl")], "generate")):
        (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert line.startswith(f"{src / 'config.json'}") and message in line, line


@pytest.mark.parametrize("value", ["64", None, [64]])
def test_hf_config_with_a_wrong_type_is_one_line(tiny, tmp_path, capsys, value):
    hf = tmp_path / "hf"
    assert main(["convert", "megamath-to-hf", str(tiny[0]), str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    config["hidden_size"] = value
    (hf / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["convert", "hf-to-megamath", str(hf), str(tmp_path / "out")]) == 2
    assert "hidden_size must be a positive integer" in one_error_line(capsys, "convert")


# ---- files that are not what they should be: tokenizers, YAML, binary text ---------------------------------

def test_inspect_with_a_file_that_is_no_tokenizer_is_one_line(tmp_path, capsys):
    _tiny_dataset(tmp_path / "d")
    (tmp_path / "bad.model").write_text("not a model")
    assert main(["inspect", str(tmp_path / "d"), "--tokenizer-model", str(tmp_path / "bad.model")]) == 2
    assert one_error_line(capsys, "inspect").startswith(f"{tmp_path / 'bad.model'}: not a SentencePiece model")


def test_config_vocab_from_a_file_that_is_no_tokenizer_is_one_line(tmp_path, capsys):
    from test_config_from_neox import LLEMMA_7B_YML

    (tmp_path / "bad.model").write_text("not a model")
    assert '"codellama/tokenizer.model"' in LLEMMA_7B_YML
    (tmp_path / "neox.yml").write_text(LLEMMA_7B_YML.replace("codellama/tokenizer.model", str(tmp_path / "bad.model")))
    assert main(["config", "from-neox", str(tmp_path / "neox.yml")]) == 2
    assert one_error_line(capsys, "config").startswith(f"{tmp_path / 'bad.model'}: not a SentencePiece model")


@pytest.mark.parametrize("text", ["model: [\n", "model:\n  hidden_size: [1\n", "a: 1\n\tb: 2\n"])
def test_invalid_yaml_is_one_line_with_its_position(tmp_path, capsys, text):
    (tmp_path / "c.yaml").write_text(text)
    for argv, command in ((["train", "--config", str(tmp_path / "c.yaml")], "train"),
                          (["plan", "--model", str(tmp_path / "c.yaml"), "--gpu", "h200", "--gpus", "8"], "plan"),
                          (["config", "from-neox", str(tmp_path / "c.yaml")], "config")):
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert line.startswith(f"{tmp_path / 'c.yaml'} is not valid YAML: line ") and "<unicode string>" not in line


def test_invalid_yaml_override_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train_steps: 1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "train_steps=[1"]) == 2
    assert one_error_line(capsys, "train").startswith("override 'train_steps=[1': the value is not valid YAML: ")


def test_binary_files_given_as_text_name_the_file(tiny, tmp_path, capsys):
    binary = tmp_path / "tok.bin"
    binary.write_bytes(bytes(range(128, 256)) + b"\n")  # like a tokenizer.model given by mistake
    out = tmp_path / "out.jsonl"
    for argv, command in (
            (["train", "--config", str(binary)], "train"),
            (["plan", "--model", str(binary), "--gpu", "h200", "--gpus", "8"], "plan"),
            (["config", "from-megatron", str(binary)], "config"),
            (["generate", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), "--prompts", str(binary),
              "--output", str(out)], "generate"),
            (["eval", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), "--task", "gsm8k", "--data",
              str(binary), "--output", str(out)], "eval"),
            (["overlap", "--test", str(binary), "--field", "q", "--corpus", str(binary), "--output", str(out)],
             "overlap"),
            (["overlap-accuracy", "--hits", str(binary), "--results", str(binary)], "overlap-accuracy")):
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert str(binary) in line and "UTF-8" in line, line
    assert not out.exists()


def test_megatron_command_file_with_an_unclosed_quote_names_the_line(tmp_path, capsys):
    (tmp_path / "train.sh").write_text("torchrun pretrain_gpt.py \\\n  --num-layers 2\n--data-path 'a b\n")
    assert main(["config", "from-megatron", str(tmp_path / "train.sh")]) == 2
    assert one_error_line(capsys, "config") == f"{tmp_path / 'train.sh'}: No closing quotation in \"--data-path 'a b\""


# ---- output paths: checked before the work, never an input ------------------------------------------------

def _eval_args(tiny, data, output):
    return ["eval", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), "--task", "demo-arith",
            "--data", str(data), "--max-new-tokens", "2", "--output", str(output)]


def _generate_args(tiny, prompts, output):
    return ["generate", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), "--prompts", str(prompts),
            "--max-new-tokens", "2", "--output", str(output)]


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_unwritable_output_fails_before_the_model_runs(tiny, tmp_path, capsys, monkeypatch, command):
    """The results are written at the end: a bad --output must not cost the whole run first."""
    from megamath.generation import session

    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "1", "prompt": "2 + 2 =", "answer": "4"}\n')
    monkeypatch.setattr(session, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    build = _eval_args if command == "eval" else _generate_args
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "adir").mkdir()
    model_file = next(p for p in sorted(Path(tiny[0]).rglob("*")) if p.is_file())
    before = {p: p.read_bytes() for p in [tiny[1], *Path(tiny[0]).rglob("*")] if p.is_file()}
    for output, message in ((tmp_path / "afile" / "out.jsonl", f"{tmp_path / 'afile'} is a file, not a folder"),
                            (tmp_path / "adir", "is a folder; name a file"),
                            (data, f"is also an input ({data})"),
                            # both ran to the end and replaced the tokenizer or a weights file (exit 0)
                            (tiny[1], f"is also an input ({tiny[1]})"),
                            (model_file, f"is a file of the input {tiny[0]}; writing it would replace it")):
        assert main(build(tiny, data, output)) == 2
        line = one_error_line(capsys, command)
        assert line.startswith(f"--output {output}") and message in line, line
    monkeypatch.setattr("megamath.output_path.os.access", lambda *a: False)  # root passes any permission check
    assert main(build(tiny, data, tmp_path / "out.jsonl")) == 2
    assert one_error_line(capsys, command) == (f"--output {tmp_path / 'out.jsonl'}: cannot write in {tmp_path} "
                                               "(permission denied)")
    assert data.read_text() == '{"id": "1", "prompt": "2 + 2 =", "answer": "4"}\n'
    assert (tmp_path / "afile").read_text() == "keep"
    assert {p: p.read_bytes() for p in before} == before


def test_eval_creates_the_folder_of_its_output(tiny, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "1", "prompt": "2 + 2 =", "answer": "4"}\n')
    assert main(_eval_args(tiny, data, tmp_path / "new" / "results.jsonl")) == 0
    assert len((tmp_path / "new" / "results.jsonl").read_text().splitlines()) == 1
    # a new file beside the model's own (results kept in the run folder) is no replacement
    shutil.copytree(tiny[0], tmp_path / "model")
    assert main(_eval_args((tmp_path / "model", tiny[1]), data, tmp_path / "model" / "results.jsonl")) == 0
    assert len((tmp_path / "model" / "results.jsonl").read_text().splitlines()) == 1


def test_overlap_output_naming_its_test_set_keeps_the_test_set(tmp_path, capsys):
    test = tmp_path / "test.jsonl"
    test.write_text('{"id": "a", "q": "one two three four"}\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "zero one two three four five"}\n')
    for output in (test, corpus):
        assert main(["overlap", "--test", str(test), "--field", "q", "--n", "3", "--corpus", str(corpus),
                     "--output", str(output), "--workers", "1", "--no-progress"]) == 2
        assert one_error_line(capsys, "overlap").startswith(f"--output {output} is also an input ({output})")
    assert test.read_text() == '{"id": "a", "q": "one two three four"}\n'
    assert corpus.read_text() == '{"text": "zero one two three four five"}\n'


def test_overlap_summary_path_is_checked_before_the_scan(tmp_path, capsys):
    """The summary (HITS.summary.json) is written after the hits: it replaced a test set of that name, and a
    folder there failed the run after the old hits were already replaced."""
    test = tmp_path / "t.summary.json"
    test.write_text('{"id": "a", "q": "one two three four"}\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "zero one two three four five"}\n')
    (tmp_path / "k.jsonl").write_text("OLD HITS\n")
    (tmp_path / "k.summary.json").mkdir()
    for output, message in ((tmp_path / "t.jsonl", f"--output's summary {test} is also an input ({test})"),
                            (tmp_path / "k.jsonl", f"--output's summary {tmp_path / 'k.summary.json'} is a folder")):
        assert main(["overlap", "--test", str(test), "--field", "q", "--n", "3", "--corpus", str(corpus),
                     "--output", str(output), "--workers", "1", "--no-progress"]) == 2
        assert one_error_line(capsys, "overlap").startswith(message)
    assert test.read_text() == '{"id": "a", "q": "one two three four"}\n'
    assert (tmp_path / "k.jsonl").read_text() == "OLD HITS\n" and not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("command, flag, value, message", [
    ("generate", "--num-samples", "0", "--num-samples must be at least 1, got 0"),
    ("generate", "--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("eval", "--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("generate", "--seed", "-1", "--seed must be >= 0, got -1"),
    ("eval", "--seed", "-1", "--seed must be >= 0, got -1"),
    ("generate", "--num-samples", "10000001", "10,000,001 samples of each of 1 prompts is 10,000,001 completions; "
     "at most 10,000,000 in one run (split the prompts or take fewer samples)"),
    ("eval", "--maj", str(10**20), f"{10**20:,} samples of each of 1 prompts is {10**20:,} completions; "
     "at most 10,000,000 in one run (split the prompts or take fewer samples)"),
])
def test_bad_counts_fail_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch, command, flag, value, message):
    from megamath.generation import session

    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "1", "prompt": "2 + 2 =", "answer": "4"}\n')
    monkeypatch.setattr(session, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    build = _eval_args if command == "eval" else _generate_args
    assert main(build(tiny, data, tmp_path / "o.jsonl") + [flag, value]) == 2
    assert one_error_line(capsys, command) == message


# ---- report -------------------------------------------------------------------------------------------------

def _run_folder(path, **files):
    path.mkdir()
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.5}\n')
    for name, text in files.items():
        (path / name.replace("_", ".", 1)).write_text(text)
    return path


@pytest.mark.parametrize("name, text, message", [
    ("config.yaml", "model: [\n", "config.yaml is not valid YAML: line 2, column 1: "),
    ("config.yaml", "- 1\n", "config.yaml must hold a mapping of keys, got list"),
    ("run_info.json", "[1", "run_info.json is not valid JSON"),
    ("run_info.json", "[1]", "run_info.json must hold a JSON object, got list"),
    ("metrics.jsonl", '{"step": 1}\n[1, 2]\n{"step": 3}\n',
     "metrics.jsonl:2: not a metrics record (an object with a step >= 1)"),
    ("metrics.jsonl", '{"loss": 1}\n{"step": 3}\n',
     "metrics.jsonl:1: not a metrics record (an object with a step >= 1)"),
    # what the report divides by or compares: a ZeroDivisionError or TypeError traceback
    ("metrics.jsonl", '{"step": 0, "consumed_samples": 2}\n',
     "metrics.jsonl:1: not a metrics record (an object with a step >= 1)"),
    ("metrics.jsonl", '{"step": 1, "consumed_samples": "2"}\n', "metrics.jsonl:1: consumed_samples must be a number, "
     "got '2'"),
    ("metrics.jsonl", '{"step": 1}\n{"step": 2, "tokens_per_s": "fast"}\n',
     "metrics.jsonl:2: tokens_per_s must be a number, got 'fast'"),
    # The sections the summary reads, and the counts it multiplies tokens by: they were tracebacks.
    ("config.yaml", "model: x\n", "config.yaml: model must be a mapping of keys, got 'x'"),
    ("config.yaml", "parallel: [1]\n", "config.yaml: parallel must be a mapping of keys, got [1]"),
    ("config.yaml", "data: 5\n", "config.yaml: data must be a mapping of keys, got 5"),
    ("config.yaml", 'data: {seq_length: "32"}\n', "config.yaml: data.seq_length must be an integer >= 1, got '32'"),
    ("config.yaml", "data: {seq_length: 0}\n", "config.yaml: data.seq_length must be an integer >= 1, got 0"),
    ("run_info.json", '{"seq_length": "32"}', "run_info.json: seq_length must be an integer >= 1, got '32'"),
    ("run_info.json", '{"world_size": "2"}', "run_info.json: world_size must be an integer >= 1, got '2'"),
])
def test_report_of_a_corrupt_run_folder_is_one_line(tmp_path, capsys, name, text, message):
    run = _run_folder(tmp_path / "run")
    (run / name).write_text(text)
    assert main(["report", str(run)]) == 2
    assert one_error_line(capsys, "report").startswith(f"{run / name}{message[len(name):]}")
    assert not (run / "report.html").exists()


def test_report_output_never_replaces_what_it_reads(tmp_path, capsys):
    run = _run_folder(tmp_path / "run", config_yaml="seed: 1\n")
    for name in ("metrics.jsonl", "config.yaml"):
        before = (run / name).read_text()
        assert main(["report", str(run), "--output", str(run / name)]) == 2
        assert one_error_line(capsys, "report").startswith(f"--output {run / name} is also an input")
        assert (run / name).read_text() == before
    (tmp_path / "adir").mkdir()
    assert main(["report", str(run), "--output", str(tmp_path / "adir")]) == 2
    assert one_error_line(capsys, "report") == f"--output {tmp_path / 'adir'} is a folder; name a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "run"]  # no temporary file left behind


def test_report_takes_null_config_sections_as_the_defaults(tmp_path, capsys):
    run = _run_folder(tmp_path / "run", config_yaml="model:\ndata:\nparallel:\n")
    assert main(["report", str(run), "--format", "md"]) == 0
    assert "| parallel layout | TP 1 × DP ? |" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_report_tokens_must_be_positive_and_finite(tmp_path, capsys, value):
    run = _run_folder(tmp_path / "run")
    assert main(["report", str(run), "--tokens", value]) == 2
    assert one_error_line(capsys, "report") == f"--tokens must be > 0 and finite, got {float(value)}"


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_report_comm_threshold_is_a_share(tmp_path, capsys, value):
    run = _run_folder(tmp_path / "run")
    assert main(["report", str(run), "--comm-threshold", value]) == 2
    assert one_error_line(capsys, "report") == f"--comm-threshold must be a share between 0 and 1, got {float(value)}"


# ---- serve --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--port", "-1"], "--port must be 0..65535, got -1"),
    (["--port", "70000"], "--port must be 0..65535, got 70000"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1, got 0"),
    (["--request-timeout", "0"], "--request-timeout must be > 0 and at most 1e+06 seconds, got 0.0"),
    # sockets refuse an infinite timeout: the server started, then dropped every request unanswered
    (["--request-timeout", "inf"], "--request-timeout must be > 0 and at most 1e+06 seconds, got inf"),
    (["--num-samples", "20000000"], "20,000,000 samples of each of 1 prompts is 20,000,000 completions; at most "
     "10,000,000 in one run (split the prompts or take fewer samples)"),  # was a 500 on every request
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--temperature", "0.2", "--temperatures", "0.5", "1.0"], "give --temperature or --temperatures, not both"),
    # Checked only by each request's SamplingParams, these answered every request with a 500.
    (["--temperatures", "0.5", "nan"], "temperature must be >= 0 and finite, got nan"),
    (["--temperature", "-1"], "temperature must be >= 0 and finite, got -1.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
    (["--prompts", "context", "fewshot"],
     "--prompts takes each of proofstep, context at most once, got context fewshot"),
    (["--prompts", "context", "context"],
     "--prompts takes each of proofstep, context at most once, got context context"),
])
def test_serve_flags_are_checked_before_the_model_loads(tiny, capsys, monkeypatch, flags, message):
    from megamath.generation import session

    monkeypatch.setattr(session, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["serve", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), *flags]) == 2
    assert one_error_line(capsys, "serve") == message


def test_serve_on_a_port_in_use_names_it_before_the_model_loads(tiny, capsys, monkeypatch):
    import socket

    from megamath.generation import session

    monkeypatch.setattr(session, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), "--max-new-tokens", "4",
                     "--port", str(port)]) == 2
    assert one_error_line(capsys, "serve") == f"cannot listen on 127.0.0.1:{port}: Address already in use"


# ---- the entry point ----------------------------------------------------------------------------------------

def test_output_piped_into_a_reader_that_leaves_is_no_error(tmp_path):
    """`megamath plan ... | head -1`: the reader closes the pipe; stop quietly, as a Unix filter does."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before it writes: every write fails with EPIPE (closed after the start, a parent slow
    # to close it let the whole 2.7 KB table into the pipe's buffer: no error, status 0)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "megamath.cli", "plan", "--model", "llemma-7b", "--gpu",
                                 "h200", "--gpus", "8"], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode == 1


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    import megamath.commands.plan as plan

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "run", interrupted)
    assert main(["plan", "--model", "llemma-7b", "--gpu", "h200", "--gpus", "8"]) == 130
    assert capsys.readouterr().err == "megamath plan: interrupted\n"


# ---- config and demo-corpus: small files, still published whole --------------------------------------------

def _interrupt_inside_writes(monkeypatch):
    """Ctrl-C after a file's bytes are written but before they are published (as if hit mid-write)."""
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("megamath.atomic_io.os.fsync", interrupted)


def test_config_output_interrupted_mid_write_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    from test_config_from_neox import LLEMMA_7B_YML

    (tmp_path / "neox.yml").write_text(LLEMMA_7B_YML)
    out = tmp_path / "out.yaml"
    out.write_text("old: config\n")
    _interrupt_inside_writes(monkeypatch)
    assert main(["config", "from-neox", str(tmp_path / "neox.yml"), "--vocab-size", "32000", "--output", str(out),
                 "--force"]) == 130
    assert out.read_text() == "old: config\n" and sorted(p.name for p in tmp_path.iterdir()) == ["neox.yml", "out.yaml"]


@pytest.mark.parametrize("flag", ["--world-size", "--vocab-size"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_config_counts_below_one_are_refused(tmp_path, capsys, flag, value):
    (tmp_path / "train.sh").write_text("--num-layers 2\n")
    assert main(["config", "from-megatron", flag, value, str(tmp_path / "train.sh")]) == 2
    assert one_error_line(capsys, "config") == f"{flag} must be at least 1, got {value}"


def test_demo_corpus_interrupted_mid_write_leaves_no_file(tmp_path, capsys, monkeypatch):
    _interrupt_inside_writes(monkeypatch)
    assert main(["demo-corpus", "--output", str(tmp_path / "demo"), "--documents", "4"]) == 130
    assert [p for p in (tmp_path / "demo").rglob("*") if p.is_file()] == []


# ---- plan ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--internode-gbs", "0"], "--internode-gbs must be positive and finite, got 0.0"),
    (["--internode-gbs", "-5"], "--internode-gbs must be positive and finite, got -5.0"),
    (["--internode-gbs", "inf"], "--internode-gbs must be positive and finite, got inf"),
    (["--tokens", "inf", "--json"], "--tokens must be positive and finite, got inf"),  # `Infinity` is not JSON
    (["--tokens", "1e400"], "--tokens must be positive and finite, got inf"),
    (["--tokens", "nan"], "--tokens must be positive and finite, got nan"),
    # TP groups are consecutive ranks: at 3 GPUs per node, ranks 2 and 3 would be one group on two nodes.
    (["--gpus-per-node", "4", "--tp", "8"], "--tp 8 does not divide --gpus-per-node 4: a TP group must sit in one node "
     "(its all-reduces need NVLink)"),
    (["--gpus-per-node", "3", "--tp", "2"], "--tp 2 does not divide --gpus-per-node 3: a TP group must sit in one node "
     "(its all-reduces need NVLink)"),
    (["--top", "0"], "--top must be >= 1, got 0"),
])
def test_plan_flags_that_would_be_ignored_are_refused(capsys, flags, message):
    assert main(["plan", "--model", "llemma-7b", "--gpu", "h200", "--gpus", "16", *flags]) == 2
    assert one_error_line(capsys, "plan") == message


# ---- tools/ -------------------------------------------------------------------------------------------------

def test_compare_with_megatron_checks_its_paths_first(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "compare_with_megatron.py"
    (tmp_path / "Megatron-LM" / "tools").mkdir(parents=True)
    (tmp_path / "Megatron-LM" / "tools" / "preprocess_data.py").write_text("")
    (tmp_path / "tok.model").write_text("")
    base = ["--tokenizer-model", str(tmp_path / "tok.model"), "--work-dir", str(tmp_path / "work")]
    for flags, message in ((["--megatron-lm", str(tmp_path / "nope"), "--input", str(tmp_path / "tok.model")],
                            "--megatron-lm: no tools/preprocess_data.py in that checkout"),
                           (["--megatron-lm", str(tmp_path / "Megatron-LM"), "--input", str(tmp_path / "no.jsonl")],
                            "--input: no such file")):
        proc = subprocess.run([sys.executable, str(tool), *flags, *base], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "work").exists()



def test_compare_with_megatron_failures_are_one_line_and_leave_no_temporary_folder(tmp_path):
    """A --megatron-python that does not exist was a FileNotFoundError traceback; it and a failing side both
    left their megatron-compare-* folder behind in the temporary directory."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "compare_with_megatron.py"
    (tmp_path / "Megatron-LM" / "tools").mkdir(parents=True)
    (tmp_path / "Megatron-LM" / "tools" / "preprocess_data.py").write_text("import sys; sys.exit('bad flags')\n")
    (tmp_path / "tok.model").write_text("")
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    base = ["--megatron-lm", str(tmp_path / "Megatron-LM"), "--input", str(tmp_path / "in.jsonl"),
            "--tokenizer-model", str(tmp_path / "tok.model"), "--tokenizer-type", "Llama2Tokenizer"]
    proc = subprocess.run([sys.executable, str(tool), *base, "--megatron-python", str(tmp_path / "no-python")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"--megatron-python: cannot run {tmp_path / 'no-python'}: "
                                                         "No such file or directory")
    assert list((tmp_path / "tmp").iterdir()) == []
    proc = subprocess.run([sys.executable, str(tool), *base], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "megatron Llama2Tokenizer failed" in proc.stdout + proc.stderr
    assert "bad flags" in proc.stdout + proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []

def test_every_help_renders_and_output_flags_say_they_replace(capsys):
    from megamath.cli import COMMANDS

    for command in COMMANDS:
        argvs = ([[command, "from-neox", "--help"], [command, "from-megatron", "--help"]] if command == "config"
                 else [[command, "--help"]])
        for argv in argvs:
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            assert exit_.value.code == 0, argv
            text = " ".join(capsys.readouterr().out.split())
            if command in ("generate", "eval", "overlap", "report", "preprocess", "merge", "demo-corpus"):
                assert "replaced" in text, command


# ---- OS errors on output paths name the user's path, not a temporary one ----------------------------------

def test_output_under_a_file_says_so(tmp_path, capsys):
    _tiny_dataset(tmp_path / "d")
    (tmp_path / "afile").write_text("keep")
    assert main(["merge", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "afile" / "m")]) == 2
    assert one_error_line(capsys, "merge") == f"{tmp_path / 'afile'}: exists and is not a folder"
    assert (tmp_path / "afile").read_text() == "keep"


def test_a_folder_in_the_way_of_an_output_is_named(tiny, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "one two three"}\n')
    (tmp_path / "out" / "in_text_document.bin").mkdir(parents=True)
    assert main(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--tokenizer-model", str(tiny[1]),
                 "--output-dir", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 2
    assert one_error_line(capsys, "preprocess") == f"{tmp_path / 'out' / 'in_text_document.bin'}: Is a directory"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in_text_document.bin"]


def test_a_folder_given_for_a_file_is_called_a_folder(tiny, tmp_path, capsys):
    folder = tmp_path / "adir"
    folder.mkdir()
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    for argv, command in (
            (["train", "--config", str(folder)], "train"),
            (["generate", "--model", str(tiny[0]), "--tokenizer-model", str(tiny[1]), "--prompts", str(folder),
              "--output", str(out)], "generate"),
            (["generate", "--model", str(tiny[0]), "--tokenizer-model", str(folder), "--prompts", str(prompts),
              "--output", str(out)], "generate"),
            (["overlap-accuracy", "--hits", str(folder), "--results", str(folder)], "overlap-accuracy")):
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert line.endswith(f"{folder} is a folder, not a file"), line


def test_convert_into_a_path_under_a_file_names_the_file(tiny, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    assert main(["convert", "megamath-to-hf", str(tiny[0]), str(tmp_path / "afile" / "hf")]) == 2
    assert one_error_line(capsys, "convert") == f"{tmp_path / 'afile'}: exists and is not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_overlap_with_an_absurd_n_finishes_or_is_refused(tmp_path, capsys):
    """n is only compared with document lengths: a huge one must neither hang (an O(n) power loop per
    document) nor overflow int64 with a traceback."""
    (tmp_path / "test.jsonl").write_text('{"id": "a", "q": "one two three"}\n')
    (tmp_path / "corpus.jsonl").write_text('{"text": "zero one two three four"}\n')
    argv = [sys.executable, "-m", "megamath.cli", "overlap", "--test", str(tmp_path / "test.jsonl"), "--field", "q",
            "--corpus", str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "hits.jsonl"), "--workers", "1",
            "--no-progress", "--n"]
    proc = subprocess.run(argv + [str(2**62)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and (tmp_path / "hits.jsonl").read_text() == "", proc.stderr
    proc = subprocess.run(argv + [str(2**70)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"megamath overlap: error: --n must be at most {2**63 - 1}, " \
        f"got {2**70}\n", proc.stderr


def test_running_out_of_host_memory_is_one_line(capsys, monkeypatch):
    """`blend --num-samples 10000000000` asks numpy for 19 GiB at once: say so, without a traceback."""
    import megamath.commands.plan as plan

    def allocate(args):
        raise MemoryError("Unable to allocate 18.6 GiB for an array with shape (10000000000,) and data type int16")

    monkeypatch.setattr(plan, "run", allocate)
    assert main(["plan", "--model", "llemma-7b", "--gpu", "h200", "--gpus", "8"]) == 1
    assert capsys.readouterr().err == ("megamath plan: error: out of memory: Unable to allocate 18.6 GiB for an array "
                                       "with shape (10000000000,) and data type int16\n")


def test_torch_out_of_host_memory_is_one_line_too(capsys, monkeypatch):
    """PyTorch's CPU allocator raises a RuntimeError (a training micro-batch or vocabulary too large for the
    host): it reached the user as an 84-line traceback."""
    import megamath.commands.plan as plan

    monkeypatch.setattr(plan, "run", lambda args: torch.empty(2**50, dtype=torch.uint8))  # 1 PiB: refused at once
    assert main(["plan", "--model", "llemma-7b", "--gpu", "h200", "--gpus", "8"]) == 1
    assert re.fullmatch(r"megamath plan: error: out of memory: DefaultCPUAllocator: can't allocate memory: you tried "
                        r"to allocate 1125899906842624 bytes\..*\n", capsys.readouterr().err)
    monkeypatch.setattr(plan, "run", lambda args: torch.tensor([1.0]).view(3))  # any other RuntimeError: raised
    with pytest.raises(RuntimeError, match="is invalid for input of size 1"):
        main(["plan", "--model", "llemma-7b", "--gpu", "h200", "--gpus", "8"])


def test_merge_into_an_empty_prefix_is_refused(tmp_path, capsys, monkeypatch):
    _tiny_dataset(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    # each wrote hidden files .bin/.idx in the current folder, or (a folder's name) inside that folder
    for output in ("", ".bin", "out/", "out/.bin", "out/.", f"{tmp_path}/out/"):
        assert main(["merge", "--input", "d", "--output", output]) == 2
        assert one_error_line(capsys, "merge") == f"--output {output!r} names no dataset: give a prefix such as out/merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx", "out"]
    assert list((tmp_path / "out").iterdir()) == []


# ---- train: inputs used only at the first evaluation are checked at the start -------------------------------

@pytest.mark.parametrize("broken", ["data", "tokenizer"])
def test_train_checks_evaluation_inputs_before_the_first_step(tiny, tmp_path, capsys, broken):
    """A wrong evaluation path used to stop the run at its first evaluation, eval_every steps (hours) in."""
    import yaml
    from test_train_loop import raw_config

    (tmp_path / "arith.jsonl").write_text('{"id": "1", "prompt": "2 + 2 =", "answer": "4"}\n')
    (tmp_path / "bad.model").write_text("not a model")
    raw = raw_config(tmp_path / "data", tmp_path / "run", train_steps=4, eval_every=4, model__max_seq_length=64,
                     model__vocab_size=512)
    raw["evaluation"] = {"tokenizer_model": str(tmp_path / "bad.model" if broken == "tokenizer" else tiny[1]),
                         "data_dir": str(tmp_path),
                         "tasks": [{"name": "demo-arith", "data": "missing.jsonl" if broken == "data" else "arith.jsonl",
                                    "max_new_tokens": 4}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    line = one_error_line(capsys, "train")
    assert line == (f"data file not found: {tmp_path / 'missing.jsonl'}" if broken == "data"
                    else f"{tmp_path / 'bad.model'}: not a SentencePiece model (INTERNAL: could not parse ModelProto "
                    f"from {tmp_path / 'bad.model'})")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_config_from_megatron_with_its_own_flags_after_the_file_says_where_they_go(tmp_path, capsys):
    (tmp_path / "train.sh").write_text("--num-layers 2\n")
    assert main(["config", "from-megatron", str(tmp_path / "train.sh"), "--world-size", "4"]) == 2
    assert one_error_line(capsys, "config") == (
        f"{str(tmp_path / 'train.sh')!r} comes before any --flag (a file holding the command line goes last, "
        "after megamath's own flags such as --output and --world-size)")


def test_output_to_a_pipe_or_device_is_written_through_not_replaced(tmp_path, capsys):
    """`--output /dev/null` is the usual way to keep only the printed numbers: publishing by rename would
    replace the device itself with a regular file (as root, for every program on the machine). A FIFO
    stands in for it here."""
    import os
    import stat
    import threading

    run = _run_folder(tmp_path / "run")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        assert main(["report", str(run), "--output", str(fifo)]) == 0
    finally:
        reader.join(timeout=10)  # the report closed the pipe: the reader ends once it has read the bytes
        if reader.is_alive() and stat.S_ISFIFO(os.stat(fifo).st_mode):  # nothing written: unblock its open
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert received and received[0].startswith(b"<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "run"]


def test_a_flag_typo_names_the_command(capsys):
    """argparse's top-level parser reported unknown flags as `megamath: error` with the top usage, which
    does not say which command's flags to look at."""
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--input", "a", "--output", "b", "--ouptut", "c"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: megamath merge ") and "Traceback" not in err
    assert err.splitlines()[-1] == "megamath merge: error: unrecognized arguments: --ouptut c"


def test_checkpoint_verify_of_a_file_says_it_is_a_file(tmp_path, capsys):
    """A file given for the run directory was reported as 'not found', though it is there."""
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["checkpoint", "verify", str(tmp_path / "metrics.jsonl")]) == 2
    assert one_error_line(capsys, "checkpoint") == (f"{tmp_path / 'metrics.jsonl'} is a file, not a folder "
                                                    "(give a run directory or a step_XXXXXXX folder)")
    assert main(["checkpoint", "verify", str(tmp_path / "nope")]) == 2
    assert one_error_line(capsys, "checkpoint") == (f"{tmp_path / 'nope'} not found "
                                                    "(give a run directory or a step_XXXXXXX folder)")


def test_convert_names_a_wrong_source_itself(tmp_path, capsys):
    """A missing SRC, a file, or a training run given to hf-to-megamath were all 'SRC/config.json not found'."""
    (tmp_path / "afile").write_text("x")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000004\n")
    for direction, src, message in (
            ("megamath-to-hf", tmp_path / "nope", f"{tmp_path / 'nope'} not found"),
            ("hf-to-megamath", tmp_path / "afile", f"{tmp_path / 'afile'} is a file; SRC is a checkpoint folder"),
            ("hf-to-megamath", run, f"{run} is a megamath training checkpoint, not a Hugging Face folder: "
                                    "export it with `megamath convert megamath-to-hf`")):
        assert main(["convert", direction, str(src), str(tmp_path / "out")]) == 2
        assert one_error_line(capsys, "convert") == message
    assert not (tmp_path / "out").exists()


def test_merge_into_one_of_its_inputs_is_refused(tmp_path, capsys):
    """`merge --input a b --output a` replaced dataset a (run twice, it held a + b + b)."""
    _tiny_dataset(tmp_path / "a")
    _tiny_dataset(tmp_path / "b")
    before = (tmp_path / "a.bin").read_bytes(), (tmp_path / "a.idx").read_bytes()
    for output in ("a", "a.bin", f"{tmp_path}/a"):
        argv = ["merge", "--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                output if output.startswith("/") else str(tmp_path / output)]
        assert main(argv) == 2
        assert one_error_line(capsys, "merge").endswith(f"is also an input ({tmp_path / 'a'}); writing it would "
                                                        "replace that input")
    assert ((tmp_path / "a.bin").read_bytes(), (tmp_path / "a.idx").read_bytes()) == before
    assert main(["merge", "--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "c")]) == 0


def test_a_file_in_the_way_of_a_deep_output_is_named(tmp_path, capsys):
    """mkdir(parents=True) under a file fails on the deepest folder: the error named a/file/out/corpus/arxiv/train,
    which does not exist, instead of the file that stands in the way."""
    (tmp_path / "afile").write_text("keep")
    assert main(["demo-corpus", "--output", str(tmp_path / "afile" / "out"), "--documents", "2"]) == 2
    assert one_error_line(capsys, "demo-corpus") == f"{tmp_path / 'afile'}: exists and is not a folder"
    assert (tmp_path / "afile").read_text() == "keep"


def test_blend_names_a_prefix_given_with_its_extension(tmp_path, capsys):
    """`blend --data-path d.bin` said only 'd.bin.idx not found'; training's data errors say what a prefix is."""
    _tiny_dataset(tmp_path / "d")
    assert main(["blend", "--data-path", str(tmp_path / "d.bin"), "--seq-length", "2", "--num-samples", "1"]) == 2
    assert one_error_line(capsys, "blend") == (f"indexed dataset file not found: {tmp_path / 'd.bin.idx'} "
                                               "(--data-path takes prefixes, without .bin/.idx, as training does)")
    assert main(["blend", "--data-path", str(tmp_path / "nope"), "--seq-length", "2", "--num-samples", "1"]) == 2
    assert one_error_line(capsys, "blend") == f"indexed dataset file not found: {tmp_path / 'nope.idx'}"


def test_flags_are_never_abbreviated(capsys):
    """`--out` for --output worked until another flag began the same way; Megatron-LM refuses it too."""
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--input", "a", "--out", "b"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "megamath merge: error: the following arguments are required: --output"


def test_generate_reads_escapes_in_stop_strings():
    r"""A shell passes `--stop "\n"` as a backslash and an n, which no completion contains: nothing stopped."""
    from megamath.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--tokenizer-model", "t", "--prompts", "p.jsonl",
                                      "--output", "o.jsonl", "--stop", "\\n", "a\\tb", "\\\\n", "Q:"])
    assert args.stop == ["\n", "a\tb", "\\n", "Q:"]
