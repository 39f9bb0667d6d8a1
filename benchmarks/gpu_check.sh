#!/usr/bin/env bash
# One command on a machine with a GPU: CUDA contract tests, the README main job on CUDA, the bf16 speed benchmark and
# `invdiff batch` with RED-Diff plainly and under torchrun (NCCL); results in benchmarks/results/gpu_check-*.json/.md.
# Under 8 minutes on one GPU. `--cpu-smoke` runs the same steps tiny on the CPU (checks the script, measures nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
exec python benchmarks/gpu_check.py "$@"
