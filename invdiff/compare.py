"""Compare solvers on identical inputs: plan, run, score and write one table and one figure per task.

The problems come from the task layer (:mod:`invdiff.tasks`), the hyperparameters from the settings table
(:mod:`invdiff.settings`), so a row reproduces ``invdiff reconstruct --solver NAME --seed S`` on the same slice
bit for bit (``tests/test_compare.py`` checks it). Like for like means every solver receives

* the *same* problem: its own copy of the task's ``y``, and every row records the sha256 of the input it was
  handed (``input_sha256``: ``y``, ``sigma_y`` and the operator's buffers), so "identical inputs" is checked;
* the same prior (loaded once), told each image's pixel spacing;
* for image ``i`` the generator of the seed rule (:func:`invdiff.tasks.image_generator`).

Outputs in ``out_dir``, each written atomically:

* ``metrics.csv``: ``solver, task, PSNR, SSIM, NMSE, seconds, NFE, note`` (fastMRI protocol per task volume,
  :data:`invdiff.metrics.PROTOCOL`; ``seconds``: wall time of the solver calls; NFE: prior evaluations);
* ``grid-<task>.png``: target, baseline, each solver and |error| maps (:func:`invdiff.plotting.save_comparison_grid`);
* ``compare.json``: per task the inputs (scale, noise level, mask), per row *every* hyperparameter it ran with
  and where the tuned ones came from, network seconds, input hashes, seed, prior and protocol;
* ``reconstructions.npz``: targets and every reconstruction (``"<task>/<solver>"``), to rescore without rerunning.

A solver that cannot run on a task's operator raises :class:`invdiff.errors.UnsupportedOperatorError` (DDRM on
multi-coil SENSE or CT, FBP on MRI, a 3-D solver on slices); its row reads ``n/a`` with that reason and the other
solvers go on.

``--3d`` (:func:`compare_volume`): the chosen slices of the scan as *one* volume problem per acceleration, posed by
:func:`invdiff.tasks.volume.fastmri_volume_task` exactly as ``invdiff reconstruct --3d`` poses it, so a row is that
command's result. Every solver gets that same volume problem (one ``input_sha256`` for all rows): the 3-D solvers
(dds, diffusion-mbir, tv-3d) couple the slices, the 2-D ones run their own algorithm on the multi-slice operator
with the 2-D prior applied slice by slice (:class:`invdiff.priors.base.SliceDenoiser`; the operator is separable
over slices, so only solver-wide scalars such as CG's step lengths or DPS's residual norm are shared across slices).
metrics.csv then holds PSNR and SSIM in the axial, coronal and sagittal planes
(:func:`invdiff.tasks.volume.plane_metrics`), the volume PSNR, seconds, NFE, peak memory (CUDA:
``max_memory_allocated``; CPU on Linux: the process's peak resident size over the solve, reset before each
solver, so it includes the loaded prior and torch) and every hyperparameter the solver ran with; one grid per plane.

``--safeguard``: each prior solver runs behind :func:`invdiff.tasks.safeguard.safeguarded_solve` (held-out k-space
columns, CG-SENSE as the reference), its row is the safeguarded result, its ``seconds`` and NFE include the check,
and a ``safeguard`` column gives the verdict per slice (``<slice>:kept`` / ``<slice>:overruled``; a volume has one,
``volume:...``); compare.json keeps both prediction errors. Without it nothing changes.

    >>> report = compare_scan("data/brain_t1_multicoil.h5", ["reddiff", "dps", "cg-sense"], [4, 8], "out",
    ...                       overrides={"dps": {"zeta": 0.3}}, steps=100)
    >>> report.row("reddiff", "4x").psnr
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import invdiff
from invdiff import settings
from invdiff.errors import InputError, UnsupportedOperatorError
from invdiff.io import atomic_open, atomic_write_json, jsonable
from invdiff.memory import peak_memory
from invdiff.registry import check_solver_names, needs_prior
from invdiff.samplers._common import timed
from invdiff.tasks import Task, resolve_device, solve

log = logging.getLogger(__name__)

CSV_COLUMNS = ("solver", "task", "PSNR", "SSIM", "NMSE", "seconds", "NFE", "note")
PLANES = ("axial", "coronal", "sagittal")
CSV_COLUMNS_3D = ("solver", "task", *(f"PSNR_{plane}" for plane in PLANES), *(f"SSIM_{plane}" for plane in PLANES),
                  "PSNR_volume", "NMSE", "seconds", "NFE", "peak_memory_MB", "hyperparameters", "note")
SAFEGUARD_COLUMN = "safeguard"
DEFAULT_SOLVERS = ("reddiff", "dps", "diffpir", "cg-sense", "l1-wavelet")
DEFAULT_SOLVERS_3D = ("dds", "diffusion-mbir", "tv-3d", "reddiff", "cg-sense")
DEFAULT_MRI_PRIOR = "brain-mri-complex"
DEFAULT_TOKEN_PRIOR = "tokens-brain"          # the shipped token prior of the token solvers (aps, masked-diffusion)
NOT_AVAILABLE = "n/a"


# ---- planning --------------------------------------------------------------------------------------------
def parse_solver_list(text: str) -> list[str]:
    """``"reddiff,dps,cg-sense"`` -> checked names."""
    return check_solver_names(str(text).split(","))


def parse_accelerations(text: str) -> list[int]:
    """``"4,8"`` -> ``[4, 8]`` (positive integers)."""
    values = []
    for part in str(text).split(","):
        try:
            value = int(part)
        except ValueError:
            raise InputError(f"--accel: expected comma-separated integers such as '4,8', got {text!r}") from None
        if value < 1:
            raise InputError(f"--accel: accelerations must be >= 1, got {value}")
        values.append(value)
    return values


def resolve_prior(prior, device: torch.device, default: str = DEFAULT_MRI_PRIOR):
    """A loaded prior on ``device``: a Denoiser as given, a shipped name or an exported path, or ``default``.

    A name or path comes from the user, so a file that cannot be loaded is bad input (:class:`InputError`).
    """
    if prior is None or isinstance(prior, (str, Path)):
        from safetensors import SafetensorError

        from invdiff.priors.loading import load_prior
        try:
            return load_prior(str(prior or default), device=device)
        except (ValueError, FileNotFoundError, IsADirectoryError, SafetensorError) as err:
            raise InputError(f"--prior {prior or default}: {str(err).splitlines()[0]}") from err
    return prior.to(device)


def prior_for_solver(solver: str, prior, device: torch.device):
    """The prior ``solver`` runs on: a token prior (``--prior PATH`` to an exported one) for solvers registered with
    ``prior="tokens"`` (APS, masked diffusion), else :func:`resolve_prior`'s continuous one."""
    from invdiff.registry import get_solver

    if get_solver(solver).metadata.get("prior") != "tokens":
        return resolve_prior(prior, device)
    if prior is not None and not isinstance(prior, (str, Path)):
        return prior
    if prior is None:
        from invdiff.priors.loading import shipped_token_priors
        shipped = shipped_token_priors()
        if not shipped:
            raise InputError(f"--solver {solver} needs a token prior and none ships: train one with `invdiff "
                             f"train-prior --kind tokens ...` (invdiff/priors/tokens.py) and pass --prior PATH")
        prior = DEFAULT_TOKEN_PRIOR if DEFAULT_TOKEN_PRIOR in shipped else shipped[0]
    from invdiff.priors.tokens import load_token_prior
    try:
        return load_token_prior(prior, device=device)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise InputError(f"--prior {prior}: {str(err).splitlines()[0]}") from err


def check_prior_fits(prior, task: Task) -> None:
    """The prior's channels (and fixed image size, for analytic priors) must match the task's images (a volume's:
    its slices, which the prior sees one by one)."""
    channels, *size = task.in_shape
    if is_volume(task):
        size = size[1:]
    prior_channels = getattr(prior, "channels", None)
    name = getattr(prior, "name", type(prior).__name__)
    if prior_channels is not None and int(prior_channels) != int(channels):
        raise InputError(f"prior {name} has {prior_channels} channels but the {task.name} images have {channels} "
                         f"(shape {task.in_shape}); use a prior for this modality")
    prior_size = getattr(prior, "image_size", None)
    if prior_size is not None and tuple(prior_size) != tuple(size):
        raise InputError(f"prior {name} is defined on {tuple(prior_size)} images but the {task.name} images are "
                         f"{tuple(size)}")


def set_overrides(tasks: Sequence[Task], overrides: dict[str, dict[str, Any]] | None) -> None:
    """Put the user's typed overrides (``{"dps": {"zeta": 0.3}}``, see :func:`invdiff.settings.parse_set`) on
    every task, over what the task had; they win over the tuned settings of the task's family."""
    for solver, values in (overrides or {}).items():
        check_solver_names([solver], flag="--set")
        settings.check(solver, values)
        for task in tasks:
            task.overrides.setdefault(solver, {}).update(values)


# ---- running ---------------------------------------------------------------------------------------------
@dataclass
class SolverRow:
    """One solver on one task: scores against the task's targets, cost, and exactly what it ran with."""

    solver: str
    task: str
    psnr: float | None = None
    ssim: float | None = None
    nmse: float | None = None
    seconds: float | None = None
    nfe: int | None = None
    network_seconds: float | None = None
    note: str = ""
    hyperparameters: dict = field(default_factory=dict)
    tuned_from: dict = field(default_factory=dict)
    input_sha256: list[str] = field(default_factory=list)
    reconstruction: np.ndarray | None = field(default=None, repr=False)
    # Set only where they apply (absent from the records otherwise): volumes, and --safeguard's prior solvers.
    planes: dict | None = None              # plane_metrics: {"psnr": {plane: dB}, "ssim": {...}, "volume_psnr": dB}
    peak_memory_bytes: int | None = None
    peak_memory_source: str | None = None
    safeguard: list[dict] | None = None     # per slice (or per volume): Verdict.as_record() plus "slice"

    @property
    def ran(self) -> bool:
        return self.reconstruction is not None

    def verdicts(self) -> str:
        """``"0:kept 1:overruled"``: the safeguard's verdict per slice ('' when it did not run on this row)."""
        return " ".join(f"{record['slice']}:{record['verdict']}" for record in self.safeguard or [])

    def csv_record(self) -> dict:
        record = {"solver": self.solver, "task": self.task, "PSNR": _fmt(self.psnr, ".4f"),
                  "SSIM": _fmt(self.ssim, ".5f"), "NMSE": _fmt(self.nmse, ".6g"), "seconds": _fmt(self.seconds, ".3f"),
                  "NFE": NOT_AVAILABLE if self.nfe is None else str(self.nfe), "note": self.note,
                  SAFEGUARD_COLUMN: self.verdicts()}
        planes = self.planes or {}
        for plane in PLANES:
            record[f"PSNR_{plane}"] = _fmt(planes.get("psnr", {}).get(plane), ".4f")
            record[f"SSIM_{plane}"] = _fmt(_defined(planes.get("ssim", {}).get(plane)), ".5f")
        record["PSNR_volume"] = _fmt(planes.get("volume_psnr"), ".4f")
        record["peak_memory_MB"] = _fmt(None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2 ** 20,
                                        ".1f")
        record["hyperparameters"] = json.dumps(jsonable(self.hyperparameters), sort_keys=True)
        return record

    def json_record(self) -> dict:
        record = dataclasses.asdict(self)
        record.pop("reconstruction")
        for name in ("planes", "peak_memory_bytes", "peak_memory_source", "safeguard"):
            if record[name] is None:
                record.pop(name)
        return jsonable(record)


def is_volume(task: Task) -> bool:
    """Whether ``task`` is one volume problem (operator in_shape (C, D, H, W), :mod:`invdiff.tasks.volume`)."""
    return len(task.in_shape) == 4


def task_target(task: Task) -> np.ndarray:
    """The reference the rows are scored against: (images, H, W) for a task of images, (D, H, W) for a volume."""
    return task.images[0].target if is_volume(task) else task.target


def volume_unsupported(solver: str) -> str | None:
    """Why ``solver`` cannot take a volume problem (its ``--3d`` row reads n/a), or None when it can."""
    from invdiff.registry import get_solver

    if get_solver(solver).metadata.get("prior") == "tokens":
        return "a token prior has no slice-wise form"
    if "budget" in settings.hyperparameters(solver):
        return "an active solver chooses the lines of one 2-D scan"
    return None


def run_solver(task: Task, solver: str, *, prior=None, seed: int = 0, steps: int | None = None,
               progress: bool = False, safeguard: bool = False) -> SolverRow:
    """Run ``solver`` on every image of ``task`` with the task's effective hyperparameters, and score it.

    safeguard: a prior solver runs behind :func:`invdiff.tasks.safeguard.safeguarded_solve` (its row is the
    safeguarded result; seconds and NFE include the check). A volume task's row also gets plane metrics and the
    solve's peak memory."""
    values = task.hyperparameters(solver, steps=steps)
    row = SolverRow(solver, task.name, hyperparameters=values, tuned_from=settings.provenance(task.family, solver))
    volume = is_volume(task)
    guarded = safeguard and needs_prior(solver)
    reason = volume_unsupported(solver) if volume else None
    if reason:
        log.warning("%s on %s: %s %s", solver, task.name, NOT_AVAILABLE, reason)
        row.note = f"{NOT_AVAILABLE}: {solver} cannot take a volume: {reason}"
        return row
    images, seconds, nfe, network, verdicts, peaks = [], 0.0, 0, 0.0, [], []
    for image in task.images:
        callback = None
        if progress and needs_prior(solver):
            from invdiff.callbacks import ProgressBar
            callback = ProgressBar(description=f"{solver} {task.name}")
        try:
            measured = peak_memory(image.problem.y.device) if volume else contextlib.nullcontext({})
            with timed(image.problem.y) as timer, measured as memory:
                if guarded:
                    from invdiff.tasks.safeguard import safeguarded_solve
                    solution, verdict = safeguarded_solve(image, solver, prior, values, seed=seed, callback=callback)
                else:
                    solution = solve(image, solver, prior, values, seed=seed, callback=callback)
        except UnsupportedOperatorError as err:
            log.warning("%s on %s: %s %s", solver, task.name, NOT_AVAILABLE, err)
            row.note = f"{NOT_AVAILABLE}: {str(err).splitlines()[0]}"
            return row
        if guarded:
            where = {"slice": "volume", "slices": image.info.get("slices")} if volume else {"slice": image.index}
            verdicts.append({**where, **verdict.as_record()})
            nfe += verdict.check_nfe
        row.input_sha256.append(solution.input_sha256)
        seconds += timer.seconds
        nfe += int(solution.result.diagnostics.get("nfe", 0))
        network += float(solution.result.diagnostics.get("network_seconds", 0.0))
        peaks.append(memory)
        images.append(solution.image)
    row.reconstruction = (images[0] if volume else np.stack(images)).astype(np.float32)
    row.seconds, row.nfe, row.network_seconds = seconds, nfe, network
    if guarded:
        row.safeguard = verdicts
    if volume:
        row.peak_memory_bytes = max(memory["bytes"] for memory in peaks)
        row.peak_memory_source = peaks[0]["source"]
    _score(row, task_target(task), volume=volume)
    log.info("%s on %s: PSNR %s SSIM %s in %.1f s (%d NFE)%s", solver, task.name, _fmt(row.psnr, ".2f"),
             _fmt(row.ssim, ".4f"), seconds, nfe, f"; safeguard {row.verdicts()}" if guarded else "")
    return row


def _score(row: SolverRow, target: np.ndarray, *, volume: bool = False) -> None:
    if not np.isfinite(row.reconstruction).all():
        row.note = "diverged: non-finite values in the reconstruction"
        row.psnr = row.ssim = row.nmse = math.nan
        return
    from invdiff import metrics

    scores = metrics.evaluate(target, row.reconstruction)
    row.psnr, row.ssim, row.nmse = scores["psnr"], scores["ssim"], scores["nmse"]
    if volume:
        from invdiff.tasks.volume import plane_metrics
        row.planes = plane_metrics(target, row.reconstruction)


def _fmt(value, spec: str) -> str:
    return NOT_AVAILABLE if value is None else format(value, spec)


def _defined(value):
    """A plane's SSIM is NaN where the plane has fewer than 7 slices (plane_metrics): shown as n/a, not nan."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@dataclass
class ComparisonReport:
    """All rows (tasks x solvers, baseline first per task) and the files written."""

    out_dir: Path
    rows: list[SolverRow]
    tasks: list[Task]
    metrics_csv: Path
    summary_json: Path
    figures: list[Path]

    def row(self, solver: str, task: str) -> SolverRow:
        for row in self.rows:
            if row.solver == solver and row.task == task:
                return row
        raise KeyError(f"no row for solver {solver!r} on task {task!r}")

    @property
    def volume(self) -> bool:
        return any(is_volume(task) for task in self.tasks)

    @property
    def safeguarded(self) -> bool:
        return any(row.safeguard for row in self.rows)

    def table(self) -> str:
        """The metrics as a Markdown table (n/a rows keep their reason); volumes: per plane, peak memory, and under
        the table the hyperparameters each solver ran with; --safeguard: the verdicts per slice."""
        guard = self.safeguarded
        if self.volume:
            head = ("| task | solver | PSNR ax / cor / sag (dB) | SSIM ax / cor / sag | NMSE | seconds | NFE | "
                    "peak memory (MB) |")
            rule = "|---|---|---|---|---:|---:|---:|---:|"
        else:
            head = "| task | solver | PSNR (dB) | SSIM | NMSE | seconds | NFE |"
            rule = "|---|---|---:|---:|---:|---:|---:|"
        lines = [head + (" safeguard |" if guard else "") + " note |", rule + ("---|" if guard else "") + "---|"]
        for row in self.rows:
            record = row.csv_record()
            if self.volume:
                planes = row.planes or {}
                psnr = " / ".join(_fmt(planes.get("psnr", {}).get(plane), ".2f") for plane in PLANES)
                ssim = " / ".join(_fmt(_defined(planes.get("ssim", {}).get(plane)), ".4f") for plane in PLANES)
                cells = [psnr, ssim, _fmt(row.nmse, ".4f"), _fmt(row.seconds, ".1f"), record["NFE"],
                         record["peak_memory_MB"]]
            else:
                cells = [_fmt(row.psnr, ".2f"), _fmt(row.ssim, ".4f"), _fmt(row.nmse, ".4f"), _fmt(row.seconds, ".1f"),
                         record["NFE"]]
            cells += [row.verdicts()] if guard else []
            lines.append(f"| {row.task} | {row.solver} | " + " | ".join(cells) + f" | {row.note} |")
        if self.volume:
            lines.append("")
            lines += [f"{row.solver} on {row.task}: {record}" for row in self.rows if row.task == self.tasks[0].name
                      for record in [json.dumps(jsonable(row.hyperparameters), sort_keys=True)]]
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        from invdiff import metrics

        notes = [f"metrics protocol: {metrics.PROTOCOL}"]
        if self.volume:
            source = next((row.peak_memory_source for row in self.rows if row.peak_memory_source), "n/a")
            notes += ["plane metrics: mean over each plane's 2-D images (all-zero target images left out; SSIM n/a "
                      "where a plane has fewer than 7 slices), one maxval per volume; NMSE: fastMRI, per volume",
                      f"peak memory: {source}"]
        return [self.table(), *notes, f"wrote {self.metrics_csv}", f"wrote {self.summary_json}",
                f"wrote {self.out_dir / 'reconstructions.npz'} (every image, to rescore)",
                *(f"wrote {figure}" for figure in self.figures)]


def compare_problems(tasks: Sequence[Task], solvers: Sequence[str], out_dir: str | Path, *, prior=None,
                     seed: int = 0, overrides: dict | None = None, steps: int | None = None, progress: bool = True,
                     title: str = "", info: dict | None = None, figures: bool = True,
                     safeguard: bool = False) -> ComparisonReport:
    """Run every solver (each task's baseline first) on every task and write metrics.csv, the grids, compare.json.

    prior: a loaded Denoiser (diffusion solvers need one; it must fit every task's images; volume tasks: a
    :class:`invdiff.priors.base.SliceDenoiser`); overrides: typed values per solver
    (:func:`invdiff.settings.parse_set`), over the tasks' tuned settings; steps: for every solver that takes
    ``steps``; figures: write the grid PNGs (volumes: one per plane); safeguard: prior solvers behind the held-out
    k-space check (module docstring).
    """
    tasks = list(tasks)
    if not tasks:
        raise InputError("compare: no tasks to run")
    volume = is_volume(tasks[0])
    if any(is_volume(task) != volume for task in tasks):
        raise InputError("compare: tasks mix volumes and images; compare them in separate runs")
    names = check_solver_names(solvers)
    set_overrides(tasks, overrides)
    baselines = list(dict.fromkeys(task.baseline for task in tasks if task.baseline not in names))
    for task in tasks:                                  # every hyperparameter checked before the heavy work
        for solver in baselines + names:
            task.hyperparameters(solver, steps=steps)
    diffusion_solvers = [name for name in baselines + names if needs_prior(name)]
    if diffusion_solvers:
        if prior is None:
            raise InputError(f"solvers {', '.join(diffusion_solvers)} need a prior; pass --prior")
        for task in tasks:
            check_prior_fits(prior, task)
    if safeguard:
        guarded = [name for name in names if needs_prior(name)]
        if not guarded:
            raise InputError(f"--safeguard checks prior solvers against the data; none of {', '.join(names)} uses a "
                             f"prior")
        from invdiff.tasks.safeguard import check_safeguard
        for task in tasks:
            for image in task.images:
                check_safeguard(image, seed=seed)
    from invdiff import metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for task in tasks:
        for solver in [task.baseline] + [name for name in names if name != task.baseline]:
            rows.append(run_solver(task, solver, prior=prior, seed=seed, steps=steps, progress=progress,
                                   safeguard=safeguard))
    total = time.perf_counter() - start
    columns = (CSV_COLUMNS_3D if volume else CSV_COLUMNS) + ((SAFEGUARD_COLUMN,) if safeguard else ())
    metrics_csv = write_metrics_csv(out_dir / "metrics.csv", rows, columns=columns)
    written = []
    if figures:
        for task in tasks:
            written += write_grids(out_dir, task, [row for row in rows if row.task == task.name], title=title)
    extra = {}
    if volume:
        extra["volume"] = {"planes": list(PLANES), "plane_metrics": "invdiff.tasks.volume.plane_metrics: mean over "
                           "the plane's 2-D images of their PSNR / SSIM, one maxval (the target's maximum) per volume",
                           "peak_memory": next((row.peak_memory_source for row in rows if row.peak_memory_source),
                                               None)}
    if safeguard:
        extra["safeguard"] = {"reference": "cg-sense", "fraction": 0.2, "tolerance": 1.0,
                              "rule": "invdiff.tasks.safeguard: held-out k-space columns; a prior solver's row is its "
                                      "own image if it predicts them no worse than the reference, else the reference's"}
    summary = {
        "title": title, "seed": seed, "seed_rule": "generator per image: seed * 1000003 + image index",
        "solvers": names, "steps": steps, "metrics_protocol": metrics.PROTOCOL,
        "prior": prior_record(prior) if diffusion_solvers else None, "invdiff_version": invdiff.__version__,
        "torch_version": torch.__version__, "total_seconds": total,
        "tasks": {task.name: {"family": task.family, "baseline": task.baseline, "images": len(task.images),
                              "in_shape": list(task.in_shape), **task.info,
                              "per_image": [{**image.info, "spacing_mm": image.spacing_mm} for image in task.images],
                              "overrides": task.overrides} for task in tasks},
        "rows": [row.json_record() for row in rows], **extra, **(info or {}),
    }
    summary_json = atomic_write_json(out_dir / "compare.json", jsonable(summary))
    write_reconstructions(out_dir / "reconstructions.npz", tasks, rows)
    return ComparisonReport(out_dir, rows, tasks, metrics_csv, summary_json, written)


def compare_scan(scan: str | Path, solvers: Sequence[str], accelerations: Sequence[int], out_dir: str | Path, *,
                 prior=None, seed: int = 0, slices: str | None = None, overrides: dict | None = None,
                 device: str = "auto", progress: bool = True, steps: int | None = None,
                 center_fraction: float | None = None, mask_kind: str = "random",
                 figures: bool = True, safeguard: bool = False) -> ComparisonReport:
    """Every solver on the chosen slices of a fastMRI scan at each acceleration, on identical inputs.

    solvers: registered names (zero-filled is added first as the baseline); accelerations: e.g. ``[4, 8]``
    (fastMRI masks seeded by the file name, centre fraction 0.08 at 4x and 0.04 at 8x unless given);
    prior: a loaded Denoiser, a shipped name or an exported path (default ``brain-mri-complex``; loaded only
    when a diffusion solver is listed); overrides: typed values per solver, over the MRI row of the settings table;
    safeguard: each prior solver's row is its safeguarded result, with the verdict per slice.
    Bad input raises :class:`InputError` before any solver runs.
    """
    from invdiff.tasks import scan_tasks

    names, accelerations, torch_device = _check_scan_request(scan, solvers, accelerations, overrides, steps, device)
    tasks = scan_tasks(scan, accelerations, slices=slices, device=torch_device, center_fraction=center_fraction,
                       mask_kind=mask_kind)
    loaded = resolve_prior(prior, torch_device) if any(needs_prior(name) for name in names) else None
    return compare_problems(tasks, names, out_dir, prior=loaded, seed=seed, overrides=overrides, steps=steps,
                            progress=progress, title=Path(scan).name,
                            info={"scan": str(scan), "device": str(torch_device)}, figures=figures,
                            safeguard=safeguard)


def _check_scan_request(scan, solvers, accelerations, overrides, steps, device):
    """What a scan comparison (2-D or --3d) checks before any heavy work: solver names, every --set value against
    the settings table, the accelerations, the device, the file; returns (names, accelerations, device)."""
    names = check_solver_names(solvers)
    for solver, values in (overrides or {}).items():
        check_solver_names([solver], flag="--set")
        settings.effective(solver, "mri", values, steps=steps)
    accelerations = [int(a) for a in accelerations]
    if not accelerations or min(accelerations) < 1:
        raise InputError(f"accelerations must be positive integers, got {accelerations}")
    torch_device = resolve_device(device)
    if not Path(scan).is_file():
        raise InputError(f"{scan}: no such scan file")
    return names, accelerations, torch_device


def compare_volume(scan: str | Path, solvers: Sequence[str], accelerations: Sequence[int], out_dir: str | Path, *,
                   prior=None, seed: int = 0, slices: str | None = None, overrides: dict | None = None,
                   device: str = "auto", progress: bool = True, steps: int | None = None,
                   center_fraction: float | None = None, mask_kind: str = "random", figures: bool = True,
                   safeguard: bool = False, chunk: int = 16) -> ComparisonReport:
    """``invdiff compare --3d``: the chosen slices of a multi-coil fastMRI scan as one volume per acceleration
    (:func:`invdiff.tasks.volume.fastmri_volume_task`, as ``invdiff reconstruct --3d``), every solver on that same
    volume problem; rows scored per plane, with time, peak memory and every hyperparameter (module docstring).

    prior: as :func:`compare_scan`; it runs slice by slice through ``SliceDenoiser(prior, chunk)``. The 3-D solvers
    take the MRI row of the settings table like every other solver.

        >>> report = compare_volume("scan.h5", ["dds", "tv-3d", "reddiff", "cg-sense"], [4], "out", steps=50)
        >>> report.row("dds", "4x-3d").planes["psnr"]["coronal"]
    """
    from invdiff.priors.base import SliceDenoiser
    from invdiff.tasks.volume import fastmri_volume_task

    names, accelerations, torch_device = _check_scan_request(scan, solvers, accelerations, overrides, steps, device)
    tasks = [fastmri_volume_task(scan, acceleration=acceleration, center_fraction=center_fraction,
                                 mask_kind=mask_kind, slices=slices, device=torch_device)
             for acceleration in accelerations]
    loaded = None
    if any(needs_prior(name) and volume_unsupported(name) is None for name in names):
        loaded = resolve_prior(prior, torch_device)
        loaded = loaded if isinstance(loaded, SliceDenoiser) else SliceDenoiser(loaded, chunk=chunk)
    return compare_problems(tasks, names, out_dir, prior=loaded, seed=seed, overrides=overrides, steps=steps,
                            progress=progress, title=f"{Path(scan).name} (volume)",
                            info={"scan": str(scan), "device": str(torch_device), "slice_chunk": chunk},
                            figures=figures, safeguard=safeguard)


# ---- writing ---------------------------------------------------------------------------------------------
def write_reconstructions(path: str | Path, tasks: Sequence[Task], rows: Sequence[SolverRow]) -> Path:
    """Targets and reconstructions as float32 (images, H, W) arrays keyed ``"<task>/target"``, ``"<task>/<solver>"``
    (compressed npz, atomically), so scores can be recomputed, e.g. inside a foreground mask, without rerunning."""
    arrays = {f"{task.name}/target": task_target(task) for task in tasks}
    arrays.update({f"{row.task}/{row.solver}": row.reconstruction for row in rows if row.ran})
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def write_metrics_csv(path: str | Path, rows: Sequence[SolverRow], *, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """``columns`` (default ``solver, task, PSNR, SSIM, NMSE, seconds, NFE, note``; volumes :data:`CSV_COLUMNS_3D`;
    ``safeguard`` appended under --safeguard), one line per row, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.csv_record())
    with atomic_open(path, "w", newline="") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def write_grids(out_dir: Path, task: Task, rows: Sequence[SolverRow], *, title: str = "") -> list[Path]:
    """``grid-<task>.png`` (:func:`invdiff.plotting.save_comparison_grid`: the middle image); a volume gets one per
    plane, ``grid-<task>-<plane>.png``, showing its central plane with that plane's PSNR / SSIM."""
    from invdiff.plotting import save_comparison_grid

    ran = [row for row in rows if row.ran]
    name = _file_safe(task.name)
    heading = f"{title} {task.name}".strip()
    if not is_volume(task):
        return [save_comparison_grid(out_dir / f"grid-{name}.png", task.target,
                                     [(row.solver, row.reconstruction, row.psnr, row.ssim) for row in ran],
                                     baseline=task.baseline, title=heading)]
    from invdiff.tasks.volume import volume_planes

    written = []
    for plane in PLANES:
        images = [(row.solver, volume_planes(row.reconstruction, plane), (row.planes or {}).get("psnr", {}).get(plane),
                   (row.planes or {}).get("ssim", {}).get(plane)) for row in ran]
        target = volume_planes(task_target(task), plane)
        written.append(save_comparison_grid(out_dir / f"grid-{name}-{plane}.png", target, images,
                                            baseline=task.baseline, title=f"{heading}, {plane}"))
    return written


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def prior_record(prior) -> dict:
    """Name, sha256 of the weights, class and training steps (over a warm-start chain) of a prior, for the records
    outputs keep of what ran; an analytic prior has no weights (sha256 None, not an empty string)."""
    from invdiff.priors.base import SliceDenoiser

    if isinstance(prior, SliceDenoiser):            # a 2-D prior run slice by slice on volumes: record the prior
        prior = prior.prior
    metadata = getattr(prior, "metadata", {}) or {}
    steps = metadata.get("total_steps", metadata.get("steps"))
    return {"name": getattr(prior, "name", type(prior).__name__),
            "sha256": getattr(prior, "sha256", None) or metadata.get("sha256") or None, "class": type(prior).__name__,
            "steps_trained": steps}


__all__ = ["SolverRow", "ComparisonReport", "compare_scan", "compare_volume", "compare_problems", "run_solver",
           "set_overrides", "parse_solver_list", "parse_accelerations", "resolve_prior", "check_prior_fits",
           "is_volume", "task_target", "volume_unsupported", "peak_memory", "write_metrics_csv",
           "write_reconstructions", "write_grids", "prior_record", "CSV_COLUMNS", "CSV_COLUMNS_3D",
           "SAFEGUARD_COLUMN", "DEFAULT_SOLVERS", "DEFAULT_SOLVERS_3D", "DEFAULT_MRI_PRIOR"]
