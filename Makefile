# The two commands of the README: `make demo` (main job) and `make test`.
# Both create the virtual environment and install megamath (with its C++ extension) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch a venv without one gets. On Linux, pip's default index has the CUDA build (nvidia-* packages, several GB); the
# CPU build is enough for the demo and the tests: set TORCH_INDEX to PyTorch's CPU wheel index to fetch it.
# On a GPU node install your CUDA build first (or set TORCH_SPEC / TORCH_INDEX to it).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Test processes: `auto` is one per CPU this job may use, at most 8 (tests/conftest.py says how). Whole
# files go to a worker (--dist loadfile) because a file's tests share module fixtures that start gloo
# jobs; split across workers, each would start them again. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info runs megamath/*.so kernels/*.so
