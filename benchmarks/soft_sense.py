"""CG-SENSE with one ESPIRiT map set against soft-SENSE with two (Uecker et al. 2014), on objects that fill the
phase-encoding field of view, the same objects with a margin, and the shipped real brain scan.

Scans: scikit-image's ``camera`` block-averaged to ``--size`` px and written as an 8-coil fastMRI scan by the
project's writer (``invdiff.datasets.synthetic.write_fake_fastmri``: birdcage maps, 2x readout oversampling, so the
object touches the field of view's edges only along the phase-encoding columns); the same image with 16 zero columns
on each side (a margin in the phase direction); ``data/brain_t1_multicoil.h5`` as shipped. Noise: none, and 1 %
(complex Gaussian k-space noise of per-component std 0.01 x the target's maximum; the synthetic images have maximum
1, so ``noise_level=0.01``; the brain gets that noise added to its own). Masks: fastMRI random masks seeded by file
name, the task layer's default centre fractions (2x 0.16, 4x 0.08, 8x 0.04). Every row goes through the task layer
(``invdiff.tasks.scan_tasks`` / ``solve``) and is scored with the fastMRI protocol. *Before* rows rebuild the task
layer as it was (sigpy's square calibration region at any number of lines) and run one-map CG-SENSE on it.

    python -m benchmarks.soft_sense                     # 3 scans x 2 noise levels x 2/4/8x; ~3 min on one thread
    python -m benchmarks.soft_sense --quick --out /tmp/ss

Writes ``benchmarks/results/soft_sense-<date>-cpu.{json,md}`` (after every case, atomically).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from invdiff import metrics, settings  # noqa: E402
from benchmarks.reports import write_json_and_markdown  # noqa: E402
from invdiff.tasks import scan as scan_module  # noqa: E402
from invdiff.tasks import scan_tasks, solve  # noqa: E402
from invdiff.tasks.scan import calibration_width  # noqa: E402

log = logging.getLogger("benchmarks.soft_sense")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BRAIN = ROOT / "data" / "brain_t1_multicoil.h5"
MARGIN = 16
BEFORE = (("before: zero-filled", "zero-filled", {}), ("before: cg-sense", "cg-sense", {"maps": 1}))
ROWS = (("zero-filled", "zero-filled", {}), ("cg-sense maps=1", "cg-sense", {"maps": 1}),
        ("cg-sense maps=2", "cg-sense", {"maps": 2}), ("cg-sense maps=auto", "cg-sense", {"maps": "auto"}))


@contextlib.contextmanager
def square_calibration_only():
    """The task layer as it was before soft-SENSE: sigpy's square calibration region at any number of lines."""
    saved = scan_module.MIN_SQUARE_CALIBRATION_LINES
    scan_module.MIN_SQUARE_CALIBRATION_LINES = 0
    try:
        yield
    finally:
        scan_module.MIN_SQUARE_CALIBRATION_LINES = saved


def write_scans(workdir: Path, size: int, noise: float, seed: int) -> dict[str, Path]:
    """The three scans at one noise level: name -> h5 path."""
    from benchmarks.off_distribution import natural_image
    from invdiff.datasets.synthetic import write_fake_fastmri

    camera = natural_image("camera", size)
    margined = np.pad(camera, ((0, 0), (MARGIN, MARGIN)))
    tag = f"noise{noise:g}"
    scans = {"camera (fills FOV)": workdir / f"camera_{tag}.h5",
             f"camera +{MARGIN}px margin": workdir / f"margin_{tag}.h5"}
    write_fake_fastmri(scans["camera (fills FOV)"], camera, num_coils=8, noise_level=noise, seed=seed)
    write_fake_fastmri(scans[f"camera +{MARGIN}px margin"], margined, num_coils=8, noise_level=noise, seed=seed)
    brain = workdir / f"brain_t1_multicoil_{tag}.h5"
    shutil.copyfile(BRAIN, brain)
    if noise > 0:
        with h5py.File(brain, "r+") as handle:
            kspace = handle["kspace"][()]
            std = noise * float(handle["reconstruction_rss"][()].max())
            rng = np.random.default_rng(seed)
            acquired = kspace != 0
            noise_sample = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
            kspace = kspace + acquired * std * noise_sample
            handle["kspace"][...] = kspace.astype(np.complex64)
    scans["brain_t1_multicoil.h5"] = brain
    return scans


def run_case(scan: Path, acceleration: int, seed: int) -> tuple[list[dict], int]:
    """The rows of one scan and acceleration (before and after), and the calibration lines of the mask."""
    with square_calibration_only():
        before = scan_tasks(scan, [acceleration])[0].images[0]
    image = scan_tasks(scan, [acceleration])[0].images[0]
    rows = []
    for label, solver, overrides, task_image in [*((*row, before) for row in BEFORE), *((*row, image) for row in ROWS)]:
        values = settings.effective(solver, "mri", overrides)
        start = time.perf_counter()
        solution = solve(task_image, solver, None, values, seed=seed)
        seconds = time.perf_counter() - start
        scores = metrics.evaluate(task_image.target[None], solution.image[None])
        diagnostics = solution.result.diagnostics
        rows.append({"solver": label, "psnr": float(scores["psnr"]), "ssim": float(scores["ssim"]), "seconds": seconds,
                     "maps_used": diagnostics.get("maps"),
                     "second_map_fraction": diagnostics.get("second_map_fraction")})
        log.info("%s %dx %s: %.2f dB", scan.name, acceleration, label, scores["psnr"])
    return rows, calibration_width(image.problem.operator.mask.cpu().numpy())


def markdown(report: dict) -> str:
    lines = [f"# CG-SENSE: one ESPIRiT map set vs soft-SENSE with two ({report['date']}, CPU, 1 thread)", "",
             f"Command: `{report['command']}`. {report['note']}", "",
             "PSNR dB / SSIM (fastMRI protocol). *Before*: the task layer's maps from sigpy's square calibration "
             "region at any number of lines, CG-SENSE with those maps (the code before this change). *After*: the "
             "task layer's maps from 24 rows x the lines below "
             f"{report['min_square_calibration_lines']} calibration lines (8x here has 5), CG-SENSE with one set "
             "(`maps=1`), two (`maps=2`) and `maps=auto` (the MRI setting: two sets when the second set, cropped at "
             f"eigenvalue 0.8, covers > {report['auto_threshold']:.0%} of the first set's support; `frac2` is that "
             "fraction; the number of sets used in brackets).", "",
             "| scan | noise | accel | lines | before: zero-filled | before: CG-SENSE | zero-filled | "
             "CG-SENSE maps=1 | "
             "maps=2 | maps=auto (used) | frac2 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in report["cases"]:
        by = {row["solver"]: row for row in case["rows"]}
        auto = by["cg-sense maps=auto"]

        def cell(row):
            return f"{row['psnr']:.2f} / {row['ssim']:.3f}"
        lines.append(f"| {case['scan']} | {case['noise']:g} | {case['acceleration']}x | {case['calibration_lines']} | "
                     f"{cell(by['before: zero-filled'])} | {cell(by['before: cg-sense'])} | "
                     f"{cell(by['zero-filled'])} | "
                     f"{cell(by['cg-sense maps=1'])} | {cell(by['cg-sense maps=2'])} | {cell(auto)} "
                     f"({auto['maps_used']}) | {by['cg-sense maps=2']['second_map_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px, 4x only, noiseless only")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side in pixels")
    parser.add_argument("--accelerations", default="2,4,8")
    parser.add_argument("--noise", default="0,0.01", help="comma-separated relative noise levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from invdiff.samplers.baselines import SOFT_SENSE_MIN_FRACTION

    size = 64 if args.quick else args.size
    accelerations = [4] if args.quick else [int(a) for a in args.accelerations.split(",")]
    noises = [0.0] if args.quick else [float(n) for n in args.noise.split(",")]
    date = datetime.date.today().isoformat()
    report = {"date": date, "command": "python -m benchmarks.soft_sense " + " ".join(argv or sys.argv[1:]),
              "size": size, "margin": MARGIN, "auto_threshold": SOFT_SENSE_MIN_FRACTION,
              "min_square_calibration_lines": scan_module.MIN_SQUARE_CALIBRATION_LINES,
              "note": (f"Synthetic: scikit-image camera at {size} px, 8 coils, written by write_fake_fastmri "
                       f"(margin: {MARGIN} zero columns each side); real: data/brain_t1_multicoil.h5 (8 coils, "
                       "384 x 192). Noise: complex Gaussian, per-component std = level x target max (the brain's "
                       "own noise is always there). fastMRI random masks, default centre fractions."),
              "cases": []}
    stem = f"soft_sense-{date}-cpu{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        for noise in noises:
            for name, scan in write_scans(Path(workdir), size, noise, args.seed).items():
                for acceleration in accelerations:
                    rows, lines = run_case(scan, acceleration, args.seed)
                    report["cases"].append({"scan": name, "noise": noise, "acceleration": acceleration,
                                            "calibration_lines": lines, "rows": rows})
                    write_json_and_markdown(args.out, stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
