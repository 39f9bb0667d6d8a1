"""The SMC ensemble sampler (AFDPS) and its exact Stage I, checked against closed forms (float64, CPU).

* Stage I: ``N(0, rho^2 I) exp(-||A x - y||^2 / (2 s^2)) = N(m, Lambda^-1)`` with
  ``Lambda = A^T A / s^2 + I / rho^2`` and ``m = Lambda^-1 A^T y / s^2`` (dense algebra on tiny images).
* The sampler: for a Gaussian prior ``N(m0, S)`` and ``y = A x + n`` the posterior is Gaussian in closed form
  (``GaussianPrior.posterior``); the weighted particles' mean and variance must match it within 0.04
  (N = 6000 particles, 120 steps), for both variants.
* Weights, ESS and resampling: invariance to a common offset, ``1 <= ESS <= N``, ``E[copies_i] = N w_i``.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from invdiff.operators.ct import ParallelBeamCT
from invdiff.operators.inpainting import Inpainting
from invdiff.operators.matrix import MatrixOperator, to_dense
from invdiff.operators.mri import CartesianMRI, SenseMRI
from invdiff.priors.analytic import GaussianPrior
from invdiff.problem import InverseProblem, simulate
from invdiff.registry import get_sampler
from invdiff.samplers.smc import (_Likelihood, effective_sample_size, normalise_log_weights, resample_indices,
                                  sample_smc)
from invdiff.samplers.stage_one import TiltedGaussian, tilted_gaussian_method

F64 = torch.float64


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Stage I ----------------------------------------------------------------------------------------------
def _sense_operator() -> SenseMRI:
    maps = torch.randn(1, 3, 4, 4, dtype=torch.complex128, generator=_seeded(3))
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()          # sum_c |S_c|^2 = 1
    return SenseMRI(torch.tensor([True, False, True, True]), maps)


STAGE_ONE_OPERATORS = {
    "pixel": lambda: Inpainting(torch.rand(3, 4, generator=_seeded(1)) < 0.5, channels=2),
    "fourier": lambda: CartesianMRI(torch.tensor([True, False, True, False, True]), img_size=(3, 5)),
    "cg-matrix": lambda: MatrixOperator(torch.randn(5, 12, generator=_seeded(2), dtype=F64) / 2, in_shape=(1, 3, 4)),
    "cg-sense": _sense_operator,
}


def _tilted_closed_form(operator, y: torch.Tensor, sigma_y: float, rho: float):
    """Dense ``Lambda`` (d, d) and ``m`` (d,) of one problem."""
    a = to_dense(operator)
    d = a.shape[1]
    precision = a.T @ a / sigma_y ** 2 + torch.eye(d, dtype=F64) / rho ** 2
    mean = torch.linalg.solve(precision, a.T @ y.reshape(-1).to(F64) / sigma_y ** 2)
    return precision, mean


def _problem_for(operator, sigma_y: float = 0.3) -> InverseProblem:
    x = torch.randn(1, *operator.in_shape, generator=_seeded(4), dtype=F64)
    return simulate(operator, x, sigma_y, _seeded(5))


def test_stage_one_picks_the_diagonal_basis():
    assert tilted_gaussian_method(STAGE_ONE_OPERATORS["pixel"]()) == "pixel"
    assert tilted_gaussian_method(STAGE_ONE_OPERATORS["fourier"]()) == "fourier"
    assert tilted_gaussian_method(STAGE_ONE_OPERATORS["cg-sense"]()) == "cg"
    assert tilted_gaussian_method(ParallelBeamCT(6, angles=[0.0, 60.0, 120.0])) == "cg"
    with pytest.raises(ValueError, match="fourier"):
        TiltedGaussian(_problem_for(STAGE_ONE_OPERATORS["cg-matrix"]()), 1.0, method="fourier")


@pytest.mark.parametrize("name", sorted(STAGE_ONE_OPERATORS))
def test_stage_one_mean_and_covariance_match_the_closed_form(name):
    """Sample mean / covariance of 20,000 draws vs ``m`` and ``Lambda^-1`` (6 standard errors), and ``mean()``
    vs ``m`` to 1e-8: the pixel, Fourier and perturb-and-solve samplers are exact."""
    operator = STAGE_ONE_OPERATORS[name]()
    problem, rho, n = _problem_for(operator), 1.5, 20_000
    precision, mean = _tilted_closed_form(operator, problem.y, problem.sigma_y, rho)
    covariance = torch.linalg.inv(precision)
    stage = TiltedGaussian(problem, rho)
    assert stage.method == name.split("-")[0]
    assert torch.allclose(stage.mean().reshape(-1), mean, atol=1e-8)
    draws = stage.sample(n, _seeded(6)).reshape(n, -1)
    max_var = covariance.diagonal().max()
    assert (draws.mean(0) - mean).abs().max() < 6 * math.sqrt(max_var / n)
    assert (torch.cov(draws.T) - covariance).abs().max() < 6 * math.sqrt(2 / n) * max_var


@pytest.mark.parametrize("operator", [STAGE_ONE_OPERATORS["cg-matrix"](), STAGE_ONE_OPERATORS["cg-sense"](),
                                      ParallelBeamCT(6, angles=[0.0, 45.0, 90.0, 135.0])],
                         ids=["matrix", "sense", "parallel-ct"])
def test_conjugate_gradient_solve_matches_dense_algebra(operator):
    """``Lambda^-1 r`` by CG equals ``torch.linalg.solve(Lambda, r)`` (relative 1e-8) for every particle."""
    problem, rho = _problem_for(operator, sigma_y=0.1), 2.0
    precision, _ = _tilted_closed_form(operator, problem.y, problem.sigma_y, rho)
    rhs = torch.randn(3, 1, *operator.in_shape, generator=_seeded(7), dtype=F64)
    solution = TiltedGaussian(problem, rho).solve(rhs)
    expected = torch.linalg.solve(precision, rhs.reshape(3, -1).T).T
    assert ((solution.reshape(3, -1) - expected).norm(dim=1) / expected.norm(dim=1)).max() < 1e-8


def test_stage_one_batch_of_problems_matches_separate_problems():
    """With one generator per problem, problem b's draws do not depend on the batch it is in."""
    operator = STAGE_ONE_OPERATORS["cg-matrix"]()
    y = torch.randn(3, 5, generator=_seeded(8), dtype=F64)
    batched = TiltedGaussian(InverseProblem(operator, y, 0.3), 2.0).sample(7, [_seeded(10 + b) for b in range(3)])
    for b in range(3):
        alone = TiltedGaussian(InverseProblem(operator, y[b:b + 1], 0.3), 2.0).sample(7, [_seeded(10 + b)])
        assert torch.allclose(batched[:, b], alone[:, 0], atol=1e-10)


# ---- weights and resampling -------------------------------------------------------------------------------
def test_weights_are_invariant_to_a_common_offset():
    """``normalise(log w + c) = normalise(log w)`` per problem, even for offsets that would overflow exp."""
    log_w = torch.randn(50, 3, generator=_seeded(0), dtype=F64) * 3
    offsets = torch.tensor([[1e4, -1e4, 7.0]], dtype=F64)
    assert torch.allclose(normalise_log_weights(log_w + offsets), normalise_log_weights(log_w), atol=1e-9)
    assert torch.allclose(effective_sample_size(log_w + offsets), effective_sample_size(log_w), rtol=1e-9)
    assert torch.allclose(normalise_log_weights(log_w).exp().sum(0), torch.ones(3, dtype=F64))


def test_effective_sample_size_bounds():
    """ESS = N for equal weights, 1 for a single surviving particle, in [1, N] otherwise."""
    n = 40
    one_hot = torch.full((n, 1), -math.inf, dtype=F64)
    one_hot[3] = 0.0
    assert effective_sample_size(torch.zeros(n, 1, dtype=F64)).item() == pytest.approx(n)
    assert effective_sample_size(one_hot).item() == pytest.approx(1.0)
    random = effective_sample_size(torch.randn(n, 100, generator=_seeded(1), dtype=F64) * 4)
    assert bool(((random >= 1 - 1e-12) & (random <= n + 1e-9)).all())


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_resampling_is_unbiased(scheme):
    """Averaged over 20,000 independent resamplings, particle i is copied ``N w_i`` times (5 standard errors)."""
    n, repeats = 8, 20_000
    w = torch.tensor([0.30, 0.02, 0.15, 0.05, 0.0, 0.25, 0.13, 0.10], dtype=F64)
    ancestors = resample_indices(w[:, None].expand(n, repeats), scheme, _seeded(2))
    counts = torch.zeros(n, repeats, dtype=F64).scatter_add_(0, ancestors, torch.ones(n, repeats, dtype=F64))
    standard_error = (n * w * (1 - w)).sqrt() / math.sqrt(repeats)
    assert bool(((counts.mean(1) - n * w).abs() <= 5 * standard_error + 1e-12).all())
    assert counts[4].max() == 0                                  # a zero weight is never copied
    if scheme == "systematic":
        # systematic resampling copies each particle floor(N w_i) or ceil(N w_i) times
        assert bool(((counts >= torch.floor(n * w)[:, None]) & (counts <= torch.ceil(n * w)[:, None])).all())


# ---- the sampler on exact Gaussian posteriors --------------------------------------------------------------
def _oracle(kind: str):
    """Gaussian prior and a linear problem whose posterior is known in closed form."""
    if kind == "1d":
        prior = GaussianPrior(torch.tensor([0.3], dtype=F64), torch.tensor([[1.0]], dtype=F64))
        matrix, sigma_y = torch.tensor([[1.0]], dtype=F64), 0.5
    elif kind == "2d":
        prior = GaussianPrior(torch.tensor([0.5, -0.2], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64))
        matrix, sigma_y = torch.tensor([[1.0, 0.5]], dtype=F64), 0.3
    else:
        # d = 16 (a 4 x 4 image), correlated prior (eigenvalues 0.2 .. 0.6, random eigenvectors), 14 orthonormal
        # measurements (A A^T = I, like inpainting and single-coil MRI)
        generator = _seeded(100)
        rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=F64))
        covariance = rotation @ torch.diag(torch.linspace(0.2, 0.6, 16, dtype=F64)) @ rotation.T
        prior = GaussianPrior(0.3 * torch.randn(1, 4, 4, generator=generator, dtype=F64), covariance)
        matrix = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=F64))[0][:14]
        sigma_y = 0.3
    operator = MatrixOperator(matrix, in_shape=prior.event_shape)
    generator = _seeded(7)
    problem = simulate(operator, prior.sample(1, generator), sigma_y, generator)
    return prior, problem, prior.posterior(problem)


def _weighted_moments(result):
    w = result.weights[:, 0]
    particles = result.samples[:, 0].reshape(len(w), -1)
    mean = (w[:, None] * particles).sum(0)
    return mean, (w[:, None] * (particles - mean) ** 2).sum(0)


@pytest.mark.parametrize("variant, proposal", [("sde", "euler"), ("ode", "euler"), ("sde", "conditional")])
@pytest.mark.parametrize("kind", ["1d", "2d", "d16"])
def test_weighted_particles_match_the_exact_gaussian_posterior(kind, variant, proposal):
    """|weighted mean - posterior mean| and |weighted variance - posterior variance| <= 0.04 per coordinate
    (N = 6000, 120 steps, float64); every ESS in [1, N]; the returned weights sum to 1."""
    prior, problem, posterior = _oracle(kind)
    n = 6000
    result = sample_smc(problem, prior, num_particles=n, steps=120, variant=variant, proposal=proposal,
                        generator=_seeded(0))
    mean, var = _weighted_moments(result)
    assert (mean - posterior.mean.reshape(-1)).abs().max() <= 0.04
    assert (var - posterior.cov.diagonal()).abs().max() <= 0.04
    ess = result.diagnostics["ess"]
    assert ess.shape == (120, 1) and bool(((ess >= 1 - 1e-9) & (ess <= n + 1e-6)).all())
    assert result.weights.dtype == F64 and result.weights.sum().item() == pytest.approx(1.0)
    assert torch.allclose(result.x.reshape(-1), mean)
    assert torch.allclose(result.diagnostics["std"].reshape(-1) ** 2, var)


@pytest.mark.parametrize("variant", ["sde", "ode"])
def test_paper_likelihood_is_exact_where_explicit_euler_is_stable(variant):
    """``stable_likelihood=False`` (the paper's fixed mu_y) on a 2-D problem started at sigma_max = 1, where
    ``2 t dt ||A||^2 / sigma_y^2 < 2`` at every step; a zero-mean isotropic prior makes Stage I exact at any T.
    Its weights are noisier than the tempered family's (measured: the SDE's weighted mean scatters with a
    standard deviation of ~0.02 across seeds even at N = 20,000), hence the larger ensemble."""
    prior = GaussianPrior(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64) * 0.8)
    operator = MatrixOperator(torch.tensor([[1.0, 0.4]], dtype=F64), in_shape=prior.event_shape)
    problem = InverseProblem(operator, torch.tensor([[0.7]], dtype=F64), 0.8)
    posterior = prior.posterior(problem)
    result = sample_smc(problem, prior, num_particles=20_000, steps=120, variant=variant, stable_likelihood=False,
                        sigma_max=1.0, generator=_seeded(1))
    mean, var = _weighted_moments(result)
    assert result.diagnostics["kappa"] == 0.0
    if variant == "sde":
        assert result.diagnostics["stiffness"].max() < 2
    assert (mean - posterior.mean.reshape(-1)).abs().max() <= 0.04
    assert (var - posterior.cov.diagonal()).abs().max() <= 0.04


def test_stiffness_is_recorded_and_warned_about(caplog):
    """The paper's explicit Euler step is unstable once ``2 t dt ||A||^2 / sigma_y^2 > 2``: the diagnostics show
    it and a warning names the fix; the tempered likelihood keeps every step below 2."""
    prior, problem, _ = _oracle("1d")
    with caplog.at_level(logging.WARNING, logger="invdiff.samplers.smc"):
        paper = sample_smc(problem, prior, num_particles=8, steps=20, stable_likelihood=False, generator=_seeded(0))
    assert paper.diagnostics["stiffness"].max() > 2
    assert "stable_likelihood=True" in caplog.text
    stable = sample_smc(problem, prior, num_particles=8, steps=20, generator=_seeded(0))
    assert stable.diagnostics["stiffness"].max() < 2


def test_conditional_proposal_is_stable_where_explicit_euler_diverges():
    """sigma_y = 0.02 with the paper's fixed likelihood from sigma_max = 80: explicit Euler's stability number
    passes 2 and its particles blow up; the conditional proposal (the Euler kernel conditioned on y, drawn
    exactly) has no such limit and lands on the posterior (1-D, N = 4000, 120 steps)."""
    prior = GaussianPrior(torch.tensor([0.3], dtype=F64), torch.tensor([[1.0]], dtype=F64))
    operator = MatrixOperator(torch.tensor([[1.0]], dtype=F64), in_shape=prior.event_shape)
    problem = InverseProblem(operator, torch.tensor([[0.9]], dtype=F64), 0.02)
    posterior = prior.posterior(problem)
    kwargs = dict(num_particles=4000, steps=120, stable_likelihood=False, generator=_seeded(0))
    euler = sample_smc(problem, prior, **kwargs)
    diverged = ~torch.isfinite(euler.samples) | (euler.samples.abs() > 1e6)
    assert euler.diagnostics["stiffness"].max() > 2 and diverged.all()
    conditional = sample_smc(problem, prior, proposal="conditional", **kwargs)
    mean, var = _weighted_moments(conditional)
    assert conditional.diagnostics["stiffness"].max() == 0
    assert abs(mean.item() - posterior.mean.item()) < 0.01
    assert abs(var.sqrt().item() / posterior.cov.item() ** 0.5 - 1) < 0.1


@pytest.mark.parametrize("name", sorted(STAGE_ONE_OPERATORS))
def test_conditional_draws_match_the_closed_form_for_each_particles_data(name):
    """``TiltedGaussian.conditional(r)``: for each particle its own data r, mean ``Lambda^-1 A^T r / s^2`` (1e-8)
    and draws with covariance ``Lambda^-1`` (20,000 particles, all given the same r, 6 standard errors)."""
    operator = STAGE_ONE_OPERATORS[name]()
    problem, rho = _problem_for(operator), 0.8
    precision, _ = _tilted_closed_form(operator, problem.y, problem.sigma_y, rho)
    a = to_dense(operator)
    stage = TiltedGaussian(problem, rho)
    residuals = torch.randn(3, *problem.y.shape, generator=_seeded(11), dtype=F64)
    if name == "fourier":   # k-space data lives on the sampled locations only
        residuals = operator.A(operator.A_adjoint(residuals[:, 0])).unsqueeze(1)
    move = stage.conditional(residuals, _seeded(12))
    mean = move.mean
    expected = torch.linalg.solve(precision, a.T @ residuals.reshape(3, -1).T / problem.sigma_y ** 2).T
    assert torch.allclose(mean.reshape(3, -1), expected, atol=1e-8)
    # the evidence quadratic r^T (s^2 I + rho^2 A A^T)^-1 r that weights the conditional proposal, densely
    data_cov = problem.sigma_y ** 2 * torch.eye(a.shape[0], dtype=F64) + rho ** 2 * a @ a.T
    flat = residuals.reshape(3, -1)
    quadratic = (flat * torch.linalg.solve(data_cov, flat.T).T).sum(dim=1)
    assert move.quadratic.shape == (3, 1) and move.quadratic.dtype == F64
    assert torch.allclose(move.quadratic.reshape(3), quadratic, rtol=1e-8)
    n = 20_000
    same = residuals[:1].expand(n, *residuals.shape[1:])
    draws = stage.conditional(same, _seeded(13)).draw
    draws = draws.reshape(n, -1)
    covariance = torch.linalg.inv(precision)
    max_var = covariance.diagonal().max()
    assert (draws.mean(0) - expected[0]).abs().max() < 6 * math.sqrt(max_var / n)
    assert (torch.cov(draws.T) - covariance).abs().max() < 6 * math.sqrt(2 / n) * max_var


def test_hutchinson_laplacian_estimates_the_trace():
    """E[z^T (Hessian mu_t) z] = a_t^2 ||A||_F^2 / s_t^2 for Rademacher z (linear A: the Hessian is constant)."""
    _, problem, _ = _oracle("2d")
    likelihood = _Likelihood(problem, kappa=1.0, second_moment=0.9, dtype=F64)
    t = 0.7
    x = torch.randn(3, 1, *problem.operator.in_shape, generator=_seeded(2), dtype=F64)
    probes = torch.where(torch.rand(4000, 1, *problem.operator.in_shape, generator=_seeded(3)) < 0.5, 1.0, -1.0)
    estimate = likelihood.laplacian(x, t, probes.to(F64))
    exact = likelihood.scale(t) ** 2 * to_dense(problem.operator).pow(2).sum() / likelihood.variance(t)
    assert torch.allclose(estimate, exact.expand_as(estimate), rtol=0.05)


# ---- plumbing: seeds, batches, shapes, registry ------------------------------------------------------------
def test_same_seed_gives_the_same_result():
    prior, problem, _ = _oracle("2d")
    first = sample_smc(problem, prior, num_particles=64, steps=20, generator=_seeded(3))
    second = sample_smc(problem, prior, num_particles=64, steps=20, generator=_seeded(3))
    other = sample_smc(problem, prior, num_particles=64, steps=20, generator=_seeded(4))
    assert torch.equal(first.samples, second.samples) and torch.equal(first.weights, second.weights)
    assert not torch.equal(first.samples, other.samples)


@pytest.mark.parametrize("variant", ["sde", "ode"])
def test_batch_of_problems_equals_separate_runs(variant):
    """Particles of B problems go through the prior as one N * B batch; with one generator per problem each
    problem's particles, weights and resampling decisions equal those of a run on that problem alone."""
    prior = GaussianPrior(torch.zeros(1, 2, 3, dtype=F64), torch.eye(6, dtype=F64) * 0.7)
    operator = MatrixOperator(torch.randn(4, 6, generator=_seeded(0), dtype=F64) / 2, in_shape=(1, 2, 3))
    y = torch.randn(3, 4, generator=_seeded(1), dtype=F64)
    kwargs = dict(num_particles=50, steps=30, variant=variant)
    batched = sample_smc(InverseProblem(operator, y, 0.3), prior, generator=[_seeded(10 + b) for b in range(3)],
                         **kwargs)
    assert batched.samples.shape == (50, 3, 1, 2, 3) and batched.weights.shape == (50, 3)
    assert batched.diagnostics["resampled"].any()            # the comparison covers resampling too
    for b in range(3):
        alone = sample_smc(InverseProblem(operator, y[b:b + 1], 0.3), prior, generator=[_seeded(10 + b)], **kwargs)
        assert torch.allclose(batched.samples[:, b], alone.samples[:, 0], atol=1e-8)
        assert torch.allclose(batched.weights[:, b], alone.weights[:, 0], atol=1e-8)
        assert torch.equal(batched.diagnostics["resampled"][:, b], alone.diagnostics["resampled"][:, 0])


@pytest.mark.parametrize("operator", [STAGE_ONE_OPERATORS["pixel"](), STAGE_ONE_OPERATORS["fourier"]()],
                         ids=["inpainting", "cartesian-mri"])
def test_outputs_on_image_operators(operator):
    """Shapes and records on operators with a diagonal Stage I, in float32 (the image-task precision)."""
    shape = operator.in_shape
    prior = GaussianPrior(torch.zeros(shape, dtype=F64), torch.eye(math.prod(shape), dtype=F64) * 0.5)
    problem = simulate(operator.float(), torch.randn(2, *shape, generator=_seeded(0)), 0.05, _seeded(1))
    calls = []
    result = sample_smc(problem, prior, num_particles=5, steps=6, callback=lambda i, total, state: calls.append(
        (i, total, tuple(state["x"].shape))), generator=_seeded(2))
    assert result.x.shape == (2, *shape) and result.x.dtype == torch.float32
    assert result.samples.shape == (5, 2, *shape) and result.weights.shape == (5, 2)
    assert result.diagnostics["best_particle"].shape == (2, *shape)
    assert result.diagnostics["std"].shape == (2, *shape)
    assert result.diagnostics["stage_one_method"] == tilted_gaussian_method(operator)
    # one network call per step, plus rejuvenation_steps (2) Langevin moves after each step that resampled
    moves = 2 * int(result.diagnostics["resampled"].any(dim=1).sum())
    assert result.diagnostics["nfe"] == 6 + moves and result.diagnostics["particle_evaluations"] == 5 * (6 + moves)
    assert calls == [(i, 6, (2, *shape)) for i in range(6)]
    assert torch.isfinite(result.samples).all()


def test_registered_as_a_diffusion_sampler():
    entry = get_sampler("smc")
    assert entry.factory is sample_smc and entry.metadata.get("kind") == "diffusion"


@pytest.mark.parametrize("bad", [dict(variant="heun"), dict(resample="stratified"), dict(num_particles=0),
                                 dict(ess_threshold=1.5), dict(stable_likelihood=-1.0), dict(weight_rule="exact"),
                                 dict(langevin_step_size=0.0), dict(sigma_max=0.001, sigma_min=0.01),
                                 dict(proposal="implicit"), dict(proposal="conditional", variant="ode")])
def test_bad_arguments_raise_value_errors_that_name_them(bad):
    prior, problem, _ = _oracle("1d")
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        sample_smc(problem, prior, steps=2, **bad)
