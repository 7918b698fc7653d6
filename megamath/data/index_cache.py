"""On-disk cache of dataset index arrays (doc_idx, sample_idx, shuffle_idx, blending indices).

Why: at ProofPile II scale the indices take seconds to build and hundreds of MB to hold; every rank
of every restart needs the same ones. They are saved once as `.npy` files under a key that hashes a
*description* of everything that changes them, and memory-mapped on later runs.

Trust nothing on disk: a metadata JSON, written last and atomically (temp file + rename), records the
description and the size and sha256 of each array file. `load` checks all of them and treats any
mismatch (stale description, missing, truncated or corrupt file, tampered metadata) as a miss, with a
warning; the caller then rebuilds. Build and load are separate calls so that one rank can build and
save while the others wait and then load. A cache folder this process may read but not write (built by
another user, or on a read-only mount) serves the entries it has; a missing entry is built and used from
memory, with a warning, since the run needs the indices, not the cache.

Layout under cache_dir, for key K of a description with kind "gpt":
    gpt-K.json             {"format": 1, "description": {...}, "arrays": {name: {file, bytes, sha256,
                            dtype, shape}}}
    gpt-K.<name>.npy       one per array
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from megamath.atomic_io import replace_atomically

# Bump when the meaning of any cached array changes: old caches then miss instead of being misread.
INDEX_FORMAT_VERSION = 1
_KEY_CHARS = 32  # hex digits of sha256 in file names: 128 bits, no accidental collisions
_HASH_BLOCK = 1 << 22
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)  # the folder refuses writes; a full disk is an error

logger = logging.getLogger(__name__)


def _canonical(description: Mapping) -> str:
    return json.dumps(description, sort_keys=True, separators=(",", ":"))


def description_key(description: Mapping) -> str:
    """Hex sha256 of the description's canonical JSON (sorted keys), cut to 32 digits."""
    return hashlib.sha256(_canonical(description).encode()).hexdigest()[:_KEY_CHARS]


def array_digest(array: np.ndarray) -> str:
    """Hex sha256 of an array's bytes; for putting arrays (e.g. a document list) into a description."""
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class _Stale(Exception):
    """A cache entry that exists but cannot be trusted; the message says why."""


class IndexCache:
    """Index arrays under `cache_dir`, keyed by description; see the module docstring."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def _stem(self, description: Mapping) -> str:
        return f"{description.get('kind', 'index')}-{description_key(description)}"

    def metadata_path(self, description: Mapping) -> Path:
        return self.cache_dir / f"{self._stem(description)}.json"

    def array_path(self, description: Mapping, name: str) -> Path:
        return self.cache_dir / f"{self._stem(description)}.{name}.npy"

    def save(self, description: Mapping, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write every array, then the metadata (the commit marker); returns the metadata path."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        entries = {}
        for name, array in arrays.items():
            path = self.array_path(description, name)
            replace_atomically(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
            entries[name] = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path),
                             "dtype": np.dtype(array.dtype).str, "shape": list(array.shape)}
        metadata = {"format": INDEX_FORMAT_VERSION, "description": description, "arrays": entries}
        meta_path = self.metadata_path(description)
        text = json.dumps(metadata, sort_keys=True, indent=1).encode()
        replace_atomically(meta_path, lambda f: f.write(text))
        return meta_path

    def load(self, description: Mapping, names: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The arrays `names` as read-only memmaps, or None on a miss (logged as a warning when an
        entry exists but fails verification)."""
        meta_path = self.metadata_path(description)
        if not meta_path.is_file():
            return None
        try:
            return self._load_verified(meta_path, description, names)
        except _Stale as why:
            logger.warning("index cache %s is not usable (%s); rebuilding", meta_path, why)
            return None

    def _load_verified(self, meta_path: Path, description: Mapping,
                       names: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Stale(f"unreadable metadata: {err}") from None
        if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT_VERSION:
            raise _Stale(f"metadata format is not {INDEX_FORMAT_VERSION}")
        if not isinstance(metadata.get("description"), dict) or \
                _canonical(metadata["description"]) != _canonical(description):
            raise _Stale("its description differs from the requested one")
        entries = metadata.get("arrays")
        arrays = {}
        for name in names:
            entry = entries.get(name) if isinstance(entries, dict) else None
            if not isinstance(entry, dict):
                raise _Stale(f"metadata lists no array {name!r}")
            path = self.array_path(description, name)
            if entry.get("file") != path.name:
                raise _Stale(f"array {name!r} is recorded as file {entry.get('file')!r}, expected {path.name!r}")
            if not path.is_file():
                raise _Stale(f"array file {path.name} is missing")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise _Stale(f"array file {path.name} has {size} bytes, metadata says {entry.get('bytes')}")
            if file_digest(path) != entry.get("sha256"):
                raise _Stale(f"array file {path.name} fails its sha256 check")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise _Stale(f"array file {path.name} does not load: {err}") from None
            if array.dtype.str != entry.get("dtype") or list(array.shape) != entry.get("shape"):
                raise _Stale(f"array file {path.name} holds {array.dtype.str} {list(array.shape)}, metadata "
                             f"says {entry.get('dtype')} {entry.get('shape')}")
            arrays[name] = array
        return arrays


def load_or_build(cache: IndexCache | None, description: Mapping, names: Sequence[str],
                  build: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Cached arrays when a verified entry exists, else `build()` (saved when there is a cache)."""
    if cache is not None:
        arrays = cache.load(description, names)
        if arrays is not None:
            return arrays
    arrays = dict(build())
    if cache is not None:
        try:
            cache.save(description, arrays)
        except OSError as err:  # a shared cache another user built, or a read-only mount: not the run's failure
            if err.errno not in _NOT_WRITABLE:
                raise
            logger.warning("index cache %s cannot be written (%s): the indices are used from memory and rebuilt "
                           "at each start; point data.cache_dir at a writable folder to keep them",
                           cache.cache_dir, err.strerror)
    return arrays
