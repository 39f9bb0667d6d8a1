"""Solver comparison on the shipped multi-coil brain sample at 4x and 8x (fastMRI random masks).

Every solver sees identical inputs (mask seeded by the file name, ESPIRiT maps, normalisation by the 99.5th
percentile of the zero-filled magnitude, noise level from the k-space periphery: the ``invdiff reconstruct``
pipeline) and the same prior and per-slice seed; see :mod:`invdiff.compare`.

    python recipes/compare_mri.py --out runs/compare_mri                 # the shipped prior, 100 steps each
    python recipes/compare_mri.py --tiny --out /tmp/compare_mri          # seconds: 48 x 48 synthetic scan,
                                                                         # analytic prior, 10 steps

Writes ``metrics.csv`` (solver, task, PSNR, SSIM, NMSE, seconds, NFE, note), ``grid-4x.png``, ``grid-8x.png``
and ``compare.json`` into ``--out``. Solver settings: classical solvers as registered; diffusion solvers at
``--steps`` each (equal network budgets, except DPS's extra backward pass); RED-Diff and DiffPIR with their
registered defaults; DPS with ``--dps-zeta`` (tuned per task family, see recipes/README.md). DDRM is listed
to show that it cannot run on multi-coil SENSE (its row reads n/a with the reason).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import torch

from invdiff.compare import (TASK_SETTINGS, apply_overrides, block_average, compare_problems,
                             parse_set_options, resolve_prior, run_recipe, scan_tasks, smooth_gaussian_prior,
                             task_settings)
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.reconstruct import resolve_device

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("recipes.compare_mri")


@dataclass
class Config:
    scan: str = "data/brain_t1_multicoil.h5"        # relative paths are tried from the cwd, then the repository
    out: str = "runs/compare_mri"
    accelerations: tuple[int, ...] = (4, 8)
    center_fraction: float = 0.0                     # 0: fastMRI's (0.08 at 4x, 0.04 at 8x)
    solvers: tuple[str, ...] = ("reddiff", "dps", "diffpir", "ddrm", "cg-sense", "l1-wavelet", "tv")
    steps: int = 100
    prior: str = "brain-mri-complex"                 # shipped name, exported path, or "analytic"
    dps_zeta: float = TASK_SETTINGS["mri"]["dps"]["zeta"]     # tuned, see invdiff.compare.TASK_SETTINGS
    slices: str = "all"                              # "all" or python-style "a:b"
    overrides: tuple[str, ...] = ()              # SOLVER:NAME=VALUE, comma-separated (e.g. reddiff:lam=300)
    seed: int = 0
    device: str = "auto"
    threads: int = 0                             # torch intra-op threads (0: torch's default)
    tiny: bool = False

    def tiny_variant(self) -> "Config":
        """Seconds-long smoke run: a 48 x 48 synthetic 4-coil scan of the brain slice, analytic prior, 10 steps."""
        return replace(self, prior="analytic", steps=10, threads=1, center_fraction=0.17, slices="all")


def repository_path(path: str) -> Path:
    """``path`` as given if it exists, else relative to the repository root."""
    candidate = Path(path)
    return candidate if candidate.exists() or candidate.is_absolute() else REPO / candidate


def tiny_scan(config: Config) -> Path:
    """A 48 x 48 (k-space 96 x 48, 4 coils) synthetic fastMRI file of the block-averaged brain slice in --out."""
    with h5py.File(repository_path(config.scan), "r") as h5:
        image = block_average(h5["reconstruction_rss"][0], 48)
    path = Path(config.out) / "tiny_scan.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fake_fastmri(path, image, num_coils=4, noise_level=0.01 * float(image.max()), seed=config.seed)
    return path


def run(config: Config):
    if config.threads:
        torch.set_num_threads(config.threads)      # one thread: tiny tensors on a shared machine run faster
    device = resolve_device(config.device)
    scan = tiny_scan(config) if config.tiny else repository_path(config.scan)
    tasks = scan_tasks(scan, config.accelerations, slices=None if config.slices == "all" else config.slices,
                       device=device, center_fraction=config.center_fraction or None)
    prior = (smooth_gaussian_prior(tasks[0].in_shape) if config.prior == "analytic"
             else resolve_prior(config.prior, device))
    for task in tasks:
        task.solver_overrides = task_settings("mri", config.solvers)
        if "dps" in task.solver_overrides:
            task.solver_overrides["dps"]["zeta"] = config.dps_zeta
    apply_overrides(tasks, parse_set_options(config.overrides))
    return compare_problems(tasks, config.solvers, config.out, prior=prior, seed=config.seed, steps=config.steps,
                            title=f"MRI {Path(scan).name}",
                            info={"recipe": "recipes/compare_mri.py", "config": vars(config)})


def main(argv=None):
    return run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
