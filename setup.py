"""Build script: the pure-Python packages plus one C++ extension (dataset index helpers).

`kernels/` is installed as `megamath.kernels` so that the kernels stay a separate folder that never
imports the rest of megamath.

Optional: the CUDA C++ RMSNorm (`megamath.kernels._rms_norm_cuda`) is built only when torch with
CUDA and nvcc are present at build time; otherwise it is skipped silently. pip's isolated build
environment has no torch, so on a CUDA machine install with `pip install --no-build-isolation -e .`.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


def cuda_extension():
    """(extension, build command) for the CUDA RMSNorm, or (None, None) where it cannot be built."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, None
    if torch.version.cuda is None or CUDA_HOME is None:  # CUDA_HOME: where torch found nvcc
        return None, None
    ext = CUDAExtension(
        "megamath.kernels._rms_norm_cuda",
        ["csrc/rms_norm_binding.cpp", "csrc/rms_norm_cuda.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return ext, BuildExtension


ext_modules = [
    Pybind11Extension(
        "megamath._helpers",
        ["csrc/helpers.cpp", "csrc/ngram_overlap.cpp", "csrc/jsonl_text.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

cuda_ext, cuda_build_ext = cuda_extension()
if cuda_ext is not None:  # torch's build command also compiles the plain C++ extension
    ext_modules.append(cuda_ext)
    build_ext = cuda_build_ext

setup(
    packages=find_packages(include=["megamath", "megamath.*"]) + ["megamath.kernels"],
    package_dir={"megamath.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
