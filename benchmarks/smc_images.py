"""The SMC ensemble sampler on image tasks, next to RED-Diff on the same prior, the same inputs and the same seed.

Per task, SMC (``sample_smc``, variant "sde", ``--particles`` N = 16, ``--steps`` 100, other arguments at their
registered defaults) is measured for

* quality: PSNR/SSIM (fastMRI protocol, :func:`invdiff.metrics.evaluate`, on images mapped through the task's
  ``to_image`` as :func:`invdiff.compare.run_solver` scores them) of the weighted mean ``result.x`` and of the
  highest-weight particle ``diagnostics["best_particle"]``;
* calibration of the std map: the fraction of pixels with ``|mean - truth| <= 2 std`` (about 0.95 for a
  calibrated Gaussian posterior), over all pixels and over the support (truth > 5 % of its max: the background
  of an MRI or CT image is most of the pixels and is easy to cover), and RMS std / RMS error on the support
  (1 when the spread matches the error on average);
* cost: wall and network seconds, NFE (batched network calls: one per step plus the Langevin moves after each
  resampling) and particle evaluations (NFE x N), final and minimum ESS (after each step's reweighting, so the
  minimum is the low point before a resampling), the number of resampling events;
* the cost ratio of the issue: SMC wall seconds per step over the time of one network pass on a batch of N
  images at the task's shape (median of a few passes after a warm-up); the goal is <= 1.2. The same ratio per
  network call (wall / NFE) is reported beside it, to separate extra calls from per-call overhead;

and RED-Diff (``reddiff``, the same ``--steps`` unless ``--reddiff-steps`` is given, the task family's row of
:mod:`invdiff.settings` as in ``benchmarks/run.py``) gives wall seconds and PSNR/SSIM, and SMC's wall time over
RED-Diff's.

Calibration is measured in the image domain of the metrics. For CT, ``to_image`` is the real image, so the std
map is the sampler's own ``diagnostics["std"]``. For MRI and inpainting it is the magnitude of the centre crop,
a nonlinear map: the centre is ``to_image(result.x)``, the magnitude of the weighted mean (the image the PSNR
scores), and the std is the weighted std of the particles' magnitudes ``to_image(sample_i)`` about their
weighted mean (float64 weights ``result.weights``), i.e. the posterior spread of the magnitude image. (The
magnitude of the weighted mean is at most the weighted mean of the magnitudes; the gap is small where the
spread is small against the signal, i.e. on the support.) ``sample_smc`` returns the std of the real/imaginary
channels only, so the magnitude std is computed here from ``result.samples``.

``--set smc:NAME=VALUE`` (or ``reddiff:``) changes one hyperparameter over the task settings, for example
``--set smc:proposal=conditional``; ``--tag`` names the report apart. ``--proposals conditional,tweedie`` runs SMC
once per proposal on every task (one row each, the same RED-Diff run beside them), so the proposals are compared
in one run on one machine load. ``--size PX`` builds the tasks small, as quick mode does (a synthetic 4-coil scan of
the T1 slice, the phantom and the inpainting image block-averaged to PX), but with the shipped network priors:
image-task numbers a CPU can afford (the network tweedie proposal costs a JVP + VJP per CG iteration).

Every sampler run gets a ``torch.Generator`` seeded ``seed * SEED_STRIDE + image index``, as ``run_solver`` does.

    python -m benchmarks.smc_images --threads 1                 # shipped priors, N = 16, 100 steps (long on CPU)
    python -m benchmarks.smc_images --quick                     # seconds: tiny images, analytic prior, 20 steps
    python -m benchmarks.smc_images --device cuda               # bf16 around the network (--network-dtype)
    python -m benchmarks.smc_images --tasks mri-4x,ct-30 --particles 32 --steps 200
    python -m benchmarks.smc_images --mri-prior PATH.json --ct-prior PATH.json
    python -m benchmarks.smc_images --size 32 --tasks ct-30,mri-4x --steps 20 --proposals conditional,tweedie

Tasks (built by the task builders of :mod:`invdiff.compare`, as in ``benchmarks/run.py``):

* ``mri-4x``, ``mri-8x``: ``data/brain_t1_multicoil.h5`` through the ``invdiff reconstruct`` pipeline (8 coils,
  ESPIRiT, fastMRI random mask), prior ``brain-mri-complex``;
* ``ct-30``: the held-out thorax phantom (``data/ct_samples.h5`` index 3) block-averaged to 128 px, 30 views,
  1 % noise, prior ``ct-phantom-anatomy`` (fixed scale), as ``recipes/compare_ct.py`` builds it;
* ``inpainting``: the T1 slice (192 x 192, complex, zero phase), 50 % random pixels, prior ``brain-mri-complex``.

Quick mode (as ``benchmarks/run.py --quick``): a 48 px synthetic 4-coil scan of the T1 slice (centre fraction
0.17, so at 8x only the 8 calibration columns of 48 are sampled), a 32 px phantom and inpainting image, the
analytic ``smooth_gaussian_prior`` per task.

Writes ``benchmarks/results/smc_images-<date>-<device>.json`` and ``.md`` (``-quick`` appended in quick mode),
atomically.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

if __package__ in (None, ""):          # `python benchmarks/smc_images.py` as well as `python -m benchmarks.smc_images`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import load_average  # noqa: E402
import invdiff  # noqa: E402
from invdiff import settings  # noqa: E402
from invdiff.compare import resolve_prior, run_solver, set_overrides  # noqa: E402
from benchmarks.reports import write_json_and_markdown  # noqa: E402
from invdiff.priors.analytic import smooth_gaussian_prior  # noqa: E402
from invdiff.priors.loading import trained_steps  # noqa: E402
from invdiff.samplers._common import call_prior, expand_sigma, timed  # noqa: E402
from invdiff.tasks import SEED_STRIDE, Task, block_average, ct_task, inpainting_task, scan_tasks, solve  # noqa: E402

log = logging.getLogger("benchmarks.smc_images")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("mri-4x", "mri-8x", "ct-30", "inpainting")
PRIOR_KIND = {"mri-4x": "mri", "mri-8x": "mri", "ct-30": "ct", "inpainting": "mri"}
DEFAULT_PRIORS = {"mri": "brain-mri-complex", "ct": "ct-phantom-anatomy"}
SUPPORT_FRACTION = 0.05          # support: truth > 5 % of its max
COVERAGE_STDS = 2.0              # |mean - truth| <= 2 std
COST_GOAL = 1.2                  # the issue's goal for wall per step / one batch-of-N network pass


# ---- tasks -----------------------------------------------------------------------------------------------
def parse_tasks(text: str) -> list[str]:
    """``"mri-4x,ct-30"`` -> checked, distinct task names in the given order."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        raise ValueError(f"--tasks: expected a comma-separated subset of {', '.join(TASKS)}, got {text!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks: a task is listed more than once in {text!r}")
    return names


def _t1_image(size: int | None = None) -> np.ndarray:
    with h5py.File(REPO / "data" / "brain_t1_multicoil.h5", "r") as h5:
        image = h5["reconstruction_rss"][0]
    return image if size is None else block_average(image, size)


def build_tasks(names: list[str], quick: bool, device: torch.device, workdir: Path,
                size: int | None = None) -> list[Task]:
    """The named tasks, each with its task-family settings for RED-Diff and SMC (as benchmarks/run.py builds them).

    size: build them at ``size`` px the quick way (quick mode: 48 px MRI, 32 px CT and inpainting).
    """
    from invdiff.datasets.synthetic import write_fake_fastmri
    from invdiff.operators.inpainting import random_pixel_mask

    tasks = []
    accelerations = [int(name[len("mri-"):-1]) for name in names if name.startswith("mri-")]
    small = size is not None or quick
    if accelerations:
        if small:
            mri_size = size or 48
            image = _t1_image(mri_size)
            scan = workdir / "small_scan.h5"
            write_fake_fastmri(scan, image, num_coils=4, noise_level=0.01 * float(image.max()), seed=0)
            # ESPIRiT needs >= 8 calibration lines (0.17 of 48 columns)
            mri = scan_tasks(scan, accelerations, slices="0", device=device,
                             center_fraction=max(0.17, 8 / mri_size))
        else:
            mri = scan_tasks(REPO / "data" / "brain_t1_multicoil.h5", accelerations, slices="0", device=device)
        for task in mri:
            task.name = f"mri-{task.name}"
        tasks += mri
    if "ct-30" in names:
        with h5py.File(REPO / "data" / "ct_samples.h5", "r") as h5:
            phantom = block_average(h5["images"][3], size or (32 if quick else 128))   # 'thorax', held out
        ct = ct_task(phantom, 30, noise_fraction=0.01, device=device)
        tasks.append(ct)
    if "inpainting" in names:
        image = _t1_image(size or 32) if small else _t1_image()
        inpainting = inpainting_task(image, random_pixel_mask(image.shape, 0.5, generator=0), name="inpainting",
                                     device=device)
        tasks.append(inpainting)
    order = {name: i for i, name in enumerate(names)}
    return sorted(tasks, key=lambda task: order[task.name])


# ---- priors ----------------------------------------------------------------------------------------------
def load_priors(args, names: list[str], device: torch.device, dtype: torch.dtype) -> dict:
    """Prior kind ("mri", "ct") -> loaded prior in the network dtype, for the kinds the tasks need.

    Loaded before any task is built, so a wrong --mri-prior / --ct-prior fails at once, naming the option.
    """
    priors = {}
    for kind in dict.fromkeys(PRIOR_KIND[name] for name in names):
        given = getattr(args, f"{kind}_prior") or DEFAULT_PRIORS[kind]
        try:
            priors[kind] = resolve_prior(given, device).to(dtype)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--{kind}-prior {given}: {err}") from None
    return priors


def quick_prior(task: Task, device: torch.device):
    """benchmarks/run.py's quick prior: the analytic smooth Gaussian field at the task's exact shape."""
    if PRIOR_KIND[task.name] == "ct":
        return smooth_gaussian_prior(task.in_shape, std=0.3, mean=0.3).to(device)
    return smooth_gaussian_prior(task.in_shape).to(device)


def _network_dtype(name: str | None, device: torch.device) -> torch.dtype:
    name = name or ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def prior_record(prior) -> dict:
    metadata = getattr(prior, "metadata", None) or {}
    return {"name": getattr(prior, "name", None) or type(prior).__name__, "sha256": metadata.get("sha256"),
            "steps_trained": trained_steps(metadata)}


# ---- measuring -------------------------------------------------------------------------------------------
def batch_pass_seconds(prior, task: Task, batch: int, repeats: int) -> float:
    """Median seconds of one prior call on a (batch, C, H, W) float32 input, after untimed warm-up calls.

    The warm-up calls (batch 1, RED-Diff's, and ``batch``, SMC's) also warm the prior up for both samplers:
    first-call allocations and kernel selection are not timed, as in benchmarks/run.py.
    """
    y = task.images[0].problem.y
    x = torch.randn((batch, *task.in_shape), generator=torch.Generator(device=y.device).manual_seed(0),
                    device=y.device)
    sigma = expand_sigma(1.0, x)
    times = []
    with torch.no_grad():
        call_prior(prior, x[:1], sigma[:1])
        call_prior(prior, x, sigma)
        for _ in range(repeats):
            with timed(x) as timer:
                call_prior(prior, x, sigma)
            times.append(timer.seconds)
    return statistics.median(times)


def image_moments(samples: torch.Tensor, weights: torch.Tensor, to_image) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and pixelwise weighted std of the particles' images ``to_image(sample_i)``, in float64.

    samples: (N, 1, C, H, W); weights: (N, 1) normalised; to_image: (1, C, H, W) -> (h, w). Returns two (h, w).
    """
    images = np.stack([to_image(sample) for sample in samples]).astype(np.float64)     # (N, h, w)
    w = weights[:, 0].detach().cpu().double().numpy()
    w = w / w.sum()
    mean = np.tensordot(w, images, axes=1)
    variance = np.tensordot(w, (images - mean) ** 2, axes=1)
    return mean, np.sqrt(np.clip(variance, 0.0, None))


def coverage(center: np.ndarray, std: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    """Fraction of pixels (in ``where``) with ``|center - truth| <= COVERAGE_STDS * std``."""
    inside = np.abs(center - truth) <= COVERAGE_STDS * std
    return float(inside[where].mean() if where is not None else inside.mean())


def _scores(target: np.ndarray, image: np.ndarray) -> dict:
    from invdiff import metrics

    if not np.isfinite(image).all():
        return {"psnr": None, "ssim": None}
    scores = metrics.evaluate(target[None], image[None])
    return {"psnr": float(scores["psnr"]), "ssim": float(scores["ssim"])}


def measure_smc(task: Task, prior, particles: int, steps: int, seed: int, proposal: str | None = None) -> dict:
    """One SMC run on the task's image (the task layer's solve: own copy of y, the seed rule), scored and calibrated.

    proposal: overrides the task settings' (and --set's) proposal when given.
    """
    chosen = {"proposal": proposal} if proposal else {}
    kwargs = settings.effective("smc", task.family, {"num_particles": particles, "variant": "sde",
                                                     **task.overrides.get("smc", {}), **chosen}, steps=steps)
    image = task.images[0]
    with timed(image.problem.y) as wall:
        solution = solve(image, "smc", prior, kwargs, seed=seed)
    result = solution.result
    diagnostics = result.diagnostics
    truth = image.target.astype(np.float64)
    center = solution.image.astype(np.float64)
    _, std = image_moments(result.samples, result.weights, image.to_image)
    support = truth > SUPPORT_FRACTION * truth.max()
    error = center - truth
    rms_error = float(np.sqrt(np.mean(error[support] ** 2)))
    ess = diagnostics["ess"][:, 0].double()
    mean_scores = _scores(image.target, center.astype(np.float32))
    best_scores = _scores(image.target, image.to_image(diagnostics["best_particle"]))
    row = {
        "task": task.name, "proposal": kwargs["proposal"], "hyperparameters": kwargs,
        "note": "" if mean_scores["psnr"] is not None else
        "diverged: non-finite values in the weighted mean",
        "psnr_mean": mean_scores["psnr"], "ssim_mean": mean_scores["ssim"],
        "psnr_best": best_scores["psnr"], "ssim_best": best_scores["ssim"],
        "coverage": _finite(coverage(center, std, truth)),
        "coverage_support": _finite(coverage(center, std, truth, support)),
        "support_fraction": float(support.mean()),
        "spread_error_ratio": _finite(float(np.sqrt(np.mean(std[support] ** 2))) / rms_error
                                      if rms_error > 0 else None),
        "wall_seconds": wall.seconds, "seconds": float(diagnostics["seconds"]),
        "network_seconds": float(diagnostics["network_seconds"]), "nfe": int(diagnostics["nfe"]),
        "particle_evaluations": int(diagnostics["particle_evaluations"]),
        "ess_final": _finite(float(ess[-1])), "ess_min": _finite(float(ess.min())),
        "resampling_events": int(diagnostics["resampled"][:, 0].sum()),
        "finite_particles": int(diagnostics["finite_particles"]),
        "max_stiffness": float(diagnostics["stiffness"].max()),
        "cg_iterations": int(diagnostics["conditional_cg_iterations"]),
        "jacobian_products": int(diagnostics.get("jacobian_products") or 0),
        "tweedie_covariance": diagnostics.get("tweedie_covariance"),
    }
    log.info("smc (%s) on %s: PSNR mean %s best %s, coverage %s (support %s), final ESS %s, %.2f s", row["proposal"],
             task.name, _cell(row["psnr_mean"], ".2f"), _cell(row["psnr_best"], ".2f"), _cell(row["coverage"], ".3f"),
             _cell(row["coverage_support"], ".3f"), _cell(row["ess_final"], ".1f"), wall.seconds)
    return row


def measure_reddiff(task: Task, prior, steps: int, seed: int) -> dict:
    """RED-Diff through :func:`invdiff.compare.run_solver` (the same seed rule, the task-family settings)."""
    row = run_solver(task, "reddiff", prior=prior, seed=seed, steps=steps)
    return {"psnr": _finite(row.psnr), "ssim": _finite(row.ssim), "wall_seconds": row.seconds,
            "network_seconds": row.network_seconds, "nfe": row.nfe, "note": row.note,
            "hyperparameters": {k: v for k, v in row.hyperparameters.items() if isinstance(v, (str, int, float))}}


def _finite(value):
    return None if value is None or not math.isfinite(value) else float(value)


# ---- report ----------------------------------------------------------------------------------------------
def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _overrides_text(report: dict) -> str:
    """`` except smc proposal=conditional`` for the report's --set options (empty when none)."""
    items = [f"{solver} {name}={value}" for solver, values in report.get("overrides", {}).items()
             for name, value in values.items()]
    return f" except {', '.join(items)}" if items else ""


def markdown(report: dict) -> str:
    smc = report["smc_settings"]
    priors = "; ".join(f"{kind}: {record['name']}" + (f" (sha256 {record['sha256'][:12]}..., step "
                                                      f"{record['steps_trained']})" if record["sha256"] else "")
                       for kind, record in report["priors"].items())
    lines = [f"# SMC on image tasks, next to RED-Diff ({report['date']}, {report['device']})", "",
             f"Command: `{report['command']}`. SMC: N = {smc['num_particles']} particles, {smc['steps']} steps, "
             f"variant {smc['variant']}, other arguments at their defaults{_overrides_text(report)}; RED-Diff: "
             f"{report.get('reddiff_steps', report['steps'])} steps with the task-family settings. "
             f"Seed {report['seed']} (generator seed * {SEED_STRIDE} + image index). "
             f"Priors: {priors}. Device {report['device']} ({report['device_name']}), torch "
             f"{report['torch_version']}, {report['threads']} thread(s), network dtype {report['network_dtype']}; "
             f"1-minute load average {report['load_average_start']} at the start, {report['load_average_end']} at "
             f"the end (a shared machine: timings vary with load).", "",
             "Quality (PSNR/SSIM: fastMRI protocol; coverage: share of pixels with |mean - truth| <= 2 std, all "
             "and on the support truth > 5 % of max; spread/error: RMS std / RMS error on the support):", "",
             "| task | SMC proposal | SMC mean PSNR | SSIM | SMC best PSNR | SSIM | RED-Diff PSNR | SSIM | coverage | "
             "coverage (support) | spread/error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        red = row["reddiff"]
        lines.append(f"| {row['task']} | {row.get('proposal')} | {_cell(row['psnr_mean'], '.2f')} | "
                     f"{_cell(row['ssim_mean'], '.4f')} | "
                     f"{_cell(row['psnr_best'], '.2f')} | {_cell(row['ssim_best'], '.4f')} | "
                     f"{_cell(red['psnr'], '.2f')} | {_cell(red['ssim'], '.4f')} | {_cell(row['coverage'], '.3f')} | "
                     f"{_cell(row['coverage_support'], '.3f')} | {_cell(row['spread_error_ratio'], '.2f')} |")
    lines += ["", f"Cost (batch pass: one prior call on N images at the task's shape, median; cost ratio: SMC wall "
                  f"per step / batch pass, goal <= {COST_GOAL}; per call: SMC wall / NFE / batch pass; CG calls: "
                  f"normal-operator calls of the conditional / tweedie proposal's solves per step; JVP+VJP: batched "
                  f"products C_t v of the tweedie proposal on a network prior, per step, not counted in NFE):", "",
              "| task | SMC proposal | SMC wall (s) | network (s) | NFE | particle evals | ESS final | ESS min | "
              "resamplings | RED-Diff wall (s) | SMC / RED-Diff | batch pass (s) | cost ratio / step | per call | "
              "CG calls / step | JVP+VJP / step |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        red = row["reddiff"]
        steps_run = row['hyperparameters']['steps']
        lines.append(f"| {row['task']} | {row.get('proposal')} | {row['wall_seconds']:.2f} | "
                     f"{row['network_seconds']:.2f} | {row['nfe']} | "
                     f"{row['particle_evaluations']} | {_cell(row['ess_final'], '.1f')} | "
                     f"{_cell(row['ess_min'], '.1f')} | {row['resampling_events']} | "
                     f"{_cell(red['wall_seconds'], '.2f')} | {_cell(row['smc_over_reddiff'], '.1f')}x | "
                     f"{row['batch_pass_seconds']:.4f} | {row['cost_ratio_per_step']:.2f} | "
                     f"{row['cost_ratio_per_call']:.2f} | "
                     f"{row['cg_iterations'] / steps_run:.1f} | {row.get('jacobian_products', 0) / steps_run:.1f} |")
    notes = [f"{row['task']}: SMC {row['note']}" for row in report["rows"] if row["note"]]
    notes += [f"{row['task']}: RED-Diff {row['reddiff']['note']}" for row in report["rows"] if row["reddiff"]["note"]]
    if any(row.get("tweedie_covariance") == "jacobian" for row in report["rows"]):
        notes.append("The tweedie proposal on a network prior uses the autodiff Tweedie covariance and is not "
                     "reweighted (invdiff/samplers/smc.py, module docstring): its ESS = N means 'equal weights by "
                     "construction', not a converged importance sampler; its particles are independent runs of a "
                     "moment-projected (TMPD-like) posterior chain.")
    if report.get("size"):
        lines += ["", f"Small images: tasks built at {report['size']} px (MRI from a synthetic 4-coil scan of the T1 "
                      f"slice) with the shipped network priors."]
    if report["quick"]:
        lines += ["", "Quick mode: tiny images and an analytic prior (an FFT Wiener filter, cheaper than the "
                      "operator), so the numbers check the pipeline only; the cost ratios measure solver overhead."]
    lines += ["", "Calibration is measured on the images the metrics score: for MRI and inpainting the centre "
                  "is the magnitude of the weighted mean and the std the weighted std of the particles' magnitude "
                  "images; for CT the real image and the sampler's own std. NFE counts batched network calls (one "
                  "per step, plus Langevin moves after each resampling); ESS is taken after each step's "
                  "reweighting, so its minimum is the low point before a resampling.", *notes, ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images, analytic prior, 20 steps (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--particles", type=int, default=16, help="SMC particles N (default 16)")
    parser.add_argument("--steps", type=int, default=None, help="steps of SMC and RED-Diff (100; quick: 20)")
    parser.add_argument("--reddiff-steps", type=int, default=None,
                        help="RED-Diff's steps when they should differ from SMC's (a few SMC steps are affordable "
                             "on a CPU where RED-Diff at so few steps is broken; default: --steps)")
    parser.add_argument("--mri-prior", default=None, help="MRI prior name or exported .json (brain-mri-complex)")
    parser.add_argument("--ct-prior", default=None, help="CT prior name or exported .json (ct-phantom-anatomy)")
    parser.add_argument("--network-dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the network (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batch passes per task (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (created if missing)")
    parser.add_argument("--set", action="append", default=[], metavar="SOLVER:NAME=VALUE",
                        help="hyperparameter of smc or reddiff over the task settings, e.g. smc:proposal=conditional")
    parser.add_argument("--tag", default="", help="suffix of the report's file name (e.g. the settings compared)")
    parser.add_argument("--proposals", default=None,
                        help="comma-separated SMC proposals, one row each per task (default: the task settings')")
    parser.add_argument("--size", type=int, default=None,
                        help="build the tasks at this many px (synthetic 4-coil MRI scan) with the network priors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from invdiff.tasks import resolve_device

    names = parse_tasks(args.tasks)
    if args.tag and not all(c.isalnum() or c in "._-" for c in args.tag):
        raise ValueError(f"--tag {args.tag!r}: use letters, digits, '.', '_' and '-' only (it names a file)")
    overrides = settings.parse_set(args.set)
    for solver in overrides:
        if solver not in ("smc", "reddiff"):
            raise ValueError(f"--set {solver}:...: this benchmark runs smc and reddiff only")
    for option, value in (("--particles", args.particles), ("--threads", args.threads), ("--repeats", args.repeats),
                          ("--steps", args.steps if args.steps is not None else 1),
                          ("--reddiff-steps", args.reddiff_steps if args.reddiff_steps is not None else 1)):
        if value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value}")
    from invdiff.samplers.smc import PROPOSALS
    proposals = [None] if args.proposals is None else [p.strip() for p in args.proposals.split(",") if p.strip()]
    if args.proposals is not None and (not proposals or any(p not in PROPOSALS for p in proposals)):
        raise ValueError(f"--proposals: expected a comma-separated subset of {', '.join(PROPOSALS)}, "
                         f"got {args.proposals!r}")
    if args.size is not None and (args.quick or args.size < 16):
        raise ValueError(f"--size: expected at least 16 px and no --quick (quick mode has its own sizes), "
                         f"got {args.size}")
    if args.quick and (args.mri_prior or args.ct_prior):
        raise ValueError("--quick runs the analytic prior; drop --mri-prior / --ct-prior or drop --quick")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    steps = args.steps or (20 if args.quick else 100)
    reddiff_steps = args.reddiff_steps or steps
    dtype = _network_dtype(args.network_dtype, device)
    load_start = load_average()
    loaded = {} if args.quick else load_priors(args, names, device, dtype)

    def write_report(rows, tasks):
        """Write the JSON and Markdown with the rows so far (after every task: a long CPU run keeps what it
        finished if it is stopped)."""
        date = datetime.date.today().isoformat()
        report = {
            "date": date, "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                                  if device.type == "cuda" else platform.processor()
                                                                  or platform.machine()),
            "quick": args.quick, "steps": steps, "reddiff_steps": reddiff_steps, "seed": args.seed,
            "threads": torch.get_num_threads(),
            "network_dtype": str(dtype).replace("torch.", ""), "torch_version": torch.__version__,
            "invdiff_version": invdiff.__version__, "cpu_count": os.cpu_count(),
            "load_average_start": load_start, "load_average_end": load_average(),
            "command": "python -m benchmarks.smc_images " + " ".join(argv if argv is not None else sys.argv[1:]),
            "smc_settings": {"num_particles": args.particles, "steps": steps, "variant": "sde"},
            "size": args.size, "proposals": proposals if args.proposals is not None else None,
            "overrides": overrides,
            "priors": priors, "batch_pass_repeats": args.repeats, "cost_goal": COST_GOAL,
            "coverage_definition": f"|mean - truth| <= {COVERAGE_STDS} std; support: truth > {SUPPORT_FRACTION} max",
            "tasks": {task.name: {"in_shape": list(task.in_shape), **{k: v for k, v in task.info.items()
                                                                       if isinstance(v, (str, int, float))}}
                      for task in tasks},
            "rows": rows,
        }
        stem = (f"smc_images-{date}-{device.type}{'' if steps == 100 or args.quick else f'-{steps}steps'}"
                f"{f'-{args.size}px' if args.size else ''}{'-quick' if args.quick else ''}"
                f"{'-' + args.tag if args.tag else ''}")
        text = markdown(report)
        write_json_and_markdown(args.out, stem, report, text)
        log.info("wrote %s.json and .md", args.out / stem)
        return report, text

    rows, priors = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        tasks = build_tasks(names, args.quick, device, Path(workdir), size=args.size)
        set_overrides(tasks, overrides)
        for task in tasks:
            kind = PRIOR_KIND[task.name]
            prior = quick_prior(task, device) if args.quick else loaded[kind]
            priors[task.name if args.quick else kind] = prior_record(prior)
            batch_pass = batch_pass_seconds(prior, task, args.particles, args.repeats)
            reddiff = None
            for proposal in proposals:
                row = measure_smc(task, prior, args.particles, steps, args.seed, proposal)
                reddiff = reddiff or measure_reddiff(task, prior, reddiff_steps, args.seed)     # once per task
                row["reddiff"] = reddiff
                red_wall = reddiff["wall_seconds"]
                row.update(batch_pass_seconds=batch_pass,
                           cost_ratio_per_step=row["wall_seconds"] / steps / batch_pass,
                           cost_ratio_per_call=row["wall_seconds"] / max(row["nfe"], 1) / batch_pass,
                           smc_over_reddiff=row["wall_seconds"] / red_wall if red_wall else None)
                rows.append(row)
                report, text = write_report(rows, tasks[:tasks.index(task) + 1])
    print(text)
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:                       # bad input: one line, exit status 2 (as the invdiff CLI)
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
