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
multi-coil SENSE or CT, FBP on MRI); its row reads ``n/a`` with that reason and the other solvers go on.

    >>> report = compare_scan("data/brain_t1_multicoil.h5", ["reddiff", "dps", "cg-sense"], [4, 8], "out",
    ...                       overrides={"dps": {"zeta": 0.3}}, steps=100)
    >>> report.row("reddiff", "4x").psnr
"""
from __future__ import annotations

import csv
import dataclasses
import io
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
from invdiff.registry import check_solver_names, needs_prior
from invdiff.samplers._common import timed
from invdiff.tasks import Task, resolve_device, solve

log = logging.getLogger(__name__)

CSV_COLUMNS = ("solver", "task", "PSNR", "SSIM", "NMSE", "seconds", "NFE", "note")
DEFAULT_SOLVERS = ("reddiff", "dps", "diffpir", "cg-sense", "l1-wavelet")
DEFAULT_MRI_PRIOR = "brain-mri-complex"
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
    if prior is None or not isinstance(prior, (str, Path)):
        if prior is not None:
            return prior
        raise InputError(f"--solver {solver} needs a token prior and none ships yet: train one with `invdiff "
                         f"train-prior --kind tokens ...` (invdiff/priors/tokens.py) and pass --prior PATH")
    from invdiff.priors.tokens import load_token_prior
    try:
        return load_token_prior(prior, device=device)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise InputError(f"--prior {prior}: {str(err).splitlines()[0]}") from err


def check_prior_fits(prior, task: Task) -> None:
    """The prior's channels (and fixed image size, for analytic priors) must match the task's images."""
    channels, *size = task.in_shape
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

    @property
    def ran(self) -> bool:
        return self.reconstruction is not None

    def csv_record(self) -> dict:
        return {"solver": self.solver, "task": self.task, "PSNR": _fmt(self.psnr, ".4f"),
                "SSIM": _fmt(self.ssim, ".5f"), "NMSE": _fmt(self.nmse, ".6g"), "seconds": _fmt(self.seconds, ".3f"),
                "NFE": NOT_AVAILABLE if self.nfe is None else str(self.nfe), "note": self.note}

    def json_record(self) -> dict:
        record = dataclasses.asdict(self)
        record.pop("reconstruction")
        return jsonable(record)


def run_solver(task: Task, solver: str, *, prior=None, seed: int = 0, steps: int | None = None,
               progress: bool = False) -> SolverRow:
    """Run ``solver`` on every image of ``task`` with the task's effective hyperparameters, and score it."""
    values = task.hyperparameters(solver, steps=steps)
    row = SolverRow(solver, task.name, hyperparameters=values, tuned_from=settings.provenance(task.family, solver))
    images, seconds, nfe, network = [], 0.0, 0, 0.0
    for image in task.images:
        callback = None
        if progress and needs_prior(solver):
            from invdiff.callbacks import ProgressBar
            callback = ProgressBar(description=f"{solver} {task.name}")
        try:
            with timed(image.problem.y) as timer:
                solution = solve(image, solver, prior, values, seed=seed, callback=callback)
        except UnsupportedOperatorError as err:
            log.warning("%s on %s: %s %s", solver, task.name, NOT_AVAILABLE, err)
            row.note = f"{NOT_AVAILABLE}: {str(err).splitlines()[0]}"
            return row
        row.input_sha256.append(solution.input_sha256)
        seconds += timer.seconds
        nfe += int(solution.result.diagnostics.get("nfe", 0))
        network += float(solution.result.diagnostics.get("network_seconds", 0.0))
        images.append(solution.image)
    row.reconstruction = np.stack(images).astype(np.float32)
    row.seconds, row.nfe, row.network_seconds = seconds, nfe, network
    _score(row, task.target)
    log.info("%s on %s: PSNR %s SSIM %s in %.1f s (%d NFE)", solver, task.name, _fmt(row.psnr, ".2f"),
             _fmt(row.ssim, ".4f"), seconds, nfe)
    return row


def _score(row: SolverRow, target: np.ndarray) -> None:
    if not np.isfinite(row.reconstruction).all():
        row.note = "diverged: non-finite values in the reconstruction"
        row.psnr = row.ssim = row.nmse = math.nan
        return
    from invdiff import metrics

    scores = metrics.evaluate(target, row.reconstruction)
    row.psnr, row.ssim, row.nmse = scores["psnr"], scores["ssim"], scores["nmse"]


def _fmt(value, spec: str) -> str:
    return NOT_AVAILABLE if value is None else format(value, spec)


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

    def table(self) -> str:
        """The metrics as a Markdown table (n/a rows keep their reason)."""
        lines = ["| task | solver | PSNR (dB) | SSIM | NMSE | seconds | NFE | note |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
        for row in self.rows:
            lines.append(f"| {row.task} | {row.solver} | {_fmt(row.psnr, '.2f')} | {_fmt(row.ssim, '.4f')} | "
                         f"{_fmt(row.nmse, '.4f')} | {_fmt(row.seconds, '.1f')} | {row.csv_record()['NFE']} | "
                         f"{row.note} |")
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        from invdiff import metrics

        return [self.table(), f"metrics protocol: {metrics.PROTOCOL}", f"wrote {self.metrics_csv}",
                f"wrote {self.summary_json}", f"wrote {self.out_dir / 'reconstructions.npz'} (every image, to rescore)",
                *(f"wrote {figure}" for figure in self.figures)]


def compare_problems(tasks: Sequence[Task], solvers: Sequence[str], out_dir: str | Path, *, prior=None,
                     seed: int = 0, overrides: dict | None = None, steps: int | None = None, progress: bool = True,
                     title: str = "", info: dict | None = None, figures: bool = True) -> ComparisonReport:
    """Run every solver (each task's baseline first) on every task and write metrics.csv, the grids, compare.json.

    prior: a loaded Denoiser (diffusion solvers need one; it must fit every task's images); overrides: typed
    values per solver (:func:`invdiff.settings.parse_set`), over the tasks' tuned settings; steps: for every solver
    that takes ``steps``; figures: write the grid PNGs.
    """
    tasks = list(tasks)
    if not tasks:
        raise InputError("compare: no tasks to run")
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
    from invdiff import metrics
    from invdiff.plotting import save_comparison_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for task in tasks:
        for solver in [task.baseline] + [name for name in names if name != task.baseline]:
            rows.append(run_solver(task, solver, prior=prior, seed=seed, steps=steps, progress=progress))
    total = time.perf_counter() - start
    metrics_csv = write_metrics_csv(out_dir / "metrics.csv", rows)
    written = []
    if figures:
        for task in tasks:
            ran = [(row.solver, row.reconstruction, row.psnr, row.ssim)
                   for row in rows if row.task == task.name and row.ran]
            written.append(save_comparison_grid(out_dir / f"grid-{_file_safe(task.name)}.png", task.target, ran,
                                                baseline=task.baseline, title=f"{title} {task.name}".strip()))
    summary = {
        "title": title, "seed": seed, "seed_rule": "generator per image: seed * 1000003 + image index",
        "solvers": names, "steps": steps, "metrics_protocol": metrics.PROTOCOL,
        "prior": prior_record(prior) if diffusion_solvers else None, "invdiff_version": invdiff.__version__,
        "torch_version": torch.__version__, "total_seconds": total,
        "tasks": {task.name: {"family": task.family, "baseline": task.baseline, "images": len(task.images),
                              "in_shape": list(task.in_shape), **task.info,
                              "per_image": [{**image.info, "spacing_mm": image.spacing_mm} for image in task.images],
                              "overrides": task.overrides} for task in tasks},
        "rows": [row.json_record() for row in rows], **(info or {}),
    }
    summary_json = atomic_write_json(out_dir / "compare.json", jsonable(summary))
    write_reconstructions(out_dir / "reconstructions.npz", tasks, rows)
    return ComparisonReport(out_dir, rows, tasks, metrics_csv, summary_json, written)


def compare_scan(scan: str | Path, solvers: Sequence[str], accelerations: Sequence[int], out_dir: str | Path, *,
                 prior=None, seed: int = 0, slices: str | None = None, overrides: dict | None = None,
                 device: str = "auto", progress: bool = True, steps: int | None = None,
                 center_fraction: float | None = None, mask_kind: str = "random",
                 figures: bool = True) -> ComparisonReport:
    """Every solver on the chosen slices of a fastMRI scan at each acceleration, on identical inputs.

    solvers: registered names (zero-filled is added first as the baseline); accelerations: e.g. ``[4, 8]``
    (fastMRI masks seeded by the file name, centre fraction 0.08 at 4x and 0.04 at 8x unless given);
    prior: a loaded Denoiser, a shipped name or an exported path (default ``brain-mri-complex``; loaded only
    when a diffusion solver is listed); overrides: typed values per solver, over the MRI row of the settings table.
    Bad input raises :class:`InputError` before any solver runs.
    """
    from invdiff.tasks import scan_tasks

    names = check_solver_names(solvers)
    for solver, values in (overrides or {}).items():
        check_solver_names([solver], flag="--set")
        settings.effective(solver, "mri", values, steps=steps)            # validate before the heavy work
    accelerations = [int(a) for a in accelerations]
    if not accelerations or min(accelerations) < 1:
        raise InputError(f"accelerations must be positive integers, got {accelerations}")
    torch_device = resolve_device(device)
    if not Path(scan).is_file():
        raise InputError(f"{scan}: no such scan file")
    tasks = scan_tasks(scan, accelerations, slices=slices, device=torch_device, center_fraction=center_fraction,
                       mask_kind=mask_kind)
    loaded = resolve_prior(prior, torch_device) if any(needs_prior(name) for name in names) else None
    return compare_problems(tasks, names, out_dir, prior=loaded, seed=seed, overrides=overrides, steps=steps,
                            progress=progress, title=Path(scan).name,
                            info={"scan": str(scan), "device": str(torch_device)}, figures=figures)


# ---- writing ---------------------------------------------------------------------------------------------
def write_reconstructions(path: str | Path, tasks: Sequence[Task], rows: Sequence[SolverRow]) -> Path:
    """Targets and reconstructions as float32 (images, H, W) arrays keyed ``"<task>/target"``, ``"<task>/<solver>"``
    (compressed npz, atomically), so scores can be recomputed, e.g. inside a foreground mask, without rerunning."""
    arrays = {f"{task.name}/target": task.target for task in tasks}
    arrays.update({f"{row.task}/{row.solver}": row.reconstruction for row in rows if row.ran})
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def write_metrics_csv(path: str | Path, rows: Sequence[SolverRow]) -> Path:
    """``solver, task, PSNR, SSIM, NMSE, seconds, NFE, note``, one line per row, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.csv_record())
    with atomic_open(path, "w", newline="") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def prior_record(prior) -> dict:
    """Name, sha256 of the weights, class and training steps (over a warm-start chain) of a prior, for the records
    outputs keep of what ran; an analytic prior has no weights (sha256 None, not an empty string)."""
    metadata = getattr(prior, "metadata", {}) or {}
    steps = metadata.get("total_steps", metadata.get("steps"))
    return {"name": getattr(prior, "name", type(prior).__name__),
            "sha256": getattr(prior, "sha256", None) or metadata.get("sha256") or None, "class": type(prior).__name__,
            "steps_trained": steps}


__all__ = ["SolverRow", "ComparisonReport", "compare_scan", "compare_problems", "run_solver", "set_overrides",
           "parse_solver_list", "parse_accelerations", "resolve_prior", "check_prior_fits",
           "write_metrics_csv", "write_reconstructions", "prior_record", "CSV_COLUMNS",
           "DEFAULT_SOLVERS", "DEFAULT_MRI_PRIOR"]
