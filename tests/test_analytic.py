"""The analytic priors are the oracle for every sampler, so they are checked against independent math here.

* log p_sigma(x) equals torch.distributions' Gaussian (mixture) log-density of N(m, S + sigma^2 I);
* Tweedie: D(x, sigma) = x + sigma^2 grad_x log p_sigma(x), the gradient by autograd;
* D(x, sigma) = E[x0 | x0 + sigma n = x] by self-normalised importance weighting of prior samples;
* prior and posterior samples have the exact mean and covariance within 5 Monte-Carlo standard errors,
  entrywise (seeded; with at most ~1200 statistics per check a correct sampler fails one with probability
  below 1e-3);
* Gaussian posteriors equal the textbook formulas with plain float64 inverses
  Sigma = (S^-1 + A^T A / s^2)^-1, mu = Sigma (S^-1 m + A^T y / s^2), on MatrixOperators and on real
  operators through to_dense;
* the stationary prior equals the dense prior with the circulant covariance F^H diag(P) F (explicit DFT
  matrices), including the per-frequency posterior for circular blur and single-coil MRI;
* mixture posterior weights w_k N(y; A m_k, A S_k A^T + s^2 I) equal numerical integration on a 1-D grid.
"""
import math

import pytest
import torch

import invdiff
from invdiff.operators.base import Operator
from invdiff.operators.matrix import MatrixOperator, to_dense
from invdiff.priors.analytic import (DiagonalGaussianPrior, FourierGaussianPosterior, GaussianMixturePrior,
                                     GaussianPrior, LowRankGaussianPrior, MixturePosterior,
                                     StationaryGaussianPrior, grid_mixture_25, shift_invariant_transfer,
                                     two_mode_mixture)
from invdiff.priors.base import Denoiser
from invdiff.problem import InverseProblem, simulate

F64 = torch.float64
N_SE = 5.0  # Monte-Carlo bound: 5 standard errors


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _spd(d, seed, floor=0.2):
    b = _randn(d, d, seed=seed)
    return b @ b.T / d + floor * torch.eye(d, dtype=F64)


def _even_spectrum(shape, seed):
    """|fft2(k)|^2 + 0.1 of a real random kernel: even in k, strictly positive."""
    kernel = _randn(*shape, seed=seed)
    return torch.fft.fft2(kernel, norm="ortho").abs() ** 2 / 2 + 0.1


def _dft_matrix(n):
    k = torch.arange(n, dtype=F64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n) / math.sqrt(n)


def _circulant_covariance(power):
    """S = blockdiag_c(F^H diag(P_c) F) with explicit DFT matrices (row-major vec of (H, W) per channel)."""
    c, h, w = power.shape
    f2 = torch.kron(_dft_matrix(h), _dft_matrix(w))
    blocks = [(f2.conj().T @ torch.diag(power[i].reshape(-1).to(torch.complex128)) @ f2).real for i in range(c)]
    return torch.block_diag(*blocks)


# ---- priors used throughout: (prior, dense covariances, means, weights) from their construction inputs ----
def _gaussian_cases():
    """name -> (prior, mean (d,), covariance (d, d)) with covariance built independently of the prior."""
    shape = (1, 2, 3)
    mean = _randn(*shape, seed=1)
    dense_cov = _spd(6, seed=2)
    var = torch.rand(6, generator=_gen(3), dtype=F64) + 0.3
    factor, diag = _randn(6, 2, seed=4), torch.rand(6, generator=_gen(5), dtype=F64) + 0.2
    power = _even_spectrum((2, 2, 3), seed=6)
    stat_mean = _randn(2, 2, 3, seed=7)
    return {
        "dense": (GaussianPrior(mean, dense_cov), mean.reshape(-1), dense_cov),
        "diagonal": (DiagonalGaussianPrior(mean, var), mean.reshape(-1), torch.diag(var)),
        "low_rank": (LowRankGaussianPrior(mean, factor, diag), mean.reshape(-1), factor @ factor.T + torch.diag(diag)),
        "stationary": (StationaryGaussianPrior(stat_mean, power), stat_mean.reshape(-1), _circulant_covariance(power)),
    }


def _mixture_cases():
    """name -> (prior, weights (K,), means (K, d), covariances (K, d, d))."""
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    means = 2.0 * _randn(3, 4, seed=11)
    full = torch.stack([_spd(4, seed=12 + k) for k in range(3)])
    diag = torch.rand(3, 4, generator=_gen(15), dtype=F64) + 0.2
    iso = torch.tensor([0.3, 1.0, 0.6], dtype=F64)
    eye = torch.eye(4, dtype=F64)
    return {
        "mixture_full": (GaussianMixturePrior(weights, means, full, shape=(1, 2, 2)), weights, means, full),
        "mixture_diagonal": (GaussianMixturePrior(weights, means, diag), weights, means, torch.diag_embed(diag)),
        "mixture_isotropic": (GaussianMixturePrior(weights, means, iso), weights, means, iso[:, None, None] * eye),
    }


GAUSSIANS = _gaussian_cases()
MIXTURES = _mixture_cases()
ALL = {**{k: v[0] for k, v in GAUSSIANS.items()}, **{k: v[0] for k, v in MIXTURES.items()}}


def _reference_log_prob(name, x_flat, sigma):
    """log N(x; m, S + sigma^2 I) (or the mixture's log-sum-exp) from torch.distributions, per row."""
    if name in GAUSSIANS:
        _, mean, cov = GAUSSIANS[name]
        return torch.stack([torch.distributions.MultivariateNormal(mean, cov + s ** 2 * torch.eye(len(mean), dtype=F64))
                            .log_prob(x) for x, s in zip(x_flat, sigma)])
    _, weights, means, covs = MIXTURES[name]
    out = []
    for x, s in zip(x_flat, sigma):
        comps = torch.distributions.MultivariateNormal(means, covs + s ** 2 * torch.eye(means.shape[1], dtype=F64))
        out.append(torch.logsumexp(weights.log() + comps.log_prob(x), 0))
    return torch.stack(out)


def _reference_moments(name):
    if name in GAUSSIANS:
        _, mean, cov = GAUSSIANS[name]
        return mean, cov
    _, weights, means, covs = MIXTURES[name]
    mean = weights @ means
    shifts = means - mean
    return mean, (weights[:, None, None] * (covs + shifts[:, :, None] * shifts[:, None, :])).sum(0)


def assert_moments(samples, mean, cov, what):
    """Sample mean and covariance (about the true mean) within N_SE empirical standard errors, entrywise."""
    x = samples.reshape(len(samples), -1)
    n = len(x)
    centred = x - mean
    mean_se = cov.diagonal().sqrt() / math.sqrt(n)
    mean_err = centred.mean(0).abs()
    assert (mean_err <= N_SE * mean_se).all(), f"{what}: mean off by {(mean_err / mean_se).max():.1f} SE"
    products = centred[:, :, None] * centred[:, None, :]
    cov_err = (products.mean(0) - cov).abs()
    cov_se = products.std(0) / math.sqrt(n)
    assert (cov_err <= N_SE * cov_se + 1e-12).all(), f"{what}: covariance off by {(cov_err / cov_se).max():.1f} SE"


# ---- test operators that are not matrices (shift-invariant ones, for the Fourier posterior) ----
class CircularBlur(Operator):
    """y = k (*) x, circular convolution per channel, written as a sum of rolls (no FFT)."""

    def __init__(self, kernel, shape):
        super().__init__()
        self.register_buffer("kernel", torch.as_tensor(kernel, dtype=F64))
        self.shape = tuple(shape)

    @property
    def in_shape(self):
        return self.shape

    def _convolve(self, x, sign):
        out = torch.zeros_like(x)
        for a in range(self.kernel.shape[0]):
            for b in range(self.kernel.shape[1]):
                out = out + self.kernel[a, b].to(x.dtype) * torch.roll(x, (sign * a, sign * b), dims=(-2, -1))
        return out

    def A(self, x, **kwargs):
        return self._convolve(x, 1)

    def A_adjoint(self, y, **kwargs):
        return self._convolve(y, -1)


class SingleCoilMRI(Operator):
    """y = M F (x_0 + i x_1) with an asymmetric mask, so A^T A mixes the real and imaginary channels."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.bool))

    @property
    def in_shape(self):
        return (2, *self.mask.shape)

    def A(self, x, **kwargs):
        k = torch.where(self.mask, torch.fft.fft2(torch.complex(x[:, 0], x[:, 1]), norm="ortho"), 0)
        return torch.stack([k.real, k.imag], dim=1)

    def A_adjoint(self, y, **kwargs):
        img = torch.fft.ifft2(torch.where(self.mask, torch.complex(y[:, 0], y[:, 1]), 0), norm="ortho")
        return torch.stack([img.real, img.imag], dim=1)


class Squares(Operator):
    """A nonlinear map, which an exact posterior must refuse."""

    @property
    def in_shape(self):
        return (1, 1, 3)

    def A(self, x, **kwargs):
        return x ** 2

    def A_adjoint(self, y, **kwargs):
        return y


def _brute_force_posterior(mean, cov, matrix, y, sigma_y):
    """Sigma = (S^-1 + A^T A / s^2)^-1, mu = Sigma (S^-1 m + A^T y / s^2), plain float64 inverses."""
    precision = torch.linalg.inv(cov) + matrix.T @ matrix / sigma_y ** 2
    post_cov = torch.linalg.inv(precision)
    return post_cov @ (torch.linalg.inv(cov) @ mean + matrix.T @ y / sigma_y ** 2), post_cov


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- MatrixOperator and to_dense ----------------------------------------------------------------------------
def test_matrix_operator_adjoint_pinv_and_shapes():
    """<A x, y> = <x, A^T y> to 1e-14; A_dagger = pinv(A); A computes in the input's precision."""
    op = invdiff.example_operator("matrix")
    assert isinstance(op, MatrixOperator) and op.in_shape == (1, 3, 4)
    x, y = _randn(3, 1, 3, 4, seed=0), _randn(3, 7, seed=1)
    lhs, rhs = (op.A(x) * y).sum(), (x * op.A_adjoint(y)).sum()
    assert abs(lhs - rhs) / (op.A(x).norm() * y.norm()) < 1e-14
    assert torch.allclose(op.A_dagger(y).reshape(3, -1), y @ torch.linalg.pinv(op.matrix).T, atol=1e-13)
    assert torch.equal(to_dense(op), op.matrix)
    low = MatrixOperator(op.matrix.float(), (1, 3, 4))
    assert low.A(x).dtype == F64 and low.A(x.float()).dtype == torch.float32
    # A float64 input to a float32 operator gets a float64 pseudo-inverse of the float32 matrix: A A^+ A = A.
    a = low.matrix.double()
    pinv = low.A_dagger(torch.eye(7, dtype=F64)).reshape(7, 12).T          # column j = A^+ e_j
    assert torch.allclose(a @ pinv @ a, a, atol=1e-12)
    with pytest.raises(ValueError, match="columns"):
        MatrixOperator(torch.zeros(3, 5), (1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 1, 3, 4\)"):
        op.A(torch.zeros(2, 12, dtype=F64))


def test_to_dense_of_a_real_operator():
    """Column j of to_dense(op) is vec(A e_j): the rolled kernel for a circular blur; A x = matrix @ vec(x)."""
    kernel = torch.tensor([[0.5, 0.2], [0.1, 0.0], [0.05, 0.15]], dtype=F64)
    op = CircularBlur(kernel, (1, 4, 5))
    matrix = to_dense(op, chunk=7)
    x = _randn(1, 1, 4, 5, seed=3)
    assert torch.allclose(matrix @ x.reshape(-1), op.A(x).reshape(-1), atol=1e-14)
    # entry (row (h, w), column (h', w')) is kernel[(h - h') mod 4, (w - w') mod 5]
    for (h, w, hh, ww) in [(0, 0, 0, 0), (1, 0, 0, 0), (2, 3, 0, 2), (0, 1, 3, 0)]:
        a, b = (h - hh) % 4, (w - ww) % 5
        expected = kernel[a, b] if a < 3 and b < 2 else 0.0
        assert matrix[h * 5 + w, hh * 5 + ww] == expected
    with pytest.raises(ValueError, match="d = 20"):
        to_dense(op, max_dim=10)


# ---- the denoisers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL))
def test_log_prob_is_the_gaussian_convolution(name):
    """log p_sigma(x) = log N(x; m, S + sigma^2 I) (mixtures: log sum_k w_k N(x; m_k, S_k + sigma^2 I))."""
    prior = ALL[name]
    x = 2 * _randn(4, *prior.event_shape, seed=20)
    sigma = torch.tensor([0.03, 0.4, 1.5, 7.0], dtype=F64)
    expected = _reference_log_prob(name, x.reshape(4, -1), sigma)
    assert torch.allclose(prior.log_prob(x, sigma), expected, rtol=1e-11, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ALL))
def test_tweedie_identity(name):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (autograd of the closed-form log-density), per-sample sigma."""
    prior = ALL[name]
    x = (2 * _randn(5, *prior.event_shape, seed=21)).requires_grad_(True)
    sigma = torch.tensor([0.01, 0.2, 0.9, 3.0, 30.0], dtype=F64)
    grad, = torch.autograd.grad(prior.log_prob(x, sigma).sum(), x)
    tweedie = x + sigma.reshape(-1, 1, 1, 1) ** 2 * grad
    assert torch.allclose(prior(x, sigma), tweedie, rtol=1e-9, atol=1e-10)
    assert torch.allclose(prior.score(x, sigma), grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ALL))
def test_denoiser_is_the_posterior_mean_of_prior_samples(name):
    """E[x0 | x0 + sigma n = x] by self-normalised importance weighting of 200k prior samples,
    w_i = N(x; x0_i, sigma^2 I); |D(x) - estimate| < 5 delta-method standard errors."""
    prior = ALL[name]
    x0 = prior.sample(200_000, _gen(30)).reshape(200_000, -1)
    sigma = 1.2
    query = prior.sample(1, _gen(31)).reshape(1, -1) + sigma * _randn(1, x0.shape[1], seed=32)
    log_w = -((x0 - query) ** 2).sum(1) / (2 * sigma ** 2)
    w = torch.softmax(log_w, 0)
    ess = 1 / (w ** 2).sum()
    assert ess > 500, f"test set-up: importance weights too degenerate (ESS {ess:.0f})"
    estimate = w @ x0
    se = ((w[:, None] ** 2) * (x0 - estimate) ** 2).sum(0).sqrt()
    exact = prior(query, torch.tensor([sigma], dtype=F64)).reshape(-1)
    assert ((exact - estimate).abs() <= N_SE * se).all(), f"{name}: {((exact - estimate).abs() / se).max():.1f} SE"


@pytest.mark.parametrize("name", sorted(ALL))
def test_prior_samples_have_the_prior_moments(name):
    """Prior samples: mean m and covariance S (mixtures: total covariance) within 5 standard errors."""
    prior = ALL[name]
    mean, cov = _reference_moments(name)
    samples = prior.sample(20_000, _gen(40))
    assert samples.shape == (20_000, *prior.event_shape) and samples.dtype == F64
    assert_moments(samples, mean, cov, name)
    assert torch.allclose(prior.covariance(), cov, atol=1e-12)
    assert torch.allclose(prior.mean.reshape(-1), mean, atol=1e-14)


def test_denoiser_protocol_and_precision():
    """channels/image_size from the event shape; (B, d) input = (B, C, H, W) input; float32 in -> float32 out;
    D -> x as sigma -> 0 (nonsingular prior) and D -> mean as sigma -> inf."""
    prior = GAUSSIANS["stationary"][0]
    assert (prior.channels, prior.image_size, prior.dtype) == (2, (2, 3), F64)
    assert 0 < prior.sigma_min < prior.sigma_max
    x = _randn(3, 2, 2, 3, seed=50)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    for p in ALL.values():
        xp = _randn(3, *p.event_shape, seed=51)
        assert torch.allclose(p(xp.reshape(3, -1), sigma).reshape(xp.shape), p(xp, sigma), atol=1e-14)
        out32 = p(xp.float(), sigma.float())
        assert out32.dtype == torch.float32 and torch.allclose(out32.double(), p(xp, sigma), rtol=1e-4, atol=1e-4)
        assert torch.allclose(p(xp, 1e-7), xp, atol=1e-8)
        far = p(xp, 1e8)
        assert torch.allclose(far, p.mean.expand_as(far), atol=1e-6)
    assert prior(x, 0.5).shape == x.shape
    with pytest.raises(ValueError, match="expected x of shape"):
        prior(torch.zeros(1, 5, dtype=F64), 1.0)


# ---- Gaussian posteriors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,sigma_y", [(4, 0.3), (9, 1e-3)])
@pytest.mark.parametrize("name", sorted(GAUSSIANS))
def test_gaussian_posterior_matches_plain_inverses(name, rows, sigma_y):
    """mean and cov equal (S^-1 + A^T A / s^2)^-1 forms for an under- (4 x d) and over-determined (9 x d) A,
    to 1e-8 relative; the posterior log-density equals torch.distributions'; exact samples have that mean
    and covariance within 5 SE (s = 0.3 is comparable to A's singular values, so the shrinkage shows)."""
    prior, mean, cov = GAUSSIANS[name]
    d = len(mean)
    op = MatrixOperator(_randn(rows, d, seed=60 + rows), prior.event_shape)
    problem = simulate(op, prior.sample(1, _gen(61)), sigma_y, _gen(62))
    post = prior.posterior(problem)
    exact_mean, exact_cov = _brute_force_posterior(mean, cov, op.matrix, problem.y.reshape(-1), sigma_y)
    assert post.mean.shape == prior.event_shape
    assert _rel(post.mean.reshape(-1), exact_mean) < 1e-8
    assert _rel(post.cov, exact_cov) < 1e-8
    assert torch.allclose(post.std.reshape(-1) ** 2, exact_cov.diagonal(), rtol=1e-7)
    x = post.sample(3, _gen(63))
    exact = torch.distributions.MultivariateNormal(exact_mean, (exact_cov + exact_cov.T) / 2)
    reference = exact.log_prob(x.reshape(3, -1))
    assert torch.allclose(post.log_prob(x), reference, rtol=1e-7)
    assert_moments(post.sample(20_000, _gen(64)), exact_mean, exact_cov, f"{name} posterior")


def test_posterior_on_a_registered_operator_via_to_dense():
    """The dense posterior under a real registered operator (inpainting if registered, else the matrix
    example) equals the plain-inverse formulas with the operator's to_dense matrix."""
    name = "inpainting" if "inpainting" in invdiff.list_operators() else "matrix"
    op = invdiff.example_operator(name)
    d = math.prod(op.in_shape)
    factor = _randn(d, 5, seed=70)
    prior = LowRankGaussianPrior(torch.zeros(op.in_shape, dtype=F64), factor, 0.5, shape=op.in_shape)
    problem = simulate(op.double(), prior.sample(1, _gen(71)), 0.2, _gen(72))
    matrix = to_dense(op)
    x = _randn(2, *op.in_shape, seed=73)
    assert torch.allclose(op.A(x).reshape(2, -1), x.reshape(2, -1) @ matrix.T, atol=1e-12)
    post = prior.posterior(problem)
    cov = factor @ factor.T + 0.5 * torch.eye(d, dtype=F64)
    exact_mean, exact_cov = _brute_force_posterior(torch.zeros(d, dtype=F64), cov, matrix,
                                                   problem.y.reshape(-1), 0.2)
    assert _rel(post.mean.reshape(-1), exact_mean) < 1e-8 and _rel(post.cov, exact_cov) < 1e-8


def test_gaussian_posterior_samples_have_posterior_moments():
    """Exact posterior samples (x = mu + L z, L L^T = Sigma) have mean mu and covariance Sigma within 5 SE."""
    prior = GAUSSIANS["low_rank"][0]
    op = MatrixOperator(_randn(3, 6, seed=80), prior.event_shape)
    post = prior.posterior(simulate(op, prior.sample(1, _gen(81)), 1.0, _gen(82)))
    assert_moments(post.sample(20_000, _gen(83)), post.mean.reshape(-1), post.cov, "low-rank posterior")


def test_posterior_refuses_what_it_cannot_do():
    """Nonlinear operators, batched y, too-large d and mismatched shapes raise ValueError naming the problem."""
    prior = DiagonalGaussianPrior(torch.zeros(3, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="not linear"):
        prior.posterior(InverseProblem(Squares(), torch.ones(1, 1, 1, 3, dtype=F64), 0.1))
    op = MatrixOperator(torch.eye(3, dtype=F64), (1, 1, 3))
    with pytest.raises(ValueError, match="batch size 2"):
        prior.posterior(InverseProblem(op, torch.ones(2, 3, dtype=F64), 0.1))
    with pytest.raises(ValueError, match="d = 3 exceeds max_dense_dim = 2"):
        prior.posterior(InverseProblem(op, torch.ones(1, 3, dtype=F64), 0.1), max_dense_dim=2)
    with pytest.raises(ValueError, match="in_shape"):
        DiagonalGaussianPrior(torch.zeros(4, dtype=F64), 1.0).posterior(InverseProblem(op, torch.ones(1, 3), 0.1))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="even"):
        StationaryGaussianPrior(torch.zeros(1, 3, 3), torch.arange(9.0).reshape(3, 3))


# ---- the stationary prior against its dense circulant twin ----------------------------------------------------
def _stationary_twins(shape, seed):
    power = _even_spectrum(shape, seed)
    mean = _randn(*shape, seed=seed + 1)
    return StationaryGaussianPrior(mean, power), GaussianPrior(mean, _circulant_covariance(power))


def test_stationary_prior_equals_dense_circulant_prior():
    """Per-frequency Wiener filter D and log p_sigma equal the dense prior with S = F^H diag(P) F."""
    stationary, dense = _stationary_twins((2, 4, 5), seed=90)
    x = 3 * _randn(4, 2, 4, 5, seed=92)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=F64)
    assert torch.allclose(stationary(x, sigma), dense(x, sigma), atol=1e-12)
    assert torch.allclose(stationary.log_prob(x, sigma), dense.log_prob(x, sigma), rtol=1e-12)
    assert torch.allclose(stationary.covariance(), dense.cov, atol=1e-12)


def _fourier_operators():
    mask = torch.rand(4, 6, generator=_gen(100)) < 0.5          # no symmetry: A^T A couples re and im
    ops = {"circular_blur": CircularBlur(torch.tensor([[0.6, 0.3], [0.2, -0.1]], dtype=F64), (2, 4, 6)),
           "single_coil_mri": SingleCoilMRI(mask)}
    if "cartesian_mri" in invdiff.list_operators():
        ops["cartesian_mri (registry)"] = invdiff.example_operator("cartesian_mri").double()
    return ops


@pytest.mark.parametrize("op_name", sorted(_fourier_operators()))
def test_stationary_fourier_posterior_equals_dense_posterior(op_name):
    """For shift-invariant A^T A the per-frequency (C x C) posterior equals the dense circulant-prior posterior:
    mean, cov, std and log-density; its samples have that mean and covariance within 5 SE."""
    op = _fourier_operators()[op_name]
    stationary, dense = _stationary_twins(op.in_shape, seed=110)
    problem = simulate(op, stationary.sample(1, _gen(111)), 0.05, _gen(112))
    assert shift_invariant_transfer(op, stationary.event_shape) is not None
    post, reference = stationary.posterior(problem), dense.posterior(problem)
    assert isinstance(post, FourierGaussianPosterior)
    assert _rel(post.mean, reference.mean) < 1e-9
    assert _rel(post.cov, reference.cov) < 1e-9
    assert torch.allclose(post.std, reference.std, rtol=1e-8)
    x = reference.sample(3, _gen(113))
    assert torch.allclose(post.log_prob(x), reference.log_prob(x), rtol=1e-9)
    if op.in_shape == (2, 4, 6):    # moments on the small cases only (d = 48)
        assert_moments(post.sample(4_000, _gen(114)), post.mean.reshape(-1), reference.cov, op_name)


def test_stationary_posterior_falls_back_to_dense_and_refuses_large_images():
    """A non-shift-invariant operator gets the dense posterior for small d and a ValueError naming d beyond."""
    stationary, dense = _stationary_twins((1, 3, 4), seed=120)
    op = MatrixOperator(_randn(5, 12, seed=121), (1, 3, 4))
    assert shift_invariant_transfer(op, stationary.event_shape) is None
    problem = simulate(op, stationary.sample(1, _gen(122)), 0.1, _gen(123))
    assert _rel(stationary.posterior(problem).cov, dense.posterior(problem).cov) < 1e-10
    with pytest.raises(ValueError, match="not Fourier-diagonal.*d = 12 exceeds max_dense_dim = 8"):
        stationary.posterior(problem, max_dense_dim=8)


# ---- mixture posteriors ---------------------------------------------------------------------------------------
def test_mixture_posterior_weights_by_numerical_integration():
    """1-D prior sum_k w_k N(m_k, v_k), y = a x + N(0, s^2): weights_k = int w_k N(x; m_k, v_k) N(y; a x, s^2) dx / Z,
    posterior mean, variance and log-density, all by the trapezoid rule on a fine grid (to 1e-8)."""
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    means = torch.tensor([[-4.0], [1.0], [5.0]], dtype=F64)
    variances = torch.tensor([1.0, 0.36, 2.25], dtype=F64)
    prior = GaussianMixturePrior(weights, means, variances)
    a, s, y = 0.8, 1.5, 2.9
    op = MatrixOperator(torch.tensor([[a]], dtype=F64), (1, 1, 1))
    post = prior.posterior(InverseProblem(op, torch.tensor([[y]], dtype=F64), s))
    assert isinstance(post, MixturePosterior)
    grid = torch.linspace(-40, 40, 100_001, dtype=F64)
    likelihood = torch.exp(-(y - a * grid) ** 2 / (2 * s ** 2)) / math.sqrt(2 * math.pi * s ** 2)
    joint = torch.stack([w * torch.exp(-(grid - m) ** 2 / (2 * v)) / torch.sqrt(2 * math.pi * v) * likelihood
                         for w, m, v in zip(weights, means[:, 0], variances)])
    mass = torch.trapezoid(joint, grid, dim=1)
    density = joint.sum(0) / mass.sum()
    assert torch.allclose(post.weights, mass / mass.sum(), atol=1e-10)
    mean = torch.trapezoid(grid * density, grid)
    var = torch.trapezoid((grid - mean) ** 2 * density, grid)
    assert abs(post.mean.item() - mean.item()) < 1e-8 and abs(post.cov.item() - var.item()) < 1e-8
    points = torch.tensor([-3.0, 0.5, 2.0, 6.0], dtype=F64)
    expected = torch.log(torch.stack([density[(grid - p).abs().argmin()] for p in points]))
    assert torch.allclose(post.log_prob(points.reshape(4, 1)), expected, atol=1e-8)


def test_mixture_posterior_components_and_weights_match_brute_force():
    """Full-covariance mixture, d = 4: each component is the plain-inverse Gaussian posterior and
    weights ∝ w_k N(y; A m_k, A S_k A^T + s^2 I) (torch.distributions)."""
    prior, weights, means, covs = MIXTURES["mixture_full"]
    op = MatrixOperator(_randn(2, 4, seed=130), prior.event_shape)
    problem = simulate(op, prior.sample(1, _gen(131)), 0.4, _gen(132))
    post = prior.posterior(problem)
    a, y = op.matrix, problem.y.reshape(-1)
    noise = 0.16 * torch.eye(2, dtype=F64)
    log_evidence = torch.stack([torch.distributions.MultivariateNormal(a @ m, a @ c @ a.T + noise).log_prob(y)
                                for m, c in zip(means, covs)])
    assert torch.allclose(post.weights, torch.softmax(weights.log() + log_evidence, 0), rtol=1e-10)
    for component, m, c in zip(post.components, means, covs):
        exact_mean, exact_cov = _brute_force_posterior(m, c, a, y, 0.4)
        assert _rel(component.mean.reshape(-1), exact_mean) < 1e-9 and _rel(component.cov, exact_cov) < 1e-9


def test_mixture_posterior_samples_have_posterior_moments():
    """25-mode grid, one noisy linear measurement (several modes stay plausible): samples of the exact posterior
    mixture have its mean and total covariance within 5 SE."""
    prior = grid_mixture_25(generator=_gen(140))
    op = MatrixOperator(torch.tensor([[1.0, 0.5]], dtype=F64), (1, 1, 2))
    post = prior.posterior(simulate(op, prior.sample(1, _gen(141)), 3.0, _gen(142)))
    assert (post.weights > 0.02).sum() >= 3, "test set-up: the posterior should keep several modes"
    assert_moments(post.sample(40_000, _gen(143)), post.mean.reshape(-1), post.cov, "grid posterior")


# ---- benchmark constructors -----------------------------------------------------------------------------------
def test_grid_mixture_25_and_two_mode_mixture():
    """Grid: 25 means scale*(i, j, i, j, ...) with i, j in {-2..2}, isotropic var; two-mode: +-sep/2 * 1/sqrt(d)."""
    prior = grid_mixture_25(scale=8.0, var=0.5, d=6)
    assert prior.num_components == 25 and prior.event_shape == (1, 1, 6)
    means = prior.means.reshape(25, 6)
    assert set(means[:, 0].tolist()) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    assert torch.equal(means[:, :2], means[:, 2:4]) and torch.equal(means[:, :2], means[:, 4:])
    assert len({tuple(m) for m in means[:, :2].tolist()}) == 25
    assert torch.allclose(prior.component_covariance(3), 0.5 * torch.eye(6, dtype=F64))
    assert torch.allclose(prior.weights, torch.full((25,), 1 / 25, dtype=F64))
    random = grid_mixture_25(generator=_gen(0)).weights
    assert torch.equal(random, grid_mixture_25(generator=_gen(0)).weights) and random.std() > 0
    with pytest.raises(ValueError, match="even"):
        grid_mixture_25(d=3)
    two = two_mode_mixture(16, separation=6.0, var=0.25, weights=(0.3, 0.7), shape=(1, 4, 4))
    assert (two.channels, two.image_size) == (1, (4, 4))
    assert torch.allclose((two.means[1] - two.means[0]).norm(), torch.tensor(6.0, dtype=F64))
    assert torch.allclose(two.means.sum(0), torch.zeros(1, 4, 4, dtype=F64), atol=1e-14)
    assert torch.allclose(two.weights, torch.tensor([0.3, 0.7], dtype=F64))


@pytest.mark.parametrize("name", ["dense", "diagonal", "stationary"])
def test_tweedie_covariance_is_the_posterior_covariance_of_x0(name):
    """``tweedie_covariance(x, sigma, v) = (S - S (S + sigma^2 I)^-1 S) v`` per batch element (its own sigma), and the
    power-1/2 operator squared gives it back (the SMC Tweedie proposal draws ``D + C^(1/2) xi``)."""
    prior, _, cov = GAUSSIANS[name]
    d = cov.shape[0]
    sigma = torch.tensor([0.3, 1.7], dtype=F64)
    v = _randn(2, *prior.event_shape, seed=21)
    x = _randn(2, *prior.event_shape, seed=22)
    out = prior.tweedie_covariance(x, sigma, v)
    for b in range(2):
        expected = cov - cov @ torch.linalg.solve(cov + sigma[b] ** 2 * torch.eye(d, dtype=F64), cov)
        assert torch.allclose(out[b].reshape(-1), expected @ v[b].reshape(-1), atol=1e-10)
    root = prior.tweedie_covariance(x, sigma, prior.tweedie_covariance(x, sigma, v, power=0.5), power=0.5)
    assert torch.allclose(root, out, atol=1e-10)
    # no closed form for a mixture: the base class's autodiff operator (tests/test_smc_tweedie_network.py)
    assert type(MIXTURES["mixture_full"][0]).tweedie_covariance is Denoiser.tweedie_covariance
