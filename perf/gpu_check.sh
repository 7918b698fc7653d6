#!/usr/bin/env bash
# The GPU check. A GPU session has about 15 minutes of device time in all, machine start included, and
# should run this early (a baseline) and again at the end, so the default run is the short one: versions,
# build (with the CUDA RMSNorm, which must build on a CUDA machine), the trainer tests compiled on the GPU
# (bf16 model with kernels against the reference ops, the host-sync test), the training-step benchmark (MFU,
# against Hugging Face eager and compiled, the planner's memory), attention against SDPA's backends, and a
# short `megamath train` (one process, 20 steps, two checkpoints; its loss must fall). The rest, every
# compiled kernel test and the benchmark of every kernel, runs by PARTS, one or two parts per call.
# Time of the short run on a fresh H200 (2026-12-04: nothing built, empty Triton and Inductor caches,
# pytest-xdist present): versions and packages 13 s; build 84 s (three pybind11 files, the torch binding, one
# .cu); trainer tests 39 s (~30 Triton compiles at head_dim 64, 22 of them the tuner's candidates, on 8
# workers); training benchmark 148 s (tuning at head_dim 128, four Hugging Face builds, torch.compile of the HF
# model once per micro-batch, the timed steps); attention benchmark 23 s (its kernels from the Triton cache the
# training benchmark filled); `megamath train` 14 s. In all 321 s; the budget below stops it at 9 minutes, and
# `megamath train` runs last so that it is what a slow machine loses, not the benchmarks. So one short run
# fits a lease; the run at the end is best a subset (e.g. PARTS="train_bench kernels" with
# TRAIN_BENCH_ARGS="--micro-batch 1" and BENCH_ARGS="--ops ..." naming the kernels that changed), as a
# machine given back is fresh again (the build and caches gone), and TESTS may name single tests.
# Assumes torch, triton and numpy are installed; installs megamath's other needs if missing (from wheels in
# $WHEELS_DIR when there is no network; without zstandard only corpus reading is lost).
#
#   bash perf/gpu_check.sh                          # the short check: trainer train_bench attention train
#   PARTS=tests bash perf/gpu_check.sh              # then, if the lease allows: PARTS=kernels
#
# Knobs (environment): PYTHON (default python3), WHEELS_DIR (default .whl: wheels to install first,
# e.g. liger-kernel for the benchmark's peers; .whl/ is git-ignored, so a remote run must be asked to carry
# it), GPU_CHECK_BUDGET (seconds for the whole run, default 540: one command may run 600), TEST_TIMEOUT /
# TRAIN_BENCH_TIMEOUT / BENCH_TIMEOUT (each step's own cap, seconds, 240 / 300 / 330; the budget's limit
# applies when smaller), TESTS (test files to run instead of every kernel test), BENCH_ARGS (extra
# arguments for perf/bench_kernels.py, e.g. "--no-compile" or "--ops rms_norm"), TRAIN_BENCH_ARGS (for
# perf/bench_train.py, e.g. "--micro-batch 1 --grad-accum 4" for LLEMMA's accumulation: its own results
# file), PARTS (which parts run: default
# "trainer train_bench attention train"; also "tests" (every compiled kernel test, the trainer's included),
# "kernels" (every kernel's benchmark, attention's included) and "resources" (perf/kernel_resources.py
# under this machine's Triton, about a minute of CPU: registers, spills, wgmma of every kernel at sm_90a);
# versions, packages and the build always run, incrementally on a machine that has built before).
# Each step runs even when an earlier one failed; the exit status is that of the first failing step.
# The budget: every command runs under `timeout`, limited to the smaller of its cap and what the budget
# leaves after keeping a share for each selected stage still to come (tests 11 %, train_bench 22 %, the
# benchmark 17 %, train 11 %, resources 11 % of the budget), so the sum of the worst cases is the budget: the
# run ends by GPU_CHECK_BUDGET seconds whatever hangs, a step the budget stopped or never started prints a
# `CUT:` line, and the last line, `=== done: status N after Ts ...; cut: ...`, is always written. When the
# session has less device time left than the command's limit, set GPU_CHECK_BUDGET a minute under it.
# Python runs unbuffered, so a stopped step keeps every line it printed in gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-perf/results}
mkdir -p "$DEST"
exec > >(tee -a "$DEST/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1  # a step the budget stops keeps every line it printed (a pipe would buffer them)
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S), ${SECONDS}s)"; }
PARTS=${PARTS:-trainer train_bench attention train}
for p in $PARTS; do
    case $p in trainer|train_bench|attention|tests|train|kernels|resources) ;;
        *) echo "unknown part '$p' in PARTS (trainer train_bench attention tests train kernels resources)"; exit 2;; esac
done
part() { [[ " $PARTS " == *" $1 "* ]]; }
record() { local rc=$1; if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi; }

# The budget (see the header): `bounded` runs each command under it.
BUDGET=${GPU_CHECK_BUDGET:-540}
GRACE=$(( BUDGET / 50 > 5 ? 5 : BUDGET / 50 > 1 ? BUDGET / 50 : 1 ))  # timeout's SIGKILL after its SIGTERM
END_RESERVE=$GRACE                                 # the final lines
MIN_STEP=$(( BUDGET / 50 > 1 ? BUDGET / 50 : 1 ))  # a step left less than this is not started
STAGES="tests train_bench bench train resources"    # the order the heavy stages run in
CUT=""
stage_selected() {
    case $1 in tests) part tests || part trainer;; bench) part kernels || part attention;; *) part "$1";; esac
}
stage_share() {  # the percentage of the budget kept for a stage while earlier steps run
    case $1 in tests) echo 11;; train) echo 11;; train_bench) echo 22;; bench) echo 17;; resources) echo 11;; esac
}
reserve_after() {  # seconds kept back for the selected stages after $1 ("setup": every selected stage)
    local after=0 total=0 s
    [ "$1" = setup ] && after=1
    for s in $STAGES; do
        if [ "$after" -eq 1 ] && stage_selected "$s"; then total=$(( total + BUDGET * $(stage_share "$s") / 100 )); fi
        [ "$s" = "$1" ] && after=1
    done
    echo "$total"
}
bounded() {  # bounded STAGE CAP LABEL LOG CMD...: CMD under the budget's limit (LOG: its output file, or -)
    local stage=$1 cap=$2 label=$3 log=$4 rc limit left
    shift 4
    left=$(( BUDGET - SECONDS - END_RESERVE - GRACE - $(reserve_after "$stage") ))
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt "$MIN_STEP" ]; then
        echo "CUT: $label not started: ${left}s of the ${BUDGET}s budget left for it (GPU_CHECK_BUDGET)"
        CUT="$CUT $label,"
        return 124
    fi
    if [ "$log" = - ]; then timeout -k "$GRACE" "$limit" "$@"; else timeout -k "$GRACE" "$limit" "$@" > "$log" 2>&1; fi
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "CUT: $label stopped after ${limit}s ($( [ "$limit" -lt "$cap" ] && echo "the ${BUDGET}s budget's share" \
            || echo "its own limit") at ${SECONDS}s)"
        CUT="$CUT $label,"
    fi
    return $rc
}

step "versions"
bounded setup 20 nvidia-smi - nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
bounded setup 60 "python versions" - $PY -c "import torch, triton; print('torch', torch.__version__, '| CUDA',
torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
bounded setup 10 nvcc - nvcc --version | tail -n 2

step "python packages"
WHEELS=${WHEELS_DIR:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    bounded setup 90 "wheels" - $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
        || echo "some wheels in $WHEELS did not install"
fi
missing=""
bounded setup 60 "package check" "$DEST/missing.txt" $PY -c "
import importlib.util
wanted = {'sentencepiece': 'sentencepiece', 'zstandard': 'zstandard', 'tqdm': 'tqdm', 'yaml': 'pyyaml',
          'safetensors': 'safetensors', 'pybind11': 'pybind11', 'pytest': 'pytest',
          'setuptools': 'setuptools'}  # the build (--no-build-isolation) imports setuptools, so does torch.utils.cpp_extension
missing = [pkg for module, pkg in wanted.items() if importlib.util.find_spec(module) is None]
if 'setuptools' not in missing and not importlib.util.find_spec('wheel') \\
        and not importlib.util.find_spec('setuptools.command.bdist_wheel'):
    missing.append('wheel')  # a setuptools before 70.1 builds a wheel (editable ones too) only with it
print(' '.join(missing))" \
    && missing=$(tail -n 1 "$DEST/missing.txt")  # (a failed check's last line is no package list)
rm -f "$DEST/missing.txt"
if [ -n "$missing" ]; then  # one quick try: a machine without network must not spend minutes in retries
    bounded setup 60 "pip install" - $PY -m pip install -q --retries 0 --timeout 10 $missing \
        || echo "could not install: $missing (no network?); continuing"
fi

step "build: megamath with the CUDA RMSNorm extension"
# torch's build takes CUDA_HOME, else the folder above the first nvcc on PATH. Where that nvcc is a wrapper script
# (a shim that execs the real compiler), the folder has no CUDA headers and the whole install fails
# ("cuda_runtime.h: No such file", seen with torch 2.11), taking every later step with it: ask nvcc where it runs.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null \
    && [ ! -f "$(dirname "$(dirname "$(command -v nvcc)")")/include/cuda_runtime.h" ]; then
    nvcc_bin=$(timeout 20 nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    if [ -n "$nvcc_bin" ] && [ -f "$nvcc_bin/../include/cuda_runtime.h" ]; then
        export CUDA_HOME=$(cd "$nvcc_bin/.." && pwd)
        echo "CUDA_HOME=$CUDA_HOME (where nvcc runs from; the nvcc on PATH is a wrapper)"
    fi
fi
bounded setup 300 build "$DEST/build.log" env MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    $PY -m pip install --no-build-isolation --no-deps -e .
rc=$?; record $rc
tail -n 5 "$DEST/build.log" 2> /dev/null
# On a CUDA machine the extension must exist: its tests skip without it, which would look green.
bounded setup 60 "extension check" - $PY -c "import sys; from megamath.kernels import rms_norm_cuda as m
print('CUDA RMSNorm extension available:', m.is_available()); sys.exit(0 if m.is_available() else 1)"
rc=$?; record $rc
[ "$rc" -eq 1 ] && echo "FAILED: the CUDA RMSNorm extension did not build (see $DEST/build.log)"

unset TRITON_INTERPRET
if part tests || part trainer; then
if part tests; then
    step "kernel and trainer tests, compiled on the GPU"
    tests=${TESTS:-$(ls tests/test_rms_norm*.py tests/test_rope*.py tests/test_flash_attention*.py tests/test_swiglu*.py \
            tests/test_cross_entropy*.py tests/test_adamw*.py tests/test_sum_of_squares.py tests/test_embedding_backward.py \
            tests/test_gpu_trainer.py \
            tests/test_attention_choice.py 2> /dev/null)}
else
    step "trainer tests, compiled on the GPU (the bf16 model against the reference ops, host syncs, the norm kernel)"
    tests=${TESTS:-tests/test_gpu_trainer.py tests/test_sum_of_squares.py tests/test_attention_choice.py}
fi
workers=$(bounded tests 20 "xdist check" /dev/null $PY -c "import xdist" > /dev/null && echo "-n 8")
bounded tests "${TEST_TIMEOUT:-240}" tests "$DEST/tests.log" $PY -m pytest -q -p no:cacheprovider $workers $tests
rc=$?; record $rc
tail -n 40 "$DEST/tests.log" 2> /dev/null
fi

if part train_bench; then
step "training-step benchmark (megamath vs Hugging Face eager and compiled; the planner's memory within 10 %)"
bounded train_bench "${TRAIN_BENCH_TIMEOUT:-300}" "training benchmark" - \
    $PY perf/bench_train.py --out "$DEST" ${TRAIN_BENCH_ARGS:-}
rc=$?; record $rc
fi

if part kernels || part attention; then
if part kernels; then
    step "kernel benchmark"
    ops=""
else
    step "attention benchmark (ours, tuned, against SDPA's flash, cuDNN and efficient backends and the eager reference)"
    ops="--ops flash_attention"
fi
bounded bench "${BENCH_TIMEOUT:-330}" "kernel benchmark" - $PY perf/bench_kernels.py --out "$DEST" $ops ${BENCH_ARGS:-}
rc=$?; record $rc
fi

if part train; then
step "megamath train on the GPU: 20 steps of a small model, bf16, kernels, two checkpoints; the loss must fall"
TRAIN_DIR=$(mktemp -d)
bounded train 30 "training case" - $PY perf/gpu_train_case.py "$TRAIN_DIR"
record $?
bounded train 150 "megamath train" "$DEST/train.log" $PY -m megamath.cli train --config "$TRAIN_DIR/train.yaml"
rc=$?; record $rc
tail -n 4 "$DEST/train.log" 2> /dev/null
if [ "$rc" -eq 0 ]; then
    bounded train 30 "training check" - $PY perf/gpu_train_case.py --check "$TRAIN_DIR"
    record $?
fi
cp "$TRAIN_DIR/run/metrics.jsonl" "$DEST/train_metrics.jsonl" 2> /dev/null
fi

if part resources; then
step "kernel resources from this machine's Triton (compiled for sm_90a, not run)"
bounded resources 180 "kernel resources" "$DEST/kernel_resources.log" $PY perf/kernel_resources.py --arch 90 --out "$DEST"
rc=$?
if [ "$rc" -eq 2 ]; then echo "this Triton cannot be read that way: $(tail -n 1 "$DEST/kernel_resources.log")"; else record $rc; fi
grep -E "^(cannot launch|slow):" "$DEST/kernel_resources.log" || echo "no default configuration spills or misses wgmma"
fi

step "done: status $status after ${SECONDS}s of the ${BUDGET}s budget${CUT:+; cut:${CUT%,}}"
exec >&- 2>&-
wait "$TEE_PID" 2> /dev/null  # the log and the caller have every line before the script ends
exit $status
