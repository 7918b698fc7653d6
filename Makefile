# The two commands of the README: `make demo` (main job) and `make test`.
# Both create the virtual environment and install megamath (with its C++ extension) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build is enough for the demo and the tests; on a GPU node install your CUDA build first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Test processes: one per CPU, at most 8 (past that the longest file sets the time, and each worker holds
# its own torch). Whole files go to a worker (--dist loadfile) because a file's tests share module
# fixtures that start gloo jobs; split across workers, each would start them again.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n : 8 )))

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info runs megamath/*.so
