"""Build script: the pure-Python packages plus one C++ extension (dataset index helpers).

`kernels/` is installed as `megamath.kernels` so that the kernels stay a separate folder that never
imports the rest of megamath.

Optional: the CUDA C++ RMSNorm (`megamath.kernels._rms_norm_cuda`) is built only when torch with
CUDA and a CUDA toolkit (nvcc and headers at torch's CUDA_HOME) are present at build time; otherwise it is skipped, saying why in
the build log (`pip install -v`). pip's isolated build environment has no torch, so on a CUDA machine
install the build requirements, then build in your environment:

    pip install setuptools wheel "pybind11>=2.10"
    pip install --no-build-isolation -e .

nvcc targets TORCH_CUDA_ARCH_LIST when set (e.g. "8.0;9.0" for a cluster of A100s and H100s), else the
GPUs visible at build time, else (no GPU visible, e.g. a build node) A100 and H100.

Every build recompiles the extensions (`force`): a non-editable build would otherwise pack the .so left
in build/ by an earlier build, one compiled against another torch included.
"""
import os
import sys

# `python setup.py ...` puts this folder first on sys.path, where kernels/ would shadow the package named
# `kernels` (a transformers dependency since 5.25), whose setuptools hook egg_info then fails to import.
HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or ".") != HERE]

from pybind11.setup_helpers import Pybind11Extension, build_ext as pybind11_build_ext
from setuptools import find_packages, setup

# sm_80 (A100) and sm_90 (H100), plus sm_90 PTX for newer GPUs: the targets of a build that sees no GPU,
# where torch's own choice (the visible GPUs' capabilities) is an empty list and an IndexError.
NO_GPU_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]


def cuda_extension():
    """The CUDA RMSNorm extension, or why it cannot be built here (a str)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return "torch is not importable in this build environment (pip's isolated builds have none)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return f"no nvcc at CUDA_HOME={CUDA_HOME} (set CUDA_HOME, or put nvcc on PATH)"
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):  # torch took the folder above
        return (f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (is its bin/nvcc a wrapper script?): "
                "set CUDA_HOME to the CUDA toolkit's folder")  # a wrapper nvcc; every compile would fail
    nvcc_flags = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        nvcc_flags += NO_GPU_ARCH_FLAGS
    return CUDAExtension(
        "megamath.kernels._rms_norm_cuda",
        ["csrc/rms_norm_binding.cpp", "csrc/rms_norm_cuda.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )


ext_modules = [
    Pybind11Extension(
        "megamath._helpers",
        ["csrc/helpers.cpp", "csrc/ngram_overlap.cpp", "csrc/jsonl_text.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

build_command = pybind11_build_ext
cuda_ext = cuda_extension()
if isinstance(cuda_ext, str):
    print(f"megamath: skipping the optional CUDA RMSNorm extension: {cuda_ext}", file=sys.stderr)
else:  # torch's build command also compiles the plain C++ extension
    from torch.utils.cpp_extension import BuildExtension as build_command
    ext_modules.append(cuda_ext)

setup(
    packages=find_packages(include=["megamath", "megamath.*"]) + ["megamath.kernels"],
    package_dir={"megamath.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_command},
    options={"build_ext": {"force": True}},
)
