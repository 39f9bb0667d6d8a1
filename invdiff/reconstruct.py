"""Reconstruct a fastMRI scan slice by slice with any registered solver, and write a submission file.

The slices are posed by the task layer (:mod:`invdiff.tasks.scan`: mask, coil maps, noise level, normalisation,
output mapping), the hyperparameters come from the settings table (:func:`invdiff.settings.effective`, task family
``mri``), and the output file records every value the solver ran with. ``invdiff compare`` goes through the same
two functions, so its row for a solver is this command's result.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import invdiff
from invdiff import metrics, settings
from invdiff.compare import prior_for_solver, prior_record
from invdiff.errors import InputError
from invdiff.registry import check_solver_names, needs_prior
from invdiff.tasks import scan as scan_tasks
from invdiff.tasks.base import resolve_device, solve

log = logging.getLogger(__name__)


@dataclass
class ReconstructionRequest:
    """What ``invdiff reconstruct`` was asked to do; ``overrides`` are typed (:func:`invdiff.settings.parse_set`)."""

    scan: str
    solver: str
    out: str
    acceleration: int = 4
    center_fraction: float | None = None
    mask_kind: str = "random"
    slices: str | None = None
    device: str = "auto"
    seed: int = 0
    png: bool = False
    prior: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    progress: bool = True
    mask_file: str | None = None
    safeguard: bool = False                 # held-out k-space check (invdiff.tasks.safeguard) for prior solvers
    volume: bool = False                    # the chosen slices as one volume problem (3-D solvers: dds, ...)
    nifti: bool = False                     # also write the volume as NIfTI with its voxel size (needs volume)


@dataclass
class ReconstructionReport:
    out: Path
    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray | None
    metrics: dict | None
    zero_filled_metrics: dict | None
    seconds: float
    attrs: dict = field(default_factory=dict)
    figure: Path | None = None
    mask: np.ndarray | None = None          # the measured columns, when an active solver chose them
    voxel_size_mm: tuple | None = None      # --3d: (z, y, x) in mm
    nifti: Path | None = None

    def summary_lines(self) -> list[str]:
        count = self.reconstruction.shape[0]
        lines = [f"wrote {self.out} ({count} slice{'s' if count != 1 else ''}, {self.seconds:.1f} s)"]
        if self.metrics is not None:
            for label, values in (("zero-filled", self.zero_filled_metrics), ("reconstruction", self.metrics)):
                lines.append(f"{label:>15}: NMSE {values['nmse']:.4f}  PSNR {values['psnr']:.2f} dB  "
                             f"SSIM {values['ssim']:.4f}")
            lines.append(f"metrics protocol: {metrics.PROTOCOL}")
        else:
            lines.append("no target in the file: metrics not computed")
        if self.figure is not None:
            lines.append(f"wrote {self.figure}")
        if self.nifti is not None:
            lines.append(f"wrote {self.nifti}")
        return lines


def check_output(request: ReconstructionRequest, overwrite: bool = False) -> tuple[Path, Path | None]:
    """``--out`` (an existing folder, a ``.h5`` name, not an existing file unless ``overwrite``) and the figure
    path; :class:`InputError` before any work, so a refused run leaves nothing behind."""
    out = Path(request.out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise InputError(f"--out {out}: expected a .h5 file name (the fastMRI submission format)")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"--out {out}: folder {out.parent} is read-only")
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; expected a .h5 file name")
    figure = figure_path(request) if request.png else None
    for path in (out, figure):
        if path is not None and path.exists() and not overwrite:
            raise InputError(f"--out: {path} exists; pass --overwrite to replace it")
    return out, figure


def figure_path(request: ReconstructionRequest) -> Path:
    """Where ``--png`` puts the figure: next to ``--out`` (a ``.h5``, see :func:`check_output`) as ``.png``."""
    return Path(request.out).with_suffix(".png")


def reconstruct_volume(request: ReconstructionRequest) -> ReconstructionReport:
    """``--3d``: the chosen slices of a multi-coil scan as one volume problem (:mod:`invdiff.tasks.volume`); a 2-D
    prior sees the slices through :class:`invdiff.priors.base.SliceDenoiser`; nothing is written."""
    from invdiff.priors.base import SliceDenoiser
    from invdiff.tasks.volume import fastmri_volume_task

    start = time.perf_counter()
    solver = check_solver_names([request.solver], flag="--solver")[0]
    values = settings.effective(solver, "mri", request.overrides, steps=request.steps)
    device = resolve_device(request.device)
    task = fastmri_volume_task(request.scan, acceleration=request.acceleration,
                               center_fraction=request.center_fraction, mask_kind=request.mask_kind,
                               slices=request.slices, device=device)
    image = task.images[0]
    prior = None
    if needs_prior(solver):
        prior = SliceDenoiser(prior_for_solver(solver, request.prior, device), chunk=16)
    callback = None
    if request.progress and prior is not None:
        from invdiff.callbacks import ProgressBar
        callback = ProgressBar(description=f"{solver} volume ({task.in_shape[1]} slices)")
    solution = solve(image, solver, prior, values, seed=request.seed, callback=callback)
    zero_filled = solve(image, "zero-filled", None, {}, seed=request.seed).image
    target = image.target
    scores = zf_scores = None
    if target is not None:
        scores, zf_scores = metrics.evaluate(target, solution.image), metrics.evaluate(target, zero_filled)
    diagnostics = solution.result.diagnostics
    attrs = {"solver": solver, "hyperparameters": values, "tuned_from": settings.provenance("mri", solver),
             "seed": request.seed, "volume": True, "device": str(device), "nfe": int(diagnostics.get("nfe", 0)),
             "peak_memory_bytes": diagnostics.get("peak_memory_bytes"),
             "solver_seconds": float(diagnostics.get("seconds", 0.0)),
             "voxel_size_mm": list(task.info.get("voxel_size_mm", [])) or None,
             "invdiff_version": invdiff.__version__,
             **{k: v for k, v in task.info.items() if isinstance(v, (str, int, float, bool))}}
    if prior is not None:
        record = prior_record(prior.prior if hasattr(prior, "prior") else prior)
        attrs["prior"], attrs["prior_sha256"] = record["name"], record["sha256"]
    if scores is not None:
        attrs.update({f"metric_{k}": v for k, v in scores.items() if k != "protocol"})
        attrs["metrics_protocol"] = metrics.PROTOCOL
    report = ReconstructionReport(Path(request.out), solution.image.astype(np.float32), zero_filled.astype(np.float32),
                                  target, scores, zf_scores, time.perf_counter() - start, attrs)
    report.voxel_size_mm = task.info.get("voxel_size_mm")
    return report


@dataclass
class SliceResult:
    """One slice of a reconstruction before assembly: what :func:`assemble_report` needs of it (and what
    ``invdiff batch`` keeps on disk per finished slice)."""

    index: int
    image: np.ndarray                       # (H, W) float32, the output mapping applied
    zero_filled: np.ndarray
    target: np.ndarray | None
    scale: float
    sigma_kspace: float
    spacing_mm: float | None                # mm per pixel of the slice's image (None: unknown)
    nfe: int
    seconds: float
    device: str
    mask: np.ndarray | None = None          # (W,) bool: the columns an active solver measured
    order: list[int] | None = None          # ... in the order it measured them
    verdict: dict | None = None             # --safeguard: the held-out check's record


@dataclass
class ScanRun:
    """What every slice of one reconstruction shares: the solver, its effective settings, the prior, the mask."""

    request: ReconstructionRequest
    solver: str
    values: dict
    device: Any
    prior: Any
    mask: np.ndarray
    mask_info: dict
    slices: range
    active: bool


def prepare_run(request: ReconstructionRequest) -> ScanRun:
    """Check ``request`` against its scan and resolve what the slices share; :class:`InputError` before any work."""
    from invdiff.datasets.fastmri import read_scan

    if request.nifti:
        raise InputError("--nifti writes a volume: it needs --3d")
    solver = check_solver_names([request.solver], flag="--solver")[0]
    values = settings.effective(solver, "mri", request.overrides, steps=request.steps)
    if request.safeguard and not needs_prior(solver):
        raise InputError(f"--safeguard checks a prior against the data; {solver} uses no prior")
    device = resolve_device(request.device)
    prior = prior_for_solver(solver, request.prior, device) if needs_prior(solver) else None
    active = "budget" in values            # an active solver chooses its own lines, starting from the calibration block
    with read_scan(request.scan) as scan:
        chosen = scan_tasks.parse_slices(request.slices, scan.num_slices)
        mask, mask_info = scan_tasks.scan_mask(scan, acceleration=request.acceleration,
                                               center_fraction=request.center_fraction, mask_kind=request.mask_kind,
                                               mask_file=request.mask_file)
        scan_tasks.check_calibration(scan, mask)
        if active:
            if scan.mask is not None:
                raise InputError(f"{request.scan}: a test-set file holds only its own lines; {solver} needs a fully "
                                 f"sampled scan to measure the lines it chooses")
            mask = scan_tasks.calibration_block(mask)
            mask_info = {**mask_info, "mask_source": f"{solver}: starts from the calibration block, chooses the rest",
                         "sampled_columns": int(mask.sum())}
    return ScanRun(request, solver, values, device, prior, mask, mask_info, chosen, active)


def reconstruct_slices(run: ScanRun, indices=None):
    """Yield a :class:`SliceResult` per slice of ``indices`` (default: the request's slices), one at a time."""
    from invdiff.datasets.fastmri import read_scan

    request, solver, prior = run.request, run.solver, run.prior
    indices = list(run.slices if indices is None else indices)
    start = time.perf_counter()
    with read_scan(request.scan) as scan:
        for count, image in enumerate(scan_tasks.scan_images(scan, indices, run.mask, device=run.device), start=1):
            began = time.perf_counter()
            callback = None
            if request.progress and prior is not None:
                from invdiff.callbacks import ProgressBar
                callback = ProgressBar(description=f"{solver} slice {image.index} ({count}/{len(indices)})")
            verdict = None
            if request.safeguard:
                from invdiff.tasks.safeguard import safeguarded_solve
                solution, checked = safeguarded_solve(image, solver, prior, run.values, seed=request.seed,
                                                      callback=callback)
                verdict = {"slice": image.index, **checked.as_record()}
            else:
                solution = solve(image, solver, prior, run.values, seed=request.seed, callback=callback)
            diagnostics = solution.result.diagnostics
            measured = order = None
            if "mask" in diagnostics:                                    # the lines an active solver measured
                measured = np.asarray(diagnostics["mask"]).astype(bool)
                order = [int(i) for i in diagnostics.get("acquisition_order", [])]
            zero_filled = solve(image, "zero-filled", None, {}, seed=request.seed).image
            yield SliceResult(index=image.index, image=solution.image, zero_filled=zero_filled, target=image.target,
                              scale=image.info["scale"], sigma_kspace=image.info["sigma_kspace"],
                              spacing_mm=image.spacing_mm, nfe=int(diagnostics.get("nfe", 0)),
                              seconds=time.perf_counter() - began, device=str(run.device), mask=measured,
                              order=order, verdict=verdict)
            log.info("%s: slice %d done (%d of %d, %.1f s so far)", Path(request.scan).name, image.index, count,
                     len(indices), time.perf_counter() - start)


def assemble_report(run: ScanRun, results: list[SliceResult], seconds: float) -> ReconstructionReport:
    """The volume of ``results`` (in slice order), its metrics and the attrs every output records."""
    request = run.request
    reconstruction = np.stack([r.image for r in results]).astype(np.float32)
    zero_filled = np.stack([r.zero_filled for r in results]).astype(np.float32)
    targets = [r.target for r in results]
    target = None if any(t is None for t in targets) else np.stack(targets).astype(np.float32)
    scores = zf_scores = None
    if target is not None:
        scores, zf_scores = metrics.evaluate(target, reconstruction), metrics.evaluate(target, zero_filled)
    spacings = [r.spacing_mm for r in results if r.spacing_mm is not None]
    attrs = {
        "solver": run.solver, "hyperparameters": run.values, "tuned_from": settings.provenance("mri", run.solver),
        "seed": request.seed, "seed_rule": "generator per slice: seed * 1000003 + slice index",
        "slices": f"{run.slices.start}:{run.slices.stop}",
        "device": ",".join(sorted({r.device for r in results})), "nfe": sum(r.nfe for r in results),
        "normalisation": scan_tasks.NORMALISATION_NOTE, "scales": [r.scale for r in results],
        "sigma_kspace_estimates": [r.sigma_kspace for r in results],
        "noise_estimate": scan_tasks.NOISE_NOTE, "pixel_spacing_mm": spacings or None,
        "invdiff_version": invdiff.__version__, **run.mask_info,
    }
    if run.prior is not None:
        record = prior_record(run.prior)
        attrs["prior"], attrs["prior_sha256"] = record["name"], record["sha256"]
        attrs["prior_steps_trained"] = record["steps_trained"]
    verdicts = [r.verdict for r in results if r.verdict is not None]
    if verdicts:
        attrs["safeguard"] = verdicts          # per slice: held-out prediction errors and which solver's image was kept
    masks = [r.mask for r in results if r.mask is not None]
    if masks:
        attrs["acquisition_order"] = [r.order for r in results]        # per slice, the columns in the order measured
        attrs["sampled_columns"] = [int(m.sum()) for m in masks]
    if scores is not None:
        attrs.update({f"metric_{k}": v for k, v in scores.items() if k != "protocol"})
        attrs["metrics_protocol"] = metrics.PROTOCOL
    report = ReconstructionReport(Path(request.out), reconstruction, zero_filled, target, scores, zf_scores,
                                  seconds, attrs)
    if masks:
        report.mask = masks[0] if all(np.array_equal(m, masks[0]) for m in masks) else np.stack(masks)
    return report


def reconstruct_scan(request: ReconstructionRequest) -> ReconstructionReport:
    """Run ``request.solver`` on the chosen slices of ``request.scan``; nothing is written."""
    if request.volume:
        return reconstruct_volume(request)
    start = time.perf_counter()
    run = prepare_run(request)
    results = list(reconstruct_slices(run))
    return assemble_report(run, results, time.perf_counter() - start)


def reconstruct_scan_to_file(request: ReconstructionRequest, *, overwrite: bool = False) -> ReconstructionReport:
    """:func:`reconstruct_scan`, then the submission file (and figure) written atomically; an existing output is
    kept unless ``overwrite``."""
    from invdiff.datasets.submission import write_reconstruction

    out, figure = check_output(request, overwrite)
    report = reconstruct_scan(request)
    write_reconstruction(out, report.reconstruction, attrs=report.attrs, mask=report.mask)
    if request.nifti:
        from invdiff.tasks.volume import write_nifti
        nifti = out.with_suffix(".nii.gz")
        write_nifti(nifti, report.reconstruction, report.voxel_size_mm or (1.0, 1.0, 1.0))
        report.nifti = nifti
    if figure is not None:
        from invdiff.plotting import save_reconstruction_figure
        save_reconstruction_figure(figure, target=report.target, zero_filled=report.zero_filled,
                                   reconstruction=report.reconstruction,
                                   title=f"{request.solver} on {Path(request.scan).name}")
        report.figure = figure
    return report
