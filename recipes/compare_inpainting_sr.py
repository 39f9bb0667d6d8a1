"""Solver comparison on inpainting (50 % random pixels; a centred box) and 4x super-resolution of the brain slice.

The image is the reference image of the shipped T1 sample (``data/brain_t1_multicoil.h5``,
``reconstruction_rss``), used as a complex image with zero phase (C = 2, the complex brain prior's input),
optionally block-averaged to ``--size``. Noise: ``sigma = --noise-fraction x p99.5(|x|)`` (inpainting: only
at observed pixels). Normalisation: the 99.5th percentile of ``|A^T y|`` (inpainting) or ``|A^+ y|`` (SR), the
prior's training rule; outputs are magnitudes.

    python recipes/compare_inpainting_sr.py --out runs/compare_inpainting_sr
    python recipes/compare_inpainting_sr.py --tiny --out /tmp/compare_isr    # seconds: 32 x 32, analytic prior

Writes ``metrics.csv``, ``grid-inpaint-random.png``, ``grid-inpaint-box.png``, ``grid-sr-4x.png`` and
``compare.json``. Baselines: zero-filled (the observed pixels) for inpainting, ``A^+ y`` for SR. Settings:
classical solvers as registered, diffusion solvers at ``--steps``, DPS with a step size per task family
(``--dps-zeta-inpainting``, ``--dps-zeta-sr``), DDRM with the same number of steps (all three operators have
an SVD here).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import torch

from invdiff.compare import (TASK_SETTINGS, apply_overrides, block_average, compare_problems, inpainting_task,
                             parse_set_options, resolve_prior, run_recipe, smooth_gaussian_prior,
                             superres_task, task_settings)
from invdiff.operators.inpainting import box_mask, random_pixel_mask
from invdiff.reconstruct import resolve_device

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("recipes.compare_inpainting_sr")


@dataclass
class Config:
    scan: str = "data/brain_t1_multicoil.h5"     # its reconstruction_rss slice 0 is the image
    out: str = "runs/compare_inpainting_sr"
    size: int = 192                              # block-average the 192 x 192 image to this size (192: native)
    observed_fraction: float = 0.5               # random-pixel inpainting: fraction of pixels observed
    box_fraction: float = 0.25                   # box inpainting: the missing centred box's side / image side
    sr_factor: int = 4
    noise_fraction: float = 0.01
    solvers: tuple[str, ...] = ("reddiff", "dps", "diffpir", "ddrm", "tv", "l1-wavelet")
    steps: int = 100
    prior: str = "brain-mri-complex"             # shipped name, exported path, or "analytic"
    dps_zeta_inpainting: float = TASK_SETTINGS["inpainting"]["dps"]["zeta"]    # tuned, see TASK_SETTINGS
    dps_zeta_sr: float = TASK_SETTINGS["sr"]["dps"]["zeta"]
    overrides: tuple[str, ...] = ()              # SOLVER:NAME=VALUE, comma-separated (e.g. reddiff:lam=300)
    seed: int = 0
    device: str = "auto"
    threads: int = 0                             # torch intra-op threads (0: torch's default)
    tiny: bool = False

    def tiny_variant(self) -> "Config":
        """Seconds-long smoke run: the slice block-averaged to 32 x 32, analytic prior, 10 steps."""
        return replace(self, prior="analytic", steps=10, threads=1, size=32)


def repository_path(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.exists() or candidate.is_absolute() else REPO / candidate


def run(config: Config):
    if config.threads:
        torch.set_num_threads(config.threads)      # one thread: tiny tensors on a shared machine run faster
    device = resolve_device(config.device)
    with h5py.File(repository_path(config.scan), "r") as h5:
        image = block_average(h5["reconstruction_rss"][0], config.size)
    shape = tuple(image.shape)
    common = {"noise_fraction": config.noise_fraction, "seed": config.seed, "device": device}
    tasks = [
        inpainting_task(image, random_pixel_mask(shape, config.observed_fraction, generator=config.seed),
                        name="inpaint-random", **common),
        inpainting_task(image, box_mask(shape, fraction=config.box_fraction), name="inpaint-box", **common),
        superres_task(image, config.sr_factor, name=f"sr-{config.sr_factor}x", **common),
    ]
    for task in tasks:
        is_sr = task.name.startswith("sr")
        task.solver_overrides = task_settings("sr" if is_sr else "inpainting", config.solvers)
        if "dps" in task.solver_overrides:
            task.solver_overrides["dps"]["zeta"] = config.dps_zeta_sr if is_sr else config.dps_zeta_inpainting
    prior = (smooth_gaussian_prior(tasks[0].in_shape) if config.prior == "analytic"
             else resolve_prior(config.prior, device))
    apply_overrides(tasks, parse_set_options(config.overrides))
    return compare_problems(tasks, config.solvers, config.out, prior=prior, seed=config.seed, steps=config.steps,
                            title="brain T1", info={"recipe": "recipes/compare_inpainting_sr.py",
                                                    "config": vars(config)})


def main(argv=None):
    return run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
