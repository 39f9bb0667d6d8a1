r"""3-D reconstruction with a 2-D prior: DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye; CVPR 2023) and DDS
(Chung, Lee, Ye; ICLR 2024), plus 3-D total variation as the classical reference; own implementations.

Both diffusion samplers run a 2-D prior on every slice of a volume ``x: (B, C, D, H, W)`` (through
:class:`invdiff.priors.base.SliceDenoiser`, ``chunk`` slices per network call, so memory stays bounded whatever
``D``) and tie the slices together with a total-variation prior *along z only* inside the data-consistency step:

    min_x  1/2 ||A x - y||^2 + lam ||D_z x||_1,        (D_z x)_d = x_{d+1} - x_d  (circular, as in the paper's code)

solved by ADMM with the split ``z = D_z x`` (DiffusionMBIR Eq. (11)-(13)), *one* ADMM iteration per diffusion step
and the ADMM variables ``z, w`` (scaled dual) carried across steps:

    z <- soft(D_z x + w, lam / rho)                                   (the modulus of the (re, im) pair for C = 2)
    x <- CG( A^T A + rho D_z^T D_z,  A^T y + rho D_z^T (z - w) ),  warm-started at the current x, ``cg_steps`` steps
    w <- w + D_z x - z

The paper updates x first and z second. Both orders are ADMM (the two primal blocks may be taken in either order),
but between two ADMM iterations the diffusion step moves x: updated last, z holds ``D_z`` of the *previous, noisier*
state, and the x-update (a prox towards ``D_z x = z``, which dominates wherever ``A`` is blind) pulls that stale noise
back in. With the paper's 2000 steps consecutive states are close and the order does not matter; at 30-100 steps the
x-first order diverged here (DiffusionMBIR on a 32^3 CT phantom at 8 views: -14 dB with 50 steps, 5 CG steps, no
corrector, against 21 dB with lam 0), so z is taken from the current state first.

``lam`` and ``rho`` are absolute (the paper's form, the operator unnormalised): CT sparse view lam 0.04, rho 10
(the signature defaults), MRI lam 0.005, rho 0.01 (README of the paper's code; settings.TUNED["mri"]).
With ``lam = 0`` the z-coupling is switched off and the data step is plain CG on ``A^T A x = A^T y`` from the same
warm start: the 2-D solver slice by slice, which is what the z-prior is measured against.

The samplers differ in where the data step acts and how many network calls they spend:

* DiffusionMBIR: a VE predictor-corrector (reverse-diffusion predictor + one Langevin corrector step at ``snr``
  0.16, score-SDE's PC sampler: 2 network calls per step, N = 2000 in the paper) on the *noisy* state ``x_sigma``,
  then one ADMM iteration with one CG step on that state.
* DDS: a DDIM step whose Tweedie estimate ``x0_hat`` gets the ADMM iteration with 5 CG steps (no gradient through
  the network, the "decomposed" step), then re-noised with the network's own noise direction:
  ``x' = x0_dc + sigma' (eta z + sqrt(1 - eta^2) eps_hat)``, ``eps_hat = (x - x0_hat) / sigma`` (the paper's VP
  update divided by ``sqrt(abar')``; eta 0.85, 50 steps).

Both run on the Karras grid (rho 7) between the prior's ``sigma_max`` and ``sigma_min``, then 0. Noise is drawn
from the ``generator`` only. ``slice_axes="alternate"`` cycles the slicing direction (axial, coronal, sagittal)
step by step, a known improvement for 2-D priors on volumes (the prior must then be fully convolutional and see
slices of the other shapes); the TV stays along z.

Diagnostics: ``nfe`` (prior calls on the volume = network evaluations per slice), ``slice_evaluations`` (all 2-D
network evaluations), ``seconds``, ``network_seconds``, ``peak_memory_bytes`` (:mod:`invdiff.memory`: CUDA's
``max_memory_allocated`` during the run; CPU: the process's peak resident size during it), ``residual_norm``
(``||A x - y||`` after each step's data step, batch mean), ``cg_residual`` (CG's relative residual per step).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from invdiff.errors import UnsupportedOperatorError
from invdiff.memory import peak_bytes, reset_peak
from invdiff.operators.base import conjugate_gradient
from invdiff.priors.base import Denoiser, SliceDenoiser
from invdiff.problem import InverseProblem
from invdiff.registry import register_solver
from invdiff.samplers._common import (NetworkCalls, SampleResult, call_prior, expand_sigma, notify, randn_like,
                                      sigma_schedule, timed, trajectory_of)

SLICE_AXES = ("axial", "alternate")
# The volume axis a 2-D prior slices along for each plane name: x is (B, C, D, H, W).
_PLANE_AXIS = {"axial": 2, "coronal": 3, "sagittal": 4}
_ALTERNATION = ("axial", "coronal", "sagittal")
# CG runs its ``cg_steps`` unless the relative residual is already this small (continuing past convergence
# divides rounding noise by rounding noise).
_CG_TOL = 1e-10


# ---- z total variation: the finite difference and its ADMM step -------------------------------------------
def difference_z(x: torch.Tensor) -> torch.Tensor:
    """``D_z x``: forward difference along the slice axis (dim 2 of (B, C, D, H, W)), circular boundary."""
    return torch.roll(x, shifts=-1, dims=2) - x


def difference_z_adjoint(v: torch.Tensor) -> torch.Tensor:
    """``D_z^T v``, the exact transpose of :func:`difference_z`."""
    return torch.roll(v, shifts=1, dims=2) - v


def soft_threshold(v: torch.Tensor, threshold: float, *, complex_pairs: bool) -> torch.Tensor:
    """``prox_{threshold |.|_1}``; with ``complex_pairs`` the (re, im) channels (dim 1, C = 2) shrink by their modulus."""
    modulus = v.pow(2).sum(dim=1, keepdim=True).sqrt() if complex_pairs else v.abs()
    return v * torch.clamp(1 - threshold / modulus.clamp_min(torch.finfo(v.dtype).tiny), min=0)


def admm_tv_z_step(problem: InverseProblem, x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, lam: float,
                   rho: float, cg_steps: int, adjoint_y: torch.Tensor | None = None, gamma: float | None = None):
    """One ADMM iteration for ``1/2 ||A x - y||^2 + lam ||D_z x||_1`` (DiffusionMBIR Eq. (11)-(13)), z first (see
    the module docstring).

    x, z, w: (B, C, D, H, W); x is the current state (z is computed from it) and the warm start of CG. Returns ``(x, z, w, cg_relative_residual)``. With
    ``lam == 0`` the TV term is off: CG on the normal equations from ``x``, and ``z, w`` are returned unchanged.
    ``gamma``: DDS's noisy-data form, a proximal term ``||x - x_start||^2 / (2 gamma)`` around the incoming ``x``
    (so with lam 0 the step is the paper's ``CG(I + gamma A^T A, x + gamma A^T y)``, divided by gamma).
    """
    operator = problem.operator
    rhs = operator.A_adjoint(problem.y) if adjoint_y is None else adjoint_y
    anchor_weight = 0.0 if gamma is None else 1.0 / gamma
    if anchor_weight:
        rhs = rhs + anchor_weight * x

    def data_normal(v):
        return operator.A_adjoint_A(v) + anchor_weight * v if anchor_weight else operator.A_adjoint_A(v)

    if lam == 0:
        x, residual = conjugate_gradient(data_normal, rhs, max_iter=cg_steps, tol=_CG_TOL, x0=x, return_residual=True)
        return x, z, w, residual
    z = soft_threshold(difference_z(x) + w, lam / rho, complex_pairs=x.shape[1] == 2)          # Eq. (12), current x
    rhs = rhs + rho * difference_z_adjoint(z - w)                                              # Eq. (11)
    x, residual = conjugate_gradient(lambda v: data_normal(v) + rho * difference_z_adjoint(difference_z(v)),
                                     rhs, max_iter=cg_steps, tol=_CG_TOL, x0=x, return_residual=True)
    w = w + difference_z(x) - z                                                                 # Eq. (13)
    return x, z, w, residual


# ---- the 2-D prior over the volume ---------------------------------------------------------------------------
def as_slice_prior(prior: Denoiser, chunk: int) -> SliceDenoiser:
    """``prior`` as a volume prior: a :class:`SliceDenoiser` is kept, a 2-D prior is wrapped with ``chunk``."""
    return prior if isinstance(prior, SliceDenoiser) else SliceDenoiser(prior, chunk=chunk)


def denoise_along(prior: SliceDenoiser, x: torch.Tensor, sigma: torch.Tensor, plane: str,
                  calls: NetworkCalls) -> torch.Tensor:
    """``D(x, sigma)`` of the 2-D prior on the slices of ``plane`` (axial: (H, W) images along D, coronal: (D, W)
    along H, sagittal: (D, H) along W): the volume is permuted so that axis comes first, and back."""
    axis = _PLANE_AXIS[plane]
    if axis == 2:
        return call_prior(prior, x, sigma, calls)
    moved = x.movedim(axis, 2)
    return call_prior(prior, moved.contiguous(), sigma, calls).movedim(2, axis)


def _plane_of_step(slice_axes: str, step: int) -> str:
    return "axial" if slice_axes == "axial" else _ALTERNATION[step % len(_ALTERNATION)]


# ---- shared plumbing -----------------------------------------------------------------------------------------
def _check(steps: int, slice_axes: str, lam: float, rho: float, cg_steps: int, chunk: int) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if slice_axes not in SLICE_AXES:
        raise ValueError(f"slice_axes must be one of {', '.join(SLICE_AXES)}, got {slice_axes!r}")
    if not lam >= 0 or not rho > 0:
        raise ValueError(f"need lam >= 0 and rho > 0, got lam={lam!r}, rho={rho!r}")
    if int(cg_steps) != cg_steps or cg_steps < 1 or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"cg_steps and chunk must be positive integers, got {cg_steps!r}, {chunk!r}")
    return int(steps)


def _volume_state(problem: InverseProblem) -> torch.Tensor:
    shape = tuple(problem.operator.in_shape)
    if len(shape) != 4:                 # a comparison shows this as an n/a row (invdiff compare without --3d)
        raise UnsupportedOperatorError(f"3-D solvers need a volume operator (in_shape (C, D, H, W); invdiff "
                                       f"reconstruct / compare --3d); {type(problem.operator).__name__} has in_shape "
                                       f"{shape}")
    dtype = torch.promote_types(problem.y.dtype, torch.float32)
    return torch.empty((problem.y.shape[0], *shape), dtype=dtype, device=problem.y.device)


def _residual_norm(problem: InverseProblem, x: torch.Tensor) -> float:
    r = problem.operator.A(x) - problem.y
    return float(torch.linalg.vector_norm(r.reshape(r.shape[0], -1), dim=1).mean())


@dataclass
class VolumeRun:
    """What DiffusionMBIR and DDS set up alike, and the ADMM-TV_z state they carry across steps.

    prior: the 2-D prior over the volume; sigmas: the Karras grid, then 0; x: the start, ``sigmas[0] n``;
    adjoint_y: ``A^T y`` (once); z_tv, w: the split variable and scaled dual (zeros at the start); calls: network
    calls; residuals / cg_residuals: per step ``||A x - y||`` after the data step and CG's relative residual.
    """

    problem: InverseProblem
    prior: SliceDenoiser
    sigmas: torch.Tensor
    x: torch.Tensor
    adjoint_y: torch.Tensor
    z_tv: torch.Tensor
    w: torch.Tensor
    calls: NetworkCalls = field(default_factory=NetworkCalls)
    residuals: list = field(default_factory=list)
    cg_residuals: list = field(default_factory=list)
    wall: Any = None

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, plane: str) -> torch.Tensor:
        """``D(x, sigma)`` of the 2-D prior on the slices of ``plane`` (:func:`denoise_along`), counted."""
        return denoise_along(self.prior, x, expand_sigma(sigma, x), plane, self.calls)

    def data_step(self, x: torch.Tensor, *, lam: float, rho: float, cg_steps: int,
                  gamma: float | None = None) -> torch.Tensor:
        """One ADMM-TV_z iteration from ``x`` (:func:`admm_tv_z_step`, Eq. (11)-(13)) with the carried ``z_tv, w``;
        records the residuals and returns the new ``x``."""
        x, self.z_tv, self.w, cg_residual = admm_tv_z_step(self.problem, x, self.z_tv, self.w, lam=lam, rho=rho,
                                                           cg_steps=cg_steps, adjoint_y=self.adjoint_y, gamma=gamma)
        self.residuals.append(_residual_norm(self.problem, x))
        self.cg_residuals.append(float(cg_residual.mean()))
        return x

    def diagnostics(self, x: torch.Tensor, **extra) -> dict:
        """The samplers' common diagnostics (module docstring) plus ``extra``; after the run's block has closed."""
        return {"nfe": self.calls.nfe, "slice_evaluations": self.calls.nfe * x.shape[0] * x.shape[2],
                "seconds": self.wall.seconds, "network_seconds": self.calls.seconds,
                "peak_memory_bytes": peak_bytes(x.device), "steps": len(self.sigmas) - 1,
                "sigmas": self.sigmas.tolist(), **extra, "residual_norm": self.residuals,
                "cg_residual": self.cg_residuals}


@contextlib.contextmanager
def volume_run(problem: InverseProblem, prior: Denoiser, *, steps: int, chunk: int, sigma_min: float | None,
               sigma_max: float | None, generator) -> Iterator[VolumeRun]:
    """The shared set-up of DiffusionMBIR and DDS, as a timed, gradient-free block: the slice prior (``chunk``
    slices per call), the schedule, ``A^T y``, the noise start ``sigmas[0] n`` (the generator's first draw) and the
    ADMM variables at zero. ``run.wall`` times the block (the peak memory is reset first)."""
    volume_prior = as_slice_prior(prior, chunk)
    like = _volume_state(problem)
    reset_peak(like.device)
    with timed(problem.y) as wall, torch.no_grad():
        sigmas = sigma_schedule(volume_prior, steps, sigma_min, sigma_max, like)
        adjoint_y = problem.operator.A_adjoint(problem.y)
        x = sigmas[0] * randn_like(like, generator)
        z_tv = difference_z(torch.zeros_like(x))
        run = VolumeRun(problem, volume_prior, sigmas, x, adjoint_y, z_tv, torch.zeros_like(z_tv), wall=wall)
        yield run


# ---- DiffusionMBIR -------------------------------------------------------------------------------------------
@register_solver("diffusion-mbir", kind="diffusion")
def sample_diffusion_mbir(problem: InverseProblem, prior: Denoiser, *, steps: int = 2000, snr: float = 0.16,
                          corrector: bool = True, lam: float = 0.04, rho: float = 10.0, cg_steps: int = 1,
                          chunk: int = 16, slice_axes: str = "axial", sigma_max: float | None = None,
                          sigma_min: float | None = None, generator=None, callback=None) -> SampleResult:
    """DiffusionMBIR (Chung et al., CVPR 2023, Alg. 1): VE predictor-corrector with a 2-D prior on every slice and
    one ADMM-TV_z iteration (``cg_steps`` CG steps) on the state after every step. See the module docstring.

    Per step ``sigma -> sigma'`` (score ``s(x, sigma) = (D(x, sigma) - x) / sigma^2``, Tweedie):

        x <- x + (sigma^2 - sigma'^2) s(x, sigma) + sqrt(sigma^2 - sigma'^2) z             (reverse-diffusion predictor)
        x <- x + e s(x, sigma') + sqrt(2 e) z,  e = 2 (snr ||z|| / ||s||)^2                (Langevin corrector, sigma' > 0)
        x, z_tv, w <- ADMM-TV_z(x, z_tv, w)                                                 (Eq. (11)-(13))

    The last step lands on ``sigma' = 0``, where the predictor returns the Tweedie mean (no noise, no corrector).
    Paper defaults: 2000 steps (4000 network calls per slice), snr 0.16, lam 0.04, rho 10, one CG step.

    problem: a volume problem (operator in_shape (C, D, H, W)); prior: a 2-D prior (wrapped in a
    ``SliceDenoiser(prior, chunk)``) or a ``SliceDenoiser``. Returns ``SampleResult(x)`` (B, C, D, H, W).

    >>> result = sample_diffusion_mbir(problem, prior, steps=200, generator=torch.Generator().manual_seed(0))
    """
    steps = _check(steps, slice_axes, lam, rho, cg_steps, chunk)
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr!r}")
    with volume_run(problem, prior, steps=steps, chunk=chunk, sigma_min=sigma_min, sigma_max=sigma_max,
                    generator=generator) as run:
        x, sigmas = run.x, run.sigmas
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            plane = _plane_of_step(slice_axes, i)
            x0_hat = run.denoise(x, sigma, plane)
            variance = sigma ** 2 - sigma_next ** 2
            x = x + variance * (x0_hat - x) / sigma ** 2                                    # predictor mean
            if sigma_next > 0:
                x = x + variance.sqrt() * randn_like(x, generator)                          # predictor noise
                if corrector:
                    score = (run.denoise(x, sigma_next, plane) - x) / sigma_next ** 2
                    noise = randn_like(x, generator)
                    ratio = _batch_norm(noise) / _batch_norm(score).clamp_min(torch.finfo(x.dtype).tiny)
                    step_size = (2 * (snr * ratio) ** 2).reshape(-1, 1, 1, 1, 1)             # Langevin, score-SDE
                    x = x + step_size * score + (2 * step_size).sqrt() * noise
            x = run.data_step(x, lam=lam, rho=rho, cg_steps=cg_steps)                      # Eq. (11)-(13)
            notify(callback, i, steps, {"x": x, "x0_hat": x0_hat, "sigma": sigma, "plane": plane,
                                        "residual_norm": run.residuals[-1], "nfe": run.calls.nfe})
    return SampleResult(x=x, diagnostics=run.diagnostics(x, lam=lam, rho=rho, cg_steps=cg_steps, snr=snr,
                                                         slice_axes=slice_axes), trajectory=trajectory_of(callback))


def _batch_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


# ---- DDS -----------------------------------------------------------------------------------------------------
@register_solver("dds", kind="diffusion")
def sample_dds(problem: InverseProblem, prior: Denoiser, *, steps: int = 50, eta: float = 0.85, lam: float = 0.04,
               rho: float = 10.0, cg_steps: int = 5, gamma: float | None = None, chunk: int = 16,
               slice_axes: str = "axial", sigma_max: float | None = None, sigma_min: float | None = None,
               generator=None, callback=None) -> SampleResult:
    """Decomposed Diffusion Sampler (Chung, Lee, Ye, ICLR 2024, Alg. 1 with the 3-D ADMM-TV_z step) in sigma form.

    Per step ``sigma -> sigma'``:

        x0_hat = D(x, sigma)                                  (Tweedie, slice by slice; no gradient through it)
        x0_dc, z, w = ADMM-TV_z(x0_hat, z, w)                 (``cg_steps`` CG steps warm-started at x0_hat)
        eps_hat = (x - x0_hat) / sigma
        x' = x0_dc + sigma' (eta n + sqrt(1 - eta^2) eps_hat),  n ~ N(0, I)      (DDIM with eta, Eq. (8))

    Warm-started CG keeps the part of ``x0_hat`` that ``A`` does not see (the Krylov space of CG lies in A's row
    space plus the z-coupling), which is the paper's "manifold-constrained" argument. Paper defaults: 50 steps,
    eta 0.85, 5 CG steps, lam 0.04, rho 10 (sparse view; 0.4 for limited angle). The returned ``x`` is the last
    ``x0_dc`` (the step to ``sigma' = 0``). ``gamma`` (None: the noiseless form above) switches to the paper's
    noisy-data step, ``x0_dc = argmin 1/2 ||A x - y||^2 + ||x - x0_hat||^2 / (2 gamma) (+ lam ||D_z x||_1)``, i.e.
    ``CG(I + gamma A^T A, x0_hat + gamma A^T y)`` without TV: CG on the bare normal equations fits the noise
    (as unregularised CG-SENSE does) once it has run long enough.

    >>> result = sample_dds(problem, prior, steps=50, generator=torch.Generator().manual_seed(0))
    """
    steps = _check(steps, slice_axes, lam, rho, cg_steps, chunk)
    if gamma is not None and not gamma > 0:
        raise ValueError(f"gamma must be > 0 or None, got {gamma!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    keep_eps = math.sqrt(1 - eta ** 2)
    with volume_run(problem, prior, steps=steps, chunk=chunk, sigma_min=sigma_min, sigma_max=sigma_max,
                    generator=generator) as run:
        x, sigmas = run.x, run.sigmas
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            plane = _plane_of_step(slice_axes, i)
            x0_hat = run.denoise(x, sigma, plane)                                              # Tweedie
            x0_dc = run.data_step(x0_hat, lam=lam, rho=rho, cg_steps=cg_steps, gamma=gamma)   # ADMM-TV_z
            eps_hat = (x - x0_hat) / sigma
            x = x0_dc + sigma_next * (eta * randn_like(x, generator) + keep_eps * eps_hat)         # DDIM, Eq. (8)
            notify(callback, i, steps, {"x": x0_dc, "x_t": x, "x0_hat": x0_hat, "sigma": sigma, "plane": plane,
                                        "residual_norm": run.residuals[-1], "nfe": run.calls.nfe})
    return SampleResult(x=x0_dc, diagnostics=run.diagnostics(x0_dc, lam=lam, rho=rho, cg_steps=cg_steps, eta=eta,
                                                             gamma=gamma, slice_axes=slice_axes),
                        trajectory=trajectory_of(callback))


# ---- 3-D total variation (classical reference) ---------------------------------------------------------------
def gradient_3d(x: torch.Tensor) -> torch.Tensor:
    """Forward differences along D, H, W with Neumann boundary: (B, C, D, H, W) -> (B, 3, C, D, H, W)."""
    g = torch.zeros((x.shape[0], 3, *x.shape[1:]), dtype=x.dtype, device=x.device)
    g[:, 0, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    g[:, 1, :, :, :-1] = x[:, :, :, 1:] - x[:, :, :, :-1]
    g[:, 2, ..., :-1] = x[..., 1:] - x[..., :-1]
    return g


def gradient_3d_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The exact transpose of :func:`gradient_3d` (minus the divergence)."""
    out = torch.zeros_like(g[:, 0])
    out[:, :, :-1] -= g[:, 0, :, :-1]
    out[:, :, 1:] += g[:, 0, :, :-1]
    out[:, :, :, :-1] -= g[:, 1, :, :, :-1]
    out[:, :, :, 1:] += g[:, 1, :, :, :-1]
    out[..., :-1] -= g[:, 2, ..., :-1]
    out[..., 1:] += g[:, 2, ..., :-1]
    return out


@register_solver("tv-3d", kind="classical")
def sample_tv_3d(problem: InverseProblem, prior=None, *, lam: float = 1e-2, max_iter: int = 200, init: str = "adjoint",
                 generator=None, callback=None) -> SampleResult:
    """``argmin 1/2 ||A x - y||^2 + lam ||A||^2 TV_3d(x)`` (isotropic over (z, y, x); the complex pair shares one
    modulus) by Condat-Vu primal-dual splitting, exactly as the 2-D ``tv`` solver (same ``lam`` scaling and steps,
    ``||grad_3d||^2 <= 12``): ``x+ = x - tau (A^T (A x - y) + grad^T q)``, ``q+ = proj(q + s grad(2 x+ - x))``.
    """
    from invdiff.samplers.baselines import _starting_point, operator_norm_squared

    _volume_state(problem)
    with timed(problem.y) as wall, torch.no_grad():
        op, y = problem.operator, problem.y
        adjoint = op.A_adjoint(y)
        lipschitz = operator_norm_squared(op, adjoint)
        x = _starting_point(problem, init, adjoint, lipschitz)
        weight = lam * lipschitz
        tau, dual_step = 1.0 / lipschitz, lipschitz / 24          # 1/tau - s ||grad||^2 >= L / 2
        q = torch.zeros_like(gradient_3d(x))
        for i in range(max_iter):
            x_next = x - tau * (op.A_adjoint(op.A(x) - y) + gradient_3d_adjoint(q))
            q = q + dual_step * gradient_3d(2 * x_next - x)
            q = q / torch.clamp(q.pow(2).sum(dim=(1, 2), keepdim=True).sqrt() / weight, min=1.0)   # |q| <= lam
            x = x_next
            notify(callback, i, max_iter, {"x": x, "sigma": torch.zeros(())})
    return SampleResult(x=x, diagnostics={"nfe": 0, "seconds": wall.seconds, "lam": lam, "iterations": max_iter,
                                          "init": init, "operator_norm_squared": lipschitz,
                                          "peak_memory_bytes": peak_bytes(x.device)})
