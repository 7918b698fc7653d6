"""Input side of preprocessing: which files make which output dataset, and how their lines are read.

ProofPile II ships as `{algebraic-stack,arxiv,open-web-math}/{train,validation,test}/*.jsonl.zst`, one
JSON record `{"text": str, "meta": dict | str}` per line. `--input` may name that root, a subset folder,
a split folder, single files or globs, in any mix; folders are searched recursively for `.jsonl`,
`.jsonl.zst` and `.jsonl.gz` files.

Naming rule (one output dataset per group of files):
    a file at `<subset>/<split>/<name>` with split one of train, validation, test
        -> `{subset}_{split}_{json_key}_document` (e.g. `arxiv_train_text_document`);
    any other ("loose") file -> `{stem}_{json_key}_document`, the stem being the file name without
        `.jsonl`, `.jsonl.zst` or `.jsonl.gz`.
Files of a group are read in sorted name order (then by path), records in file order. Two loose files
with the same stem, or a loose file named like a group, are refused rather than silently merged.

The main process only decompresses and cuts the stream into batches of whole lines (`LineBatch`); JSON
parsing and validation (`parse_lines`) run in the workers, so that work is parallel too.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import zstandard

SPLITS = ("train", "validation", "test")
SUFFIXES = (".jsonl.zst", ".jsonl.gz", ".jsonl")  # longest first: `.jsonl` is a suffix of neither
_UTF8_BOM = b"\xef\xbb\xbf"

# Reasons a line is skipped; the summary counts lines per reason.
INVALID_JSON = "invalid JSON"
INVALID_UTF8 = "invalid UTF-8"
NOT_AN_OBJECT = "not a JSON object"
MISSING_KEY = "missing json key"
NOT_A_STRING = "text not a string"
EMPTY_TEXT = "empty text"
BAD_LINE_REASONS = (INVALID_JSON, INVALID_UTF8, NOT_AN_OBJECT, MISSING_KEY, NOT_A_STRING, EMPTY_TEXT)


def skipped_counts(skipped: dict[str, int]) -> str:
    """Skipped lines by reason, for an error line: `invalid JSON: 3, missing json key: 1,024`."""
    return ", ".join(f"{reason}: {count:,}" for reason, count in sorted(skipped.items()))


@dataclass(frozen=True)
class InputGroup:
    """The files that make one output dataset."""

    name: str
    """Dataset name before `_{json_key}_document`: `{subset}_{split}` or a loose file's stem."""
    files: tuple[Path, ...]
    """In reading order."""
    subset: str | None = None
    split: str | None = None
    origins: tuple[tuple[Path, int, int], ...] | None = None
    """When the files are copies of inputs (Megatron's round-robin partitions), per file: (the input, its
    line number of the copy's first line, the step between the input lines of consecutive copy lines), so
    bad lines are reported at the input's file:line. None: the files are the inputs."""

    def output_prefix(self, output_dir: str | Path, json_key: str) -> Path:
        """`output_dir/{name}_{json_key}_document` (Megatron's `{prefix}_{key}_document`); a name that would
        leave output_dir (a path separator, from the key or a file name) is refused. `..` inside a name
        (`v1..2.jsonl`) is harmless: only a whole name `.` or `..` means a folder."""
        name = f"{self.name}_{json_key}_document"
        if _has_separator(name) or name in (".", ".."):
            cause = "--json-key" if _has_separator(json_key) else "the input name"
            raise ValueError(f"dataset name {name!r} (from {cause}) is not a plain file name: "
                             "use names without path separators")
        return Path(output_dir) / name


def _has_separator(name: str) -> bool:
    """Whether `name` holds a path separator (or a NUL, which no file name can)."""
    return "/" in name or "\\" in name or "\0" in name


@dataclass(frozen=True)
class BadLine:
    """A skipped input line, reported as `file:line: reason: detail`."""

    file: Path
    line: int
    """1-based line number in the decompressed file."""
    reason: str
    """One of BAD_LINE_REASONS."""
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.detail}"


@dataclass(frozen=True)
class LineBatch:
    """Whole lines of one file, as raw bytes: what the main process sends to a worker."""

    group: int
    """Index of the InputGroup the file belongs to."""
    file: Path
    first_line: int
    """1-based line number of the first line in `data`."""
    data: bytes
    """Complete lines, `\\n`-terminated except possibly the file's last."""
    file_bytes: int
    """Bytes of the (compressed) file consumed for this batch: drives the progress bar."""
    line_step: int = 1
    """Line k of `data` (from 0) is line `first_line + k * line_step` of `file` (a partition copy: see origins)."""


# --- finding inputs ---------------------------------------------------------------------------------


def strip_suffix(path: Path) -> str | None:
    """File name without its jsonl suffix, or None when the file is not a supported input."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _files_under(folder: Path, required: bool = True) -> list[Path]:
    """Input files anywhere below `folder`, hidden files and folders left out."""
    files = [p for p in folder.rglob("*") if p.is_file() and strip_suffix(p)
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if required and not files:
        raise FileNotFoundError(f"no .jsonl, .jsonl.zst or .jsonl.gz files under {folder}")
    return files


def _expand(spec: str | Path) -> list[Path]:
    """One --input argument -> the input files it names."""
    path = Path(spec)
    if path.is_dir():
        return _files_under(path)
    if path.is_file():
        if strip_suffix(path) is None:
            raise ValueError(f"{path}: unsupported input file; expected .jsonl, .jsonl.zst or .jsonl.gz")
        return [path]
    if any(c in str(spec) for c in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(str(spec), recursive=True))]
        files = [f for m in matches for f in (_files_under(m, False) if m.is_dir() else [m]) if strip_suffix(f)]
        if not files:
            raise FileNotFoundError(f"no .jsonl, .jsonl.zst or .jsonl.gz files match {spec}")
        return files
    raise FileNotFoundError(f"input not found: {spec}")


def _group_key(path: Path) -> tuple[str, str | None, str | None]:
    """(name, subset, split) of the dataset a file belongs to, by the naming rule above."""
    parent = Path(os.path.abspath(path)).parent  # normalised, but symlinks keep their own place
    if parent.name in SPLITS and parent.parent.name:
        return f"{parent.parent.name}_{parent.name}", parent.parent.name, parent.name
    return strip_suffix(path), None, None


def discover_inputs(inputs: Sequence[str | Path]) -> list[InputGroup]:
    """Expand `--input` arguments into output groups, sorted by name; a file named twice counts once."""
    if not inputs:
        raise ValueError("no --input given")
    seen: set[Path] = set()
    members: dict[str, list[Path]] = {}
    layout: dict[str, tuple[str | None, str | None]] = {}
    for spec in inputs:
        for path in _expand(spec):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            name, subset, split = _group_key(path)
            if name in layout and (layout[name][0] is None or subset is None):
                other = members[name][0]
                raise ValueError(f"{other} and {path} would both be written to dataset {name!r}; "
                                 "rename one or preprocess them separately")
            layout[name] = (subset, split)
            members.setdefault(name, []).append(path)
    return [InputGroup(name, tuple(sorted(members[name], key=lambda p: (p.name, str(p)))), *layout[name])
            for name in sorted(members)]


# --- reading lines ----------------------------------------------------------------------------------


def _zstd_blocks(raw, read_size: int) -> Iterator[bytes]:
    """Decompressed blocks of a .zst file: every frame of it, and an error if the last one is cut short
    (zstandard's stream reader would end silently, losing the tail of a truncated download)."""
    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    while chunk := raw.read(read_size):
        while chunk:
            block = frame.decompress(chunk)
            if block:
                yield block
            if frame.eof:  # frames may be concatenated: start a new one on what is left
                chunk, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
            else:
                chunk, in_frame = b"", True
    if in_frame:
        raise EOFError("the file ends inside a zstd frame (truncated?)")


def _blocks(raw, path: Path, size: int) -> Iterator[bytes]:
    """Decompressed bytes of a file, in blocks of about `size` bytes."""
    if path.name.endswith(".zst"):
        yield from _zstd_blocks(raw, max(1, size // 8))  # jsonl compresses about 4-8x
        return
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
    while block := stream.read(size):
        yield block


def archive_fault(path: Path) -> str | None:
    """Why a compressed input cannot be read to its end (None when it can): a test pass, like `zstd -t`,
    for --skip-bad-files, which must drop a bad file whole instead of keeping the part read before the fault."""
    if not path.name.endswith((".zst", ".gz")):
        return None
    try:
        for _ in read_line_batches(path, 0, 8 << 20):
            pass
    except ValueError as err:
        return str(err)
    return None


def read_line_batches(path: Path, group: int, batch_bytes: int) -> Iterator[LineBatch]:
    """Cut a file into batches of at least `batch_bytes` decompressed bytes (one block more at most),
    at line ends.

    A line longer than a batch makes one larger batch; memory is bounded by the longest line.
    Decompression errors (corrupt or truncated archives) become a ValueError naming the file.
    """
    with open(path, "rb") as raw:
        if path.name.endswith((".zst", ".gz")) and os.fstat(raw.fileno()).st_size == 0:
            # A 0-byte archive is no valid zstd/gzip stream (`zstd -t` rejects it): a failed download, not an
            # empty shard. Reading it as empty would publish a dataset silently missing that shard.
            raise ValueError(f"{path}: empty file (0 bytes) is not a valid {path.suffix[1:]} archive")
        blocks = _blocks(raw, path, batch_bytes)
        pending: list[bytes] = []  # blocks not yet sent, the first starting at a line start
        size, line, consumed, first = 0, 1, 0, True
        while True:
            try:
                block = next(blocks, b"")
            except (zstandard.ZstdError, OSError, EOFError, zlib.error) as err:
                raise ValueError(f"{path}: cannot decompress near line {line}: {err}") from err
            if block:
                pending.append(block)
                size += len(block)
                # Join only once a line ends in the new block: a huge line costs no repeated copies.
                if size < max(batch_bytes, len(_UTF8_BOM)) or b"\n" not in block:
                    continue
            data = b"".join(pending)
            if first:
                data, first = data.removeprefix(_UTF8_BOM), False
            cut = data.rfind(b"\n") + 1 if block else len(data)  # at the end, the unterminated last line too
            if cut:
                position = raw.tell()
                yield LineBatch(group, path, line, data[:cut], position - consumed)
                consumed = position
                line += data.count(b"\n", 0, cut)
            pending, size = ([data[cut:]], len(data) - cut) if cut < len(data) else ([], 0)
            if not block:
                return


# --- parsing records (runs in the workers) ----------------------------------------------------------

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def parse_lines(data: bytes, json_key: str, sentence_lists: bool = False
                ) -> tuple[list, list[tuple[int, str, str]]]:
    """Texts of the valid records in `data`, in order, and `(line offset, reason, detail)` of the rest.

    The batch is decoded as UTF-8 in one call; only when that fails is it decoded line by line to find
    the culprits. `meta` is not needed for tokenization and is not validated. With `sentence_lists`, a
    list of strings under `json_key` (Megatron's sentence-split format) is a valid text, returned as that
    list; otherwise it is skipped as not a string.
    """
    try:
        lines: list = data.decode("utf-8").split("\n")
        decoded = True
    except UnicodeDecodeError:
        lines, decoded = data.split(b"\n"), False
    if lines and not lines[-1]:
        lines.pop()  # the terminating newline of the batch's last line
    texts: list = []  # str, or list[str] with sentence_lists
    bad: list[tuple[int, str, str]] = []
    loads = json.loads
    for i, line in enumerate(lines):
        if not decoded:
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append((i, INVALID_UTF8, f"byte {err.start}: {err.reason}"))
                continue
        try:
            record = loads(line)
        except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than Python's stack allows
            bad.append((i, INVALID_JSON, _json_fault(line, err)))
            continue
        if type(record) is not dict:
            bad.append((i, NOT_AN_OBJECT, f"the line is {_JSON_TYPES.get(type(record), 'a value')}"))
            continue
        text = record.get(json_key)
        if sentence_lists and type(text) is list:
            fault = _sentence_list_fault(text, json_key)
            if fault:
                bad.append((i, *fault))
            else:
                texts.append(text)
            continue
        if type(text) is not str:
            if json_key not in record:
                keys = ", ".join(repr(k) for k in list(record)[:8])
                bad.append((i, MISSING_KEY, f"no {json_key!r} key (keys: {keys or 'none'})"))
            else:
                bad.append((i, NOT_A_STRING, f"{json_key!r} is {_JSON_TYPES.get(type(text), 'a value')}"))
            continue
        if not text:
            bad.append((i, EMPTY_TEXT, f"{json_key!r} is an empty string"))
            continue
        if ("\\ud" in line or "\\uD" in line) and not _is_utf8_encodable(text):
            # A lone surrogate escape (e.g. "\ud800") decodes to a str no UTF-8 tokenizer accepts.
            bad.append((i, INVALID_UTF8, f"{json_key!r} has a lone surrogate escape (\\ud800-\\udfff)"))
            continue
        texts.append(text)
    return texts, bad


def _json_fault(line: str, err: Exception) -> str:
    """Why json.loads refused a line, in one line. Not only JSONDecodeError: a line nested thousands deep
    raises RecursionError, and an integer of over 4,300 digits a plain ValueError (no .msg, no .colno)."""
    if not line.strip():
        return "blank line"
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    if isinstance(err, RecursionError):
        return "nested too deeply to parse (arrays or objects beyond Python's recursion limit)"
    # e.g. "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"
    return " ".join(str(err).split(";")[0].split()) or type(err).__name__


def _sentence_list_fault(sentences: list, json_key: str) -> tuple[str, str] | None:
    """(reason, detail) when a list under json_key is no usable list of sentences, else None."""
    for sentence in sentences:
        if type(sentence) is not str:
            return NOT_A_STRING, f"{json_key!r} is a list holding {_JSON_TYPES.get(type(sentence), 'a value')}"
    if not any(sentences):  # Megatron would store an empty document; skipped, as an empty string is
        return EMPTY_TEXT, f"{json_key!r} is " + ("a list of empty strings" if sentences else "an empty list")
    if not all(map(_is_utf8_encodable, sentences)):
        return INVALID_UTF8, f"{json_key!r} has a lone surrogate escape (\\ud800-\\udfff)"
    return None


def _is_utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
