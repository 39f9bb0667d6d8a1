"""Score MRI reconstructions against the noise-free image as well as the fastMRI target of the noisy scan.

    python -m benchmarks.clean_reference [--out DIR] COMPARE_DIR [COMPARE_DIR ...]

The fastMRI protocol scores a reconstruction against the root-sum-of-squares (or ESC) image of the *fully sampled,
noisy* k-space. On the shipped samples (k-space noise 1 % of the image maximum, 8 coils) that target carries the
noise, and its root-sum-of-squares turns the noise into a bright floor in the background (mean about
``sqrt(2 C) sigma``, 4 % of the maximum). A reconstruction that removes noise is then penalised for it: the
noise-free image itself scores only ~30 dB against the T1 and EPI targets. This script rebuilds each shipped
sample without noise (``data/make_samples.py`` with ``noise_level=0``: same seeds, so the same phase and coils;
its own noisy rebuild must reproduce the shipped target, which is checked) and rescores every image of
``invdiff compare`` output folders (``reconstructions.npz``) against both references, with the same protocol.
Only the shipped samples have a noise-free reference; other scans are refused by name. Needs the ``data`` extra.

Writes ``clean_reference-<date>.json`` and ``.md`` (atomically) into ``--out``: the ceiling (the noise-free image
scored against the noisy target) per sample, and per folder, task and solver both scores.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.reports import write_json_and_markdown  # noqa: E402
from invdiff.metrics import evaluate  # noqa: E402

MAKERS = {"brain_t1_multicoil": "make_brain_t1_multicoil", "brain_multislice_multicoil": "make_brain_multislice_multicoil",
          "brain_singlecoil": "make_brain_singlecoil"}
REPRODUCTION_TOLERANCE = 1e-5        # relative: the shipped targets are rebuilt to ~1e-6 across numpy versions


@functools.lru_cache(maxsize=1)
def _make_samples():
    spec = importlib.util.spec_from_file_location("make_samples", REPO / "data" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _target(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        key = "reconstruction_rss" if "reconstruction_rss" in f else "reconstruction_esc"
        return f[key][()]


def references(sample: str, shipped: Path, work: Path) -> dict[str, np.ndarray]:
    """``{"noisy": the shipped target, "clean": the noise-free rebuild's}``, after checking that the noisy rebuild
    reproduces the shipped target (else the clean one would not be its noise-free twin)."""
    make = getattr(_make_samples(), MAKERS[sample])
    noisy_dir, clean_dir = work / "noisy", work / "clean"
    noisy_dir.mkdir(exist_ok=True)
    clean_dir.mkdir(exist_ok=True)
    rebuilt = _target(make(noisy_dir))
    stored = _target(shipped)
    if rebuilt.shape != stored.shape:
        raise ValueError(f"{shipped}: target shape {stored.shape}, but data/make_samples.py now builds {rebuilt.shape}")
    error = float(np.abs(rebuilt - stored).max() / np.abs(stored).max())
    if error > REPRODUCTION_TOLERANCE:
        raise ValueError(f"{shipped}: data/make_samples.py no longer reproduces its target (relative error {error:.2e}"
                         f" > {REPRODUCTION_TOLERANCE}); a noise-free reference would not match it")
    return {"noisy": stored, "clean": _target(make(clean_dir, noise_level=0.0))}


def rescore(folder: Path, refs_for) -> list[dict]:
    meta = json.loads((folder / "compare.json").read_text())
    scan = Path(meta["scan"]).stem
    if scan not in MAKERS:
        raise ValueError(f"{folder}: scan {meta['scan']!r} has no noise-free reference (only the shipped samples "
                         f"{', '.join(m + '.h5' for m in MAKERS)} do)")
    refs = refs_for(scan)
    images = np.load(folder / "reconstructions.npz")
    rows = []
    for key in images.files:
        task, solver = key.split("/", 1)
        if solver == "target":
            continue
        target = images[f"{task}/target"]
        slices = _matching_slices(target, refs["noisy"], folder)
        image = images[key]
        rows.append({"folder": folder.name, "scan": scan, "task": task, "solver": solver,
                     "slices": [slices.start, slices.stop],
                     "fastmri_target": _scores(evaluate(target, image)),
                     "noise_free": _scores(evaluate(refs["clean"][slices], image)),
                     # the noise-free image against these slices' targets: the best a reconstruction can
                     # expect from the fastMRI score here
                     "ceiling": _scores(evaluate(target, refs["clean"][slices])),
                     "prior": (meta.get("prior") or {}).get("name")})
    return rows


def _matching_slices(target: np.ndarray, noisy: np.ndarray, folder: Path) -> slice:
    """Which contiguous slices of the sample the folder's targets are (``compare --slices START:STOP``)."""
    for start in range(noisy.shape[0] - target.shape[0] + 1):
        if np.allclose(noisy[start:start + target.shape[0]], target, rtol=0, atol=1e-6 * np.abs(noisy).max()):
            return slice(start, start + target.shape[0])
    raise ValueError(f"{folder}: its targets {target.shape} are not contiguous slices of the shipped sample's target "
                     f"{noisy.shape}")


def _scores(metrics: dict) -> dict:
    return {"psnr": round(metrics["psnr"], 3), "ssim": round(metrics["ssim"], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="invdiff compare output folders")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="suffix of the report's name")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="clean_reference-"))
    cache: dict[str, dict] = {}

    def refs_for(scan: str) -> dict:
        if scan not in cache:
            (work / scan).mkdir()
            cache[scan] = references(scan, REPO / "data" / f"{scan}.h5", work / scan)
        return cache[scan]

    rows = [row for folder in args.folders for row in rescore(folder, refs_for)]
    ceilings = {scan: _scores(evaluate(refs["noisy"], refs["clean"])) for scan, refs in cache.items()}
    report = {"date": datetime.date.today().isoformat(), "command": "python -m benchmarks.clean_reference " +
              " ".join(str(f) for f in args.folders), "ceilings": ceilings, "rows": rows}
    stem = f"clean_reference-{report['date']}{'-' + args.tag if args.tag else ''}"
    write_json_and_markdown(args.out, stem, report, markdown(report))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Noise-free reference, {report['date']}", "", f"`{report['command']}`", "",
             "Ceiling: the noise-free image scored against the fastMRI target of the noisy scan (PSNR dB / SSIM), whole sample.", "",
             "| sample | noise-free image vs fastMRI target |", "|---|---:|"]
    lines += [f"| {scan} | {c['psnr']:.2f} / {c['ssim']:.3f} |" for scan, c in report["ceilings"].items()]
    lines += ["", "Per row, the ceiling is that of the row's slices.", "",
              "| folder | prior | task | solver | vs fastMRI target | vs noise-free image | ceiling (these slices) |",
              "|---|---|---|---|---:|---:|---:|"]
    for r in report["rows"]:
        a, b, c = r["fastmri_target"], r["noise_free"], r["ceiling"]
        lines.append(f"| {r['folder']} | {r['prior']} | {r['task']} | {r['solver']} | {a['psnr']:.2f} / {a['ssim']:.3f} "
                     f"| {b['psnr']:.2f} / {b['ssim']:.3f} | {c['psnr']:.2f} / {c['ssim']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
