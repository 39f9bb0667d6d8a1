"""Solvers side by side, one run: the same prior and the same input for every solver on every task.

For each task and solver: wall seconds, network seconds (inside the prior: forward passes, plus DPS's backward
passes), the solver overhead fraction ``(wall - network) / wall``, NFE, peak memory and PSNR/SSIM (fastMRI
protocol); and, per task, RED-Diff's time per reconstruction over DPS's at equal steps.

    python -m benchmarks.run                          # shipped priors, 100 steps: ~15 min on 1 CPU thread
    python -m benchmarks.run --quick                  # seconds: tiny images, analytic prior, 5 steps
    python -m benchmarks.run --device cuda            # bf16 around the network (--network-dtype) on CUDA
    python -m benchmarks.run --mri-prior PATH.json --ct-prior PATH.json --threads 1

Tasks (built by the task layer :mod:`invdiff.tasks`, so they are the recipes' problems):

* ``mri-4x``: ``data/brain_t1_multicoil.h5`` through the ``invdiff reconstruct`` pipeline (8 coils, ESPIRiT,
  fastMRI random mask at 4x, k-space 384 x 192), prior ``brain-mri-complex``;
* ``ct-60``: the held-out thorax phantom of ``data/ct_samples.h5`` at 128 px, 60 views, 1 % noise, prior
  ``ct-phantom-anatomy`` (fixed scale); ``--ct-geometries parallel,fan,limited`` adds ``ct-fan-60`` (flat-detector fan
  beam over 360 degrees) and ``ct-limited120-60`` (parallel beam over [0, 120) degrees);
* ``inpainting``: the T1 slice (192 x 192, complex, zero phase), 50 % random pixels, prior ``brain-mri-complex``.

Solvers: ``--solvers`` (default reddiff, dps, diffpir, ddrm and the classical cg-sense, l1-wavelet, tv), each
task's baseline first (zero-filled / FBP); later solvers add their rows by name. Diffusion solvers run at
``--steps`` each with the task family's row of :mod:`invdiff.settings` (DPS's tuned zeta, RED-Diff's FBP start on
CT). Before timing, the prior is called once at each task's shape (warm-up).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the run minus the allocation at its start; on
CPU the peak resident set size, sampled every 2 ms during the run, minus the RSS at its start (torch's CPU
allocator is invisible to ``tracemalloc``, and ``ru_maxrss`` is a process-lifetime high-water mark).

Writes ``benchmarks/results/<date>-<device>.json``, ``.md`` and ``.png`` (PSNR against wall time per image, one panel
per task: the quality-for-time trade at a glance; ``-quick`` appended in quick mode), atomically.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path

import h5py
import numpy as np
import torch

if __package__ in (None, ""):                  # `python benchmarks/run.py` as well as `python -m benchmarks.run`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import invdiff  # noqa: E402
from invdiff.compare import resolve_prior
from benchmarks.reports import write_json_and_markdown  # noqa: E402
from invdiff.errors import UnsupportedOperatorError
from invdiff.io import atomic_path
from invdiff.priors.analytic import smooth_gaussian_prior
from invdiff.priors.loading import trained_steps
from invdiff.registry import needs_prior
from invdiff.samplers._common import call_prior, expand_sigma, timed
from invdiff.tasks import Task, block_average, ct_task, inpainting_task, scan_tasks, solve

log = logging.getLogger("benchmarks.run")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SOLVERS = ("reddiff", "dps", "diffpir", "ddrm", "cg-sense", "l1-wavelet", "tv")
ROW_KEYS = ("solver", "task", "wall_seconds", "network_seconds", "init_seconds", "overhead_fraction",
            "loop_overhead_fraction", "nfe", "peak_memory_mb", "psnr", "ssim", "note")


# ---- memory ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    """Current resident set size (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of a block above its starting level, in MB: CUDA allocations, or the sampled CPU RSS."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.megabytes: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.megabytes = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2 ** 20
            return False
        if self._start is None:
            return False
        self._stop.set()
        self._thread.join()
        rss = _rss_bytes()
        self._peak = max(self._peak, rss or 0)
        self.megabytes = (self._peak - self._start) / 2 ** 20
        return False


# ---- tasks -----------------------------------------------------------------------------------------------
def _t1_image(size: int | None = None) -> np.ndarray:
    with h5py.File(REPO / "data" / "brain_t1_multicoil.h5", "r") as h5:
        image = h5["reconstruction_rss"][0]
    return image if size is None else block_average(image, size)


def build_tasks(quick: bool, device: torch.device, workdir: Path,
                ct_geometries: tuple[str, ...] = ("parallel",)) -> list[tuple[Task, str]]:
    """(task, prior kind) pairs: prior kind "mri" or "ct". Quick: 48 / 32 px images (a synthetic scan).
    ct_geometries: the CT task at 60 views in each geometry (parallel, fan, limited: 120 degrees)."""
    from invdiff.datasets.synthetic import write_fake_fastmri
    from invdiff.operators.inpainting import random_pixel_mask

    if quick:
        image = _t1_image(48)
        scan = workdir / "quick_scan.h5"
        write_fake_fastmri(scan, image, num_coils=4, noise_level=0.01 * float(image.max()), seed=0)
        mri = scan_tasks(scan, [4], device=device, center_fraction=0.17)[0]
        ct_size, inpaint_image = 32, _t1_image(32)
    else:
        mri = scan_tasks(REPO / "data" / "brain_t1_multicoil.h5", [4], device=device)[0]
        ct_size, inpaint_image = 128, _t1_image()
    mri.name = "mri-4x"
    with h5py.File(REPO / "data" / "ct_samples.h5", "r") as h5:
        phantom = block_average(h5["images"][3], ct_size)                  # 'thorax', held out
    cts = [(ct_task(phantom, 60, noise_fraction=0.01, device=device, geometry=geometry), "ct")
           for geometry in ct_geometries]
    inpainting = inpainting_task(inpaint_image, random_pixel_mask(inpaint_image.shape, 0.5, generator=0),
                                 name="inpainting", device=device)
    return [(mri, "mri"), *cts, (inpainting, "mri")]


def load_priors(args, tasks, device: torch.device) -> dict:
    """One prior per task (the same object for tasks of the same modality, except analytic ones, which have
    a fixed image shape), cast to the network dtype."""
    dtype = _network_dtype(args, device)
    priors, loaded = {}, {}
    for task, kind in tasks:
        if args.quick:
            shape = task.in_shape
            prior = smooth_gaussian_prior(shape, std=0.3, mean=0.3) if kind == "ct" else smooth_gaussian_prior(shape)
            priors[task.name] = prior.to(device)
            continue
        if kind not in loaded:
            loaded[kind] = resolve_prior(args.mri_prior if kind == "mri" else args.ct_prior, device).to(dtype)
        priors[task.name] = loaded[kind]
    return priors


def _network_dtype(args, device: torch.device) -> torch.dtype:
    name = args.network_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def warm_up(prior, task: Task) -> None:
    """One prior call at the task's shape: first-call allocations and kernel selection are not timed."""
    like = torch.zeros((1, *task.in_shape), device=task.images[0].problem.y.device)
    with torch.no_grad():
        call_prior(prior, like, expand_sigma(1.0, like))


# ---- measuring -------------------------------------------------------------------------------------------
def measure(task: Task, solver: str, prior, steps: int, seed: int, device: torch.device) -> dict:
    """One reconstruction of the task's (single) image with ``solver``, timed and scored: the task layer's
    problem, the settings table's hyperparameters (``steps`` for every diffusion solver), the seed rule."""
    from invdiff import metrics

    values = task.hyperparameters(solver, steps=steps if needs_prior(solver) else None)
    image = task.images[0]
    row = dict.fromkeys(ROW_KEYS)
    row.update(solver=solver, task=task.name, note="", hyperparameters=values)
    try:
        with PeakMemory(device) as memory, timed(image.problem.y) as wall:
            solution = solve(image, solver, prior, values, seed=seed)
    except UnsupportedOperatorError as err:
        row["note"] = f"n/a: {str(err).splitlines()[0]}"
        log.warning("%s on %s: %s", solver, task.name, row["note"])
        return row
    result = solution.result
    network = float(result.diagnostics.get("network_seconds", 0.0))
    init = float(result.diagnostics.get("init_seconds", 0.0))     # RED-Diff's A^+ y (a CG solve on SENSE)
    reconstruction = solution.image[None]
    scores = metrics.evaluate(image.target[None], reconstruction) if np.isfinite(reconstruction).all() else {}
    row.update(wall_seconds=wall.seconds, network_seconds=network,
               init_seconds=init,
               overhead_fraction=(wall.seconds - network) / wall.seconds if wall.seconds > 0 else None,
               loop_overhead_fraction=((wall.seconds - init - network) / (wall.seconds - init)
                                       if wall.seconds - init > 0 else None),
               nfe=int(result.diagnostics.get("nfe", 0)), peak_memory_mb=memory.megabytes,
               psnr=scores.get("psnr"), ssim=scores.get("ssim"),
               backward_passes=int(result.diagnostics.get("backward_passes", 0)))
    if not scores:
        row["note"] = "diverged: non-finite values"
    log.info("%s on %s: %.2f s (network %.2f s), PSNR %s", solver, task.name, wall.seconds, network,
             "n/a" if row["psnr"] is None else f"{row['psnr']:.2f}")
    return row


def reddiff_vs_dps(rows: list[dict]) -> dict:
    """Per task: RED-Diff's wall seconds over DPS's at equal steps (and the same for network seconds)."""
    ratios = {}
    by_key = {(row["solver"], row["task"]): row for row in rows}
    for task in dict.fromkeys(row["task"] for row in rows):
        red, dps = by_key.get(("reddiff", task)), by_key.get(("dps", task))
        if red and dps and red["wall_seconds"] and dps["wall_seconds"]:
            ratios[task] = {"reddiff_seconds": red["wall_seconds"], "dps_seconds": dps["wall_seconds"],
                            "reddiff_over_dps": red["wall_seconds"] / dps["wall_seconds"],
                            "dps_over_reddiff": dps["wall_seconds"] / red["wall_seconds"],
                            "steps": red["nfe"]}
    return ratios


# ---- report ----------------------------------------------------------------------------------------------
def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# Solvers side by side ({report['date']}, {report['device']})", "",
             f"Command: `{report['command']}`. {report['steps']} steps per diffusion solver; torch "
             f"{report['torch_version']}, {report['threads']} thread(s), network dtype {report['network_dtype']}; "
             f"1-minute load average {report['load_average_start']} at the start, {report['load_average_end']} at "
             f"the end (a shared machine: timings vary with load). Priors: "
             + "; ".join(f"{task}: {prior}" for task, prior in report["priors"].items()) + ".", "",
             "| task | solver | wall (s) | network (s) | init (s) | overhead | overhead w/o init | NFE | "
             "peak memory (MB) | PSNR (dB) | SSIM | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['task']} | {row['solver']} | {_cell(row['wall_seconds'], '.2f')} | "
                     f"{_cell(row['network_seconds'], '.2f')} | {_cell(row['init_seconds'], '.2f')} | "
                     f"{_cell(row['overhead_fraction'], '.1%')} | {_cell(row['loop_overhead_fraction'], '.1%')} | "
                     f"{_cell(row['nfe'], 'd')} | {_cell(row['peak_memory_mb'], '.1f')} | "
                     f"{_cell(row['psnr'], '.2f')} | {_cell(row['ssim'], '.4f')} | {row['note'][:60]} |")
    lines += ["", "RED-Diff's time per reconstruction against DPS at equal steps (DPS also backpropagates through "
                  "the network once per step):", "", "| task | steps | RED-Diff (s) | DPS (s) | DPS / RED-Diff |",
              "|---|---:|---:|---:|---:|"]
    for task, ratio in report["reddiff_vs_dps"].items():
        lines.append(f"| {task} | {ratio['steps']} | {ratio['reddiff_seconds']:.2f} | {ratio['dps_seconds']:.2f} | "
                     f"{ratio['dps_over_reddiff']:.2f}x |")
    lines += ["", "Overhead = (wall - network) / wall: the share of a run spent outside the prior (operator, "
                  "optimiser, noise). 'w/o init' leaves out the initialisation that RED-Diff reports separately "
                  "(init_seconds: A^+ y, a CG solve for SENSE). DPS's network time includes its backward pass. "
                  "Classical solvers have no network, so theirs is 100 %. Peak memory: "
              + report["memory_method"], ""]
    return "\n".join(lines)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): timings on a shared machine need it beside them."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images, analytic prior, 5 steps (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--steps", type=int, default=None, help="steps per diffusion solver (100; quick: 5)")
    parser.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS), help="comma-separated solver names")
    parser.add_argument("--mri-prior", default="brain-mri-complex", help="MRI prior name or exported path")
    parser.add_argument("--ct-prior", default="ct-phantom-anatomy", help="CT prior name or exported path")
    parser.add_argument("--ct-geometries", default="parallel",
                        help="comma-separated CT geometries of the 60-view task: parallel, fan, limited (120 degrees)")
    parser.add_argument("--network-dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the network (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (created if missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from invdiff.tasks import resolve_device
    from invdiff.registry import check_solver_names

    solvers = check_solver_names(args.solvers.split(","))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 100)
    load_start = load_average()
    with tempfile.TemporaryDirectory() as workdir:
        tasks = build_tasks(args.quick, device, Path(workdir), tuple(args.ct_geometries.split(",")))
        priors = load_priors(args, tasks, device)
        rows = []
        for task, _ in tasks:
            warm_up(priors[task.name], task)
            order = [task.baseline] + [name for name in solvers if name != task.baseline]
            for solver in order:
                rows.append(measure(task, solver, priors[task.name], steps, args.seed, device))
    date = datetime.date.today().isoformat()
    report = {
        "date": date, "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                              if device.type == "cuda" else platform.processor()
                                                              or platform.machine()),
        "quick": args.quick, "steps": steps, "threads": torch.get_num_threads(),
        "network_dtype": str(_network_dtype(args, device)).replace("torch.", ""),
        "torch_version": torch.__version__, "invdiff_version": invdiff.__version__, "cpu_count": os.cpu_count(),
        "load_average_start": load_start, "load_average_end": load_average(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "priors": {task.name: _prior_name(priors[task.name]) for task, _ in tasks},
        "tasks": {task.name: {"in_shape": list(task.in_shape), **{k: v for k, v in task.info.items()
                                                                   if isinstance(v, (str, int, float))}}
                  for task, _ in tasks},
        "memory_method": ("torch.cuda.max_memory_allocated above the start of the run" if device.type == "cuda" else
                          "peak RSS sampled every 2 ms during the run, above the RSS at its start"),
        "rows": rows, "reddiff_vs_dps": reddiff_vs_dps(rows),
    }
    stem = f"{date}-{device.type}{'-quick' if args.quick else ''}"
    write_json_and_markdown(args.out, stem, report, markdown(report))
    quality_for_time_figure(report, args.out / f"{stem}.png")
    log.info("wrote %s.json, .md and .png", args.out / stem)
    return report


def quality_for_time_figure(report: dict, path: Path) -> Path:
    """PSNR against wall seconds per image, one panel per task, one labelled point per solver (log time axis):
    what a user choosing a solver weighs, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in report["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in report["rows"]:
            if row["task"] != task or row["psnr"] is None or not row["wall_seconds"]:
                continue
            diffusion = row["nfe"] not in (None, 0)
            ax.scatter(row["wall_seconds"], row["psnr"], marker="o" if diffusion else "s",
                       color="tab:blue" if diffusion else "tab:grey")
            ax.annotate(row["solver"], (row["wall_seconds"], row["psnr"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds per image")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"quality for time ({report['device']}, {report['threads']} thread(s), {report['steps']} steps; "
                 f"circles: diffusion, squares: classical)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _prior_name(prior) -> str:
    metadata = getattr(prior, "metadata", {}) or {}
    name = getattr(prior, "name", type(prior).__name__)
    steps = trained_steps(metadata)
    return f"{name} (step {steps})" if steps is not None else name


if __name__ == "__main__":
    main()
