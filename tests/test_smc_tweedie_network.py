"""Tweedie's covariance for every differentiable prior, and the SMC Tweedie proposal on priors without a closed form.

``Cov[x0 | x0 + sigma n = x] = sigma^2 dD/dx`` (second-order Tweedie identity). The base class gets it by autodiff
(:class:`invdiff.priors.base.JacobianCovariance`: ``sigma^2 (J + J^T) / 2``, a Lanczos square root, a PSD guard);
the analytic Gaussian priors have it in closed form. A Gaussian prior wrapped in a plain :class:`Denoiser`
(``_Generic``: forward only) runs the generic path, so the two can be compared on the same prior. Float64, CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from invdiff.operators.inpainting import Inpainting
from invdiff.operators.matrix import MatrixOperator
from invdiff.priors.analytic import DiagonalGaussianPrior, GaussianMixturePrior, GaussianPrior
from invdiff.priors.base import Denoiser, JacobianCovariance
from invdiff.priors.unet import EDMUNet, UNetConfig
from invdiff.problem import InverseProblem, simulate
from invdiff.samplers.smc import _guarded_conjugate_gradient, sample_smc
from tests.test_smc_dimension import _case, _image_prior, _scores

F64 = torch.float64


class _Generic(Denoiser):
    """A prior seen only through ``D(x, sigma)``: the base class's autodiff covariance, never a closed form."""

    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner = inner
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.channels, self.image_size = inner.channels, inner.image_size

    def forward(self, x, sigma):
        return self.inner(x, sigma)


class _Scaled(Denoiser):
    """``D(x, sigma) = a x``: Jacobian a I, so ``Cov = a sigma^2 I``, not PSD for a < 0 (the guard's case)."""

    def __init__(self, a: float):
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=F64))       # float64 network: no cast at the boundary

    def forward(self, x, sigma):
        return self.a * x


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gaussians():
    q, _ = torch.linalg.qr(_randn(64, 64, seed=11))
    cov = q @ torch.diag(torch.linspace(0.001, 0.5, 64, dtype=F64)) @ q.T
    mean = _randn(1, 8, 8, seed=12)
    return {"stationary": _image_prior(8), "dense": GaussianPrior(mean, (cov + cov.T) / 2),
            "diagonal": DiagonalGaussianPrior(mean, torch.linspace(0.001, 0.5, 64, dtype=F64).reshape(1, 8, 8))}


@pytest.mark.parametrize("name", ["stationary", "dense", "diagonal"])
def test_jacobian_covariance_equals_the_closed_form_on_a_gaussian_prior(name):
    """d = 64 Gaussians, two sigmas per batch: ``sigma^2 (J + J^T) v / 2`` equals ``(S - S (S + sigma^2 I)^-1 S) v``
    to rounding, and the 16-step Lanczos root is within 3 % of the exact root (exact, to 1e-8, with d steps: the
    Krylov space is then the whole space)."""
    prior = _gaussians()[name]
    x, v = _randn(2, 1, 8, 8, seed=1), _randn(2, 1, 8, 8, seed=2)
    sigma = torch.tensor([0.05, 2.0], dtype=F64)
    generic = _Generic(prior)
    assert not isinstance(prior.tweedie_operator(x, sigma), JacobianCovariance)     # closed form kept
    operator = generic.tweedie_operator(x, sigma)
    assert isinstance(operator, JacobianCovariance)
    exact = prior.tweedie_covariance(x, sigma, v)
    assert torch.allclose(operator(v), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(generic.tweedie_covariance(x, sigma, v), exact, rtol=1e-10, atol=1e-12)
    root = prior.tweedie_covariance(x, sigma, v, power=0.5)
    approx = operator(v, 0.5)
    assert float((approx - root).norm() / root.norm()) < 0.03
    full = generic.tweedie_operator(x, sigma, lanczos_iterations=64)(v, 0.5)
    assert torch.allclose(full, root, rtol=1e-8, atol=1e-8)
    assert float(operator.shift.max()) == 0.0                                        # PSD: no guard needed


def test_jacobian_covariance_of_a_mixture_is_its_exact_x0_posterior_covariance():
    """For a Gaussian mixture D is the exact MMSE denoiser, so ``sigma^2 dD/dx`` is exactly ``Cov[x0 | x]``: the
    covariance of the posterior of x0 under the identity operator with noise sigma (a mixture posterior)."""
    d = 6
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7], dtype=F64), _randn(2, d, seed=3),
                                 torch.tensor([0.2, 0.5], dtype=F64))
    x, sigma = _randn(1, d, seed=4).reshape(1, *prior.event_shape), 0.8
    problem = InverseProblem(MatrixOperator(torch.eye(d, dtype=F64), in_shape=prior.event_shape),
                             x.reshape(1, d), sigma)
    expected = prior.posterior(problem).cov
    operator = prior.tweedie_operator(x, sigma)
    basis = torch.eye(d, dtype=F64).reshape(d, *prior.event_shape)
    columns = torch.cat([operator(e.unsqueeze(0)).reshape(1, d) for e in basis])
    assert torch.allclose(columns, expected, atol=1e-10)


def test_psd_guard_lifts_a_negative_jacobian():
    """``D = -x / 2``: ``Cov = -sigma^2 / 2 I``; the Lanczos root sees Ritz value ``-sigma^2 / 2``, shifts it to 0, and
    every later product uses the shifted (zero, PSD) operator."""
    x, v = _randn(3, 1, 4, 4, seed=5), _randn(3, 1, 4, 4, seed=6)
    operator = _Scaled(-0.5).tweedie_operator(x, 2.0)
    assert torch.allclose(operator(v), -2.0 * v)                           # before any root: unguarded
    assert torch.allclose(operator(v, 0.5), torch.zeros_like(v), atol=1e-12)
    assert torch.allclose(operator.shift.flatten(), torch.full((3,), 2.0, dtype=F64))
    assert torch.allclose(operator(v), torch.zeros_like(v), atol=1e-12)


def test_generic_tweedie_proposal_reproduces_the_analytic_posterior():
    """The d = 256 case of test_smc_dimension (squared-exponential prior, 40 % inpainting, sigma_y 0.05), N = 256,
    through the autodiff covariance and Lanczos root: weighted mean within 3x the floor 1/sqrt(N) of the exact
    posterior mean (posterior-std units), variance ratio in [0.85, 1.15], as the closed-form path does."""
    prior, problem, mean, cov, _, _ = _case()
    n = 256
    results = {name: sample_smc(problem, p, num_particles=n, steps=5, proposal="tweedie",
                                generator=torch.Generator().manual_seed(1))
               for name, p in (("closed_form", prior), ("jacobian", _Generic(prior)))}
    for name, result in results.items():
        assert result.diagnostics["tweedie_covariance"] == name
        error, ratio = _scores(result.samples[:, 0], result.weights[:, 0], mean, cov)
        assert error <= 3 / math.sqrt(n), (name, error)
        assert 0.85 <= ratio <= 1.15, (name, ratio)
    assert results["jacobian"].diagnostics["jacobian_products"] > 0
    assert results["closed_form"].diagnostics["jacobian_products"] == 0


def test_tweedie_proposal_runs_on_a_tiny_network_prior():
    """A tiny float32 EDM UNet on 16 x 16 inpainting: finite particles and weights (equal: not reweighted for a
    network prior, module docstring of smc.py), one products count per CG iteration and Lanczos step."""
    torch.manual_seed(0)
    net = EDMUNet(UNetConfig(channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                             embedding_dim=16)).eval()
    generator = torch.Generator().manual_seed(3)
    operator = Inpainting(torch.rand(16, 16, generator=generator) < 0.5)
    problem = simulate(operator, 0.3 * torch.randn(1, 1, 16, 16, generator=generator), 0.05, generator)
    result = sample_smc(problem, net, num_particles=4, steps=4, proposal="tweedie", lanczos_iterations=4,
                        sigma_max=5.0, generator=torch.Generator().manual_seed(4))
    diagnostics = result.diagnostics
    assert diagnostics["tweedie_covariance"] == "jacobian"
    assert torch.isfinite(result.samples).all() and torch.isfinite(result.x).all()
    assert torch.isfinite(result.weights).all()
    assert torch.allclose(result.weights, torch.full_like(result.weights, 0.25))
    assert diagnostics["jacobian_products"] == 4 * 4 + diagnostics["conditional_cg_iterations"] + 4
    assert math.isfinite(diagnostics["tweedie_psd_shift"])


def test_lanczos_iterations_are_checked():
    prior, problem, *_ = _case(size=4)
    with pytest.raises(ValueError, match="lanczos_iterations"):
        sample_smc(problem, prior, num_particles=2, steps=2, proposal="tweedie", lanczos_iterations=0)


def test_guarded_conjugate_gradient_solves_spd_and_stops_at_negative_curvature():
    """On an SPD system it is CG (solution to 1e-10); on an element whose matrix is indefinite it stops at the first
    non-positive curvature with a finite iterate while the other element of the batch still converges."""
    q, _ = torch.linalg.qr(_randn(8, 8, seed=7))
    spd = q @ torch.diag(torch.linspace(0.1, 2.0, 8, dtype=F64)) @ q.T
    indefinite = q @ torch.diag(torch.linspace(-1.0, 2.0, 8, dtype=F64)) @ q.T
    matrices = torch.stack([spd, indefinite])
    rhs = _randn(2, 8, seed=8)
    u, relative = _guarded_conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", matrices, v), rhs,
                                              max_iter=100, tol=1e-12)
    assert torch.allclose(u[0], torch.linalg.solve(spd, rhs[0]), atol=1e-10)
    assert relative[0] < 1e-10
    assert torch.isfinite(u[1]).all() and torch.isfinite(relative[1]) and relative[1] <= 1   # never worse than 0
    # preconditioned by the exact inverse of a nearby SPD matrix (flexible CG): the same SPD solution
    nearby = torch.linalg.inv(spd + 0.05 * torch.eye(8, dtype=F64))
    u, relative = _guarded_conjugate_gradient(lambda v: v @ spd.T, rhs, max_iter=100, tol=1e-12,
                                              precondition=lambda v: v @ nearby.T)
    assert torch.allclose(u, torch.linalg.solve(spd, rhs.T).T, atol=1e-10)
