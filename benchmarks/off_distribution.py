"""Prior solvers on scans unlike their training data: natural images written as fastMRI scans, with and without
the held-out k-space safeguard, next to zero-filled and CG-SENSE.

The brain prior has never seen a camera, coins or a moon. Each image (scikit-image's samples, block-averaged to
``--size``) is written as a fastMRI file by the project's synthetic writer (single-coil, and 8-coil with birdcage
maps), undersampled by fastMRI's random mask at each acceleration, and reconstructed through the task layer with
the settings table's values. Every row: PSNR / SSIM (fastMRI protocol), seconds, and for ``+safeguard`` rows the
safeguard's verdict (``invdiff.tasks.safeguard``).

    python -m benchmarks.off_distribution                       # RED-Diff, DPS, SMC; 4x (sc, mc) and 8x (mc)
    python -m benchmarks.off_distribution --quick --out /tmp/od # seconds: analytic prior, tiny images

Writes ``benchmarks/results/off_distribution-<date>-cpu.{json,md}`` (rows written after every case).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from invdiff import metrics, settings  # noqa: E402
from invdiff.compare import resolve_prior  # noqa: E402
from benchmarks.reports import write_json_and_markdown  # noqa: E402
from invdiff.tasks import block_average, scan_tasks, solve  # noqa: E402

log = logging.getLogger("benchmarks.off_distribution")
RESULTS = Path(__file__).resolve().parent / "results"
IMAGES = ("camera", "coins", "moon")
CASES = (("single-coil", 4), ("8-coil", 4), ("8-coil", 8))


def natural_image(name: str, size: int) -> np.ndarray:
    """A scikit-image sample, grey, cropped square and block-averaged to ``size`` (max 1)."""
    from skimage import color, data

    image = getattr(data, name)()
    image = color.rgb2gray(image) if image.ndim == 3 else image.astype(np.float32)
    side = min(image.shape) // size * size
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    image = block_average(np.ascontiguousarray(image[top:top + side, left:left + side], dtype=np.float32), size)
    return (image / image.max()).astype(np.float32)


def run_case(scan: Path, acceleration: int, solvers, prior, steps: dict, seed: int,
             center_fraction: float | None = None) -> list[dict]:
    from invdiff.tasks.safeguard import safeguarded_solve

    image = scan_tasks(scan, [acceleration], center_fraction=center_fraction)[0].images[0]
    rows = []

    def record(label, solution, seconds, verdict=None):
        scores = metrics.evaluate(image.target[None], solution.image[None])
        rows.append({"solver": label, "psnr": float(scores["psnr"]), "ssim": float(scores["ssim"]),
                     "seconds": seconds, "verdict": verdict})
        log.info("%s %dx %s: %.2f dB", scan.name, acceleration, label, scores["psnr"])

    for name in ("zero-filled", "cg-sense", *solvers):
        values = settings.effective(name, "mri", steps.get(name, {}))
        start = time.perf_counter()
        solution = solve(image, name, prior if name in solvers else None, values, seed=seed)
        record(name, solution, time.perf_counter() - start)
        if name in solvers and name != "smc":
            start = time.perf_counter()
            solution, verdict = safeguarded_solve(image, name, prior, values, seed=seed)
            record(f"{name}+safeguard", solution, time.perf_counter() - start, verdict.as_record())
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Prior solvers off their training distribution ({report['date']}, CPU, 1 thread)", "",
             f"Command: `{report['command']}`. Images: scikit-image samples at {report['size']} px written as fastMRI "
             f"scans by `invdiff.datasets.synthetic.write_fake_fastmri`; prior `{report['prior']}`; solver "
             f"settings: the MRI row of `invdiff.settings` with {report['steps']}. PSNR dB / SSIM (fastMRI "
             f"protocol).", "", "| image | scan | accel | solver | PSNR | SSIM | s | safeguard kept |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for case in report["cases"]:
        for row in case["rows"]:
            kept = "" if row["verdict"] is None else row["verdict"]["chosen"]
            lines.append(f"| {case['image']} | {case['scan']} | {case['acceleration']}x | {row['solver']} | "
                         f"{row['psnr']:.2f} | {row['ssim']:.3f} | {row['seconds']:.1f} | {kept} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images, analytic prior, few steps")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (quick: 64)")
    parser.add_argument("--prior", default="brain-mri-complex", help="prior name or exported path")
    parser.add_argument("--solvers", default="reddiff,dps,smc", help="comma-separated prior solvers")
    parser.add_argument("--images", default=",".join(IMAGES), help="scikit-image sample names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from invdiff.datasets.synthetic import write_fake_fastmri

    size = 64 if args.quick else args.size
    solvers = [s for s in args.solvers.split(",") if s]
    steps = ({name: {"steps": 5} for name in solvers} if args.quick else
             {"reddiff": {"steps": 100}, "dps": {"steps": 100}, "smc": {"steps": 30, "num_particles": 4}})
    if "smc" in steps and args.quick:
        steps["smc"]["num_particles"] = 2
    date = datetime.date.today().isoformat()
    report = {"date": date, "command": "python -m benchmarks.off_distribution " + " ".join(argv or sys.argv[1:]),
              "size": size, "prior": "analytic" if args.quick else args.prior, "steps": steps, "cases": []}
    stem = f"off_distribution-{date}-cpu{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.images.split(","):
            image = natural_image(name, size)
            for coils, acceleration in CASES:
                scan = Path(workdir) / f"{name}_{coils}.h5"
                if not scan.exists():
                    write_fake_fastmri(scan, image, num_coils=8, multicoil=coils != "single-coil",
                                       noise_level=0.01, seed=args.seed)
                centre = 0.2 if args.quick else None          # ESPIRiT needs >= 4 calibration lines at 64 px
                if args.quick:
                    from invdiff.priors.analytic import smooth_gaussian_prior
                    prior = smooth_gaussian_prior(scan_tasks(scan, [acceleration], center_fraction=centre)[0].in_shape)
                else:
                    prior = resolve_prior(args.prior, torch.device("cpu"))
                rows = run_case(scan, acceleration, solvers, prior, steps, args.seed, centre)
                report["cases"].append({"image": name, "scan": coils, "acceleration": acceleration, "rows": rows})
                write_json_and_markdown(args.out, stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
