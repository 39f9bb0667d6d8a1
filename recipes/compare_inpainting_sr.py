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
the inpainting and SR rows of ``invdiff.settings`` (DPS's step size per family), diffusion solvers at ``--steps``,
``--set`` over them; DDRM with the same number of steps (all three operators have an SVD here).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import h5py

from invdiff import recipe
from invdiff.operators.inpainting import box_mask, random_pixel_mask
from invdiff.tasks import block_average, inpainting_task, superres_task


@dataclass
class Config(recipe.RecipeConfig):
    scan: str = "data/brain_t1_multicoil.h5"     # its reconstruction_rss slice 0 is the image
    out: str = "runs/compare_inpainting_sr"
    size: int = 192                              # block-average the 192 x 192 image to this size (192: native)
    observed_fraction: float = 0.5               # random-pixel inpainting: fraction of pixels observed
    box_fraction: float = 0.25                   # box inpainting: the missing centred box's side / image side
    sr_factor: int = 4
    noise_fraction: float = 0.01
    solvers: tuple[str, ...] = ("reddiff", "dps", "diffpir", "ddrm", "tv", "l1-wavelet")

    def tiny_variant(self) -> "Config":
        """Seconds-long smoke run: the slice block-averaged to 32 x 32, analytic prior, 30 steps."""
        return replace(self, prior="analytic", steps=30, threads=1, size=32)


def build_tasks(config: Config, device):
    with h5py.File(recipe.repository_path(config.scan), "r") as h5:
        image = block_average(h5["reconstruction_rss"][0], config.size)
    shape = tuple(image.shape)
    common = {"noise_fraction": config.noise_fraction, "seed": config.seed, "device": device}
    return [
        inpainting_task(image, random_pixel_mask(shape, config.observed_fraction, generator=config.seed),
                        name="inpaint-random", **common),
        inpainting_task(image, box_mask(shape, fraction=config.box_fraction), name="inpaint-box", **common),
        superres_task(image, config.sr_factor, name=f"sr-{config.sr_factor}x", **common),
    ]


def stand_in(config: Config, tasks):
    """The --tiny prior, fitted on the multislice sample (another subject), never on the test image."""
    return recipe.stand_in_prior(tasks[0].in_shape, "data/brain_multislice_multicoil.h5", key="reconstruction_rss",
                                 factor=2 if config.size < 96 else 1)


def run(config: Config):
    return recipe.run_comparison(config, build_tasks, stand_in, title="brain T1",
                                 recipe="recipes/compare_inpainting_sr.py")


def main(argv=None):
    return recipe.run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
