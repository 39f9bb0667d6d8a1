"""The held-out k-space check (invdiff.tasks.safeguard): a prior that fits the data is kept, one that does not is
overruled by the reference, the held-out columns never touch the calibration block, and the check is seeded.

Single-coil Cartesian MRI on an image drawn from an exact stationary Gaussian prior: with the true prior, a
posterior solver predicts unmeasured columns better than CG-SENSE (which predicts zeros there); with a prior whose
mean is far off, it predicts them worse, and the safeguard must say so and return CG-SENSE's image.
"""
import functools

import numpy as np
import pytest
import torch

from invdiff import settings
from invdiff.errors import InputError
from invdiff.operators.masks import make_mask
from invdiff.operators.mri import CartesianMRI
from invdiff.priors.analytic import StationaryGaussianPrior, smooth_gaussian_prior
from invdiff.problem import simulate
from invdiff.tasks import TaskImage, magnitude_image, solve
from invdiff.tasks.safeguard import held_out_columns, safeguarded_solve

SHAPE = (2, 32, 32)


def _image(prior_seed=0):
    prior = smooth_gaussian_prior(SHAPE, std=0.5, correlation=2.0)
    x = prior.sample(1, torch.Generator().manual_seed(prior_seed)).float()
    mask = make_mask("random", shape=SHAPE[1:], acceleration=3, center_fraction=0.15, seed="safeguard.h5")
    op = CartesianMRI(mask=mask, img_size=SHAPE[1:])
    problem = simulate(op, x, 0.02, torch.Generator().manual_seed(1))
    target = magnitude_image(x, scale=1.0)
    return TaskImage(problem, target, functools.partial(magnitude_image, scale=1.0), index=0), prior


def test_a_prior_that_fits_is_kept_and_one_that_does_not_is_overruled():
    image, prior = _image()
    values = settings.effective("diffpir", None, {"steps": 20})
    kept, verdict = safeguarded_solve(image, "diffpir", prior.float(), values, seed=0)
    assert verdict.chosen == "diffpir" and verdict.solver_error < verdict.reference_error
    np.testing.assert_array_equal(kept.image, solve(image, "diffpir", prior.float(), values, seed=0).image)

    wrong = StationaryGaussianPrior(torch.full(SHAPE, 3.0, dtype=torch.float64), prior.power_spectrum.clone())
    overruled, verdict = safeguarded_solve(image, "diffpir", wrong.float(), values, seed=0)
    assert verdict.chosen == "cg-sense" and verdict.solver_error > verdict.reference_error
    reference = solve(image, "cg-sense", None, settings.effective("cg-sense", "mri"), seed=0).image
    np.testing.assert_array_equal(overruled.image, reference)
    psnr = lambda a: 20 * np.log10(image.target.max() / np.sqrt(((a - image.target) ** 2).mean()))   # noqa: E731
    assert psnr(overruled.image) > psnr(solve(image, "diffpir", wrong.float(), values, seed=0).image) + 1


def test_held_out_columns_avoid_the_calibration_block_and_are_seeded():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[28:36] = True
    mask[2::4] = True                  # 26 and 38 are not adjacent to the block
    first = held_out_columns(mask, 0.5, torch.Generator().manual_seed(3))
    again = held_out_columns(mask, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and not first[28:36].any() and torch.all(mask[first])
    assert int(first.sum()) == round(0.5 * int((mask & ~torch.isin(torch.arange(64), torch.arange(28, 36))).sum()))
    with pytest.raises(InputError, match="leaves none"):
        held_out_columns(mask[28:36].clone(), 0.5, torch.Generator())
