#!/usr/bin/env bash
# One command on a GPU machine: train the brain and CT priors at GPU scale and measure them against the shipped ones
# (benchmarks/gpu_train_priors.py). Where the packages the project needs are missing (deepinv, sigpy, nibabel, ...),
# it installs the wheels that `bash benchmarks/gpu_payload.sh` put in .gpu/whl (carry .gpu with the device tool),
# and the training sources read the template and volumes from .gpu/files.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import deepinv, sigpy, nibabel" 2>/dev/null && compgen -G ".gpu/whl/*.whl" >/dev/null; then
    tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    for wheel in .gpu/whl/*-cp3*.whl; do
        case "$wheel" in *"-$tag-"*) ;; *) echo "gpu_train_priors.sh: $wheel is not for this Python ($tag);" \
            "rerun benchmarks/gpu_payload.sh with --python-version for it" >&2; exit 2;; esac
    done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/invdiff-site .gpu/whl/*.whl
    export PYTHONPATH="/tmp/invdiff-site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu/files ]; then
    export INVDIFF_TRAINING_FILES="${PWD}/.gpu/files"
fi
exec "$PY" benchmarks/gpu_train_priors.py "$@"
