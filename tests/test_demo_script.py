"""examples/demo.sh under stand-in `megamath` and `torchrun` commands: every path it hands on is one
argument (an output folder with a space stays whole) and the training config is found wherever the
script is started from."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "demo.sh"
# Each call appends its arguments, one a line, after a `---` line; `megamath report` prints a path.
FAKE = '#!/bin/bash\n{ echo "--- $(basename "$0")"; printf "%s\\n" "$@"; } >> "$LOG"\necho report.html\n'


def test_paths_stay_whole_and_the_config_is_found_from_any_folder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("megamath", "torchrun"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls"
    elsewhere = tmp_path / "somewhere else"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}
    proc = subprocess.run(["bash", str(SCRIPT), "my runs/demo"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [block.splitlines() for block in log.read_text().split("--- ")[1:]]
    assert [c[0] for c in calls] == ["megamath"] * 4 + ["torchrun"] * 2 + ["megamath"] * 2
    assert calls[0][1:] == ["demo-corpus", "--output", "my runs/demo"]
    start, train = calls[4][1:], calls[5][1:]  # the untrained model's losses (skip_train), then the training
    assert "skip_train=true" in start and "skip_train=true" not in train
    for call in (start, train):
        config = Path(call[call.index("--config") + 1])
        assert (elsewhere / config).is_file(), f"--config {config} does not exist from {elsewhere}"
        assert "data.data_dir=my runs/demo/data" in call and "run_dir=my runs/demo/train" in call


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_takes_torch_from_the_index_given(tmp_path):
    """pip's default Linux torch is the CUDA build (GBs of nvidia-* wheels), so the README's CPU build needs the
    PyTorch CPU index: TORCH_INDEX passes it to the torch install only; by default pip's own index is used."""
    venv = tmp_path / "novenv"  # missing: make would create it; -n only prints the commands
    def torch_install(*variables: str) -> str:
        proc = subprocess.run(["make", "-n", "setup", f"VENV={venv}", *variables], cwd=SCRIPT.parents[1],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        (line,) = [line for line in proc.stdout.splitlines() if "pip install" in line and "torch==" in line]
        return line
    assert "--index-url" not in torch_install()
    cpu = "https://wheels.example/whl/cpu"  # any index URL
    assert torch_install(f"TORCH_INDEX={cpu}").endswith(f'pip install "torch==2.13.0" --index-url "{cpu}"')
