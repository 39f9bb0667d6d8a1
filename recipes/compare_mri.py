"""Solver comparison on the shipped multi-coil brain sample at 4x and 8x (fastMRI random masks).

Every solver sees identical inputs posed by the task layer (``invdiff.tasks.scan_tasks``: mask seeded by the
file name, ESPIRiT maps, normalisation by the 99.5th percentile of the zero-filled magnitude, noise level from
the k-space periphery), the same prior and per-slice seed, and the MRI row of the settings table
(``invdiff.settings``, e.g. DPS's tuned zeta): a row here is ``invdiff reconstruct`` on the same slices.

    python recipes/compare_mri.py --out runs/compare_mri                 # the shipped prior, 100 steps each
    python recipes/compare_mri.py --tiny --out /tmp/compare_mri          # seconds: 48 x 48 synthetic scan,
                                                                         # analytic prior, 30 steps
    python recipes/compare_mri.py --set reddiff:lam=300 --set dps:zeta=1 # overrides, as everywhere

Writes ``metrics.csv`` (solver, task, PSNR, SSIM, NMSE, seconds, NFE, note), ``grid-4x.png``, ``grid-8x.png``
and ``compare.json`` into ``--out``. DDRM is listed to show that it cannot run on multi-coil SENSE (its row reads
n/a with the reason).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import h5py

from invdiff import recipe
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.tasks import block_average, scan_tasks


@dataclass
class Config(recipe.RecipeConfig):
    scan: str = "data/brain_t1_multicoil.h5"        # relative paths are tried from the cwd, then the repository
    out: str = "runs/compare_mri"
    accelerations: tuple[int, ...] = (4, 8)
    center_fraction: float = 0.0                     # 0: fastMRI's (0.08 at 4x, 0.04 at 8x)
    slices: str = "all"                              # "all" or python-style "a:b"

    def tiny_variant(self) -> "Config":
        """Seconds-long smoke run: a 48 x 48 synthetic 4-coil scan of the brain slice, analytic prior, 30 steps."""
        return replace(self, prior="analytic", steps=30, threads=1, center_fraction=0.17, slices="all")


def tiny_scan(config: Config) -> Path:
    """A 48 x 48 (k-space 96 x 48, 4 coils) synthetic fastMRI file of the block-averaged brain slice in --out."""
    with h5py.File(recipe.repository_path(config.scan), "r") as h5:
        image = block_average(h5["reconstruction_rss"][0], 48)
    path = Path(config.out) / "tiny_scan.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fake_fastmri(path, image, num_coils=4, noise_level=0.01 * float(image.max()), seed=config.seed)
    return path


def build_tasks(config: Config, device):
    scan = tiny_scan(config) if config.tiny else recipe.repository_path(config.scan)
    return scan_tasks(scan, config.accelerations, slices=config.slices, device=device,
                      center_fraction=config.center_fraction or None)


def stand_in(config: Config, tasks):
    """The --tiny prior, fitted on the multislice sample (another subject), never on the test image."""
    return recipe.stand_in_prior(tasks[0].in_shape, "data/brain_multislice_multicoil.h5", key="reconstruction_rss",
                                 factor=2)


def run(config: Config):
    return recipe.run_comparison(config, build_tasks, stand_in, title=f"MRI {Path(config.scan).name}",
                                 recipe="recipes/compare_mri.py")


def main(argv=None):
    return recipe.run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
