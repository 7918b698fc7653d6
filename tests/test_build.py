"""setup.py's decisions, read without compiling: which extensions a build gets, with which nvcc targets, that
every build recompiles them, and that an sdist carries every C++/CUDA source.

setup.py runs with `setuptools.setup` replaced by a recorder of its arguments. The CUDA cases fake a CUDA
build of torch (torch.version.cuda, and torch's CUDA_HOME pointed at a folder with or without bin/nvcc), so
they run on the CPU torch of CI.
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import setuptools
import torch
import torch.utils.cpp_extension as cpp_extension

REPO = Path(__file__).resolve().parents[1]
CUDA_EXT = "megamath.kernels._rms_norm_cuda"


def _configured(monkeypatch, cuda_home: Path | None, arch_list: str | None = None) -> dict:
    """The arguments setup.py gives setup(), with torch posing as a CUDA build whose nvcc lives in
    cuda_home (None: torch as it is)."""
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", recorded.update)
    monkeypatch.chdir(REPO)
    if cuda_home is not None:
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return recorded


def _fake_cuda_home(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    return tmp_path


def _ext(setup_args, name):
    return next((e for e in setup_args["ext_modules"] if e.name == name), None)


def test_cpu_torch_builds_the_helpers_alone(monkeypatch, capsys):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    dist = _configured(monkeypatch, None)
    assert [e.name for e in dist["ext_modules"]] == ["megamath._helpers"]
    assert "is not a CUDA build" in capsys.readouterr().err


def test_missing_nvcc_skips_the_cuda_extension_instead_of_failing_the_install(monkeypatch, tmp_path, capsys):
    # A stale CUDA_HOME (a module unloaded, a moved toolkit): torch's build command would stop the whole
    # install with "nvcc not found", the helpers included.
    dist = _configured(monkeypatch, tmp_path / "gone")
    assert _ext(dist, CUDA_EXT) is None and _ext(dist, "megamath._helpers") is not None
    assert f"no nvcc at CUDA_HOME={tmp_path / 'gone'}" in capsys.readouterr().err


def test_a_cuda_home_without_headers_skips_the_cuda_extension(monkeypatch, tmp_path, capsys):
    # The folder above a wrapper script `nvcc` on PATH (/usr/local/bin/nvcc exec-ing the real one): torch takes
    # it as CUDA_HOME, and every compile stopped the whole install on "cuda_runtime.h: No such file".
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /opt/cuda/bin/nvcc \"$@\"\n")
    dist = _configured(monkeypatch, tmp_path)
    assert _ext(dist, CUDA_EXT) is None and _ext(dist, "megamath._helpers") is not None
    assert f"CUDA_HOME={tmp_path} has no include/cuda_runtime.h" in capsys.readouterr().err


def test_without_a_visible_gpu_nvcc_targets_a100_and_h100(monkeypatch, tmp_path):
    # torch's own choice there is the visible GPUs' capabilities: none, and an IndexError mid-build.
    if torch.cuda.device_count():
        pytest.skip("a GPU is visible: torch targets it")
    dist = _configured(monkeypatch, _fake_cuda_home(tmp_path))
    nvcc = _ext(dist, CUDA_EXT).extra_compile_args["nvcc"]
    assert "-O3" in nvcc
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(nvcc)
    assert dist["cmdclass"]["build_ext"] is cpp_extension.BuildExtension


def test_torch_cuda_arch_list_is_left_to_torch(monkeypatch, tmp_path):
    dist = _configured(monkeypatch, _fake_cuda_home(tmp_path), arch_list="8.0")
    assert not any("arch" in flag for flag in _ext(dist, CUDA_EXT).extra_compile_args["nvcc"])


def test_every_build_recompiles_the_extensions(monkeypatch):
    # Otherwise a non-editable build packs whatever .so an earlier build left in build/ (one compiled
    # against another torch, or a half-written one) without looking at it.
    assert _configured(monkeypatch, None)["options"]["build_ext"]["force"] is True


def _hub_kernels_lookalike(site: Path) -> None:
    """An installed package named `kernels` with a setuptools egg_info hook, as transformers >= 5.25 brings
    (Hugging Face's kernels): setup.py must not let the checkout's kernels/ folder shadow it."""
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(
        "def write_probe(cmd, basename, filename):\n    cmd.write_file('probe', filename, 'hub')\n")
    info = site / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    (info / "entry_points.txt").write_text("[egg_info.writers]\nkernels_probe.txt = kernels:write_probe\n")


def test_sdist_carries_every_csrc_source(tmp_path):
    # With a CPU torch setup.py lists only the helpers' sources; the CUDA ones come in through MANIFEST.in.
    # Made from a copy, so that the checkout's megamath.egg-info is not rewritten. A package named kernels
    # with an egg_info hook is installed beside it (_hub_kernels_lookalike).
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("megamath", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    _hub_kernels_lookalike(tmp_path / "site")
    paths = [str(tmp_path / "site"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (src / "megamath.egg-info" / "kernels_probe.txt").read_text() == "hub"
    (archive,) = (tmp_path / "dist").glob("megamath-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if "/" in n}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "csrc").iterdir() if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)
