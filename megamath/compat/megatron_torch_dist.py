"""Megatron-LM's `torch_dist` checkpoint format, read one layer's tensor at a time.

The format is a PyTorch distributed checkpoint (a `.metadata` index and `__R_0.distcp` data files) whose
tensors are global; a layer weight is one tensor with the layers stacked on its first axis
(`decoder.layers.mlp.linear_fc1.weight`: [num_layers, 2·ffn, hidden]). Reading such a key whole would hold
every layer's copy of it at once (a third of a 34B model for linear_fc1), so each read asks for one
layer's window of it: the distributed checkpoint's own resharding (`create_read_items_for_chunk_list`)
finds the stored chunks that overlap the window and reads only those bytes, after their CRC-32s are
checked. The common state (args, iteration) is unpickled by pickle_guard, not by
torch.load(weights_only=False).
"""
from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megamath.compat.pickle_guard import guarded_load

COMMON_FILE = "common.pt"  # where Megatron-LM versions before the common state moved into the data kept it


class _GuardedPlanner(DefaultLoadPlanner):
    """Loads each requested tensor's window (its first-axis offsets in `offsets`), and unpickles bytes
    (the common state) with pickle_guard."""

    def __init__(self, offsets: dict[str, tuple[int, ...]] | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets or {}

    def create_local_plan(self) -> LoadPlan:
        if not self.offsets:
            return super().create_local_plan()
        items = []
        for fqn, tensor in self.state_dict.items():
            window = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=tensor.size())
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [window])
        return LoadPlan(items)

    def lookup_tensor(self, index):  # the window's buffer, whatever its offset in the stored tensor
        return self.state_dict[index.fqn]

    def load_bytes(self, read_item, value):
        self.state_dict[read_item.dest_index.fqn] = guarded_load(value)


class _OnceReader(FileSystemReader):
    """The folder's index is read once, not once per tensor."""

    @cached_property
    def _metadata(self):
        return super().read_metadata()

    def read_metadata(self, *args, **kwargs):
        return self._metadata


class DistCheckpoint:
    """One torch_dist folder: its stored keys, its common state, and windows of its tensors."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.reader = _OnceReader(str(folder))
        self.stored = self.reader.read_metadata().state_dict_metadata

    def tensor_keys(self) -> dict[str, TensorStorageMetadata]:
        return {k: m for k, m in self.stored.items() if isinstance(m, TensorStorageMetadata)}

    @cached_property
    def _common(self) -> dict:
        if self.object_keys("common_state"):
            return self.read_object("common_state")
        if (self.folder / COMMON_FILE).is_file():
            common = guarded_load(self.folder / COMMON_FILE)
            return common[0] if isinstance(common, list) else common
        raise ValueError(f"{self.folder}: no common state (args) in the checkpoint and no {COMMON_FILE}")

    def common_state(self) -> dict:
        """The args, iteration and optimizer entry; unpickled once (the weights', the optimizer's and the
        command's readers all ask for it)."""
        return self._common

    def object_keys(self, prefix: str) -> list[str]:
        """The stored objects (pickled, not tensors) whose keys start with `prefix`."""
        return [k for k, m in self.stored.items() if isinstance(m, BytesStorageMetadata) and k.startswith(prefix)]

    def read_object(self, prefix: str):
        """The first stored object under `prefix` (a sharded object's one shard), unpickled by pickle_guard."""
        key = self.object_keys(prefix)[0]
        request = {key: io.BytesIO()}
        self._load(request, _GuardedPlanner())
        found = request[key]
        return found[0] if isinstance(found, list) else found

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """Tensor `key` whole, or its slice `layer` along the first (stacked layers) axis."""
        if layer is None:
            size = self.stored[key].size
            return self.read_range(key, 0, size[0] if len(size) else 0)
        return self.read_range(key, layer, layer + 1)[0]

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Tensor `key`'s elements [start, stop) along its first axis (the chunks they lie in checked first)."""
        meta = self.stored[key]
        size = list(meta.size)
        offsets = [0] * len(size)
        if size:
            offsets[0], size[0] = start, stop - start
        self._verify(key, start, stop)
        out = torch.empty(size, dtype=meta.properties.dtype)
        self._load({key: out}, _GuardedPlanner({key: tuple(offsets)}))
        return out

    def _verify(self, key: str, start: int, stop: int) -> None:
        """The CRC-32s of the stored chunks of `key` whose first-axis range meets [start, stop). Each chunk
        is written as a torch.save zip record, whose CRCs the loader does not check: a flipped bit in a
        weight would convert silently. (A chunk stored otherwise, with no CRC, is not checked.)"""
        storage = self.reader.read_metadata().storage_data
        for chunk in self.stored[key].chunks:
            first = chunk.offsets[0] if len(chunk.offsets) else 0
            if len(chunk.offsets) and not (first < stop and start < first + chunk.sizes[0]):
                continue
            info = storage[MetadataIndex(key, chunk.offsets)]
            with open(self.folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                record = io.BytesIO(f.read(info.length))
            if not record.getvalue().startswith(b"PK\x03\x04"):  # not a zip record: no CRC to check
                continue
            try:
                with zipfile.ZipFile(record) as archive:
                    damaged = archive.testzip() is not None
            except (zipfile.BadZipFile, OSError, EOFError):  # its zip structure itself is broken
                damaged = True
            if damaged:
                raise ValueError(f"{self.folder / info.relative_path}: the stored chunk of {key} at "
                                 f"{list(chunk.offsets)} fails its CRC-32 check: the file is damaged")

    def _load(self, request: dict, planner: _GuardedPlanner) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load(request, storage_reader=self.reader, planner=planner, no_dist=True)
            except CheckpointException as err:  # its message is a rank's whole traceback: keep the last line
                last = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
                raise ValueError(f"{self.folder}: reading {', '.join(request)} failed: {last}") from err


@dataclass
class DistTensor:
    """A global tensor of a torch_dist checkpoint (one layer's, for stacked keys), read when asked for."""

    source: DistCheckpoint
    key: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self) -> torch.Tensor:
        return self.source.read(self.key, self.layer)
