"""RED-Diff against exact oracles, plus the shared sampler helpers it is built on.

The fixed-point test: with a Gaussian prior N(m, S) (exact denoiser D(x, s) = m + S (S + s^2 I)^-1 (x - m)) and a
linear operator, E[eps_hat - eps | mu] = s (S + s^2 I)^-1 (mu - m), so the stochastic iteration, with noise levels
visited in random order, is stationary at the minimiser of
    ||y - A mu||^2 / (2 sigma_y^2) + lam (mu - m)^T W (mu - m) / 2,   W = mean_t w(s_t) s_t (S + s_t^2 I)^-1,
    mu* = (A^T A / sigma_y^2 + lam W)^-1 (A^T y / sigma_y^2 + lam W m).
All tests run in float64 on d <= 128 in seconds.
"""
import math

import pytest
import torch

import invdiff
from invdiff.callbacks import TrajectoryRecorder
from invdiff.settings import hyperparameters
from invdiff.operators.matrix import MatrixOperator
from invdiff.operators.mri import CartesianMRI
from invdiff.priors.analytic import GaussianPrior
from invdiff.problem import InverseProblem
from invdiff.registry import get_sampler
from invdiff.samplers._common import NetworkCalls, call_prior, expand_sigma, randn_like
from invdiff.samplers.reddiff import initial_mean, noise_levels, sample_reddiff

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)



def _gaussian_problem(d=16, m=8, sigma_y=0.1, seed=0, dtype=F64):
    """A Gaussian prior with eigenvalues 0.05..2 in a random basis and a random (m, d) operator."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    cov = (q * torch.logspace(-1.3, 0.3, d, dtype=F64)) @ q.T
    cov = (cov + cov.T) / 2
    mean = 0.3 * torch.randn(d, generator=g, dtype=F64)
    prior = GaussianPrior(mean.reshape(1, 1, d), cov)
    matrix = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(d)
    op = MatrixOperator(matrix, (1, 1, d))
    problem = invdiff.simulate(op, prior.sample(1, g), sigma_y, g)
    return prior, InverseProblem(op, problem.y.to(dtype), sigma_y), cov, mean, matrix


def _fixed_point(cov, mean, matrix, y, sigma_y, lam, sigmas, weight=lambda s: s):
    eye = torch.eye(len(cov), dtype=F64)
    W = sum(weight(s) * s * torch.linalg.inv(cov + s * s * eye) for s in sigmas) / len(sigmas)
    precision = matrix.T @ matrix / sigma_y ** 2 + lam * W
    return torch.linalg.solve(precision, matrix.T @ y / sigma_y ** 2 + lam * W @ mean)


def test_fixed_point_is_the_closed_form_minimiser():
    """Polyak average of 32 chains x last 500 of 1000 random-order steps equals mu* within 3 % of |mu* - A^+ y|.

    Tolerance: the measured error is 0.4-1.2 % over seeds 0-4 (Monte-Carlo error of the average: Adam keeps
    each chain jittering at a scale set by lr and the eps noise; 2000 steps at half the lr give 0.6-0.8 %). W is the mean over the levels of the averaged window (each level is used once, in random order,
    so the window holds a random half of the grid). The test can fail: getting lam 20 % wrong moves mu* by 6 %,
    the weighting w = 1 or w = s^2 instead of w = s by 53 % and 87 %.
    """
    lam, steps, chains = 20.0, 1000, 32
    prior, problem, cov, mean, matrix = _gaussian_problem()
    batch = InverseProblem(problem.operator, problem.y.expand(chains, -1).contiguous(), problem.sigma_y)
    recorder = TrajectoryRecorder(every=1)
    result = sample_reddiff(batch, prior, steps=steps, lr=0.01, lam=lam, time_order="random",
                            generator=_gen(0), callback=recorder)
    iterates = torch.stack(recorder.trajectory[steps // 2:]).reshape(-1, len(cov))
    average = iterates.mean(dim=0)
    window = result.diagnostics["sigmas"][steps // 2:]
    y = problem.y[0]
    expected = _fixed_point(cov, mean, matrix, y, problem.sigma_y, lam, window)
    scale = (expected - problem.operator.A_dagger(problem.y).reshape(-1)).norm()
    error = (average - expected).norm() / scale
    assert error < 0.03, f"relative error {error:.4f}"
    for wrong in (_fixed_point(cov, mean, matrix, y, problem.sigma_y, 1.2 * lam, window),
                  _fixed_point(cov, mean, matrix, y, problem.sigma_y, lam, window, weight=lambda s: 1.0)):
        assert (wrong - expected).norm() / scale > 1.5 * 0.03


def test_defaults_beat_the_pseudo_inverse_on_a_gaussian_oracle():
    """Default hyperparameters (descending sweep) on images of magnitude ~1 with sigma_y = 0.05: the squared error
    to the truth, summed over 8 problems, is at most half that of A^+ y (measured: about a third)."""
    n, d = 4, 16
    g = _gen(3)
    coords = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1, 2).to(F64)
    cov = 0.15 * torch.exp(-((coords[:, None] - coords[None]) ** 2).sum(-1) / 2) + 1e-3 * torch.eye(d, dtype=F64)
    prior = GaussianPrior(0.4 * torch.ones(1, n, n, dtype=F64), cov)
    op = MatrixOperator(torch.randn(6, d, generator=g, dtype=F64) / math.sqrt(d), (1, n, n))
    x = prior.sample(8, g)
    problem = invdiff.simulate(op, x, 0.05, g)
    result = sample_reddiff(problem, prior, generator=_gen(4))
    assert ((result.x - x) ** 2).sum() < 0.5 * ((op.A_dagger(problem.y) - x) ** 2).sum()


def test_seeds_nfe_and_diagnostics():
    prior, problem, *_ = _gaussian_problem()
    first = sample_reddiff(problem, prior, steps=30, generator=_gen(1))
    again = sample_reddiff(problem, prior, steps=30, generator=_gen(1))
    other = sample_reddiff(problem, prior, steps=30, generator=_gen(2))
    assert torch.equal(first.x, again.x)
    assert (first.x - other.x).abs().max() > 1e-6
    d = first.diagnostics
    assert d["nfe"] == 30 and d["seconds"] > 0 and 0 <= d["network_seconds"] + d["init_seconds"] <= d["seconds"]
    assert len(d["sigmas"]) == len(d["loss_data"]) == len(d["loss_prior"]) == 30
    assert d["sigmas"] == sorted(d["sigmas"], reverse=True)
    assert d["sigmas"][0] == pytest.approx(prior.sigma_max) and d["sigmas"][-1] == pytest.approx(prior.sigma_min)
    # the recorded data term is ||y - A mu||^2 / (2 sigma_y^2) at the step's mu (before its update)
    assert d["loss_data"][0] == pytest.approx(
        float(((problem.residual(problem.operator.A_dagger(problem.y))) ** 2).sum() / (2 * 0.01)), rel=1e-9)


def test_batch_elements_are_independent_with_per_image_generators():
    """Adam is per coordinate and the loss sums per-image terms, so image b of a batch run with generators
    [g_0, g_1] is the single-image run with g_b (same noise whatever the batch)."""
    prior, problem, *_ = _gaussian_problem()
    y2 = torch.cat([problem.y, 2 * problem.y])
    batch = sample_reddiff(InverseProblem(problem.operator, y2, problem.sigma_y), prior, steps=25,
                           generator=[_gen(5), _gen(6)])
    single = sample_reddiff(InverseProblem(problem.operator, y2[1:], problem.sigma_y), prior, steps=25,
                            generator=_gen(6))
    assert torch.allclose(batch.x[1:], single.x, rtol=0, atol=1e-10)


def test_random_order_visits_every_level_once():
    grid = noise_levels(40, 0.01, 10.0, "descending", None)
    shuffled = noise_levels(40, 0.01, 10.0, "random", _gen(0))
    assert torch.equal(shuffled.sort(descending=True).values, grid) and not torch.equal(shuffled, grid)


def test_state_is_float32_for_float32_data_with_a_float64_prior():
    prior, problem, *_ = _gaussian_problem(dtype=torch.float32)
    assert prior.dtype == F64
    result = sample_reddiff(problem, prior, steps=5, generator=_gen(0))
    assert result.x.dtype == torch.float32 and torch.isfinite(result.x).all()


def test_complex_mri_images():
    """C = 2 (real, imag) images through single-coil Cartesian MRI: RED-Diff runs like on any real tensor and,
    with a smooth Gaussian prior, ends closer to the truth than the zero-filled start."""
    n = 8
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[0, 3, 4, 6]] = True
    op = CartesianMRI(mask, img_size=(n, n))
    coords = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1, 2).to(F64)
    smooth = 0.2 * torch.exp(-((coords[:, None] - coords[None]) ** 2).sum(-1) / 4) + 1e-3 * torch.eye(n * n, dtype=F64)
    prior = GaussianPrior(torch.zeros(2, n, n, dtype=F64), torch.block_diag(smooth, smooth))
    g = _gen(7)
    x = prior.sample(2, g).float()
    problem = invdiff.simulate(op, x, 0.02, g)
    result = sample_reddiff(problem, prior, init="adjoint", generator=_gen(8))
    assert result.x.shape == (2, 2, n, n) and result.x.dtype == torch.float32
    assert ((result.x - x) ** 2).sum() < ((op.A_adjoint(problem.y) - x) ** 2).sum()


def test_registry_call_equals_direct_call_and_signature_is_the_schema():
    prior, problem, *_ = _gaussian_problem()
    via_registry = invdiff.sample("reddiff", problem, prior, steps=10, lam=5.0, generator=_gen(3))
    direct = sample_reddiff(problem, prior, steps=10, lam=5.0, generator=_gen(3))
    assert torch.equal(via_registry.x, direct.x)
    assert get_sampler("reddiff").metadata["kind"] == "diffusion"
    assert hyperparameters(sample_reddiff) == {"steps": 100, "lr": 0.05, "lam": 100.0, "init": "pinv",
                                               "sigma_max": None, "sigma_min": None, "time_order": "descending",
                                               "weighting": "snr", "antithetic": False}


def test_initialisations():
    prior, problem, *_ = _gaussian_problem()
    op = problem.operator
    assert torch.equal(initial_mean(problem, "pinv", F64), op.A_dagger(problem.y))
    assert torch.equal(initial_mean(problem, "adjoint", F64), op.A_adjoint(problem.y))
    assert not initial_mean(problem, "zeros", F64).any()
    with pytest.raises(ValueError, match="fbp"):
        initial_mean(problem, "fbp", F64)


@pytest.mark.parametrize("kwargs, word", [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"lam": -1.0}, "lam"),
                                          ({"init": "noise"}, "init"), ({"time_order": "up"}, "time_order"),
                                          ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min")])
def test_bad_hyperparameters_are_named(kwargs, word):
    prior, problem, *_ = _gaussian_problem()
    with pytest.raises(ValueError, match=word):
        sample_reddiff(problem, prior, **kwargs)


# ---- shared helpers (invdiff.samplers._common) -------------------------------------------------------------
class _Recording(torch.nn.Module):
    """A float64 'network' that records the dtypes it is called with: D(x, sigma) = x / (1 + sigma^2)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1, dtype=F64))
        self.seen = []

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x, sigma):
        self.seen.append((x.dtype, sigma.dtype))
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_call_prior_casts_at_the_boundary_and_counts():
    net, calls = _Recording(), NetworkCalls()
    x = torch.ones(3, 1, 2, 2)
    out = call_prior(net, x, expand_sigma(1.0, x), calls)
    call_prior(net, x, expand_sigma(torch.tensor([1.0, 2.0, 3.0]), x), calls)
    assert net.seen == [(F64, F64), (F64, F64)] and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(x, 0.5)) and calls.nfe == 2 and calls.seconds >= 0
    with pytest.raises(ValueError, match="sigma"):
        expand_sigma(torch.ones(2), x)


def test_randn_like_per_image_generators():
    x = torch.zeros(2, 1, 3, 3, dtype=F64)
    pair = randn_like(x, [_gen(0), _gen(1)])
    assert torch.equal(pair[1], randn_like(x[:1], _gen(1))[0])
    assert torch.equal(randn_like(x, _gen(4)), randn_like(x, _gen(4)))
    with pytest.raises(ValueError, match="generator"):
        randn_like(x, [_gen(0)])
