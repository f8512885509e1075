#!/usr/bin/env bash
# The GPU checks the issues ask for, for a session that is lent a device machine (the `device` tool). The
# machine starts bare, with torch 2.11 / torchvision 0.26 but neither fastcore, fastprogress nor the data, and
# each call is limited to 10 minutes, so the work is split into parts that each fit in one call:
#
#   tests    the CUDA tests (sync-free fit with ActivationStats + GradientStats, bf16/fp16, compile, loader)
#   speed    bench/gpu.py (issue 8's table) and bench/overhead.py --device cuda (issue 6's GPU ratio)
#   models   bench/models.py --models resnet18 --epochs 5 (issue 5: how close to 0.94)
#
# Once, on the development machine, put what the device lacks in folders git ignores:
#   mkdir -p .whl .fmnist
#   pip download --no-deps -d .whl fastcore fastprogress python-fasthtml starlette itsdangerous python-multipart
#   cp /usr/share/datasets/fashion-mnist/* .fmnist/
#   printf '/.whl/\n/.fmnist/\n' >> .git/info/exclude
# Then one device call per part (a call may run 10 minutes; bench/gpu.py now times 9 configurations and counts
# their ops, so `speed` gets a call of its own):
#   run(command="bash bench/gpu_session.sh tests", carry=[".whl", ".fmnist"], timeout_s=600)
#   run(command="bash bench/gpu_session.sh speed", carry=[".whl", ".fmnist"], timeout_s=600)
#   run(command="bash bench/gpu_session.sh models", carry=[".whl", ".fmnist"], timeout_s=600)
# Each part writes its output to $OUT/<part>.txt (the files come back) and prints a short tail.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_session}"
mkdir -p "$out"

if ! python -c 'import fastcore, fastprogress, learnkit' 2>/dev/null; then
    pip install -q --no-deps .whl/*.whl
    pip install -q --no-deps -e .
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    mkdir -p /usr/share/datasets/fashion-mnist
    cp .fmnist/* /usr/share/datasets/fashion-mnist/
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"

for part in "$@"; do
    case "$part" in
        tests) python -m pytest -q -rs tests/test_gpu_speed.py tests/test_batch_size.py tests/test_data.py \
                   tests/test_faults.py ;;  # the files with the CUDA-only tests, whole
        speed) python bench/gpu.py --repeats 3; python bench/overhead.py --device cuda --rounds 5 ;;
        models) python bench/models.py --models resnet18 --epochs 5 --quiet ;;
        *) echo "unknown part $part: use tests, speed or models" >&2; exit 2 ;;
    esac > "$out/$part.txt" 2>&1 || echo "part $part failed (exit $?)" >> "$out/$part.txt"
    echo "== $part"; tail -n 25 "$out/$part.txt"
done
