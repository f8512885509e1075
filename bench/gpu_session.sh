#!/usr/bin/env bash
# Issue 19's GPU checks in ONE device call (the `device` tool's `run`) of at most 8 minutes, every figure written
# under $OUT. The machine starts bare: torch 2.11 / torchvision 0.26 and pytest, but neither fastcore, fastprogress
# (and what fastprogress imports) nor the data, and nothing can be downloaded there.
#
# Once, on the development machine, in the checkout the session runs from, put what the device lacks in folders git
# ignores (the wheels are pure Python; these versions are the project venv's):
#   mkdir -p .whl .fmnist
#   python -m pip download -q --no-deps --only-binary=:all: -d .whl fastcore==2.2.41 fastprogress==1.1.6 \
#       python-fasthtml==0.14.14 starlette==1.10.0 itsdangerous==2.2.0 python-multipart==0.0.34
#   cp /usr/share/datasets/fashion-mnist/* .fmnist/
#   printf '/.whl/\n/.fmnist/\n' >> .git/info/exclude
# Check it here first, on the CPU at toy sizes (no install, no GPU; files in /tmp/gpu_session):
#   bash bench/gpu_session.sh --dry-run
# Then the one call:
#   run(command="bash bench/gpu_session.sh", carry=[".whl", ".fmnist"], timeout_s=540)
#
# The parts run in this order, each under its own time limit (seconds) so that one that hangs cannot take the rest:
#   tests      150  the CUDA tests: sync-free fits (ActivationStats + GradientStats, health_cbs()), graph mode (no sync
#                   in an epoch, the eager accuracy, the captured step equal to the eager one), bf16/fp16, compile,
#                   loaders, NaN guard, resume; plus the CPU graph-mode tests
#   graph       60  bench/gpu.py --graph-only: fit_one_cycle(4) at bs 512 and 64, hand loop / eager / eager +
#                   ActivationStats / graph mode / graph + ActivationStats: first epoch, later epochs, accuracy
#   table      200  bench/gpu.py: the issue's table at bs 64 and 512 (hand loop, learnkit, + ActivationStats, bf16 +
#                   channels_last, compile, + health_cbs(), graph mode), medians of 3 repeats, no op count
#   precision   50  bench/precision.py: resnet18 at 64 px, bs 256, bf16 + channels_last against fp32
# Files under $OUT (8 at most come back): session.txt (device, versions, each part's exit status and seconds),
# tests.txt, graph.txt, graph.json, table.txt, table.json, precision.txt, precision.json.
# Older parts, for calls of their own: speed (bench/overhead.py --device cuda), models (bench/models.py resnet18).
#   bash bench/gpu_session.sh speed models
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests graph table precision)
out="${OUT:-/tmp/gpu_session}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-}"
if [ -z "$py" ]; then if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi; fi

: > "$out/session.txt"
if [ $dry -eq 0 ]; then
    if ! "$py" -c 'import fastcore, fastprogress' 2>/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "could not install the wheels in .whl (see the top of this script)" >&2; exit 2; }
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/* /usr/share/datasets/fashion-mnist/
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$out/session.txt" 2>&1
fi
"$py" -c 'import torch, learnkit; print("torch", torch.__version__, "| cuda", torch.cuda.is_available(), "| learnkit from", learnkit.__file__)' \
    >> "$out/session.txt" 2>&1

# The CUDA tests of the other files, by name (their files' CPU tests run in CI).
cuda_tests=(tests/test_gpu_speed.py tests/test_graph_mode.py
            tests/test_batch_size.py::test_no_host_sync_while_training_on_cuda
            tests/test_data.py::test_cuda_cache_on_device_and_pinned_host_path_agree_without_host_syncs
            tests/test_faults.py::test_nan_guard_adds_no_sync_on_cuda_and_names_the_first_bad_batch
            tests/test_faults.py::test_resume_on_cuda_equals_an_uninterrupted_fit)

run_part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "part $name: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo " (stopped at its $limit s limit)")" \
        | tee -a "$out/session.txt"
    tail -n 30 "$out/$name.txt"
}

for part in "${parts[@]}"; do
    if [ $dry -eq 1 ]; then
        case "$part" in
            tests) run_part tests 120 "$py" -m pytest -q --collect-only -m "not slow" "${cuda_tests[@]}" ;;
            graph) run_part graph 300 "$py" bench/gpu.py --device cpu --quick --bs 512 --graph-only --graph-epochs 2 \
                       --json "$out/graph.json" ;;
            table) run_part table 300 "$py" bench/gpu.py --device cpu --quick --repeats 1 --no-ops --bs 512 \
                       --configs b,f,g,g_acts --json "$out/table.json" ;;
            precision) run_part precision 300 "$py" bench/precision.py --device cpu --quick --json "$out/precision.json" ;;
            *) echo "--dry-run covers tests, graph, table and precision; not $part" >&2; exit 2 ;;
        esac
        continue
    fi
    case "$part" in
        tests)  # -v: each result as it comes, so a run stopped at the part's limit still says what passed
            per_test=(); "$py" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout=100)  # a traceback, not a kill
            run_part tests 150 "$py" -m pytest -v --tb=short -rs -m "not slow" --durations=15 ${per_test[@]+"${per_test[@]}"} \
                "${cuda_tests[@]}" ;;
        graph) run_part graph 60 "$py" bench/gpu.py --graph-only --graph-epochs 4 --bs 512,64 --json "$out/graph.json" ;;
        table) run_part table 200 "$py" bench/gpu.py --repeats 3 --no-ops --configs b,c,d,e,f,g,g_acts \
                   --json "$out/table.json" ;;
        precision) run_part precision 50 "$py" bench/precision.py --json "$out/precision.json" ;;
        speed) run_part speed 300 "$py" bench/overhead.py --device cuda --rounds 5 ;;
        models) run_part models 540 "$py" bench/models.py --models resnet18 --epochs 5 --quiet ;;
        *) echo "unknown part $part: use tests, graph, table, precision, speed or models" >&2; exit 2 ;;
    esac
done
