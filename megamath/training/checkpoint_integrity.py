"""Checksums of training checkpoints: recorded when saved, checked before anything is loaded.

Why: a shard with a few bytes overwritten, or cut short by a full disk, otherwise loads silently (or
with a traceback that names no file) and the run trains on garbage. Every file of a checkpoint gets
its size and SHA-256 recorded in metadata.json, which is written last; a loader hashes each file it
is about to read and refuses a mismatch with the file's name, the expected and the found size/digest.
metadata.json seals itself: `metadata_sha256` is the digest of the rest of its contents (as canonical JSON),
since one flipped digit there (the step, the global batch, the DP size) would otherwise pass every check and
resume a run wrongly, or fail it, rather than walk back to the previous checkpoint.

Saving: each rank hashes the files it wrote (read back from the page cache) and leaves the digests in
a small `.sums_rankNNNNN.json` in the temporary folder; rank 0 merges them into metadata.json's
`checksums` and removes them. No collective is needed, so it works the same on gloo and NCCL.

checkpoint_verify.py checks whole checkpoints offline (`megamath checkpoint verify`) with these
primitives; checkpoints saved before checksums existed are checked for presence only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

SUMS_PREFIX = ".sums_rank"
METADATA_DIGEST = "metadata_sha256"
_CHUNK = 8 << 20
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or altered (a ValueError: the CLI prints it as one line)."""


def file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def check_file_name(name: str, where: str) -> str:
    """A file name recorded in a checkpoint (or index) must stay inside its folder: no separators, no `..`."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise CheckpointIntegrityError(f"{where}: file name {name!r} is not a plain file name inside the folder")
    return name


def _contents_digest(meta: dict) -> str:
    """SHA-256 of the metadata without its seal, as canonical JSON (sorted keys, no spaces): the same for the
    dict that was saved and for the one parsed back, whatever the file's layout."""
    body = {key: value for key, value in meta.items() if key != METADATA_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- saving ------------------------------------------------------------------------------------------------

def sealed_metadata_text(meta: dict) -> str:
    """metadata.json's text: `meta` with, last, `metadata_sha256` over the rest (any older seal replaced)."""
    body = {key: value for key, value in meta.items() if key != METADATA_DIGEST}
    return json.dumps({**body, METADATA_DIGEST: _contents_digest(body)}, indent=2) + "\n"


def write_rank_sums(folder: Path, rank: int, names: list[str]) -> None:
    """Digests of the files this rank wrote into `folder`, left for rank 0 to merge."""
    sums = {name: file_digest(folder / name) for name in names}
    (folder / f"{SUMS_PREFIX}{rank:05d}.json").write_text(json.dumps(sums))


def collect_sums(folder: Path) -> dict[str, dict]:
    """Merge (and remove) every rank's digest file in `folder`."""
    merged = {}
    for path in sorted(folder.glob(f"{SUMS_PREFIX}*.json")):
        merged.update(json.loads(path.read_text()))
        path.unlink()
    return merged


# ---- loading -----------------------------------------------------------------------------------------------

def check_metadata_seal(meta: dict, where: str) -> None:
    """Refuse metadata whose contents changed after it was sealed (metadata saved unsealed, by older versions,
    is taken as it is)."""
    recorded = meta.get(METADATA_DIGEST)
    if recorded is None:
        return
    found = _contents_digest(meta)
    if found != recorded:
        raise CheckpointIntegrityError(f"{where} has contents with sha256 {found}, expected {recorded} "
                                       "(it changed after it was saved)")


def verify_files(path: Path, meta: dict, names: list[str]) -> None:
    """Check that each file of `names` in checkpoint `path` is present with its recorded size and digest."""
    sums = meta.get("checksums")
    for name in names:
        file = path / check_file_name(name, str(path / "metadata.json"))
        if not file.is_file():
            expected = f" (expected {sums[name]['bytes']} bytes)" if sums and name in sums else ""
            raise CheckpointIntegrityError(f"checkpoint file {file} is missing{expected}")
        if sums is None:
            continue  # saved before checksums were recorded: presence is all that can be checked
        expected = sums.get(name)
        if expected is None:
            raise CheckpointIntegrityError(f"{path / 'metadata.json'} records no checksum for {name}")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointIntegrityError(f"checkpoint file {file} is {size} bytes, expected {expected['bytes']} "
                                           f"(truncated or overwritten)")
        found = file_digest(file)["sha256"]
        if found != expected["sha256"]:
            raise CheckpointIntegrityError(f"checkpoint file {file} has sha256 {found}, expected {expected['sha256']} "
                                           "(its contents changed after it was saved)")
