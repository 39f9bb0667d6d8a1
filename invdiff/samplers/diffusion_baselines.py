"""Diffusion baselines behind invdiff's sampler signature: DPS, DiffPIR and DDRM in the EDM sigma convention.

Each sampler is the paper's algorithm written for ``x_sigma = x0 + sigma n`` (EDM/VE form), calling the prior
``D(x, sigma) = E[x0 | x_sigma = x]`` exactly as every other invdiff sampler does, over the same schedule
(``invdiff.schedules.karras`` between the prior's ``sigma_min`` and ``sigma_max``, then 0). A VP model
(DDPM/ADM) enters through its adapter; the VP -> VE translation of each update is spelled out in its docstring.

Why these are small own implementations and not deepinv 0.5.0's ``deepinv.sampling.{DPS, DiffPIR, DDRM}``:

* ``DDRM.forward`` and ``DiffPIR.forward`` draw noise with ``torch.randn_like`` from the *global* RNG (and
  call ``torch.manual_seed`` when given a seed); invdiff draws randomness only from the ``generator`` passed in,
  so the same seed gives the same reconstruction whatever else ran before.
* deepinv's ``DiffPIR`` hard-codes a 1000-step linear-beta VP grid and clamps ``x0`` to ``[-1, 1]``; its
  ``DPS`` clips ``D(x)`` to ``[-1, 1]``, runs the denoiser in float32 and integrates a VP SDE with its own
  beta schedule. invdiff's priors have their own sigma range, complex MRI channels are signed, and the oracle
  tests run in float64: each of these would make the comparison with RED-Diff not like for like.
* deepinv's ``DDRM`` reads ``physics.mask`` / ``U_adjoint`` / ``V`` and so needs a ``DecomposablePhysics``;
  invdiff's decomposable operators (inpainting, single-coil MRI, super-resolution, dense matrices) are not
  subclasses of it, so :func:`spectral_decomposition` gives their SVDs here. (It also divides
  ``U^T y`` by the singular values in place, which for operators whose ``U`` is the identity, such as
  deepinv's ``Inpainting``, rescales the caller's ``y``.)

To run deepinv's own classes on an invdiff prior anyway (e.g. as a cross-check), wrap it with
:func:`invdiff.priors.deepinv_bridge.as_deepinv_denoiser`.

NFE counts forward evaluations of the prior. DPS also backpropagates through the prior once per step
(``diagnostics["backward_passes"]``), so a DPS step costs about two network passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from invdiff.errors import UnsupportedOperatorError
from invdiff.operators.base import conjugate_gradient
from invdiff.operators.fft import complex_to_real, fft2c, ifft2c, real_to_complex
from invdiff.operators.inpainting import Inpainting
from invdiff.operators.matrix import MatrixOperator
from invdiff.operators.mri import CartesianMRI
from invdiff.operators.superres import SuperResolution
from invdiff.priors.base import Denoiser
from invdiff.problem import InverseProblem
from invdiff.registry import register_solver
from invdiff.samplers._common import (NetworkCalls, SampleResult, call_prior, expand_sigma, notify, randn_like,
                                      sigma_schedule, timed, trajectory_of)

# Singular values below this fraction of the largest are treated as exactly zero (unobserved directions).
SINGULAR_RTOL = 1e-10


# ---- shared plumbing (pure helpers used by the three samplers below) ---------------------------------------
def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _check_unit_interval(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def _state_like(problem: InverseProblem) -> torch.Tensor:
    """An empty (B, *in_shape) tensor in the sampler's state dtype (float32, or float64 for float64 y)."""
    dtype = torch.promote_types(problem.y.dtype, torch.float32)
    return torch.empty((problem.y.shape[0], *problem.operator.in_shape), dtype=dtype, device=problem.y.device)


def _batch_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _diagnostics(wall, calls: NetworkCalls, sigmas: torch.Tensor, **extra) -> dict:
    return {"nfe": calls.nfe, "seconds": wall.seconds, "network_seconds": calls.seconds,
            "steps": len(sigmas) - 1, "sigmas": sigmas.tolist(), **extra}


# ---- DPS ---------------------------------------------------------------------------------------------------
@register_solver("dps", kind="diffusion")
def sample_dps(problem: InverseProblem, prior: Denoiser, *, steps: int = 1000, zeta: float = 1.0,
               sigma_max: float | None = None, sigma_min: float | None = None,
               generator=None, callback=None) -> SampleResult:
    """Diffusion Posterior Sampling (Chung et al., ICLR 2023, Alg. 1) in sigma form; own implementation.

    Per step ``sigma -> sigma'`` of the Karras grid (x, x0_hat: (B, *in_shape) in the state dtype):

        x0_hat = D(x, sigma)                                                     (Tweedie estimate)
        x'     = x0_hat + (sigma'/sigma)^2 (x - x0_hat) + sigma' sqrt(1 - (sigma'/sigma)^2) z   (ancestral)
        x_next = x' - zeta sqrt((1 + sigma^2)(1 + sigma'^2)) grad_x ||y - A x0_hat(x)||         (guidance)

    The ancestral step is DDPM's: ``q(x_{t-1} | x_t, x0_hat)`` is exactly this Brownian bridge in VE
    coordinates. Guidance: the authors' code (and deepinv's "norm" guidance) steps by ``zeta`` times the gradient
    of the residual *norm* (the paper's ``zeta_i = zeta' / ||y - A x0_hat||`` on the squared norm is
    ``zeta = 2 zeta'``); the paper takes that step in VP coordinates ``x_vp = x / sqrt(1 + sigma^2)``, which
    gives the factor ``sqrt((1 + sigma^2)(1 + sigma'^2))`` here, so ``zeta`` means what it means in the paper.
    The gradient backpropagates through the network (never detached): one forward and one backward pass
    per step. Residual norms are per batch element. ``x0_hat`` is not clipped (complex MRI channels are
    signed). ``zeta`` sets a step *length* in image units (late in sampling about ``zeta ||A||`` per step in
    the l2 norm of the whole image), so it should shrink for small images; 1.0 is the paper's value for
    256 x 256 x 3 images in [-1, 1] (about 0.5 for the same images normalised to [0, 1]).

    generator: a ``torch.Generator`` or one per image. Returns ``SampleResult(x)`` with diagnostics ``nfe``
    (forward passes, = steps), ``backward_passes`` (= steps), ``seconds``, ``network_seconds`` (forward and
    backward through the prior), ``sigmas`` and ``residual_norm`` (``||y - A x0_hat||`` per step, batch mean).

    >>> result = sample_dps(problem, prior, steps=1000, zeta=1.0, generator=torch.Generator().manual_seed(0))
    """
    steps = _check_steps(steps)
    if not zeta >= 0:
        raise ValueError(f"zeta must be >= 0, got {zeta!r}")
    operator, y = problem.operator, problem.y
    with timed(y) as wall:
        calls = NetworkCalls()
        like = _state_like(problem)
        sigmas = sigma_schedule(prior, steps, sigma_min, sigma_max, like)
        x = sigmas[0] * randn_like(like, generator)
        residual_norms = []
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                x0_hat = call_prior(prior, x, expand_sigma(sigma, x), calls)      # Tweedie
                residual_norm = _batch_norm(y - operator.A(x0_hat))
                with timed(x) as backward:
                    # Summing over the batch keeps each image's gradient its own (images do not interact).
                    (norm_grad,) = torch.autograd.grad(residual_norm.sum(), x)
            calls.seconds += backward.seconds
            x, x0_hat = x.detach(), x0_hat.detach()
            ratio = sigma_next / sigma
            x_prime = (x0_hat + ratio ** 2 * (x - x0_hat)
                       + sigma_next * torch.sqrt(1 - ratio ** 2) * randn_like(x, generator))   # ancestral
            vp_factor = torch.sqrt((1 + sigma ** 2) * (1 + sigma_next ** 2))
            x = x_prime - zeta * vp_factor * norm_grad                            # guidance
            residual_norms.append(float(residual_norm.detach().mean()))
            last = i == steps - 1
            notify(callback, i, steps, {"x": x if last else x0_hat, "x_t": x, "x0_hat": x0_hat,
                                        "sigma": sigma, "residual_norm": residual_norm.detach()})
    return SampleResult(x=x.detach(), diagnostics=_diagnostics(
        wall, calls, sigmas, backward_passes=steps, zeta=zeta, residual_norm=residual_norms),
        trajectory=trajectory_of(callback))


# ---- DiffPIR -----------------------------------------------------------------------------------------------
def _quadratic_prox(problem: InverseProblem, x0_hat: torch.Tensor, rho_t: float, max_iter: int) -> torch.Tensor:
    """``argmin_x ||y - A x||^2 + rho_t ||x - x0_hat||^2``, i.e. ``(A^T A + rho_t I) x = A^T y + rho_t x0_hat``.

    Conjugate gradients warm-started at ``x0_hat``: the first residual ``A^T (y - A x0_hat)`` lies in A's row
    space and so does every later one, hence the null-space part of ``x0_hat`` is kept exactly, whatever
    ``rho_t``; on the row space the system is as well conditioned as ``A^T A`` (one iteration for masks).
    """
    operator = problem.operator
    rhs = operator.A_adjoint(problem.y) + rho_t * x0_hat
    return conjugate_gradient(lambda v: operator.A_adjoint_A(v) + rho_t * v, rhs, max_iter=max_iter, tol=1e-6, x0=x0_hat)


@register_solver("diffpir", kind="diffusion")
def sample_diffpir(problem: InverseProblem, prior: Denoiser, *, steps: int = 100, lam: float = 7.0,
                   zeta: float = 0.3, cg_max_iter: int = 30, sigma_max: float | None = None,
                   sigma_min: float | None = None, generator=None, callback=None) -> SampleResult:
    """DiffPIR (Zhu et al., CVPR-W 2023, Alg. 1) in sigma form; own implementation.

    Per step ``sigma -> sigma'`` of the Karras grid (x: (B, *in_shape) in the state dtype), ``s = sigma_y``:

        x0_hat  = D(x, sigma)                                                   (denoising)
        x0_data = argmin_x ||y - A x||^2 + rho_t ||x - x0_hat||^2,  rho_t = lam s^2 / sigma^2    (data step)
        eps_hat = (x - x0_data) / sigma                                         (effective noise)
        x_next  = x0_data + sigma' (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)      (re-noising)

    Dividing the paper's VP lines by ``sqrt(abar_t)`` gives exactly these (its ``sigma_bar_t`` *is* the VE
    sigma). The data step is solved by CG on the normal equations (``cg_max_iter``; one iteration for masks),
    at every step including the last, where ``sigma' = 0`` returns ``x0_data``. ``lam = 7`` is the value of
    the authors' demo and of deepinv; ``zeta`` (noise re-injection: 0 deterministic, 1 fresh noise) is tuned
    per task in the paper; 0.3 is a middle value (deepinv's default is 0.1).

    generator: a ``torch.Generator`` or one per image. Returns ``SampleResult(x)`` with diagnostics ``nfe``
    (= steps), ``seconds``, ``network_seconds``, ``sigmas``.

    >>> result = sample_diffpir(problem, prior, steps=100, generator=torch.Generator().manual_seed(0))
    """
    steps = _check_steps(steps)
    _check_unit_interval("zeta", zeta)
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    sigma_y = float(problem.sigma_y)
    with timed(problem.y) as wall, torch.no_grad():
        calls = NetworkCalls()
        like = _state_like(problem)
        sigmas = sigma_schedule(prior, steps, sigma_min, sigma_max, like)
        x = sigmas[0] * randn_like(like, generator)
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x0_hat = call_prior(prior, x, expand_sigma(sigma, x), calls)          # denoising
            rho_t = lam * sigma_y ** 2 / float(sigma) ** 2
            x0_data = _quadratic_prox(problem, x0_hat, rho_t, cg_max_iter)       # data step
            eps_hat = (x - x0_data) / sigma                                       # effective noise
            x = x0_data + sigma_next * (math.sqrt(1 - zeta) * eps_hat
                                        + math.sqrt(zeta) * randn_like(x, generator))   # re-noising
            notify(callback, i, steps, {"x": x0_data, "x_t": x, "x0_hat": x0_hat, "sigma": sigma})
    return SampleResult(x=x, diagnostics=_diagnostics(wall, calls, sigmas, lam=lam, zeta=zeta),
                        trajectory=trajectory_of(callback))


# ---- DDRM --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectralDecomposition:
    """``A = U diag(s) V^T`` seen from the image side, for one problem.

    to_spectral(x) = ``V^T x`` and from_spectral(z) = ``V z`` (V orthogonal: the spectral domain has d = dim x
    entries); singular_values: ``s`` broadcastable to the spectral shape, 0 on A's null space; ut_y:
    ``U^T y`` embedded in the spectral shape (0 where ``s = 0``).
    """

    to_spectral: Callable[[torch.Tensor], torch.Tensor]
    from_spectral: Callable[[torch.Tensor], torch.Tensor]
    singular_values: torch.Tensor
    ut_y: torch.Tensor


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _inpainting_svd(op: Inpainting, y: torch.Tensor, shape) -> SpectralDecomposition:
    # M is diagonal with 0/1 entries: U = V = I, s = M.
    s = op.A(torch.ones(shape, dtype=y.dtype, device=y.device))
    return SpectralDecomposition(_identity, _identity, s, y)


def _cartesian_mri_svd(op: CartesianMRI, y: torch.Tensor, shape) -> SpectralDecomposition:
    # A = M F with F unitary: V^T = F (orthogonal on the real (re, im) representation), U = I, s = M on both
    # channels. M is read back as A V 1 = M F F^H 1 (binary, so rounding is removed by the threshold).
    def to_spectral(x):
        return complex_to_real(fft2c(real_to_complex(x)))

    def from_spectral(z):
        return complex_to_real(ifft2c(real_to_complex(z)))

    ones = torch.ones(shape, dtype=y.dtype, device=y.device)
    s = (op.A(from_spectral(ones)).abs() > 0.5).to(y.dtype)
    return SpectralDecomposition(to_spectral, from_spectral, s, y)


def _superres_svd(op: SuperResolution, y: torch.Tensor, shape) -> SpectralDecomposition:
    # A x = A_H x A_W^T is a Kronecker product, so its SVD is the product of the two 1-D SVDs.
    u_h, s_h, vt_h = torch.linalg.svd(op.matrix_h.to(torch.float64), full_matrices=True)
    u_w, s_w, vt_w = torch.linalg.svd(op.matrix_w.to(torch.float64), full_matrices=True)
    u_h, u_w, vt_h, vt_w = (m.to(y.dtype) for m in (u_h, u_w, vt_h, vt_w))
    h, w = len(s_h), len(s_w)
    s = torch.zeros(shape[-2:], dtype=y.dtype, device=y.device)
    s[:h, :w] = torch.outer(s_h, s_w).to(y.dtype)
    ut_y = torch.zeros(shape, dtype=y.dtype, device=y.device)
    ut_y[..., :h, :w] = u_h.T @ y @ u_w
    return SpectralDecomposition(lambda x: vt_h @ x @ vt_w.T, lambda z: vt_h.T @ z @ vt_w, s, ut_y)


def _matrix_svd(op: MatrixOperator, y: torch.Tensor, shape) -> SpectralDecomposition:
    u, s_thin, vt = torch.linalg.svd(op.matrix.to(torch.float64), full_matrices=True)
    u, vt = u.to(y.dtype), vt.to(y.dtype)
    d, k = vt.shape[0], len(s_thin)
    s = torch.zeros(d, dtype=y.dtype, device=y.device)
    s[:k] = s_thin.to(y.dtype)
    ut_y = torch.zeros(y.shape[0], d, dtype=y.dtype, device=y.device)
    ut_y[:, :k] = (y @ u)[:, :k]
    return SpectralDecomposition(lambda x: x.reshape(x.shape[0], -1) @ vt.T,
                                 lambda z: (z @ vt).reshape(z.shape[0], *shape[1:]), s, ut_y)


def _deepinv_svd(physics, y: torch.Tensor, shape) -> SpectralDecomposition:
    mask = torch.as_tensor(physics.mask, device=y.device)
    if mask.is_complex():
        raise UnsupportedOperatorError(f"{type(physics).__name__}: DDRM here needs real singular values (physics.mask), "
                         f"got a complex mask")
    return SpectralDecomposition(physics.V_adjoint, physics.V, mask.to(y.dtype), physics.U_adjoint(y))


_SPECTRAL_DECOMPOSITIONS = ((Inpainting, _inpainting_svd), (CartesianMRI, _cartesian_mri_svd),
                            (SuperResolution, _superres_svd), (MatrixOperator, _matrix_svd))


def spectral_decomposition(operator, y: torch.Tensor, shape: tuple[int, ...]) -> SpectralDecomposition:
    """The SVD of a decomposable operator for measurements ``y``; images have ``shape`` = (B, *in_shape).

    Decomposable: ``Inpainting``, ``CartesianMRI`` (single coil), ``SuperResolution``, ``MatrixOperator``,
    and any ``deepinv.physics.DecomposablePhysics`` with real singular values. Anything else raises UnsupportedOperatorError.
    """
    from deepinv.physics import DecomposablePhysics

    for cls, build in _SPECTRAL_DECOMPOSITIONS:
        if isinstance(operator, cls):
            return build(operator, y, shape)
    if isinstance(operator, DecomposablePhysics):
        return _deepinv_svd(operator, y, shape)
    known = ", ".join(cls.__name__ for cls, _ in _SPECTRAL_DECOMPOSITIONS)
    raise UnsupportedOperatorError(f"DDRM needs a decomposable operator (a known SVD A = U diag(s) V^T); got "
                     f"{type(operator).__name__}. Decomposable operators: {known} and "
                     f"deepinv.physics.DecomposablePhysics subclasses. Use 'dps' or 'diffpir' for "
                     f"{type(operator).__name__}.")


@register_solver("ddrm", kind="diffusion")
def sample_ddrm(problem: InverseProblem, prior: Denoiser, *, steps: int = 20, eta: float = 0.85,
                eta_b: float = 1.0, sigma_max: float | None = None, sigma_min: float | None = None,
                generator=None, callback=None) -> SampleResult:
    """DDRM (Kawar, Elad, Ermon, Song, NeurIPS 2022) on the operator's SVD; own implementation.

    In spectral coordinates ``x_bar = V^T x`` and ``y_bar = diag(s)^+ U^T y`` (per-entry noise ``s_y / s_i``,
    ``s_y = sigma_y``), with ``x0_bar = V^T D(V x_bar, sigma)``, each step ``sigma -> sigma'`` draws, entry by entry:

        s_i = 0:                N(x0_bar + sqrt(1 - eta^2) sigma' (x_bar - x0_bar) / sigma,         eta^2 sigma'^2)
        sigma' <  s_y / s_i:    N(x0_bar + sqrt(1 - eta^2) sigma' (y_bar - x0_bar) s_i / s_y,       eta^2 sigma'^2)
        sigma' >= s_y / s_i:    N((1 - eta_b) x0_bar + eta_b y_bar,             sigma'^2 - eta_b^2 s_y^2 / s_i^2)

    starting from ``N(y_bar, sigma_max^2 - s_y^2 / s_i^2)`` where observed with ``s_y / s_i <= sigma_max``
    and ``N(0, sigma_max^2)`` elsewhere (the paper's p^(T)); the steps above are its p^(t). The paper writes
    DDRM in VE form, so nothing is translated. The last step (``sigma' = 0``) returns ``V V^T D(x, sigma_min)``,
    the final denoised estimate, as the authors' code does. Defaults are the paper's: 20 steps, ``eta = 0.85``,
    ``eta_b = 1``. Needs a decomposable operator (:func:`spectral_decomposition`); anything else raises
    ValueError.

    generator: a ``torch.Generator`` or one per image. Returns ``SampleResult(x)`` with diagnostics ``nfe``
    (= steps), ``seconds``, ``network_seconds``, ``sigmas``.

    >>> result = sample_ddrm(problem, prior, steps=20, generator=torch.Generator().manual_seed(0))
    """
    steps = _check_steps(steps)
    _check_unit_interval("eta", eta)
    _check_unit_interval("eta_b", eta_b)
    sigma_y = float(problem.sigma_y)
    with timed(problem.y) as wall, torch.no_grad():
        calls = NetworkCalls()
        like = _state_like(problem)
        svd = spectral_decomposition(problem.operator, problem.y.to(like.dtype), tuple(like.shape))
        s = svd.singular_values
        s = torch.where(s > SINGULAR_RTOL * s.abs().max().clamp_min(torch.finfo(s.dtype).tiny), s, 0.0)
        observed = s > 0
        safe_s = torch.where(observed, s, 1.0)
        noise_std = torch.where(observed, sigma_y / safe_s, math.inf)                # s_y / s_i
        y_bar = torch.where(observed, svd.ut_y / safe_s, 0.0)
        sigmas = sigma_schedule(prior, steps, sigma_min, sigma_max, like)
        c = math.sqrt(1 - eta ** 2)

        first = observed & (noise_std <= sigmas[0])                                  # p^(T)
        std = torch.where(first, (sigmas[0] ** 2 - noise_std ** 2).clamp_min(0).sqrt(), sigmas[0])
        x_bar = torch.where(first, y_bar, 0.0) + std * randn_like(y_bar, generator)
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x0_hat = call_prior(prior, svd.from_spectral(x_bar), expand_sigma(sigma, like), calls)
            x0_bar = svd.to_spectral(x0_hat)
            below = observed & (sigma_next < noise_std)                               # p^(t), middle case
            above = observed & ~below                                                 # p^(t), last case
            finite_std = torch.where(observed, noise_std, 1.0)
            mean = torch.where(above, (1 - eta_b) * x0_bar + eta_b * y_bar,
                               torch.where(below, x0_bar + c * sigma_next * (y_bar - x0_bar) / finite_std,
                                           x0_bar + c * sigma_next * (x_bar - x0_bar) / sigma))
            std = torch.where(above, (sigma_next ** 2 - (eta_b * finite_std) ** 2).clamp_min(0).sqrt(),
                              eta * sigma_next)
            x_bar = mean + std * randn_like(x_bar, generator)
            last = i == steps - 1
            notify(callback, i, steps, {"x": svd.from_spectral(x_bar) if last else x0_hat,
                                        "x0_hat": x0_hat, "sigma": sigma})
        x = svd.from_spectral(x_bar)
    return SampleResult(x=x, diagnostics=_diagnostics(wall, calls, sigmas, eta=eta, eta_b=eta_b),
                        trajectory=trajectory_of(callback))


__all__ = ["sample_dps", "sample_diffpir", "sample_ddrm", "spectral_decomposition", "SpectralDecomposition"]
