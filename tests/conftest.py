"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported, hence here. The interpreter's
repeated scan of triton.language is cached (tests/interpreter_speedup.py: same kernels, same values).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speedup import install

    install()
