"""Solver comparison on sparse-view parallel-beam CT (30 and 60 views) of held-out phantoms.

The phantoms are ``data/ct_samples.h5`` (Shepp-Logan and procedural phantoms rendered by
``invdiff.datasets.synthetic.ct_phantom``, a different generator from the CT prior's training phantoms),
block-averaged from 256 to ``--size`` pixels (the prior was trained on fields of view of 128 to 256 pixels) and
re-projected with invdiff's own projector: ``y = A x + sigma_y n``, ``sigma_y = --noise-fraction x RMS(A x)``.
CT uses the prior's fixed scale ``(HU + 1000) / 2000`` in [0, 1]: no percentile normalisation.

    python recipes/compare_ct.py --out runs/compare_ct                  # the shipped CT prior, 100 steps each
    python recipes/compare_ct.py --tiny --out /tmp/compare_ct           # seconds: 32 x 32, analytic prior

Writes ``metrics.csv``, ``grid-ct-30.png``, ``grid-ct-60.png`` and ``compare.json`` into ``--out``. Settings:
classical solvers as registered (FBP with the ramp filter is the baseline); diffusion solvers at ``--steps``;
RED-Diff initialised with FBP (``--reddiff-init``; its pseudo-inverse default is a 500-iteration CG on the
normal equations here, slow and noise-amplifying) and with ``--reddiff-lam`` (tuned: the registered lam = 100
is calibrated for operators with ||A|| <= 1, while ||A||^2 ~ 7.5e3 here); DPS with ``--dps-zeta``; DDRM is
listed to show it cannot run on CT (no SVD), its row reads n/a.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from invdiff.compare import (TASK_SETTINGS, apply_overrides, block_average, compare_problems, ct_task,
                             parse_set_options, resolve_prior, run_recipe, smooth_gaussian_prior, task_settings)
from invdiff.reconstruct import resolve_device

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("recipes.compare_ct")


@dataclass
class Config:
    data: str = "data/ct_samples.h5"             # relative paths are tried from the cwd, then the repository
    out: str = "runs/compare_ct"
    phantoms: tuple[int, ...] = (3,)             # in the file: 0 shepp_logan, 1-2 ellipses, 3 thorax, 4 resolution
    size: int = 128
    views: tuple[int, ...] = (30, 60)
    noise_fraction: float = 0.01
    solvers: tuple[str, ...] = ("reddiff", "dps", "diffpir", "ddrm", "cg-sense", "l1-wavelet", "tv")
    steps: int = 100
    prior: str = "ct-phantom"                    # shipped name, exported path, or "analytic"
    reddiff_init: str = TASK_SETTINGS["ct"]["reddiff"]["init"]
    reddiff_lam: float = TASK_SETTINGS["ct"]["reddiff"]["lam"]  # tuned, see invdiff.compare.TASK_SETTINGS
    dps_zeta: float = TASK_SETTINGS["ct"]["dps"]["zeta"]      # tuned, see invdiff.compare.TASK_SETTINGS
    overrides: tuple[str, ...] = ()              # SOLVER:NAME=VALUE, comma-separated (e.g. reddiff:lam=300)
    seed: int = 0
    device: str = "auto"
    threads: int = 0                             # torch intra-op threads (0: torch's default)
    tiny: bool = False

    def tiny_variant(self) -> "Config":
        """Seconds-long smoke run: one 32 x 32 phantom at 8 and 16 views, analytic prior, 10 steps."""
        return replace(self, prior="analytic", steps=10, threads=1, size=32, phantoms=(0,), views=(8, 16))


def repository_path(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.exists() or candidate.is_absolute() else REPO / candidate


def load_phantoms(config: Config) -> tuple[np.ndarray, list[str]]:
    """The chosen phantoms, block-averaged to ``config.size``: (N, size, size) float32 in [0, 1], and their names."""
    with h5py.File(repository_path(config.data), "r") as h5:
        images = h5["images"][...]
        names = json.loads(h5.attrs["names"])
    for index in config.phantoms:
        if not 0 <= index < len(images):
            raise ValueError(f"--phantoms: index {index} is outside the {len(images)} phantoms of {config.data}")
    chosen = np.stack([block_average(images[i], config.size) for i in config.phantoms])
    return chosen, [names[i] for i in config.phantoms]


def run(config: Config):
    if config.threads:
        torch.set_num_threads(config.threads)      # one thread: tiny tensors on a shared machine run faster
    device = resolve_device(config.device)
    images, names = load_phantoms(config)
    tasks = [ct_task(images, views, noise_fraction=config.noise_fraction, seed=config.seed, device=device)
             for views in config.views]
    for task in tasks:
        task.info["phantoms"] = names
        task.solver_overrides = task_settings("ct", config.solvers)
        if "reddiff" in task.solver_overrides:
            task.solver_overrides["reddiff"].update(init=config.reddiff_init, lam=config.reddiff_lam)
        if "dps" in task.solver_overrides:
            task.solver_overrides["dps"]["zeta"] = config.dps_zeta
    if config.prior == "analytic":
        prior = smooth_gaussian_prior(tasks[0].in_shape, std=0.3, mean=0.3)
    else:
        prior = resolve_prior(config.prior, device)
    apply_overrides(tasks, parse_set_options(config.overrides))
    return compare_problems(tasks, config.solvers, config.out, prior=prior, seed=config.seed, steps=config.steps,
                            title="CT", info={"recipe": "recipes/compare_ct.py", "config": vars(config)})


def main(argv=None):
    return run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
