#!/usr/bin/env bash
# The GPU check. A GPU session has about 15 minutes of device time in all, machine start included, and
# should run this early (a baseline) and again at the end, so the default run is the short one (about 5-6
# minutes, estimated: never timed whole on a GPU): versions, build (with the CUDA RMSNorm, which must build on
# a CUDA machine), the trainer tests compiled on the GPU (bf16 model with kernels against the reference ops,
# the host-sync test), the training-step benchmark (MFU, against Hugging Face eager and compiled, the
# planner's memory), and attention against SDPA's backends. The rest, every compiled kernel test, a short
# `megamath train` and the benchmark of every kernel, runs by PARTS, one or two parts per call.
# Assumes torch, triton and numpy are installed; installs megamath's other needs if missing (from wheels in
# $WHEELS_DIR when there is no network; without zstandard only corpus reading is lost).
#
#   bash perf/gpu_check.sh                          # the short check: trainer train_bench attention
#   PARTS="tests train" bash perf/gpu_check.sh      # then, if the lease allows: PARTS=kernels
#
# Knobs (environment): PYTHON (default python3), WHEELS_DIR (default .whl: wheels to install first,
# e.g. liger-kernel for the benchmark's peers), TEST_TIMEOUT / BENCH_TIMEOUT (seconds, 240 / 330),
# TESTS (test files to run instead of every kernel test), BENCH_ARGS (extra arguments for
# perf/bench_kernels.py, e.g. "--no-compile" or "--ops rms_norm"), TRAIN_BENCH_ARGS (for
# perf/bench_train.py), TRAIN_BENCH_TIMEOUT (seconds, 300), PARTS (which parts run: default
# "trainer train_bench attention"; also "tests" (every compiled kernel test, the trainer's included),
# "train", "kernels" (every kernel's benchmark, attention's included) and "resources" (perf/kernel_resources.py
# under this machine's Triton, about a minute of CPU: registers, spills, wgmma of every kernel at sm_90a);
# versions, packages and the build always run, incrementally after the first call).
# Each step runs even when an earlier one failed; the exit status is that of the first failing step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-perf/results}
mkdir -p "$DEST"
exec > >(tee -a "$DEST/gpu_check.log") 2>&1
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
PARTS=${PARTS:-trainer train_bench attention}
for p in $PARTS; do
    case $p in trainer|train_bench|attention|tests|train|kernels|resources) ;;
        *) echo "unknown part '$p' in PARTS (trainer train_bench attention tests train kernels resources)"; exit 2;; esac
done
part() { [[ " $PARTS " == *" $1 "* ]]; }
record() { local rc=$1; if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi; }

step "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton',
triton.__version__, '|', torch.cuda.get_device_name(0))"
nvcc --version | tail -n 2

step "python packages"
WHEELS=${WHEELS_DIR:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "some wheels in $WHEELS did not install"
fi
missing=$($PY - <<'EOF'
import importlib.util
wanted = {"sentencepiece": "sentencepiece", "zstandard": "zstandard", "tqdm": "tqdm", "yaml": "pyyaml",
          "safetensors": "safetensors", "pybind11": "pybind11", "pytest": "pytest"}
print(" ".join(pkg for module, pkg in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
    $PY -m pip install -q $missing || echo "could not install: $missing (no network?); continuing"
fi

step "build: megamath with the CUDA RMSNorm extension"
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install --no-build-isolation --no-deps -e . > "$DEST/build.log" 2>&1
rc=$?; record $rc
tail -n 5 "$DEST/build.log"
$PY -c "from megamath.kernels import rms_norm_cuda as m; print('CUDA RMSNorm extension available:', m.is_available())"
# On a CUDA machine the extension must exist: its tests skip without it, which would look green.
$PY -c "from megamath.kernels import rms_norm_cuda as m; import sys; sys.exit(0 if m.is_available() else 1)"
rc=$?; record $rc
[ "$rc" -ne 0 ] && echo "FAILED: the CUDA RMSNorm extension did not build (see $DEST/build.log)"

unset TRITON_INTERPRET
if part tests || part trainer; then
if part tests; then
    step "kernel and trainer tests, compiled on the GPU"
    tests=${TESTS:-$(ls tests/test_rms_norm*.py tests/test_rope*.py tests/test_flash_attention*.py tests/test_swiglu*.py \
            tests/test_cross_entropy*.py tests/test_adamw*.py tests/test_gpu_trainer.py tests/test_attention_choice.py \
            2> /dev/null)}
else
    step "trainer tests, compiled on the GPU (the bf16 model against the reference ops, the host-sync test)"
    tests=${TESTS:-tests/test_gpu_trainer.py tests/test_attention_choice.py}
fi
workers=$($PY -c "import xdist" 2> /dev/null && echo "-n 8")
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider $workers $tests > "$DEST/tests.log" 2>&1
rc=$?; record $rc
tail -n 40 "$DEST/tests.log"
[ "$rc" -eq 124 ] && echo "tests stopped at TEST_TIMEOUT"
fi

if part train; then
step "megamath train on the GPU: 20 steps of a small model, bf16, kernels"
TRAIN_DIR=$(mktemp -d)
$PY perf/gpu_train_case.py "$TRAIN_DIR"
timeout 180 $PY -m megamath.cli train --config "$TRAIN_DIR/train.yaml"
rc=$?; record $rc
tail -n 3 "$TRAIN_DIR/run/metrics.jsonl" 2> /dev/null
fi

if part train_bench; then
step "training-step benchmark (megamath vs Hugging Face eager and compiled; the planner's memory within 10 %)"
timeout "${TRAIN_BENCH_TIMEOUT:-300}" $PY perf/bench_train.py --out "$DEST" ${TRAIN_BENCH_ARGS:-}
rc=$?; record $rc
[ "$rc" -eq 124 ] && echo "training benchmark stopped at TRAIN_BENCH_TIMEOUT"
fi

if part kernels || part attention; then
if part kernels; then
    step "kernel benchmark"
    ops=""
else
    step "attention benchmark (ours, tuned, against SDPA's flash, cuDNN, efficient and math backends)"
    ops="--ops flash_attention"
fi
timeout "${BENCH_TIMEOUT:-330}" $PY perf/bench_kernels.py --out "$DEST" $ops ${BENCH_ARGS:-}
rc=$?; record $rc
[ "$rc" -eq 124 ] && echo "benchmark stopped at BENCH_TIMEOUT"
fi

if part resources; then
step "kernel resources from this machine's Triton (compiled for sm_90a, not run)"
$PY perf/kernel_resources.py --arch 90 --out "$DEST" > "$DEST/kernel_resources.log" 2>&1
rc=$?
if [ "$rc" -eq 2 ]; then echo "this Triton cannot be read that way: $(tail -n 1 "$DEST/kernel_resources.log")"; else record $rc; fi
grep -E "^(cannot launch|slow):" "$DEST/kernel_resources.log" || echo "no default configuration spills or misses wgmma"
fi

step "done: status $status"
exit $status
