"""The SMC sampler at image-like dimension, against closed forms (float64, CPU).

A stationary Gaussian prior on a 16 x 16 grid (d = 256; squared-exponential covariance, length 2 px, per-pixel
variance 0.04, mean 0.5) observed at 40 % of its pixels with sigma_y = 0.05. Its posterior ``N(m_post, C_post)``
comes from dense algebra, and so does every intermediate target of ``proposal="tweedie"``: the diffused posterior
``p(x_t | y) = N(m_post, C_post + t^2 I)``. Scores are in posterior-std units, ``||m - m_post|| / sqrt(tr C_post)``
(the floor for N exact samples is 1 / sqrt(N)), and the variance ratio ``sum(var) / tr C_post``.
"""
from __future__ import annotations

import math

import pytest
import torch

from invdiff.operators.inpainting import Inpainting
from invdiff.operators.matrix import MatrixOperator, to_dense
from invdiff.priors.analytic import GaussianMixturePrior, StationaryGaussianPrior
from invdiff.problem import simulate
from invdiff.samplers.smc import _Likelihood, prior_second_moment, sample_smc
from invdiff.schedules import karras

F64 = torch.float64


def _image_prior(size: int = 16) -> StationaryGaussianPrior:
    k = torch.fft.fftfreq(size, dtype=F64)
    power = torch.exp(-2 * math.pi ** 2 * 4.0 * (k[:, None] ** 2 + k[None, :] ** 2))
    return StationaryGaussianPrior(torch.full((1, size, size), 0.5, dtype=F64), power * (0.04 / power.mean()))


def _case(size: int = 16, sigma_y: float = 0.05):
    prior = _image_prior(size)
    generator = torch.Generator().manual_seed(0)
    operator = Inpainting(torch.rand(size, size, generator=generator) < 0.4)
    problem = simulate(operator, prior.sample(1, generator), sigma_y, generator)
    cov, matrix = prior.covariance(), to_dense(operator)
    precision = torch.linalg.inv(cov + 1e-12 * torch.eye(len(cov), dtype=F64)) + matrix.T @ matrix / sigma_y ** 2
    post_cov = torch.linalg.inv(precision)
    post_mean = post_cov @ (torch.linalg.solve(cov + 1e-12 * torch.eye(len(cov), dtype=F64), prior.mean.reshape(-1))
                            + matrix.T @ problem.y.reshape(-1) / sigma_y ** 2)
    return prior, problem, post_mean, (post_cov + post_cov.T) / 2, cov, matrix


def _scores(particles: torch.Tensor, weights: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
    x = particles.reshape(len(weights), -1)
    m = (weights[:, None] * x).sum(0)
    var = (weights[:, None] * (x - m) ** 2).sum(0)
    total = cov.diagonal().sum()
    return float((m - mean).norm() / total.sqrt()), float(var.sum() / total)


def test_dense_posterior_of_the_case_agrees_with_the_prior_posterior():
    """The test's own precision-form posterior vs ``StationaryGaussianPrior.posterior`` (Kalman form)."""
    prior, problem, mean, cov, _, _ = _case(size=8)
    post = prior.posterior(problem)
    assert torch.allclose(post.mean.reshape(-1), mean, atol=1e-8)
    assert torch.allclose(post.cov, cov, atol=1e-8)


def test_tweedie_proposal_reaches_the_floor_at_d256():
    """d = 256, N = 512: weighted mean within 3x the floor 1/sqrt(N) of the posterior mean (posterior-std units),
    variance ratio in [0.85, 1.15], equal weights (ESS = N) after every step."""
    prior, problem, mean, cov, _, _ = _case()
    n = 512
    result = sample_smc(problem, prior, num_particles=n, steps=5, proposal="tweedie",
                        generator=torch.Generator().manual_seed(1))
    error, ratio = _scores(result.samples[:, 0], result.weights[:, 0], mean, cov)
    assert error <= 3 / math.sqrt(n), error
    assert 0.85 <= ratio <= 1.15, ratio
    assert torch.allclose(result.diagnostics["ess"], torch.full_like(result.diagnostics["ess"], float(n)))


def test_tweedie_intermediate_targets_are_the_diffused_posterior():
    """After each step to t_next the particles must be ``p(x_t | y) = N(m_post, C_post + t_next^2 I)``: mean within
    4x the floor and variance ratio within 10 %, at every step (a wrong bridge, covariance root or solve shows up
    at the step it happens)."""
    prior, problem, mean, cov, _, _ = _case()
    n, seen = 512, []
    eye = torch.eye(len(mean), dtype=F64)

    def record(step, total, state):
        seen.append((float(state["sigma"]), state["particles"][:, 0].clone(), state["weights"][:, 0].clone()))

    result = sample_smc(problem, prior, num_particles=n, steps=5, proposal="tweedie", callback=record,
                        generator=torch.Generator().manual_seed(2))
    sigmas = result.diagnostics["sigmas"]
    assert len(seen) == 5
    for i, (_, particles, weights) in enumerate(seen):
        t = sigmas[i + 1]
        error, ratio = _scores(particles, weights, mean, cov + t * t * eye)
        assert error <= 4 / math.sqrt(n), (i, t, error)
        assert abs(ratio - 1) <= 0.1, (i, t, ratio)


def test_tempered_intermediate_targets_hold_for_the_first_steps():
    """The conditional proposal's own targets ``Q(., t) = N(m, S + t^2 I) exp(-||a_t A x - y||^2 / (2 s_t^2))``
    (closed form) for the first 5 steps at d = 256, N = 1000: the weights carry the twist correctly while the
    increments are small (the bias the dimension sweep shows builds up later, where they concentrate)."""
    prior, problem, _, _, cov, matrix = _case()
    n, seen = 1000, []

    def record(step, total, state):
        seen.append((state["particles"][:, 0].clone(), state["weights"][:, 0].clone()))
        if step == 4:
            raise StopIteration

    with pytest.raises(StopIteration):
        sample_smc(problem, prior, num_particles=n, steps=100, proposal="conditional", callback=record,
                   generator=torch.Generator().manual_seed(3))
    likelihood = _Likelihood(problem, 1.0, prior_second_moment(prior), F64)
    sigmas = karras(100, prior.sigma_min, prior.sigma_max, append_zero=True).to(F64)
    eye = torch.eye(len(cov), dtype=F64)
    y = problem.y.reshape(-1)
    for i, (particles, weights) in enumerate(seen):
        t = float(sigmas[i + 1])
        a, s2 = likelihood.scale(t), likelihood.variance(t)
        prior_precision = torch.linalg.inv(cov + t * t * eye)
        q_cov = torch.linalg.inv(prior_precision + a * a * matrix.T @ matrix / s2)
        q_mean = q_cov @ (prior_precision @ prior.mean.reshape(-1) + a * matrix.T @ y / s2)
        error, ratio = _scores(particles, weights, q_mean, (q_cov + q_cov.T) / 2)
        assert error <= 3 / math.sqrt(n), (i, error)
        assert abs(ratio - 1) <= 0.1, (i, ratio)


def test_tweedie_needs_a_prior_with_a_tweedie_covariance():
    """Every Denoiser has one (a mixture: by autodiff); a bare callable prior without it is refused."""
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.5], dtype=F64), torch.randn(2, 4, dtype=F64,
                                 generator=torch.Generator().manual_seed(0)), torch.tensor(0.2, dtype=F64))
    operator = MatrixOperator(torch.eye(4, dtype=F64)[:2], in_shape=prior.event_shape)
    problem = simulate(operator, prior.sample(1, torch.Generator().manual_seed(1)), 0.1,
                       torch.Generator().manual_seed(2))
    result = sample_smc(problem, prior, num_particles=4, steps=3, proposal="tweedie")
    assert result.diagnostics["tweedie_covariance"] == "jacobian" and torch.isfinite(result.samples).all()

    def bare(x, sigma):
        return prior(x, sigma)

    bare.sigma_min, bare.sigma_max = prior.sigma_min, prior.sigma_max
    with pytest.raises(ValueError, match="tweedie_covariance"):
        sample_smc(problem, bare, num_particles=4, steps=3, proposal="tweedie")
    with pytest.raises(ValueError, match="ODE"):
        sample_smc(problem, _image_prior(4), num_particles=4, steps=3, proposal="tweedie", variant="ode")


class _CountingOperator(MatrixOperator):
    """A MatrixOperator that counts its A and A^T calls (issue 13: no unused A^T, no A(x) computed twice)."""

    def __init__(self, matrix: torch.Tensor, in_shape: tuple[int, ...]):
        super().__init__(matrix, in_shape=in_shape)
        self.calls = {"A": 0, "A_adjoint": 0}

    def A(self, x, *args, **kwargs):
        self.calls["A"] += 1
        return super().A(x, *args, **kwargs)

    def A_adjoint(self, y, *args, **kwargs):
        self.calls["A_adjoint"] += 1
        return super().A_adjoint(y, *args, **kwargs)


@pytest.mark.parametrize("variant, per_step", [("ode", {"A": 1, "A_adjoint": 0}), ("sde", {"A": 1, "A_adjoint": 1})])
def test_operator_calls_per_step(variant, per_step):
    """Without corrector moves or resampling, each extra step costs the ODE one A (at x_next, reused as the next
    step's A x) and no A^T; the SDE with the Euler proposal one A and one A^T (its gradient)."""
    prior = _image_prior(4)
    counts = {}
    for steps in (6, 11):
        operator = _CountingOperator(torch.eye(16, dtype=F64)[::2], in_shape=prior.event_shape)
        problem = simulate(operator, prior.sample(1, torch.Generator().manual_seed(0)), 0.1,
                           torch.Generator().manual_seed(1))
        operator.calls = {"A": 0, "A_adjoint": 0}
        sample_smc(problem, prior, num_particles=8, steps=steps, variant=variant, langevin_steps=0, resample="none",
                   generator=torch.Generator().manual_seed(2))
        counts[steps] = dict(operator.calls)
    assert {k: (counts[11][k] - counts[6][k]) / 5 for k in per_step} == per_step


@pytest.mark.parametrize("kind", ["1d", "2d", "d16"])
def test_tweedie_on_the_small_dense_oracles(kind):
    """The Tweedie proposal on test_smc's dense GaussianPrior + MatrixOperator oracles (the CG path with a dense
    covariance): weighted mean and variance within 0.04 per coordinate at N = 6000, 10 steps."""
    from tests.test_smc import _oracle
    prior, problem, posterior = _oracle(kind)
    result = sample_smc(problem, prior, num_particles=6000, steps=10, proposal="tweedie",
                        generator=torch.Generator().manual_seed(0))
    x = result.samples[:, 0].reshape(6000, -1)
    assert (x.mean(0) - posterior.mean.reshape(-1)).abs().max() <= 0.04
    assert (x.var(0) - posterior.cov.diagonal()).abs().max() <= 0.04
