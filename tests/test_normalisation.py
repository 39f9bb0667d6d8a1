"""The normalisation step: y / s = A (x / s) + n / s.

* the scaled problem has y / s and sigma_y / s, and its exact posterior (prior N(m / s, S / s^2)) is the
  original posterior mapped by x -> x / s, so solving it and multiplying back changes nothing;
* the default scale is the 99.5th percentile of |A^T y| (numpy's percentile, linear interpolation), and for
  complex MRI images the modulus of the (real, imag) pair, so a global phase does not change it;
* denormalise multiplies x, samples and trajectory by s and records it.
"""
import math

import numpy as np
import pytest
import torch

import invdiff
from invdiff.normalisation import default_scale, denormalise, normalise
from invdiff.operators.matrix import MatrixOperator
from invdiff.operators.mri import CartesianMRI
from invdiff.priors.analytic import GaussianPrior
from invdiff.problem import InverseProblem
from invdiff.samplers._common import SampleResult

F64 = torch.float64


def _matrix_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    op = MatrixOperator(torch.randn(10, 12, generator=g, dtype=F64), (1, 3, 4))
    x = 50.0 * torch.randn(1, 1, 3, 4, generator=g, dtype=F64)
    return invdiff.simulate(op, x, 0.5, g)


def test_scaled_problem_has_the_scaled_posterior():
    problem = _matrix_problem()
    scaled, scale = normalise(problem)
    assert torch.allclose(scaled.y, problem.y / scale) and scaled.sigma_y == pytest.approx(problem.sigma_y / scale)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(1, 3, 4, generator=g, dtype=F64)
    root = torch.randn(12, 12, generator=g, dtype=F64)
    cov = 400.0 * root @ root.T / 12
    original = GaussianPrior(mean, cov).posterior(problem)
    rescaled = GaussianPrior(mean / scale, cov / scale ** 2).posterior(scaled)
    assert torch.allclose(denormalise(rescaled.mean, scale), original.mean, rtol=1e-9, atol=1e-9)
    assert torch.allclose(rescaled.cov * scale ** 2, original.cov, rtol=1e-8, atol=1e-8)


def test_default_scale_is_the_percentile_of_the_adjoint():
    problem = _matrix_problem()
    adjoint = problem.operator.A_adjoint(problem.y).abs().numpy()
    assert default_scale(problem) == pytest.approx(float(np.percentile(adjoint, 99.5)), rel=1e-6)
    assert default_scale(problem, percentile=50) == pytest.approx(float(np.percentile(adjoint, 50)), rel=1e-6)
    pinv = problem.operator.A_dagger(problem.y).abs().numpy()
    assert default_scale(problem, reference="pinv") == pytest.approx(float(np.percentile(pinv, 99.5)), rel=1e-6)


def test_complex_images_use_the_modulus():
    n = 8
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[0, 2, 3, 4, 7]] = True
    op = CartesianMRI(mask, img_size=(n, n))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, n, n, generator=g, dtype=F64)
    y = op.A(x)
    zero_filled = op.A_adjoint(y)
    modulus = zero_filled.pow(2).sum(dim=1).sqrt().numpy()
    scale = default_scale(InverseProblem(op, y, 0.01))
    assert scale == pytest.approx(float(np.percentile(modulus, 99.5)), rel=1e-6)
    phi = 0.7                                         # x -> e^{i phi} x rotates y and A^T y, not their modulus
    rotated = torch.stack([math.cos(phi) * x[:, 0] - math.sin(phi) * x[:, 1],
                           math.sin(phi) * x[:, 0] + math.cos(phi) * x[:, 1]], dim=1)
    assert default_scale(InverseProblem(op, op.A(rotated), 0.01)) == pytest.approx(scale, rel=1e-9)


def test_denormalise_result_and_tensor():
    result = SampleResult(x=torch.ones(1, 1, 2, 2), diagnostics={"nfe": 3}, samples=torch.ones(4, 1, 1, 2, 2),
                          weights=torch.full((4, 1), 0.25), trajectory=[torch.ones(1, 1, 2, 2), "note"])
    back = denormalise(result, 3.0)
    assert torch.equal(back.x, 3 * result.x) and torch.equal(back.samples, 3 * result.samples)
    assert torch.equal(back.weights, result.weights) and back.trajectory[1] == "note"
    assert torch.equal(back.trajectory[0], 3 * result.trajectory[0])
    assert back.diagnostics == {"nfe": 3, "scale": 3.0} and result.diagnostics == {"nfe": 3}
    assert torch.equal(denormalise(torch.ones(2), 2.0), torch.full((2,), 2.0))


def test_bad_input_is_named():
    problem = _matrix_problem()
    with pytest.raises(ValueError, match="scale"):
        normalise(problem, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        denormalise(torch.ones(1), -1.0)
    with pytest.raises(ValueError, match="reference"):
        normalise(problem, reference="median")
    with pytest.raises(ValueError, match="fbp"):
        normalise(problem, reference="fbp")
    silent = InverseProblem(problem.operator, torch.zeros_like(problem.y), 0.1)
    with pytest.raises(ValueError, match="zero"):
        normalise(silent)
