"""3-D reconstruction with 2-D priors: quality per plane, time and peak memory of DiffusionMBIR, DDS and baselines.

CT (default): a procedural 3-D CT phantom (``invdiff.tasks.volume.ct_phantom_3d``, fresh seeds) and the 3-D
Shepp-Logan, ``--views`` equispaced parallel-beam views of every axial slice, 1 % noise; solvers FBP, 3-D TV, the 2-D
solver slice by slice without the z-prior (DDS with lam 0: ``dds-2d``), DDS and DiffusionMBIR (``ct-phantom-anatomy``
prior). MRI (``--mri``): the first frame of nibabel's held-out ``example4d.nii.gz`` (24 x 96 x 128, 2.2 x 2 x 2 mm),
8-coil birdcage k-space, a fastMRI random mask per slice; solvers zero-filled, CG-SENSE, slice-wise RED-Diff, dds-2d,
DDS, DiffusionMBIR (``brain-mri-complex`` prior). Each row: PSNR / SSIM in the axial, coronal and sagittal planes
(mean over the plane's 2-D images, one maxval per volume, as DiffusionMBIR reports), seconds, peak memory, network
evaluations per slice. ``--depths`` measures the cost of DDS at several depths instead (how it scales).

On CPU every solver runs in a fresh process (``--isolate``, default there) so its peak resident memory is its own
(:mod:`invdiff.memory`: the peak resident size during the solve; the row also gives the process's resident size
before it). With ``--device cuda`` the network
runs under bf16 autocast (``--no-bf16`` for fp32), slices go through it ``--chunk`` at a time (default 64 on CUDA),
and peak memory is ``torch.cuda.max_memory_allocated``.

    python benchmarks/volume3d.py --size 32 --views 8 30 --threads 1                  # CPU CT table (small volume)
    python benchmarks/volume3d.py --mri --threads 1                                   # CPU MRI table
    python benchmarks/volume3d.py --size 32 --depths 8 16 32 --solvers dds             # cost at three depths
    python benchmarks/volume3d.py --size 256 --views 8 --device cuda                   # the 256^3 GPU run

Writes ``benchmarks/results/volume3d-<date>-<device>[-tag].{json,md}``.

The CT rows of ``invdiff.settings.TUNED`` for dds and diffusion-mbir come from runs of this script on tuning phantoms
(``--size 32 --depth 16 --views 30`` and 8, ``--seed 11`` and ``12``, ``--set dds:lam=L dds:rho=R``, one run per
value; the default ``--seed 7`` is the reported volume and was not used to choose):
``results/volume3d-2026-12-05-cpu-ct-sweep.md``, validated on seed 7 in ``-ct-tuned`` against ``-ct-paper-defaults``.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
if __package__ in (None, ""):                      # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reports import write_json_and_markdown  # noqa: E402

log = logging.getLogger("benchmarks.volume3d")

CT_SOLVERS = ("fbp", "tv-3d", "dds-2d", "dds", "dds-alternate", "diffusion-mbir", "mbir-cg5")
MRI_SOLVERS = ("zero-filled", "cg-sense", "reddiff", "dds-2d", "dds", "diffusion-mbir")
# Benchmark rows that are a registered solver with fixed changes (the row name says what differs).
ALIASES = {"dds-2d": ("dds", {"lam": 0.0}), "dds-alternate": ("dds", {"slice_axes": "alternate"}),
           "mbir-2d": ("diffusion-mbir", {"lam": 0.0}), "mbir-cg5": ("diffusion-mbir", {"cg_steps": 5})}
# Budget choices for a CPU run (the papers': DiffusionMBIR 2000 steps, DDS 50); recorded in every row.
CPU_STEPS = {"dds": 50, "diffusion-mbir": 100, "reddiff": 100}
# The classical references' weights for these volumes (3-D TV: swept 1e-4 / 3e-4 / 1e-3 on a 32^3 phantom at 8 views).
FIXED = {"ct": {"tv-3d": {"lam": 3e-4, "init": "fbp"}}, "mri": {"tv-3d": {"lam": 1e-2}}}


class AutocastDenoiser(torch.nn.Module):
    """A prior run under CUDA bf16 autocast, answering in float32 (STYLE 7: cast at the network boundary only)."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        for name in ("sigma_min", "sigma_max", "channels", "image_size"):
            setattr(self, name, getattr(prior, name))

    @property
    def dtype(self):
        return torch.float32

    def at_spacing(self, spacing_mm):
        inner = self.prior.at_spacing(spacing_mm) if hasattr(self.prior, "at_spacing") else self.prior
        return self if inner is self.prior else AutocastDenoiser(inner)

    def forward(self, x, sigma):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.prior(x, sigma).float()


# ---- one job: build the task, run one solver, score it --------------------------------------------------
def build_task(spec: dict):
    from invdiff.tasks.volume import (ct_phantom_3d, ct_volume_task, example4d_first_frame, mri_volume_task,
                                      shepp_logan_3d)

    if spec["family"] == "ct":
        size, depth = spec["size"], spec["depth"]
        if spec["volume"] == "shepp-logan":
            volume = shepp_logan_3d(size, supersample=1 if size > 64 else 2)
        else:
            volume = ct_phantom_3d(size, seed=spec["seed"], supersample=1 if size > 64 else 2)
        start = (size - depth) // 2
        volume = volume[start:start + depth]
        return ct_volume_task(volume, spec["views"], seed=spec["seed"], device=spec["device"])
    volume, voxel = example4d_first_frame()
    if spec.get("depth"):
        start = (volume.shape[0] - spec["depth"]) // 2
        volume = volume[start:start + spec["depth"]]
    factor = int(spec.get("downsample") or 1)
    if factor > 1:                                 # in-plane block average: a cheaper volume with larger voxels
        depth, height, width = volume.shape
        volume = volume[:, :height - height % factor, :width - width % factor]
        volume = volume.reshape(depth, height // factor, factor, width // factor, factor).mean(axis=(2, 4))
        voxel = (voxel[0], voxel[1] * factor, voxel[2] * factor)
    return mri_volume_task(volume, spec["acceleration"], num_coils=8, seed=spec["seed"], device=spec["device"],
                           voxel_size_mm=voxel, phase_amplitude=0.0)


def run_job(spec: dict) -> dict:
    """Run one (task, solver) job; returns its metrics row (called in a fresh process on CPU)."""
    torch.set_num_threads(spec["threads"])
    import invdiff
    from invdiff.priors.base import SliceDenoiser
    from invdiff.registry import needs_prior
    from invdiff.memory import peak_bytes, reset_peak, resident_bytes
    from invdiff.settings import effective
    from invdiff.tasks import solve
    from invdiff.tasks.volume import plane_metrics

    device = torch.device(spec["device"])
    task = build_task(spec)
    image = task.images[0]
    solver, changes = ALIASES.get(spec["solver"], (spec["solver"], {}))
    hyperparameters = effective(solver, task.family, {**FIXED.get(task.family, {}).get(solver, {}), **changes,
                                                      **spec.get("overrides", {}).get(spec["solver"], {})})
    if "steps" in hyperparameters and solver in spec["steps"]:
        hyperparameters["steps"] = spec["steps"][solver]
    prior = None
    if needs_prior(solver):
        prior = invdiff.load_prior(spec["prior"], device=device)
        if device.type == "cuda" and spec["bf16"]:
            prior = AutocastDenoiser(prior)
        prior = SliceDenoiser(prior, chunk=spec["chunk"])
        if "chunk" in hyperparameters:
            hyperparameters["chunk"] = spec["chunk"]
    baseline_memory = resident_bytes() if device.type == "cpu" else 0
    memory_source = reset_peak(device)
    start = time.perf_counter()
    solution = solve(image, solver, prior, hyperparameters, seed=spec["seed"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    diagnostics = solution.result.diagnostics
    maxval = 1.0 if task.family == "ct" else float(image.target.max())
    metrics = plane_metrics(image.target, solution.image, maxval=maxval)
    residuals = diagnostics.get("residual_norm")
    return {"solver": spec["solver"], "registered_solver": solver, "task": task.name, "volume": spec.get("volume"),
            "shape": list(image.target.shape), "views": spec.get("views"), "acceleration": spec.get("acceleration"),
            "psnr": metrics["psnr"], "ssim": metrics["ssim"], "volume_psnr": metrics["volume_psnr"],
            "seconds": seconds, "network_seconds": diagnostics.get("network_seconds"),
            "nfe_per_slice": diagnostics.get("nfe", 0), "slice_evaluations": diagnostics.get("slice_evaluations", 0),
            "peak_memory_bytes": peak_bytes(device), "peak_memory_source": memory_source,
            "memory_before_solve_bytes": baseline_memory,
            "final_residual_norm": residuals[-1] if residuals else None,
            "hyperparameters": {k: v for k, v in hyperparameters.items()}, "seed": spec["seed"],
            "threads": spec["threads"], "device": str(device)}


def _run(spec: dict, isolate: bool) -> dict:
    if not isolate:
        return run_job(spec)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(run_job, (spec,))


# ---- report -------------------------------------------------------------------------------------------------
def _fmt(row: dict, key: str) -> str:
    return " / ".join(f"{row[key][p]:.2f}" if key == "psnr" else f"{row[key][p]:.3f}"
                      for p in ("axial", "coronal", "sagittal"))


def markdown(result: dict) -> str:
    lines = [f"# 3-D reconstruction with 2-D priors ({result['date']}, {result['device_name']})", "",
             f"torch {result['torch']}, {result['threads']} thread(s), load average at start {result['load_start']}; "
             f"{result['note']}", "",
             "| task | solver | PSNR ax / cor / sag (dB) | SSIM ax / cor / sag | vol. PSNR | NFE/slice | seconds | "
             "peak memory (MB) | before solve (MB) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['task']} {tuple(row['shape'])} | {row['solver']} | {_fmt(row, 'psnr')} | {_fmt(row, 'ssim')} "
                     f"| {row['volume_psnr']:.2f} | {row['nfe_per_slice']} | {row['seconds']:.1f} | "
                     f"{row['peak_memory_bytes'] / 2 ** 20:.0f} | {row['memory_before_solve_bytes'] / 2 ** 20:.0f} |")
    lines += ["", "Hyperparameters per row (effective values) are in the JSON next to this file."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="CT volume side (voxels)")
    parser.add_argument("--depth", type=int, default=None, help="slices (default: --size for CT, all 24 for MRI)")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="cost at these depths instead of quality")
    parser.add_argument("--views", type=int, nargs="+", default=[8, 30])
    parser.add_argument("--volumes", nargs="+", default=["phantom", "shepp-logan"], choices=["phantom", "shepp-logan"])
    parser.add_argument("--mri", action="store_true", help="the MRI table (example4d, 4x) instead of CT")
    parser.add_argument("--acceleration", type=int, default=4)
    parser.add_argument("--downsample", type=int, default=1, help="MRI: in-plane block average by this factor")
    parser.add_argument("--solvers", nargs="+", default=None, help=f"default CT {CT_SOLVERS}, MRI {MRI_SOLVERS}; "
                                                                      f"also {sorted(ALIASES)}")
    parser.add_argument("--steps", nargs="+", default=[], metavar="SOLVER=N",
                        help=f"step budgets (default on CPU {CPU_STEPS}; on CUDA the papers' defaults except MBIR 200)")
    parser.add_argument("--set", nargs="+", default=[], metavar="ROW:NAME=VALUE", dest="overrides",
                        help="hyperparameter overrides per benchmark row, e.g. dds:cg_steps=10")
    parser.add_argument("--seed", type=int, default=7, help="phantom and noise seed (fresh: the prior never saw it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="slices per network call (default 16 CPU, 64 CUDA)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one process per solver for its own peak memory (default: on for CPU)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    isolate = device.type == "cpu" if args.isolate is None else args.isolate
    chunk = args.chunk or (64 if device.type == "cuda" else 16)
    steps = dict(CPU_STEPS) if device.type == "cpu" else {"dds": 50, "diffusion-mbir": 200, "reddiff": 100}
    for item in args.steps:
        name, _, value = item.partition("=")
        steps[name] = int(value)
    from invdiff.settings import convert
    overrides: dict = {}
    for item in args.overrides:
        head, _, value = item.partition("=")
        row, _, name = head.partition(":")
        solver = ALIASES.get(row, (row, {}))[0]
        overrides.setdefault(row, {})[name] = convert(solver, name, value)
    family = "mri" if args.mri else "ct"
    solvers = args.solvers or (MRI_SOLVERS if args.mri else CT_SOLVERS)
    base = {"family": family, "device": str(device), "threads": args.threads, "chunk": chunk, "bf16": args.bf16,
            "steps": steps, "seed": args.seed, "overrides": overrides,
            "prior": "brain-mri-complex" if args.mri else "ct-phantom-anatomy"}
    specs = []
    if args.depths:
        for depth in args.depths:
            for solver in solvers:
                specs.append({**base, "solver": solver, "size": args.size, "depth": depth, "views": args.views[0],
                              "volume": "phantom", "acceleration": args.acceleration})
    elif args.mri:
        for solver in solvers:
            specs.append({**base, "solver": solver, "depth": args.depth, "acceleration": args.acceleration,
                          "volume": "example4d", "downsample": args.downsample})
    else:
        for volume in args.volumes:
            for views in args.views:
                for solver in solvers:
                    specs.append({**base, "solver": solver, "size": args.size, "depth": args.depth or args.size,
                                  "views": views, "volume": volume})
    load_start = os.getloadavg()[0]
    rows = []
    for spec in specs:
        log.info("running %s on %s", spec["solver"], {k: spec.get(k) for k in ("volume", "views", "depth", "size")})
        row = _run(spec, isolate)
        log.info("%s: PSNR %s SSIM %s, %.1f s, peak %.0f MB", row["solver"], _fmt(row, "psnr"), _fmt(row, "ssim"),
                 row["seconds"], row["peak_memory_bytes"] / 2 ** 20)
        rows.append(row)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    note = ("CPU peak memory: the solving process's peak RSS during the solve (invdiff.memory; each row gives its "
            "source), including torch and the prior; 'before solve' is the same process's RSS after building the "
            "task and loading the prior."
            if device.type == "cpu" else f"CUDA peak memory: max_memory_allocated; network in {'bf16 autocast' if args.bf16 else 'fp32'}.")
    result = {"date": datetime.date.today().isoformat(), "device": str(device), "device_name": device_name,
              "torch": torch.__version__, "threads": args.threads, "load_start": round(load_start, 2),
              "argv": sys.argv[1:] if argv is None else list(argv), "note": note, "rows": rows}
    kind = "mri" if args.mri else ("depths" if args.depths else "ct")
    stem = f"volume3d-{result['date']}-{device.type}-{kind}" + (f"-{args.tag}" if args.tag else "")
    table = markdown(result)
    write_json_and_markdown(args.out, stem, result, table)
    sys.stdout.write(table)
    return result


if __name__ == "__main__":
    main()
