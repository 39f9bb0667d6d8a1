"""Solver comparison on sparse-view CT (30 and 60 views; parallel beam, fan beam, limited angle) of held-out phantoms.

The phantoms are ``data/ct_samples.h5`` (Shepp-Logan and procedural phantoms rendered by
``invdiff.datasets.synthetic.ct_phantom``, a different generator from the CT prior's training phantoms),
block-averaged from 256 to ``--size`` pixels (the prior was trained on fields of view of 128 to 256 pixels) and
re-projected with invdiff's own projectors: ``y = A x + sigma_y n``, ``sigma_y = --noise-fraction x RMS(A x)``.
Geometries (``--geometries``): ``parallel`` (angles in [0, 180)), ``fan`` (flat-detector fan beam, magnification 2,
angles in [0, 360)) and ``limited`` (parallel beam over [0, ``--limited-angle``) degrees only); every geometry at
every ``--views``. Tasks are named ``ct-30``, ``ct-fan-30``, ``ct-limited120-30``.
CT uses the prior's fixed scale ``(HU + 1000) / 2000`` in [0, 1]: no percentile normalisation.

    python recipes/compare_ct.py --out runs/compare_ct                  # the shipped CT prior, 100 steps each
    python recipes/compare_ct.py --tiny --out /tmp/compare_ct           # seconds: 32 x 32, analytic prior

Writes ``metrics.csv``, one ``grid-<task>.png`` per task and ``compare.json`` into ``--out``. Settings: the
CT row of ``invdiff.settings`` (FBP starts for RED-Diff, TV and L1-wavelet; tuned RED-Diff lam and DPS zeta;
``invdiff info reddiff`` lists them with their provenance), diffusion solvers at ``--steps``, ``--set`` over them;
FBP with the ramp filter is the baseline; DDRM is listed to show it cannot run on CT (no SVD), its row reads n/a.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

import h5py
import numpy as np

from invdiff import recipe
from invdiff.errors import InputError
from invdiff.tasks import block_average, ct_task


@dataclass
class Config(recipe.RecipeConfig):
    data: str = "data/ct_samples.h5"             # relative paths are tried from the cwd, then the repository
    out: str = "runs/compare_ct"
    phantoms: tuple[int, ...] = (3,)             # in the file: 0 shepp_logan, 1-2 ellipses, 3 thorax, 4 resolution
    size: int = 128
    views: tuple[int, ...] = (30, 60)
    geometries: tuple[str, ...] = ("parallel", "fan", "limited")
    limited_angle: float = 120.0                 # degrees covered by the limited-angle geometry
    noise_fraction: float = 0.01
    prior: str = "ct-phantom-anatomy"            # shipped name, exported path, or "analytic"

    def tiny_variant(self) -> "Config":
        """Seconds-long smoke run: one 32 x 32 phantom at 8 and 16 views (parallel), 16 views fan and limited
        angle, analytic prior, 30 steps."""
        return replace(self, prior="analytic", steps=30, threads=1, size=32, phantoms=(0,), views=(8, 16))


def load_phantoms(config: Config) -> tuple[np.ndarray, list[str], list[float] | None]:
    """The chosen phantoms, block-averaged to ``config.size``: (N, size, size) float32 in [0, 1], their names and
    pixel spacings in mm at ``config.size`` (None when the file's optional ``spacing_mm`` attribute, one value per
    stored image at the stored size, is absent: phantoms without a physical scale)."""
    path = recipe.repository_path(config.data)
    with h5py.File(path, "r") as h5:
        images = h5["images"][...]
        names = json.loads(h5.attrs["names"])
        stored_spacing = h5.attrs.get("spacing_mm")
    for index in config.phantoms:
        if not 0 <= index < len(images):
            raise InputError(f"--phantoms: index {index} is outside the {len(images)} phantoms of {config.data}")
    chosen = np.stack([block_average(images[i], config.size) for i in config.phantoms])
    spacings = None
    if stored_spacing is not None:
        stored_spacing = np.atleast_1d(np.asarray(stored_spacing, dtype=float))
        if stored_spacing.shape != (len(images),):
            raise InputError(f"{path}: attribute spacing_mm: expected {len(images)} values (one per image), "
                             f"got shape {stored_spacing.shape}")
        factor = images.shape[-1] / config.size                  # block averaging widens the pixels
        spacings = [float(stored_spacing[i]) * factor for i in config.phantoms]
    return chosen, [names[i] for i in config.phantoms], spacings


def build_tasks(config: Config, device):
    images, names, spacings = load_phantoms(config)
    tasks = []
    for geometry in config.geometries:
        # Each geometry at each view count; the --tiny run keeps its two parallel tasks and adds the others once.
        views_here = config.views if not (config.tiny and geometry != "parallel") else config.views[-1:]
        for views in views_here:
            tasks.append(ct_task(images, views, noise_fraction=config.noise_fraction, seed=config.seed,
                                 device=device, geometry=geometry,
                                 angle_range=config.limited_angle if geometry == "limited" else None,
                                 spacing_mm=spacings))
    for task in tasks:
        task.info["phantoms"] = names
        if spacings is not None:
            task.info["spacing_mm"] = spacings
    return tasks


def stand_in(config: Config, tasks):
    """The --tiny prior, fitted on the other phantoms of the file (never the test ones), on the fixed CT scale."""
    return recipe.stand_in_prior(tasks[0].in_shape, config.data, key="images", factor=256 // config.size,
                                 exclude=config.phantoms, percentile=None)


def run(config: Config):
    return recipe.run_comparison(config, build_tasks, stand_in, title="CT", recipe="recipes/compare_ct.py")


def main(argv=None):
    return recipe.run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
