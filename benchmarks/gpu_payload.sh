#!/usr/bin/env bash
# Here, before a GPU loan: fill .gpu/ (git-ignored) with what benchmarks/gpu_train_priors.sh needs on a machine that
# has torch, numpy, h5py, scipy, scikit-image, numba and einops but not this project's other dependencies:
#   .gpu/whl    wheels of deepinv, sigpy, PyWavelets, defusedxml, nibabel and natsort for CPython 3.12 x86-64 (~9 MB)
#   .gpu/files  the MNI152 template (nilearn's wheel) and the real MR volumes (dipy's) the brain source trains on
#               (~6 MB), and runs/realct/realct128.h5 (real CT for the final check) when it exists here.
# The device tool sends the working tree (~50 MB) plus carried paths, at most 64 MiB: carry only .gpu.
# Then: device run "bash benchmarks/gpu_train_priors.sh --out $OUT", carry [".gpu"], timeout_s 590.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
mkdir -p .gpu/whl .gpu/files
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl \
    deepinv==0.5.0 sigpy==0.1.27 PyWavelets==1.9.0 defusedxml==0.7.1 nibabel==5.4.2 natsort==8.4.0
python - <<'PY'
import shutil
from pathlib import Path

from invdiff.datasets import training as T

files = Path(".gpu/files")
wanted = [("nilearn", "datasets/data/" + T.MNI_FILE.format(k)) for k in ("t1", "gm", "wm")]
wanted += [(package, rel) for package, rel, *_ in T.REAL_MR_VOLUMES]
for package, rel in wanted:
    path = T.package_file(package, rel)
    if path is None:
        raise SystemExit(f"gpu_payload: {package}/{rel} not found here; pip install -e '.[data]' first")
    shutil.copy(path, files / path.name)
real_ct = Path("runs/realct/realct128.h5")
if real_ct.is_file():
    shutil.copy(real_ct, files / real_ct.name)
import subprocess
payload = sum(p.stat().st_size for p in Path(".gpu").rglob("*") if p.is_file())
tracked = sum(Path(f).stat().st_size for f in subprocess.run(["git", "ls-files", "-z"], capture_output=True, text=True,
                                                            check=True).stdout.split("\0") if f and Path(f).is_file())
print(f"gpu_payload: {payload / 2**20:.1f} MiB in .gpu + {tracked / 2**20:.1f} MiB tracked = "
      f"{(payload + tracked) / 2**20:.1f} MiB of the device tool's 64 MiB")
if payload + tracked > 63 * 2**20:
    raise SystemExit("gpu_payload: too close to the device tool's 64 MiB limit; drop runs/realct or untracked files")
PY
