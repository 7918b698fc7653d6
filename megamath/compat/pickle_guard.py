"""Load a `torch.save` file written by another trainer, without that trainer installed and without
running its code.

Megatron-LM pickles its whole `args` namespace into every checkpoint, and the namespace holds
Megatron-LM's own classes (enums such as `AttnBackend`, dataclasses, functions). `torch.load(...,
weights_only=True)` refuses those classes, and `weights_only=False` imports Megatron-LM and runs
whatever the file names. Here torch's tensor-rebuilding functions, its dtypes and sizes, and a few
plain containers are let through; every other class or function the file names becomes an inert
`Foreign` record of its name and arguments. Nothing of the file's choosing is imported or called.
"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import types
import zipfile
from pathlib import Path

import torch

_PLAIN = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "object"): object,
    ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
}


class Foreign:
    """What a pickled object of an unknown class becomes: its class's dotted name and what it was built from."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        shown = ", ".join(repr(a) for a in self.args)
        return f"<{self.qualname}({shown})>" if shown else f"<{self.qualname}>"


def _foreign_class(module: str, name: str) -> type:
    return type(name, (Foreign,), {"qualname": f"{module}.{name}"})


def _reconstruct(cls, base, state):  # copyreg._reconstructor, for protocol-2 objects without a __reduce__
    return cls() if isinstance(cls, type) and issubclass(cls, Foreign) else Foreign(cls, base, state)


def _encode(text: str, encoding: str = "latin1") -> bytes:  # _codecs.encode: how protocol 2 pickles bytes
    return text.encode(encoding)


class GuardedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return getattr(torch._utils, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return torch._tensor._rebuild_from_type_v2
        if (module, name) == ("torch", "Tensor"):  # a tensor pickled with its attributes (Megatron-LM's masters)
            return torch.Tensor
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage") or module == "torch.storage" and name == "UntypedStorage":
            return super().find_class(module, name)  # torch.load's own wrapper maps these first
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstruct
        if (module, name) == ("_codecs", "encode"):
            return _encode
        return _foreign_class(module, name)


_GUARDED = types.SimpleNamespace(__name__="megamath_guarded_pickle", Unpickler=GuardedUnpickler,
                                 load=lambda f, **kw: GuardedUnpickler(f, **kw).load())


def guarded_load(source: str | Path | io.BytesIO):
    """`torch.load` of a file (or bytes) of another trainer's: tensors on the CPU, foreign classes inert.

    A file in the zip format torch has written since 1.6 has each record's CRC-32 checked first (torch.load
    does not: a flipped bit in a weight would convert silently), then its tensors are memory-mapped rather
    than read into memory. A file that is neither that nor an older torch pickle is refused, naming it."""
    if isinstance(source, io.BytesIO):
        return torch.load(source, map_location="cpu", weights_only=False, pickle_module=_GUARDED)
    zipped = zipfile.is_zipfile(source)
    if zipped:
        with zipfile.ZipFile(source) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"{source}: record {damaged} fails its CRC-32 check: the file is damaged")
    try:
        return torch.load(source, map_location="cpu", weights_only=False, pickle_module=_GUARDED, mmap=zipped)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{source}: not a readable torch.save file ({type(err).__name__}: {err}); is it truncated "
                         "or damaged?") from err


def plain_args(args: object) -> dict:
    """A pickled argparse namespace (or dict) as a dict; anything else is not a trainer's arguments."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise ValueError(f"the checkpoint's args are a {type(args).__name__}, not an argparse namespace")
