"""Analytic priors with exact denoisers and exact posteriors: the oracle every sampler is tested against.

Every prior here is a :class:`~invdiff.priors.base.Denoiser` on real images ``(B, C, H, W)`` (or their
flattened form ``(B, d)``, d = C H W) with

* the exact denoiser ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` at every sigma (hence the exact score
  ``(D - x) / sigma^2`` of ``p_sigma = p * N(0, sigma^2 I)``, Tweedie),
* the exact log-density ``log_prob(x, sigma) = log p_sigma(x)`` (differentiable, for Tweedie checks),
* exact prior sampling ``sample(n, generator) -> (n, C, H, W)``,
* for a linear problem ``y = A x + n``, ``n ~ N(0, s^2 I)`` (:class:`~invdiff.problem.InverseProblem` with
  one measurement), ``posterior(problem)`` with exact ``.mean``, ``.cov``, ``.std``, ``.sample(n, generator)``,
  ``.log_prob(x)``, and for mixtures the posterior component ``.weights``.

Posterior of a Gaussian prior ``x ~ N(m, S)`` under ``y = A x + n``::

    Sigma_post = (S^-1 + A^T A / s^2)^-1 = S - S A^T (A S A^T + s^2 I)^-1 A S
    mu_post    = Sigma_post (S^-1 m + A^T y / s^2) = m + S A^T (A S A^T + s^2 I)^-1 (y - A m)
    p(y)       = N(y; A m, A S A^T + s^2 I)                  (the evidence, used for mixture weights)

No inverse of S or of an ill-conditioned matrix is ever formed. With a factor ``S = R R^T`` (any R, so
singular S is fine) and the thin SVD of the whitened operator ``A R = U diag(g) V^T``::

    Sigma_post = S - (R V) diag(g^2 / (g^2 + s^2)) (R V)^T
    mu_post    = m + (R V) diag(g / (g^2 + s^2)) U^T (y - A m)
    x_post     = mu_post + R (I - V diag(1 - s / sqrt(g^2 + s^2)) V^T) z,  z ~ N(0, I)   (exact sample)

which is the Kalman form above written in the eigenbasis of ``A S A^T``. A Gaussian mixture prior gives a
mixture posterior: component k keeps the Gaussian posterior above and its weight becomes
``w_k N(y; A m_k, A S_k A^T + s^2 I)`` (normalised with log-sum-exp in float64).

Dense linear algebra needs the operator's (m, d) matrix: a :class:`MatrixOperator` gives it directly,
any other linear operator is probed with :func:`~invdiff.operators.matrix.to_dense` (d <= ``max_dense_dim``).
:class:`StationaryGaussianPrior` avoids dense algebra when ``A^T A`` is itself shift-invariant (single-coil
Cartesian MRI, circular blur): then the posterior is a per-frequency (C x C) Wiener filter.

Buffers are float64 (the oracle's precision). Single Gaussians compute ``D`` in the input's dtype; mixtures
compute in float64 and return the input's dtype.

    >>> prior = GaussianPrior(torch.zeros(1, 2, 2), torch.eye(4))
    >>> post = prior.posterior(InverseProblem(op, y, sigma_y=0.1))
    >>> post.mean.shape, post.cov.shape, post.sample(100, generator).shape
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from invdiff.operators.base import Operator
from invdiff.operators.matrix import MAX_DENSE_DIM, to_dense
from invdiff.priors.base import Denoiser, as_sigma_batch
from invdiff.problem import InverseProblem

LOG_2PI = math.log(2 * math.pi)
F64 = torch.float64

# EDM's choices (sigma_min 0.002, sigma_max 80 for data of std 0.5) scaled by the prior's spread:
# denoising stops at 0.4 % of the RMS standard deviation and starts where p_sigma is N(0, sigma^2 I) to
# within 1/400 in variance along every direction (sigma_max = 20 sqrt(lambda_max(E[x x^T]))).
SIGMA_MIN_PER_STD = 0.004
SIGMA_MAX_PER_STD = 20.0


# ---- shapes and validation -------------------------------------------------------------------------------
def _event_shape(mean: torch.Tensor, shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W) of one image: ``shape`` if given, else mean's (C, H, W); a (d,) mean becomes (1, 1, d)."""
    d = mean.numel()
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or math.prod(shape) != d:
            raise ValueError(f"shape must be (C, H, W) with C*H*W = {d} (the mean's size), got {shape}")
        return shape
    if mean.ndim == 3:
        return tuple(mean.shape)
    if mean.ndim == 2:
        return (1, *mean.shape)
    if mean.ndim == 1:
        return (1, 1, d)
    raise ValueError(f"mean must have shape (d,), (H, W) or (C, H, W), got {tuple(mean.shape)}")


def _float64(name: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got dtype {tensor.dtype}")
    tensor = tensor.detach().to(F64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return tensor


def _nonnegative(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if (tensor < 0).any():
        raise ValueError(f"{name} must be >= 0 everywhere, got minimum {tensor.min().item():.3g}")
    return tensor


def _psd_eigh(name: str, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition ``cov = Q diag(lam) Q^T`` of a symmetric PSD (..., d, d) matrix; lam clamped at 0."""
    scale = cov.abs().amax().clamp_min(torch.finfo(F64).tiny)
    asymmetry = (cov - cov.transpose(-1, -2)).abs().amax()
    if asymmetry > 1e-8 * scale:
        raise ValueError(f"{name} must be symmetric; max |S - S^T| = {asymmetry.item():.3g} "
                         f"(max |S| = {scale.item():.3g})")
    lam, q = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
    if lam.min() < -1e-8 * lam.abs().max():
        raise ValueError(f"{name} must be positive semi-definite; smallest eigenvalue {lam.min().item():.3g}")
    return lam.clamp_min(0), q


def _flat(x: torch.Tensor, event_shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *event_shape) or (B, d) -> (B, d)."""
    d = math.prod(event_shape)
    if tuple(x.shape[1:]) != tuple(event_shape) and tuple(x.shape[1:]) != (d,):
        raise ValueError(f"expected x of shape (B, {', '.join(map(str, event_shape))}) or (B, {d}), "
                         f"got {tuple(x.shape)}")
    return x.reshape(x.shape[0], d)


def _sigma_range(trace_per_dim: float, second_moment_max: float) -> tuple[float, float]:
    sigma_data = math.sqrt(max(trace_per_dim, 0.0))
    sigma_min = SIGMA_MIN_PER_STD * sigma_data if sigma_data > 0 else 0.002
    sigma_max = SIGMA_MAX_PER_STD * math.sqrt(max(second_moment_max, 0.0))
    return sigma_min, max(sigma_max, 10 * sigma_min, 1e-3)


def _check_dense_dim(what: str, d: int, max_dense_dim: int) -> None:
    if d > max_dense_dim:
        raise ValueError(f"{what} needs a dense {d} x {d} matrix; d = {d} exceeds max_dense_dim = {max_dense_dim} "
                         f"(exact dense linear algebra is for small images)")


# ---- the linear-Gaussian posterior ----------------------------------------------------------------------
def dense_problem(problem: InverseProblem, event_shape: tuple[int, ...], *,
                  max_dense_dim: int = MAX_DENSE_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """The (m, d) float64 matrix of ``problem.operator`` and the flattened measurement y (m,).

    Checks that there is one measurement, that the operator acts on d = prod(event_shape) entries, and
    that it is linear (``A x`` equals ``matrix @ x`` on a random probe, to 1e-8 relative).
    """
    operator, y = problem.operator, problem.y
    if y.shape[0] != 1:
        raise ValueError(f"the exact posterior is for one measurement: y has batch size {y.shape[0]}; "
                         f"make one InverseProblem per measurement")
    d = math.prod(event_shape)
    in_shape = tuple(operator.in_shape)
    if math.prod(in_shape) != d:
        raise ValueError(f"operator {type(operator).__name__} acts on in_shape {in_shape} "
                         f"({math.prod(in_shape)} entries) but the prior's images are {tuple(event_shape)} (d = {d})")
    _check_dense_dim(f"the exact posterior under {type(operator).__name__}", d, max_dense_dim)
    matrix = to_dense(operator, in_shape, max_dim=max_dense_dim)
    y_flat = y.detach().reshape(-1).to(F64)
    if matrix.shape[0] != y_flat.numel():
        raise ValueError(f"y has {y_flat.numel()} entries but {type(operator).__name__} produces {matrix.shape[0]}")
    probe = torch.randn(1, *in_shape, generator=torch.Generator().manual_seed(0), dtype=F64).to(matrix.device)
    applied = operator.A(probe).reshape(-1)
    error = (applied - matrix @ probe.reshape(-1)).norm() / applied.norm().clamp_min(torch.finfo(F64).tiny)
    if error > 1e-8:
        raise ValueError(f"operator {type(operator).__name__} is not linear (A x differs from its matrix by "
                         f"{error.item():.2e} relative); exact posteriors need a linear operator")
    return matrix, y_flat


def gaussian_posterior(mean: torch.Tensor, factor: torch.Tensor, matrix: torch.Tensor, y: torch.Tensor,
                       sigma_y: float, event_shape: tuple[int, ...]) -> tuple["GaussianPosterior", torch.Tensor]:
    """Posterior of ``x ~ N(mean, factor factor^T)`` given ``y = matrix x + N(0, sigma_y^2 I)``, and ``log p(y)``.

    mean: (d,), factor: (d, p), matrix: (m, d), y: (m,), all float64. See the module docstring for the
    SVD form used (exact, no inverse of S, stable for singular S and tiny sigma_y).
    """
    s2 = float(sigma_y) ** 2
    residual = y - matrix @ mean
    u, g, vh = torch.linalg.svd(matrix @ factor, full_matrices=False)    # A R = U diag(g) V^T
    rv = factor @ vh.T                                                     # R V, (d, k)
    shrink = g ** 2 / (g ** 2 + s2)
    cov = factor @ factor.T - (rv * shrink) @ rv.T
    cov = (cov + cov.T) / 2
    projected = u.T @ residual
    post_mean = mean + rv @ (g / (g ** 2 + s2) * projected)
    # R (I - V diag(c) V^T) with c = 1 - s / sqrt(g^2 + s^2) squares to Sigma_post: exact, PSD by construction.
    sample_factor = factor - (rv * (1 - math.sqrt(s2) / torch.sqrt(g ** 2 + s2))) @ vh
    # log N(y; A m, G), G = U diag(g^2 + s^2) U^T + s^2 (I - U U^T)
    m = y.numel()
    outside = residual - u @ projected
    quad = (projected ** 2 / (g ** 2 + s2)).sum() + (outside ** 2).sum() / s2
    logdet = torch.log(g ** 2 + s2).sum() + (m - g.numel()) * math.log(s2)
    log_evidence = -0.5 * (quad + logdet + m * LOG_2PI)
    return GaussianPosterior(post_mean, cov, sample_factor, event_shape), log_evidence


class GaussianPosterior:
    """``x | y ~ N(mean, cov)`` on images of shape ``event_shape`` (float64).

    mean: (C, H, W); cov: (d, d); std: (C, H, W); sample(n, generator) -> (n, C, H, W); log_prob(x) -> (N,).
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, sample_factor: torch.Tensor,
                 event_shape: tuple[int, ...]):
        self.event_shape = tuple(event_shape)
        self._mean = mean
        self._cov = cov
        self._sample_factor = sample_factor

    @property
    def mean(self) -> torch.Tensor:
        return self._mean.reshape(self.event_shape)

    @property
    def cov(self) -> torch.Tensor:
        return self._cov

    @property
    def std(self) -> torch.Tensor:
        return self._cov.diagonal().clamp_min(0).sqrt().reshape(self.event_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + L z`` with ``L L^T = cov``, z ~ N(0, I): (n, C, H, W) float64."""
        z = torch.randn(n, self._sample_factor.shape[1], generator=generator, dtype=F64, device=self._mean.device)
        return (self._mean + z @ self._sample_factor.T).reshape(n, *self.event_shape)

    @functools.cached_property
    def _cholesky(self) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(self._cov)
        if info != 0:
            raise ValueError("the posterior covariance is singular (the prior is degenerate); log_prob has no density")
        return chol

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; mean, cov)`` for x (N, C, H, W) or (N, d): (N,) float64."""
        r = _flat(x, self.event_shape).to(F64) - self._mean
        white = torch.linalg.solve_triangular(self._cholesky, r.T, upper=False)
        logdet = 2 * self._cholesky.diagonal().log().sum()
        return -0.5 * ((white ** 2).sum(0) + logdet + r.shape[1] * LOG_2PI)


class MixturePosterior:
    """``x | y ~ sum_k weights_k N(mean_k, cov_k)``: the posterior of a Gaussian mixture prior.

    weights: (K,) float64; components: list of :class:`GaussianPosterior`; mean: (C, H, W);
    cov: (d, d) (law of total covariance); sample(n, generator) -> (n, C, H, W); log_prob(x) -> (N,).
    """

    def __init__(self, log_weights: torch.Tensor, components: list[GaussianPosterior]):
        self.log_weights = log_weights - torch.logsumexp(log_weights, 0)
        self.components = components
        self.event_shape = components[0].event_shape

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def mean(self) -> torch.Tensor:
        return torch.einsum("k,k...->...", self.weights, torch.stack([c.mean for c in self.components]))

    @property
    def cov(self) -> torch.Tensor:
        total = self.mean.reshape(-1)
        cov = torch.zeros_like(self.components[0].cov)
        for w, c in zip(self.weights, self.components):
            shift = c.mean.reshape(-1) - total
            cov = cov + w * (c.cov + torch.outer(shift, shift))
        return cov

    @property
    def std(self) -> torch.Tensor:
        return self.cov.diagonal().clamp_min(0).sqrt().reshape(self.event_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component ``k ~ weights``, then ``x ~ N(mean_k, cov_k)``: (n, C, H, W) float64, in random order."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        out = torch.empty(n, *self.event_shape, dtype=F64, device=self.log_weights.device)
        for k, component in enumerate(self.components):
            chosen = (labels == k).nonzero().squeeze(1)
            if len(chosen):
                out[chosen] = component.sample(len(chosen), generator)
        return out

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log sum_k weights_k N(x; mean_k, cov_k)``: (N,) float64."""
        per_component = torch.stack([c.log_prob(x) for c in self.components], dim=1)
        return torch.logsumexp(self.log_weights + per_component, dim=1)


# ---- base class ----------------------------------------------------------------------------------------
class AnalyticPrior(Denoiser):
    """Shared plumbing: event shape, flattening, ``sigma`` handling, the Denoiser attributes."""

    def _set_event_shape(self, event_shape: tuple[int, int, int]) -> None:
        self.event_shape = tuple(event_shape)
        self.dim = math.prod(event_shape)
        self.channels = event_shape[0]
        self.image_size = (event_shape[1], event_shape[2])

    def _set_sigma_range(self, trace_per_dim: float, second_moment_max: float,
                         sigma_min: float | None, sigma_max: float | None) -> None:
        default_min, default_max = _sigma_range(trace_per_dim, second_moment_max)
        self.sigma_min = float(default_min if sigma_min is None else sigma_min)
        self.sigma_max = float(default_max if sigma_max is None else sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``D(x, sigma) = E[x0 | x0 + sigma n = x]``: x (B, C, H, W) or (B, d), sigma scalar or (B,)."""
        flat = _flat(x, self.event_shape)
        return self._denoise(flat, as_sigma_batch(sigma, len(flat), flat)).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``log p_sigma(x)``, ``p_sigma = p * N(0, sigma^2 I)``: (B,), differentiable in x."""
        flat = _flat(x, self.event_shape)
        return self._log_prob(flat, as_sigma_batch(sigma, len(flat), flat))

    def _randn(self, *shape, generator):
        return torch.randn(*shape, generator=generator, dtype=F64, device=self._device())

    def _device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def covariance(self, *, max_dense_dim: int = MAX_DENSE_DIM) -> torch.Tensor:
        """The prior covariance as a dense (d, d) float64 matrix."""
        _check_dense_dim(f"{type(self).__name__}.covariance", self.dim, max_dense_dim)
        factor = self._dense_factor()
        return factor @ factor.T

    def posterior(self, problem: InverseProblem, *, max_dense_dim: int = MAX_DENSE_DIM) -> GaussianPosterior:
        """Exact posterior ``p(x | y)`` for a linear problem (dense algebra, d <= max_dense_dim)."""
        matrix, y = dense_problem(problem, self.event_shape, max_dense_dim=max_dense_dim)
        post, _ = gaussian_posterior(self.mean.reshape(-1).to(F64), self._dense_factor().to(F64), matrix, y,
                                     problem.sigma_y, self.event_shape)
        return post

    # subclass interface
    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_prob(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense_factor(self) -> torch.Tensor:
        """A (d, p) float64 matrix R with R R^T = the prior covariance."""
        raise NotImplementedError


def _column(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, 1)


# ---- Gaussian priors ------------------------------------------------------------------------------------
class _ClosedFormTweedie:
    """Mixin of the single-Gaussian priors: ``Cov[x0 | x]`` in closed form (it does not depend on x).

    The other priors (mixtures, low rank) use the base class's autodiff operator (``Denoiser.tweedie_covariance``).
    """

    def tweedie_covariance(self, x: torch.Tensor, sigma, v: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """``Cov[x0 | x0 + sigma n = x]^power v``: Tweedie's second moment ``sigma^2 dD/dx`` (symmetric PSD).

        x, v: (B, C, H, W) or (B, d); sigma: scalar or (B,); power 1 (products) or 1/2 (draws
        ``D + Cov^(1/2) xi`` from the Gaussian ``N(D, Cov)``). For a Gaussian prior the covariance does not
        depend on x and ``p(x0 | x)`` is exactly that Gaussian (the SMC sampler's ``proposal="tweedie"``).
        """
        flat = _flat(v, self.event_shape)
        sigma = as_sigma_batch(sigma, len(flat), flat)
        return self._tweedie_covariance(flat, sigma, float(power)).reshape(v.shape)



class GaussianPrior(_ClosedFormTweedie, AnalyticPrior):
    """``x0 ~ N(mean, cov)`` with a dense covariance (d up to a few thousand).

    mean: (C, H, W), (H, W) or (d,); cov: (d, d) symmetric PSD (singular allowed). With
    ``cov = Q diag(lam) Q^T``: ``D(x, sigma) = mean + Q diag(lam / (lam + sigma^2)) Q^T (x - mean)``.
    """

    def __init__(self, mean, cov, *, shape: Sequence[int] | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        mean = _float64("mean", mean)
        self._set_event_shape(_event_shape(mean, shape))
        cov = _float64("cov", cov)
        if cov.shape != (self.dim, self.dim):
            raise ValueError(f"cov must have shape ({self.dim}, {self.dim}) for a mean of {self.dim} entries, "
                             f"got {tuple(cov.shape)}")
        lam, q = _psd_eigh("cov", cov)
        self.register_buffer("mean", mean.reshape(self.event_shape))
        self.register_buffer("cov", cov)
        self.register_buffer("eigenvalues", lam)
        self.register_buffer("eigenvectors", q)
        self._set_sigma_range(lam.sum().item() / self.dim, lam.max().item() + mean.pow(2).sum().item(),
                              sigma_min, sigma_max)

    def _denoise(self, x, sigma):
        m, lam, q = (t.to(x.dtype) for t in (self.mean.reshape(-1), self.eigenvalues, self.eigenvectors))
        coefficients = (x - m) @ q                                             # Q^T (x - m)
        gain = lam / (lam + _column(sigma) ** 2).clamp_min(torch.finfo(x.dtype).tiny)
        return m + (gain * coefficients) @ q.T

    def _tweedie_covariance(self, v, sigma, power):
        # Cov[x0 | x] = S - S (S + sigma^2)^-1 S = Q diag(lam sigma^2 / (lam + sigma^2)) Q^T
        lam, q = (t.to(v.dtype) for t in (self.eigenvalues, self.eigenvectors))
        s2 = _column(sigma) ** 2
        variance = lam * s2 / (lam + s2).clamp_min(torch.finfo(v.dtype).tiny)
        return ((variance ** power) * (v @ q)) @ q.T

    def _log_prob(self, x, sigma):
        m, lam, q = (t.to(x.dtype) for t in (self.mean.reshape(-1), self.eigenvalues, self.eigenvectors))
        coefficients = (x - m) @ q
        var = lam + _column(sigma) ** 2
        return -0.5 * ((coefficients ** 2 / var).sum(1) + var.log().sum(1) + self.dim * LOG_2PI)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + Q diag(sqrt(lam)) z``: (n, C, H, W) float64."""
        z = self._randn(n, self.dim, generator=generator)
        x = self.mean.reshape(-1) + (z * self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return x.reshape(n, *self.event_shape)

    def covariance(self, *, max_dense_dim: int = MAX_DENSE_DIM) -> torch.Tensor:
        return self.cov

    def _dense_factor(self):
        return self.eigenvectors * self.eigenvalues.sqrt()


class DiagonalGaussianPrior(_ClosedFormTweedie, AnalyticPrior):
    """``x0 ~ N(mean, diag(var))``: ``D(x, sigma) = mean + var / (var + sigma^2) (x - mean)``.

    mean: (C, H, W), (H, W) or (d,); var: same number of entries (or a scalar), >= 0.
    """

    def __init__(self, mean, var, *, shape: Sequence[int] | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        mean = _float64("mean", mean)
        self._set_event_shape(_event_shape(mean, shape))
        var = _nonnegative("var", _float64("var", var))
        if var.numel() == 1:
            var = var.reshape(1).expand(self.dim)
        if var.numel() != self.dim:
            raise ValueError(f"var must have {self.dim} entries (one per pixel) or 1, got shape {tuple(var.shape)}")
        self.register_buffer("mean", mean.reshape(self.event_shape))
        self.register_buffer("var", var.reshape(self.event_shape).clone())
        self._set_sigma_range(var.mean().item(), var.max().item() + mean.pow(2).sum().item(), sigma_min, sigma_max)

    def _denoise(self, x, sigma):
        m, var = self.mean.reshape(-1).to(x.dtype), self.var.reshape(-1).to(x.dtype)
        gain = var / (var + _column(sigma) ** 2).clamp_min(torch.finfo(x.dtype).tiny)
        return m + gain * (x - m)

    def _tweedie_covariance(self, v, sigma, power):
        var, s2 = self.var.reshape(-1).to(v.dtype), _column(sigma) ** 2
        return (var * s2 / (var + s2).clamp_min(torch.finfo(v.dtype).tiny)) ** power * v

    def _log_prob(self, x, sigma):
        m, var = self.mean.reshape(-1).to(x.dtype), self.var.reshape(-1).to(x.dtype)
        total = var + _column(sigma) ** 2
        return -0.5 * (((x - m) ** 2 / total).sum(1) + total.log().sum(1) + self.dim * LOG_2PI)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self._randn(n, *self.event_shape, generator=generator)
        return self.mean + self.var.sqrt() * z

    def _dense_factor(self):
        return torch.diag(self.var.reshape(-1).sqrt())


class LowRankGaussianPrior(AnalyticPrior):
    """``x0 ~ N(mean, U U^T + diag(diag))``, U: (d, r) ``factor``, ``diag``: (d,) >= 0.

    ``D(x, sigma) = x - sigma^2 (S + sigma^2 I)^-1 (x - mean)`` with the Woodbury identity, for
    ``E = diag + sigma^2``: ``(E + U U^T)^-1 = E^-1 - E^-1 U (I_r + U^T E^-1 U)^-1 U^T E^-1`` (cost d r^2).
    """

    def __init__(self, mean, factor, diag, *, shape: Sequence[int] | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        mean = _float64("mean", mean)
        self._set_event_shape(_event_shape(mean, shape))
        factor = _float64("factor", factor)
        if factor.ndim != 2 or factor.shape[0] != self.dim or factor.shape[1] < 1:
            raise ValueError(f"factor must have shape ({self.dim}, r) with r >= 1, got {tuple(factor.shape)}")
        diag = _nonnegative("diag", _float64("diag", diag))
        if diag.numel() == 1:
            diag = diag.reshape(1).expand(self.dim)
        if diag.numel() != self.dim:
            raise ValueError(f"diag must have {self.dim} entries or 1, got shape {tuple(diag.shape)}")
        self.register_buffer("mean", mean.reshape(self.event_shape))
        self.register_buffer("factor", factor)
        self.register_buffer("diag", diag.reshape(-1).clone())
        spectral = torch.linalg.matrix_norm(factor, ord=2).item() ** 2
        self._set_sigma_range((factor.pow(2).sum().item() + diag.sum().item()) / self.dim,
                              spectral + diag.max().item() + mean.pow(2).sum().item(), sigma_min, sigma_max)

    def _woodbury(self, r: torch.Tensor, sigma: torch.Tensor):
        """``v = (S + sigma^2 I)^-1 r`` (B, d) and ``log det(S + sigma^2 I)`` (B,) per batch element."""
        u = self.factor.to(r.dtype)
        inv_e = 1 / (self.diag.to(r.dtype) + _column(sigma) ** 2)                    # E^-1, (B, d)
        inner = torch.eye(u.shape[1], dtype=r.dtype, device=r.device) + torch.einsum("dr,bd,ds->brs", u, inv_e, u)
        chol = torch.linalg.cholesky(inner)                                          # I_r + U^T E^-1 U
        t = torch.cholesky_solve(((inv_e * r) @ u).unsqueeze(-1), chol).squeeze(-1)  # (B, r)
        v = inv_e * r - inv_e * (t @ u.T)
        # matrix determinant lemma: det(E + U U^T) = det(E) det(I_r + U^T E^-1 U)
        logdet = -inv_e.log().sum(1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(1)
        return v, logdet

    def _denoise(self, x, sigma):
        v, _ = self._woodbury(x - self.mean.reshape(-1).to(x.dtype), sigma)
        return x - _column(sigma) ** 2 * v

    def _log_prob(self, x, sigma):
        r = x - self.mean.reshape(-1).to(x.dtype)
        v, logdet = self._woodbury(r, sigma)
        return -0.5 * ((r * v).sum(1) + logdet + self.dim * LOG_2PI)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + U z1 + sqrt(diag) z2``: (n, C, H, W) float64."""
        z_low = self._randn(n, self.factor.shape[1], generator=generator)
        z_diag = self._randn(n, self.dim, generator=generator)
        x = self.mean.reshape(-1) + z_low @ self.factor.T + self.diag.sqrt() * z_diag
        return x.reshape(n, *self.event_shape)

    def _dense_factor(self):
        return torch.cat([self.factor, torch.diag(self.diag.sqrt())], dim=1)


def _fft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fft2(x, norm="ortho")


def _ifft2_real(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(x, norm="ortho").real


def _is_hermitian_symmetric(p: torch.Tensor) -> bool:
    """``p[..., k1, k2] == p[..., -k1 mod H, -k2 mod W]`` (a real field's power spectrum is even)."""
    mirrored = torch.roll(torch.flip(p, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return bool((p - mirrored).abs().max() <= 1e-10 * p.abs().max().clamp_min(torch.finfo(F64).tiny))


def shift_invariant_transfer(operator: Operator, event_shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The (H, W, C, C) complex128 transfer matrices of ``A^T A`` if it commutes with circular shifts, else None.

    A shift-invariant real operator on C-channel images is a multichannel circular convolution,
    ``(A^T A x)_o = sum_i h_oi * x_i``, so in the orthonormal 2-D FFT basis it acts at each frequency k by
    the C x C matrix ``T[k]_oi = fft2(h_oi)[k]`` (h_oi = channel o of ``A^T A`` applied to a delta in channel i).
    A random probe confirms the structure (relative error 1e-9); any other operator returns None.
    """
    c, h, w = event_shape
    if tuple(operator.in_shape) != tuple(event_shape):
        return None
    device = operator.device

    def normal(x):
        return operator.A_adjoint(operator.A(x))

    deltas = torch.zeros(c, c, h, w, dtype=F64, device=device)
    deltas[torch.arange(c), torch.arange(c), 0, 0] = 1.0
    kernels = normal(deltas)                                               # (C_in, C_out, H, W)
    transfer = torch.fft.fft2(kernels, norm="backward").permute(2, 3, 1, 0)  # (H, W, C_out, C_in)
    transfer = (transfer + transfer.conj().transpose(-1, -2)) / 2           # A^T A is symmetric
    probe = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    expected = _fft2(normal(probe))
    predicted = torch.einsum("hwoi,bihw->bohw", transfer, _fft2(probe).to(transfer.dtype))
    if (expected - predicted).abs().max() > 1e-9 * expected.abs().max().clamp_min(torch.finfo(F64).tiny):
        return None
    return transfer


class FourierGaussianPosterior:
    """``x | y ~ N(mean, F^H Sigma F)`` with ``Sigma`` block-diagonal over frequencies (C x C per k).

    mean: (C, H, W) float64; blocks: (H, W, C, C) complex128 (F is the orthonormal 2-D FFT per channel).
    ``cov`` is built densely on demand (d <= max_dense_dim); ``std`` and ``sample`` cost a few FFTs.
    """

    def __init__(self, mean: torch.Tensor, blocks: torch.Tensor, max_dense_dim: int = MAX_DENSE_DIM):
        self.event_shape = tuple(mean.shape)
        self._mean = mean
        self.blocks = blocks
        self.max_dense_dim = max_dense_dim

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @functools.cached_property
    def _eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        lam, vecs = torch.linalg.eigh(self.blocks)
        return lam.clamp_min(0), vecs

    def _apply_blocks(self, x: torch.Tensor, power: float) -> torch.Tensor:
        """``F^H Sigma^power F x`` for real x (N, C, H, W) (power 1/2: the Hermitian square root)."""
        lam, vecs = self._eig
        coefficients = _fft2(x).permute(0, 2, 3, 1).unsqueeze(-1)              # (N, H, W, C, 1)
        scaled = vecs @ ((lam ** power).unsqueeze(-1).to(vecs.dtype) * (vecs.conj().transpose(-1, -2) @ coefficients))
        return _ifft2_real(scaled.squeeze(-1).permute(0, 3, 1, 2))

    @property
    def cov(self) -> torch.Tensor:
        d = self._mean.numel()
        _check_dense_dim("FourierGaussianPosterior.cov", d, self.max_dense_dim)
        basis = torch.eye(d, dtype=F64, device=self._mean.device).reshape(d, *self.event_shape)
        cov = self._apply_blocks(basis, 1.0).reshape(d, d)
        return (cov + cov.T) / 2

    @property
    def std(self) -> torch.Tensor:
        # diag(F^H Sigma F) is the same at every pixel: the frequency average of Sigma[k]_cc.
        var = self.blocks.diagonal(dim1=-2, dim2=-1).real.mean(dim=(0, 1))      # (C,)
        return var.sqrt().reshape(-1, 1, 1).expand(self.event_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + F^H Sigma^(1/2) F z``, z ~ N(0, I) real: (n, C, H, W) float64."""
        z = torch.randn(n, *self.event_shape, generator=generator, dtype=F64, device=self._mean.device)
        return self._mean + self._apply_blocks(z, 0.5)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; mean, F^H Sigma F)`` = -(sum_k X_k^H Sigma_k^-1 X_k + sum_k log det Sigma_k + d log 2 pi) / 2."""
        lam, vecs = self._eig
        if (lam <= 0).any():
            raise ValueError("the posterior covariance is singular (a zero power-spectrum entry); no density")
        r = _flat(x, self.event_shape).to(F64).reshape(-1, *self.event_shape) - self._mean
        coefficients = vecs.conj().transpose(-1, -2) @ _fft2(r).permute(0, 2, 3, 1).unsqueeze(-1)
        quad = (coefficients.squeeze(-1).abs() ** 2 / lam).sum(dim=(1, 2, 3))
        return -0.5 * (quad + lam.log().sum() + self._mean.numel() * LOG_2PI)


class StationaryGaussianPrior(_ClosedFormTweedie, AnalyticPrior):
    """A stationary (circulant) Gaussian field: ``x0 = mean + F^H diag(sqrt(P)) F z`` per channel, z ~ N(0, I).

    mean: (C, H, W) or (H, W) (or a scalar with ``shape``); power_spectrum P: (C, H, W) or (H, W) >= 0 in
    ``fft2`` order (DC at [0, 0], not shifted), even (``P[k] = P[-k]``) so that the field is real.
    P[k] is the variance of the orthonormal Fourier coefficient k; each pixel's variance is mean(P).
    ``D(x, sigma) = mean + F^H (P / (P + sigma^2)) F (x - mean)``: a per-frequency Wiener filter.
    The posterior is a per-frequency C x C Wiener filter when ``A^T A`` is shift-invariant (single-coil
    Cartesian MRI, circular blur); otherwise dense linear algebra (d <= max_dense_dim).
    """

    def __init__(self, mean, power_spectrum, *, shape: Sequence[int] | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        power = _nonnegative("power_spectrum", _float64("power_spectrum", power_spectrum))
        if power.ndim == 2:
            power = power.unsqueeze(0)
        if power.ndim != 3:
            raise ValueError(f"power_spectrum must have shape (H, W) or (C, H, W), got {tuple(power.shape)}")
        mean = _float64("mean", mean)
        if shape is None:
            shape = mean.shape if mean.ndim == 3 else (power.shape[0], *power.shape[-2:])
        if mean.numel() == 1:
            mean = mean.reshape(1).expand(math.prod(shape))
        self._set_event_shape(_event_shape(mean, shape))
        power = power.expand(self.channels, -1, -1) if power.shape[0] == 1 else power
        if tuple(power.shape) != self.event_shape:
            raise ValueError(f"power_spectrum has shape {tuple(power.shape)}; expected (H, W) or (C, H, W) = "
                             f"{self.event_shape} to match the mean")
        if not _is_hermitian_symmetric(power):
            raise ValueError("power_spectrum must be even, P[k1, k2] = P[-k1 mod H, -k2 mod W] (fft2 order, "
                             "not fftshifted); an uneven spectrum has no real field")
        self.register_buffer("mean", mean.reshape(self.event_shape).clone())
        self.register_buffer("power_spectrum", power.clone())
        self._set_sigma_range(power.mean().item(), power.max().item() + mean.pow(2).sum().item(),
                              sigma_min, sigma_max)

    def _images(self, x):
        return x.reshape(-1, *self.event_shape)

    def _denoise(self, x, sigma):
        m, p = self.mean.to(x.dtype), self.power_spectrum.to(x.dtype)
        gain = p / (p + sigma.reshape(-1, 1, 1, 1) ** 2).clamp_min(torch.finfo(x.dtype).tiny)
        filtered = _ifft2_real(gain * _fft2(self._images(x) - m))
        return (m + filtered).reshape(x.shape)

    def _tweedie_covariance(self, v, sigma, power):
        # per frequency: Cov[x0 | x] = P sigma^2 / (P + sigma^2)
        p, s2 = self.power_spectrum.to(v.dtype), sigma.reshape(-1, 1, 1, 1) ** 2
        variance = p * s2 / (p + s2).clamp_min(torch.finfo(v.dtype).tiny)
        return _ifft2_real(variance ** power * _fft2(self._images(v))).reshape(v.shape)

    def _log_prob(self, x, sigma):
        m, p = self.mean.to(x.dtype), self.power_spectrum.to(x.dtype)
        var = p + sigma.reshape(-1, 1, 1, 1) ** 2
        coefficients = _fft2(self._images(x) - m)
        return -0.5 * ((coefficients.abs() ** 2 / var).sum(dim=(1, 2, 3)) + var.log().sum(dim=(1, 2, 3))
                       + self.dim * LOG_2PI)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + F^H sqrt(P) F z`` with real white z: (n, C, H, W) float64."""
        z = self._randn(n, *self.event_shape, generator=generator)
        return self.mean + _ifft2_real(self.power_spectrum.sqrt() * _fft2(z))

    def _filter(self, x: torch.Tensor, power: float) -> torch.Tensor:
        return _ifft2_real(self.power_spectrum ** power * _fft2(x))

    def _dense_factor(self):
        # The symmetric square root F^H sqrt(P) F as a real (d, d) matrix.
        basis = torch.eye(self.dim, dtype=F64, device=self._device()).reshape(self.dim, *self.event_shape)
        root = self._filter(basis, 0.5).reshape(self.dim, self.dim)
        return (root + root.T) / 2

    def covariance(self, *, max_dense_dim: int = MAX_DENSE_DIM) -> torch.Tensor:
        _check_dense_dim("StationaryGaussianPrior.covariance", self.dim, max_dense_dim)
        basis = torch.eye(self.dim, dtype=F64, device=self._device()).reshape(self.dim, *self.event_shape)
        cov = self._filter(basis, 1.0).reshape(self.dim, self.dim)
        return (cov + cov.T) / 2

    def posterior(self, problem: InverseProblem, *, max_dense_dim: int = MAX_DENSE_DIM):
        """Exact posterior: per-frequency Wiener filter if ``A^T A`` is shift-invariant, else dense algebra."""
        operator = problem.operator
        if problem.y.shape[0] != 1:
            raise ValueError(f"the exact posterior is for one measurement: y has batch size {problem.y.shape[0]}; "
                             f"make one InverseProblem per measurement")
        transfer = shift_invariant_transfer(operator, self.event_shape)
        if transfer is None:
            if self.dim > max_dense_dim:
                raise ValueError(
                    f"StationaryGaussianPrior.posterior: {type(operator).__name__} is not Fourier-diagonal "
                    f"(A^T A does not commute with circular shifts), so the exact posterior needs dense algebra, "
                    f"but d = {self.dim} exceeds max_dense_dim = {max_dense_dim}; use a Fourier-diagonal "
                    f"operator (single-coil Cartesian MRI, circular blur) or a smaller image")
            return super().posterior(problem, max_dense_dim=max_dense_dim)
        return self._fourier_posterior(problem, transfer, max_dense_dim)

    def _fourier_posterior(self, problem: InverseProblem, transfer: torch.Tensor,
                           max_dense_dim: int) -> FourierGaussianPosterior:
        # Per frequency k, with P_k = diag(P[:, k]) and T_k the transfer matrix of A^T A:
        #   Sigma_k = (P_k^-1 + T_k / s^2)^-1 = P_k^(1/2) (I + P_k^(1/2) T_k P_k^(1/2) / s^2)^-1 P_k^(1/2)
        # (no inverse of P, so zero-power frequencies are fine), and
        #   mu = m + F^H Sigma_k F A^T (y - A m) / s^2.
        s2 = float(problem.sigma_y) ** 2
        operator = problem.operator
        root = self.power_spectrum.sqrt().permute(1, 2, 0).to(transfer.dtype)     # (H, W, C)
        c = self.channels
        whitened = root.unsqueeze(-1) * transfer * root.unsqueeze(-2) / s2
        eye = torch.eye(c, dtype=transfer.dtype, device=transfer.device)
        blocks = root.unsqueeze(-1) * torch.linalg.solve(eye + whitened, torch.diag_embed(root))
        blocks = (blocks + blocks.conj().transpose(-1, -2)) / 2
        m = self.mean.to(F64)
        residual = problem.y.detach().to(F64) - operator.A(m.unsqueeze(0))
        back = _fft2(operator.A_adjoint(residual)).permute(0, 2, 3, 1).unsqueeze(-1)   # (1, H, W, C, 1)
        update = (blocks @ back).squeeze(-1).permute(0, 3, 1, 2) / s2
        mean = m + _ifft2_real(update)[0]
        return FourierGaussianPosterior(mean, blocks, max_dense_dim)


# ---- Gaussian mixtures ----------------------------------------------------------------------------------
class GaussianMixturePrior(AnalyticPrior):
    """``x0 ~ sum_k w_k N(m_k, S_k)``; ``D(x, sigma) = sum_k r_k(x) [m_k + S_k (S_k + sigma^2 I)^-1 (x - m_k)]``
    with responsibilities ``r_k ∝ w_k N(x; m_k, S_k + sigma^2 I)`` (log-sum-exp in float64).

    weights: (K,) > 0 (normalised here); means: (K, C, H, W), (K, H, W) or (K, d); covs: (K, d, d) full,
    (K, d) / (K, *event) diagonal, (K,) isotropic per component, or a scalar shared isotropic variance.
    Computes in float64 (memory B K d per call) and returns the input's dtype.
    """

    def __init__(self, weights, means, covs, *, shape: Sequence[int] | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        weights = _float64("weights", weights).reshape(-1)
        if (weights <= 0).any() or weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty vector of positive numbers, got {weights.tolist()}")
        k = weights.numel()
        means = _float64("means", means)
        if means.shape[0] != k:
            raise ValueError(f"means must have {k} rows (one per weight), got shape {tuple(means.shape)}")
        self._set_event_shape(_event_shape(means[0], shape))
        d = self.dim
        covs = _float64("covs", covs)
        if covs.shape == (k, d, d) and d > 1:
            self.full = True
            lam, q = _psd_eigh("covs", covs)
        else:
            self.full = False
            if covs.ndim == 0:
                covs = covs.expand(k)
            if covs.shape == (k,):
                covs = covs.unsqueeze(1).expand(k, d)
            covs = covs.reshape(k, -1)
            if covs.shape != (k, d):
                raise ValueError(f"covs must be (K, d, d) full, (K, d) diagonal, (K,) isotropic or a scalar with "
                                 f"K = {k}, d = {d}; got shape {tuple(covs.shape)}")
            lam, q = _nonnegative("covs", covs).clone(), None
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means.reshape(k, *self.event_shape))
        self.register_buffer("eigenvalues", lam)                                    # (K, d)
        self.register_buffer("eigenvectors", q)                                     # (K, d, d) or None
        flat = self.means.reshape(k, d)
        spread = (flat - self.weights @ flat).pow(2).sum(1)
        trace = (self.weights * (lam.sum(1) + spread)).sum().item() / d
        # lambda_max(sum_k w_k m_k m_k^T) from the K x K Gram matrix of the weighted means.
        weighted = self.weights.sqrt()[:, None] * flat
        means_moment = torch.linalg.eigvalsh(weighted @ weighted.T).max().item()
        self._set_sigma_range(trace, lam.max().item() + means_moment, sigma_min, sigma_max)

    @property
    def num_components(self) -> int:
        return self.weights.numel()

    @property
    def mean(self) -> torch.Tensor:
        """The mixture mean ``sum_k w_k m_k``: (C, H, W)."""
        return torch.einsum("k,k...->...", self.weights, self.means)

    def component_covariance(self, k: int) -> torch.Tensor:
        """``S_k`` as a dense (d, d) float64 matrix."""
        factor = self._component_factor(k)
        return factor @ factor.T

    def _component_factor(self, k: int) -> torch.Tensor:
        if self.full:
            return self.eigenvectors[k] * self.eigenvalues[k].sqrt()
        return torch.diag(self.eigenvalues[k].sqrt())

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per-component ``log w_k N(x; m_k, S_k + sigma^2 I)`` (B, K) and Wiener estimates (B, K, d)."""
        means = self.means.reshape(self.num_components, self.dim).to(F64)
        lam = self.eigenvalues.to(F64)
        r = x.unsqueeze(1) - means                                                   # (B, K, d)
        q = self.eigenvectors.to(F64) if self.full else None
        coefficients = torch.einsum("bkd,kde->bke", r, q) if self.full else r        # Q_k^T (x - m_k)
        var = lam + sigma.reshape(-1, 1, 1) ** 2
        log_joint = (self.weights.to(F64).log()
                     - 0.5 * ((coefficients ** 2 / var).sum(2) + var.log().sum(2) + self.dim * LOG_2PI))
        shrunk = lam / var.clamp_min(torch.finfo(F64).tiny) * coefficients
        estimates = means + (torch.einsum("bke,kde->bkd", shrunk, q) if self.full else shrunk)
        return log_joint, estimates

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``r_k(x) = p(component k | x0 + sigma n = x)``: (B, K) float64."""
        flat = _flat(x, self.event_shape).to(F64)
        log_joint, _ = self._terms(flat, as_sigma_batch(sigma, len(flat), flat))
        return torch.softmax(log_joint, dim=1)

    def _denoise(self, x, sigma):
        log_joint, estimates = self._terms(x.to(F64), sigma.to(F64))
        return torch.einsum("bk,bkd->bd", torch.softmax(log_joint, dim=1), estimates).to(x.dtype)

    def _log_prob(self, x, sigma):
        log_joint, _ = self._terms(x.to(F64), sigma.to(F64))
        return torch.logsumexp(log_joint, dim=1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component ``k ~ w``, then ``x ~ N(m_k, S_k)``: (n, C, H, W) float64, in random order."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = self._randn(n, self.dim, generator=generator)
        scaled = self.eigenvalues[labels].sqrt() * z
        out = torch.empty(n, self.dim, dtype=F64, device=self._device())
        means = self.means.reshape(self.num_components, self.dim)
        for k in range(self.num_components):
            chosen = (labels == k).nonzero().squeeze(1)
            step = scaled[chosen] @ self.eigenvectors[k].T if self.full else scaled[chosen]
            out[chosen] = means[k] + step
        return out.reshape(n, *self.event_shape)

    def covariance(self, *, max_dense_dim: int = MAX_DENSE_DIM) -> torch.Tensor:
        """Total covariance ``sum_k w_k (S_k + (m_k - m)(m_k - m)^T)``: (d, d) float64."""
        _check_dense_dim("GaussianMixturePrior.covariance", self.dim, max_dense_dim)
        shifts = self.means.reshape(self.num_components, self.dim) - self.mean.reshape(-1)
        cov = (self.weights[:, None] * shifts).T @ shifts
        for k in range(self.num_components):
            cov = cov + self.weights[k] * self.component_covariance(k)
        return cov

    def posterior(self, problem: InverseProblem, *, max_dense_dim: int = MAX_DENSE_DIM) -> MixturePosterior:
        """Exact posterior mixture: ``w_k' ∝ w_k N(y; A m_k, A S_k A^T + s^2 I)``, Gaussian components."""
        matrix, y = dense_problem(problem, self.event_shape, max_dense_dim=max_dense_dim)
        means = self.means.reshape(self.num_components, self.dim).to(F64)
        components, log_evidence = [], []
        for k in range(self.num_components):
            post, log_ev = gaussian_posterior(means[k], self._component_factor(k).to(F64), matrix, y,
                                              problem.sigma_y, self.event_shape)
            components.append(post)
            log_evidence.append(log_ev)
        return MixturePosterior(self.weights.to(F64).log() + torch.stack(log_evidence), components)


# ---- standard benchmarks --------------------------------------------------------------------------------
def grid_mixture_25(*, scale: float = 8.0, var: float = 1.0, d: int = 2, shape: Sequence[int] | None = None,
                    generator: torch.Generator | None = None) -> GaussianMixturePrior:
    """The 25-mode grid of the MCGdiff benchmarks: means ``scale * (i, j, i, j, ...)``, i, j in {-2..2}.

    Components are isotropic with variance ``var``; in d > 2 dimensions (d even) the 2-D grid point is
    repeated d/2 times. Weights are equal, or with ``generator`` drawn as in the benchmark,
    ``w_k ∝ z_k^2`` with z_k ~ N(0, 1). Images are (1, 1, d) unless ``shape`` is given.
    """
    if d < 2 or d % 2:
        raise ValueError(f"d must be an even number >= 2 (the 2-D grid is repeated d/2 times), got {d}")
    grid = torch.arange(-2, 3, dtype=F64) * scale
    points = torch.cartesian_prod(grid, grid)                               # (25, 2)
    means = points.repeat(1, d // 2)                                        # (25, d): (i, j, i, j, ...)
    if generator is None:
        weights = torch.ones(25, dtype=F64)
    else:
        weights = torch.randn(25, generator=generator, dtype=F64) ** 2
    return GaussianMixturePrior(weights, means, torch.tensor(float(var), dtype=F64), shape=shape)


def two_mode_mixture(d: int = 16, *, separation: float = 6.0, var: float = 1.0,
                     weights: Sequence[float] = (0.5, 0.5), shape: Sequence[int] | None = None) -> GaussianMixturePrior:
    """Two isotropic modes ``N(+-separation/2 * u, var I)``, ``u = (1, ..., 1) / sqrt(d)``.

    The modes are ``separation`` apart along the diagonal (the mode-collapse test of RED-Diff-like samplers).
    Images are (1, 1, d) unless ``shape`` is given (e.g. (1, 4, 4) for d = 16).
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if len(weights) != 2:
        raise ValueError(f"weights must have two entries, got {weights}")
    direction = torch.ones(d, dtype=F64) / math.sqrt(d)
    means = torch.stack([-separation / 2 * direction, separation / 2 * direction])
    return GaussianMixturePrior(torch.tensor(weights, dtype=F64), means, torch.tensor(float(var), dtype=F64),
                                shape=shape)


def smooth_gaussian_prior(shape: Sequence[int], *, std: float = 0.5, correlation: float = 2.0,
                          mean: float = 0.0) -> StationaryGaussianPrior:
    """A stationary Gaussian field with a squared-exponential covariance: an exact, training-free prior.

    ``P(k) ∝ exp(-2 pi^2 l^2 |k|^2)`` (k in cycles per pixel, ``l = correlation`` pixels), scaled so each pixel
    has variance ``std^2`` (``mean(P) = std^2``): a smooth-image prior on the normalised scale (magnitude ~1).
    shape: (C, H, W). Exact ``D(x, sigma)`` (a Wiener filter), so the diffusion solvers run in milliseconds;
    used by ``--tiny`` recipes, tests and ``benchmarks/run.py --quick``. Not a model of any anatomy.
    """
    channels, height, width = (int(n) for n in shape)
    kh = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    kw = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    power = torch.exp(-2 * math.pi ** 2 * correlation ** 2 * (kh ** 2 + kw ** 2))
    power = power * (std ** 2 / power.mean())
    return StationaryGaussianPrior(torch.full((channels, height, width), float(mean), dtype=torch.float64),
                                   power.expand(channels, height, width).clone())


def empirical_gaussian_prior(images, shape: Sequence[int], *, percentile: float | None = 99.5,
                             floor: float = 1e-6) -> StationaryGaussianPrior:
    """A zero-mean stationary Gaussian prior whose power spectrum is the average of ``images``' (an empirical
    Wiener prior): the best *linear* model of those images, exact D and exact posteriors, no training.

    images: (N, h, w) real arrays, each divided by its ``percentile`` magnitude (the priors' training rule; None
    keeps the values, e.g. CT's fixed scale) and centred on a zero (H, W) canvas (cropped when larger);
    shape: (C, H, W); with C = 2 (complex images) the power is split evenly between the real and imaginary
    channels, so a zero-phase image and a rotated-phase one are equally likely. ``floor`` keeps every frequency's
    variance positive. Used by the recipes' ``--tiny`` runs, fitted on images that are not the test images.
    """
    channels, height, width = (int(n) for n in shape)
    power = torch.zeros(height, width, dtype=torch.float64)
    count = 0
    for image in images:
        image = torch.as_tensor(image, dtype=torch.float64)
        if image.ndim != 2:
            raise ValueError(f"images must be (N, h, w) real arrays, got an image of shape {tuple(image.shape)}")
        if percentile is not None:
            image = image / torch.quantile(image.abs().flatten(), percentile / 100).clamp_min(1e-12)
        h, w = min(image.shape[0], height), min(image.shape[1], width)
        top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
        canvas = torch.zeros(height, width, dtype=torch.float64)
        row, col = (height - h) // 2, (width - w) // 2
        canvas[row:row + h, col:col + w] = image[top:top + h, left:left + w]
        power += torch.fft.fft2(canvas, norm="ortho").abs().pow(2)
        count += 1
    if count == 0:
        raise ValueError("empirical_gaussian_prior needs at least one image")
    power = power / (count * channels) + floor
    power = (power + torch.roll(torch.flip(power, (0, 1)), (1, 1), (0, 1))) / 2      # exactly even: a real field
    return StationaryGaussianPrior(torch.zeros(channels, height, width, dtype=torch.float64),
                                   power.expand(channels, height, width).clone())


__all__ = [
    "AnalyticPrior", "GaussianPrior", "DiagonalGaussianPrior", "LowRankGaussianPrior", "StationaryGaussianPrior",
    "GaussianMixturePrior", "GaussianPosterior", "FourierGaussianPosterior", "MixturePosterior",
    "grid_mixture_25", "two_mode_mixture", "gaussian_posterior", "dense_problem", "shift_invariant_transfer",
    "smooth_gaussian_prior", "empirical_gaussian_prior",
]
