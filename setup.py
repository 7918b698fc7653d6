"""Build script: the pure-Python packages plus one C++ extension (dataset index helpers).

`kernels/` is installed as `megamath.kernels` so that the kernels stay a separate folder that never
imports the rest of megamath.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megamath._helpers",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    packages=find_packages(include=["megamath", "megamath.*"]) + ["megamath.kernels"],
    package_dir={"megamath.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
