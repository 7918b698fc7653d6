"""Every flag of Megatron-LM's `tools/preprocess_data.py` (as of August 2026: its own flags plus the shared
tokenizer flags its parser takes from Megatron's TokenizerConfig) on `tools/preprocess_data.py`: a flag that
changes nothing in Megatron for a SentencePiece model changes no byte here, and one that would change
Megatron's ids (or makes Megatron fail) is refused with one line and exit status 2."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2

import test_preprocess
from megamath.compat import megatron_preprocess
from test_megatron_preprocess import megatron_args, read_pair
from test_preprocess import _texts, _write

bpe_model = test_preprocess.bpe_model  # the session's Llama-like model (a fixture)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
TOKENIZER_FLAGS = {  # Megatron's TokenizerConfig, one flag per field (two for a field that defaults to True)
    "--vocab-size", "--padded-vocab-size", "--no-pad-vocab-size", "--disable-pad-vocab-size", "--vocab-file",
    "--merge-file", "--vocab-extra-ids", "--tokenizer-type", "--tokenizer-model", "--tokenizer-metadata",
    "--tokenizer-special-tokens", "--tiktoken-pattern", "--tiktoken-num-special-tokens",
    "--tokenizer-sentencepiece-legacy", "--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
    "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces", "--tokenizer-hf-no-use-fast",
    "--tokenizer-hf-no-include-special-tokens", "--trust-remote-code", "--null-tokenizer-eod-id",
    "--null-tokenizer-pad-id", "--chat-template", "--use-gigatoken"}
SCRIPT_FLAGS = {  # preprocess_data.py's get_args
    "--input", "--json-keys", "--split-sentences", "--keep-newlines", "--append-eod", "--lang", "--output-prefix",
    "--workers", "--find-optimal-num-workers", "--workers-to-check", "--max-documents", "--partitions",
    "--log-interval", "--keep-sequential-samples"}
# Run by every test here (megatron_args), or tested in test_megatron_preprocess.py.
EXERCISED = {"--input", "--json-keys", "--output-prefix", "--workers", "--tokenizer-type", "--tokenizer-model",
             "--append-eod", "--split-sentences", "--find-optimal-num-workers", "--partitions",
             "--keep-sequential-samples"}

SENTENCEPIECE_METADATA = {"library": "sentencepiece", "class_name": "MegatronTokenizerText",
                          "class_path": "megatron.core.tokenizers.text.text_tokenizer", "chat_template": None}
NO_OPS = [  # flags Megatron reads for no SentencePiece type, or that do nothing on a Llama-like model
    ["--vocab-size", "32000"], ["--padded-vocab-size", "32128"], ["--no-pad-vocab-size"],
    ["--disable-pad-vocab-size"], ["--vocab-file", "gpt2-vocab.json"], ["--merge-file", "gpt2-merges.txt"],
    ["--vocab-extra-ids", "100"], ["--tiktoken-pattern", "v2"], ["--tiktoken-num-special-tokens", "0"],
    ["--tokenizer-hf-no-use-fast"], ["--tokenizer-hf-no-include-special-tokens"], ["--trust-remote-code"],
    ["--use-gigatoken"], ["--null-tokenizer-eod-id", "7"], ["--null-tokenizer-pad-id", "0"],
    ["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"],
    ["--no-tokenizer-sentencepiece-ignore-extra-whitespaces"],  # the model keeps runs of spaces, as Llama's
    ["--disable-tokenizer-sentencepiece-ignore-extra-whitespaces"],
    ["--tokenizer-metadata", SENTENCEPIECE_METADATA], ["--tokenizer-metadata", {"library": "sentencepiece"}],
    ["--keep-newlines"], ["--lang", "german"], ["--log-interval", "1"], ["--workers-to-check", "1", "2"],
    ["--max-documents", "2"],
    ["--tokenizer-sentencepiece-legacy"],  # without special tokens the same ids; run without --append-eod
]
NO_EOD = "--tokenizer-sentencepiece-legacy"

REFUSALS = [  # extra flags, what the one line says
    (["--tokenizer-special-tokens", "<s>", "</s>"], "--tokenizer-special-tokens is not supported: megamath encodes "
                                                    "text with the model's own pieces"),
    (["--tokenizer-sentencepiece-legacy", "--tokenizer-special-tokens", "<mask>"], "--tokenizer-special-tokens is "
                                                                                   "not supported"),
    (["--tokenizer-sentencepiece-legacy"], "--tokenizer-sentencepiece-legacy with --append-eod is not supported: "
                                           "Megatron-LM's legacy SentencePiece wrapper has no EOS id"),
    (["--tokenizer-metadata", "missing.json"], "--tokenizer-metadata not found: "),
    (["--tokenizer-metadata", "{not json"], "invalid JSON (Expecting property name enclosed in double quotes at line 1)"),
    (["--tokenizer-metadata", ["sentencepiece"]], "not a JSON object"),
    (["--tokenizer-metadata", {"library": "huggingface"}], "names the tokenizer library 'huggingface', which "
                                                           "Megatron-LM would then run instead of SentencePiece"),
    (["--tokenizer-metadata", {"class_name": "MegatronTokenizerText"}], "names the tokenizer library None"),
    (["--tokenizer-metadata", {**SENTENCEPIECE_METADATA, "class_path": "mine"}], "names the tokenizer class "
                                                                                 "mine.MegatronTokenizerText"),
    (["--tokenizer-metadata", {"library": "sentencepiece", "eod": 3}], "sets eod, which Megatron-LM sets as attributes"),
    *[(["--tokenizer-type", t], f"--tokenizer-type {t} is not supported: megamath tokenizes with SentencePiece only")
      for t in ("TikTokenizer", "NullTokenizer", "BertWordPieceCase", "BertWordPieceLowerCase", "MultimodalTokenizer",
                "NullMultimodalTokenizer", "SFTTokenizer")],
    *[(["--tokenizer-type", t], f"--tokenizer-type {t} is not supported (no longer a Megatron-LM tokenizer type: "
       "Megatron-LM runs those models with HuggingFaceTokenizer)") for t in ("Llama3Tokenizer", "MistralTokenizer")],
]


def _flags(extra: list) -> set[str]:
    return {a for a in extra if isinstance(a, str) and a.startswith("--")}


def test_every_megatron_flag_is_a_flag_here_and_tested():
    ours = {flag for action in megatron_preprocess.build_parser()._actions for flag in action.option_strings}
    assert TOKENIZER_FLAGS | SCRIPT_FLAGS <= ours
    tested = EXERCISED.union(*map(_flags, NO_OPS), *(_flags(extra) for extra, _ in REFUSALS))
    assert tested == TOKENIZER_FLAGS | SCRIPT_FLAGS


def _resolve(extra: list, folder: Path) -> list[str]:
    """A JSON value (or a string after --tokenizer-metadata) stands for a metadata file holding it."""
    out = []
    for i, arg in enumerate(extra):
        if i and extra[i - 1] == "--tokenizer-metadata" and arg != "missing.json":
            path = folder / "tokenizer_metadata.json"
            path.write_text(arg if isinstance(arg, str) else json.dumps(arg))
            arg = path
        out.append(str(folder / arg) if arg == "missing.json" else str(arg))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bpe_model):
    """The input (texts with runs of spaces and tabs) and the bytes written without any extra flag."""
    folder = tmp_path_factory.mktemp("flags")
    data = _write(folder / "corpus.jsonl", [{"text": t} for t in _texts(11, 25)] + [{"text": ["a  b", "  c "]}])
    base = {}
    for eod in (True, False):
        args = megatron_args(data, folder / f"base{eod}", bpe_model)
        assert megatron_preprocess.run(args if eod else [a for a in args if a != "--append-eod"]) == 0
        base[eod] = read_pair(folder / f"base{eod}_text_document")
    return data, base


@pytest.mark.parametrize("extra", NO_OPS, ids=lambda extra: " ".join(map(str, extra))[:60])
def test_a_flag_megatron_ignores_changes_no_byte(tmp_path, bpe_model, corpus, extra):
    data, base = corpus
    eod = NO_EOD not in extra
    args = megatron_args(data, tmp_path / "x", bpe_model, *_resolve(extra, tmp_path))
    assert megatron_preprocess.run(args if eod else [a for a in args if a != "--append-eod"]) == 0
    assert read_pair(tmp_path / "x_text_document") == base[eod]


def _tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(tool, argv: list[str], capsys, folder: Path) -> str:
    assert tool.megatron_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: ") and err.count("\n") == 1 and err.endswith("\n")
    assert not list(folder.glob("x_*")), "a refused run wrote output"
    return err


@pytest.mark.parametrize("extra, message", REFUSALS, ids=lambda v: " ".join(map(str, v))[:60] if isinstance(v, list)
                         else "")
def test_a_flag_that_would_change_megatron_ids_is_one_line(tmp_path, bpe_model, capsys, extra, message):
    data = _write(tmp_path / "d.jsonl", [{"text": "a  b"}])
    err = _refused(_tool(), megatron_args(data, tmp_path / "x", bpe_model, *_resolve(extra, tmp_path)), capsys, tmp_path)
    assert message in err


@pytest.mark.parametrize("flag", ["--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
                                  "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces"])
def test_keeping_extra_whitespace_is_refused_for_a_model_that_collapses_it(tmp_path, bpe_model, capsys, flag):
    """Megatron marks runs of spaces before encoding only where the model would collapse them; megamath does not."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(bpe_model.read_bytes())
    model.normalizer_spec.remove_extra_whitespaces = True
    collapsing = tmp_path / "collapsing.model"
    collapsing.write_bytes(model.SerializeToString())
    data = _write(tmp_path / "d.jsonl", [{"text": "a  b"}])
    tool = _tool()
    err = _refused(tool, megatron_args(data, tmp_path / "x", collapsing, flag), capsys, tmp_path)
    assert err == ("preprocess_data.py: error: --no-tokenizer-sentencepiece-ignore-extra-whitespaces is not supported "
                   f"for {collapsing}: this model collapses runs of spaces, where Megatron-LM encodes them its own way "
                   "and megamath does not; drop the flag\n")
    assert tool.megatron_main(megatron_args(data, tmp_path / "y", collapsing)) == 0  # without the flag: Megatron's ids


def test_a_bad_value_is_refused_by_argparse_as_megatron_refuses_it(capsys):
    for extra in (["--tiktoken-pattern", "v3"], ["--vocab-size", "big"]):
        with pytest.raises(SystemExit) as exit_:
            megatron_preprocess.build_parser().parse_args(megatron_args("d.jsonl", "x", "m.model", *extra))
        assert exit_.value.code == 2 and f"argument {extra[0]}: invalid" in capsys.readouterr().err


def test_the_script_exits_2_with_one_line(tmp_path, bpe_model):
    data = _write(tmp_path / "d.jsonl", [{"text": "a"}])
    proc = subprocess.run([sys.executable, str(TOOL), *megatron_args(data, tmp_path / "x", bpe_model),
                           "--tokenizer-special-tokens", "<pad>"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("preprocess_data.py: error: --tokenizer-special-tokens is not supported")
    assert proc.stderr.count("\n") == 1
