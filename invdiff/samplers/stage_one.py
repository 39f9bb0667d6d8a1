"""Stage I of the SMC sampler: exact draws from the tilted Gaussian ``N(0, rho^2 I) exp(-||A x - y||^2 / (2 s^2))``.

The SMC sampler (:mod:`invdiff.samplers.smc`) starts its particles from ``Q_y(x, T) = p_T(x) exp(-mu_y(x))``
with ``p_T`` the prior diffused to the largest noise level ``T``. At ``T`` the prior is washed out, so
``p_T ~= N(0, rho^2 I)`` with ``rho^2 = T^2 + sigma_data^2`` (the diffusion adds ``T^2`` to the prior's own
per-entry second moment ``sigma_data^2``). For a linear operator the tilted density is Gaussian::

    precision  Lambda = A^T A / s^2 + I / rho^2
    mean       m      = Lambda^-1 A^T y / s^2

and is sampled exactly, never by running a chain:

* ``"pixel"`` (inpainting, ``A^T A = M`` diagonal in pixels): ``x = m + Lambda^-1/2 xi`` entry by entry;
* ``"fourier"`` (single-coil Cartesian MRI, ``A^T A = F^H M F``): the same in k-space, then ``F^H``;
* ``"cg"`` (anything else: multi-coil MRI, CT, dense matrices), perturb-and-solve::

      x = Lambda^-1 ( A^T (y + s e1) / s^2 + e2 / rho ),   e1, e2 ~ N(0, I) independent

  whose mean is ``m`` and covariance ``Lambda^-1 (A^T A / s^2 + I / rho^2) Lambda^-1 = Lambda^-1``: exact up
  to the conjugate-gradient tolerance (Papandreou & Yuille's perturb-and-MAP for Gaussians).

``s`` is the problem's ``sigma_y`` unless overridden (the sampler's tempered mode passes
``sqrt(sigma_y^2 + kappa T^2)``). Particles are ``(N, B, *in_shape)``: N particles for each of the B problems
in ``problem.y``; the operator always sees its own batch B (see :func:`map_particles`).

    >>> stage = TiltedGaussian(problem, rho=80.0)
    >>> x = stage.sample(16, generator)            # (16, B, C, H, W)
"""
from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple, Sequence

import torch

from invdiff.operators.base import conjugate_gradient
from invdiff.operators.fft import complex_to_real, ifft2c, real_to_complex
from invdiff.operators.inpainting import Inpainting
from invdiff.operators.mri import CartesianMRI
from invdiff.problem import InverseProblem
from invdiff.samplers._common import randn_like

log = logging.getLogger(__name__)

METHODS = ("auto", "pixel", "fourier", "cg")

Generators = torch.Generator | Sequence[torch.Generator] | None


# ---- particles through a batched operator --------------------------------------------------------------
class ConditionalDraw(NamedTuple):
    """What :meth:`TiltedGaussian.conditional` returns (see there)."""

    mean: torch.Tensor
    draw: torch.Tensor
    quadratic: torch.Tensor


def particle_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-particle inner product over the data axes, (N, B, ...) x (N, B, ...) -> (N, B) float64."""
    return (a.double() * b.double()).flatten(2).sum(dim=2)


def map_particles(fn: Callable[[torch.Tensor], torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
    """Apply a batch function ``fn: (B, ...) -> (B, ...)`` to particles ``xs: (N, B, ...)`` in one call.

    With B = 1 the particles simply become the batch (operators broadcast batch-1 masks and maps). With B > 1
    an operator may hold one mask or coil map per problem, so ``torch.func.vmap`` maps over the particle axis
    and each call sees the batch B it was built for -- still one batched computation, no Python loop (CT's sparse
    product has its own vmap rule that joins the particles into one matrix product).
    """
    n, b = xs.shape[:2]
    if b == 1:
        out = fn(xs.reshape(n, *xs.shape[2:]))
        return out.reshape(n, 1, *out.shape[1:])
    return torch.func.vmap(fn)(xs)


def particle_noise(shape: Sequence[int], like: torch.Tensor, generator: Generators,
                   active: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal ``(N, B, ...)`` noise; with one generator per problem, problem b's noise comes from
    ``generator[b]`` alone, so a problem sees the same particles whatever batch it is solved in.

    active: optional (B,) bool; with per-problem generators only the active problems draw (and consume their
    generator), the others get zeros.
    """
    shape = tuple(shape)
    if active is not None and generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        noise = like.new_zeros(shape)
        for b in active.nonzero().flatten().tolist():
            g = generators[b]
            noise[:, b] = torch.randn((shape[0], *shape[2:]), generator=g, dtype=like.dtype,
                                      device=g.device).to(like.device)
        return noise
    probe = like.new_empty((shape[1], shape[0], *shape[2:]))
    return randn_like(probe, generator).transpose(0, 1)


# ---- which exact sampler fits the operator ---------------------------------------------------------------
def tilted_gaussian_method(operator) -> str:
    """``"pixel"`` when ``A^T A`` is diagonal in pixels (inpainting), ``"fourier"`` when it is diagonal in the
    centred unitary DFT basis (single-coil Cartesian MRI), else ``"cg"`` (perturb-and-solve)."""
    if isinstance(operator, Inpainting):
        return "pixel"
    if isinstance(operator, CartesianMRI):
        return "fourier"
    return "cg"


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


class TiltedGaussian:
    """``N(0, rho^2 I) exp(-||A x - y||^2 / (2 s^2))`` = ``N(m, Lambda^-1)`` for a linear operator A.

    problem: y (B, ...); rho: prior standard deviation (> 0); sigma_y: s, default ``problem.sigma_y``;
    method: one of :data:`METHODS` (``"auto"`` picks with :func:`tilted_gaussian_method`); cg_tol / cg_max_iter:
    the conjugate-gradient stopping rule of the ``"cg"`` method (tol relative to the right-hand side; default
    1e-10 for float64 data, 1e-6 for float32). Tensors are in y's floating dtype (float32 at least).
    """

    def __init__(self, problem: InverseProblem, rho: float, *, sigma_y: float | None = None, method: str = "auto",
                 cg_tol: float | None = None, cg_max_iter: int = 1000):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        self.problem = problem
        self.operator = problem.operator
        self.rho = _positive("rho", rho)
        self.sigma_y = _positive("sigma_y", problem.sigma_y if sigma_y is None else sigma_y)
        self.method = tilted_gaussian_method(self.operator) if method == "auto" else method
        if self.method == "pixel" and not isinstance(self.operator, Inpainting):
            raise ValueError(f"method 'pixel' needs an Inpainting operator (A^T A diagonal in pixels); "
                             f"got {type(self.operator).__name__}")
        if self.method == "fourier" and not isinstance(self.operator, CartesianMRI):
            raise ValueError(f"method 'fourier' needs a CartesianMRI operator (A^T A diagonal in k-space); "
                             f"got {type(self.operator).__name__}")
        self.dtype = torch.promote_types(problem.y.dtype, torch.float32)
        self.y = problem.y.to(self.dtype)
        self.batch = self.y.shape[0]
        self.in_shape = tuple(self.operator.in_shape)
        default_tol = 1e-10 if self.dtype == torch.float64 else 1e-6
        self.cg_tol = default_tol if cg_tol is None else _positive("cg_tol", cg_tol)
        self.cg_max_iter = int(cg_max_iter)
        self.cg_iterations = 0             # normal-operator calls of the last solve (diagnostics)
        self.cg_relative_residual = None   # set by solve(): worst relative residual of the last solve

    # ---- the Gaussian ----------------------------------------------------------------------------------
    def apply_precision(self, xs: torch.Tensor) -> torch.Tensor:
        """``Lambda x = A^T A x / s^2 + x / rho^2`` for particles (N, B, *in_shape)."""
        normal = map_particles(self.operator.normal, xs)
        return normal / self.sigma_y ** 2 + xs / self.rho ** 2

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``Lambda^-1 rhs`` by conjugate gradients, each particle and problem with its own step sizes.

        rhs: (N, B, *in_shape). Logs a warning when the relative residual stays above ``cg_tol``.
        """
        n, b = rhs.shape[:2]

        calls = 0

        def flat_precision(flat: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return self.apply_precision(flat.reshape(n, b, *self.in_shape)).reshape(flat.shape)

        flat_rhs = rhs.reshape(n * b, *self.in_shape)
        solution, relative = conjugate_gradient(flat_precision, flat_rhs, max_iter=self.cg_max_iter, tol=self.cg_tol,
                                                return_residual=True)
        self.cg_iterations = calls
        self.cg_relative_residual = float(relative.max())
        if self.cg_relative_residual > 10 * self.cg_tol:
            # Stage I and the SMC conditional step both solve here; rho tells them apart in the log.
            log.warning("tilted Gaussian (rho %.3g, s %.3g): conjugate gradients stopped at relative residual %.3g "
                        "after %d iterations (tolerance %.1g); the draws are not exact to that level", self.rho,
                        self.sigma_y, self.cg_relative_residual, calls, self.cg_tol)
        return solution.reshape(rhs.shape)

    def mean(self) -> torch.Tensor:
        """``m = Lambda^-1 A^T y / s^2``: (B, *in_shape)."""
        if self.method == "pixel":
            return self.operator.A_adjoint(self.y) / self.sigma_y ** 2 / self._pixel_precision()
        if self.method == "fourier":
            return self._from_kspace(self._kspace_mean())
        rhs = self.operator.A_adjoint(self.y) / self.sigma_y ** 2
        return self.solve(rhs.unsqueeze(0)).squeeze(0)

    def sample(self, num_particles: int, generator: Generators = None) -> torch.Tensor:
        """``num_particles`` exact draws per problem: (N, B, *in_shape) in the data's dtype."""
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        n = int(num_particles)
        if self.method == "pixel":
            precision = self._pixel_precision()
            xi = particle_noise((n, self.batch, *self.in_shape), self.y, generator)
            return self.mean() + xi / precision.sqrt()
        if self.method == "fourier":
            precision = self._kspace_precision()
            xi = particle_noise((n, self.batch, *self.y.shape[1:]), self.y, generator)    # real/imag k-space noise
            kspace = self._kspace_mean() + xi / precision.sqrt()
            return self._from_kspace(kspace.reshape(n * self.batch, *self.y.shape[1:])).reshape(n, self.batch,
                                                                                                 *self.in_shape)
        # perturb-and-solve: x = Lambda^-1 (A^T (y + s e1) / s^2 + e2 / rho)
        e1 = particle_noise((n, *self.y.shape), self.y, generator)
        e2 = particle_noise((n, self.batch, *self.in_shape), self.y, generator)
        perturbed = self.y + self.sigma_y * e1
        rhs = map_particles(self.operator.A_adjoint, perturbed) / self.sigma_y ** 2 + e2 / self.rho
        return self.solve(rhs)

    def conditional(self, residual: torch.Tensor, generator: Generators = None) -> "ConditionalDraw":
        """Mean, one exact draw and the evidence quadratic of ``N(0, rho^2 I) exp(-||A z - r||^2 / (2 s^2))`` for a
        data vector per particle.

        residual: r, (N, B, *y.shape[1:]), one right-hand side per particle (the sampler's conditional proposal
        passes ``y - A c`` for each particle's centre c). Returns :class:`ConditionalDraw` with ``mean`` and
        ``draw`` (N, B, *in_shape), by the same three methods as :meth:`mean` / :meth:`sample` with r in place of
        y (the cg method solves the mean and the perturbed system in one stacked call), and ``quadratic`` (N, B)
        float64, ``r^T (s^2 I + rho^2 A A^T)^-1 r``: by Woodbury ``|r|^2 / s^2 - <A^T r / s^2, mean>``, from the
        right-hand side the mean solve needs anyway (no extra operator call).
        """
        n = residual.shape[0]
        s2 = self.sigma_y ** 2
        data_term = particle_inner(residual, residual) / s2
        if self.method == "pixel":
            precision = self._pixel_precision()
            rhs_mean = map_particles(self.operator.A_adjoint, residual) / s2
            mean = rhs_mean / precision
            xi = particle_noise((n, self.batch, *self.in_shape), self.y, generator)
            return ConditionalDraw(mean, mean + xi / precision.sqrt(), data_term - particle_inner(rhs_mean, mean))
        if self.method == "fourier":
            # in k-space (F unitary): A^T r / s^2 <-> M r / s^2, and the mean <-> k_mean
            precision = self._kspace_precision()
            k_rhs = self._kspace_mask() * residual / s2
            k_mean = k_rhs / precision
            xi = particle_noise(residual.shape, self.y, generator)
            both = torch.cat([k_mean, k_mean + xi / precision.sqrt()])               # (2N, B, ...)
            images = self._from_kspace(both.reshape(2 * n * self.batch, *residual.shape[2:]))
            mean, draw = images.reshape(2, n, self.batch, *self.in_shape).unbind(0)
            return ConditionalDraw(mean, draw, data_term - particle_inner(k_rhs, k_mean))
        e1 = particle_noise(residual.shape, self.y, generator)
        e2 = particle_noise((n, self.batch, *self.in_shape), self.y, generator)
        rhs_mean = map_particles(self.operator.A_adjoint, residual) / s2
        rhs_draw = map_particles(self.operator.A_adjoint, residual + self.sigma_y * e1) / s2 + e2 / self.rho
        mean, draw = self.solve(torch.cat([rhs_mean, rhs_draw])).split(n)
        return ConditionalDraw(mean, draw, data_term - particle_inner(rhs_mean, mean))

    # ---- diagonal bases --------------------------------------------------------------------------------
    def _pixel_precision(self) -> torch.Tensor:
        """``diag(M) / s^2 + 1 / rho^2`` as (B|1, *in_shape): ``A^T A 1`` is the observation mask."""
        ones = torch.ones((1, *self.in_shape), dtype=self.dtype, device=self.y.device)
        return self.operator.normal(ones) / self.sigma_y ** 2 + 1 / self.rho ** 2

    def _kspace_mask(self) -> torch.Tensor:
        """1.0 where k-space is sampled, on y's real/imag grid: ``A A^H = M`` applied to ones."""
        return (self.operator.A(self.operator.A_adjoint(torch.ones_like(self.y))) > 0.5).to(self.dtype)

    def _kspace_precision(self) -> torch.Tensor:
        """``M / s^2 + 1 / rho^2`` per real k-space coordinate."""
        return self._kspace_mask() / self.sigma_y ** 2 + 1 / self.rho ** 2

    def _kspace_mean(self) -> torch.Tensor:
        """``(M y / s^2) / (M / s^2 + 1 / rho^2)``: entries of y outside the mask carry no information."""
        return self._kspace_mask() * self.y / self.sigma_y ** 2 / self._kspace_precision()

    def _from_kspace(self, kspace: torch.Tensor) -> torch.Tensor:
        """``F^H k`` for real/imag k-space (B, 2, H, W), every location kept (no sampling mask)."""
        return complex_to_real(ifft2c(real_to_complex(kspace)))


__all__ = ["TiltedGaussian", "ConditionalDraw", "particle_inner", "tilted_gaussian_method", "map_particles",
           "particle_noise", "METHODS"]
