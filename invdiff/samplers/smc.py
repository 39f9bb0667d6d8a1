r"""Approximation-free ensemble sampling (AFDPS; Chen, Ren, Min, Ying, Izzo, arXiv 2506.03979): weighted particles.

Target: the posterior ``p(x | y) ∝ p(x) exp(-mu_y(x))``, ``mu_y(x) = ||A x - y||^2 / (2 sigma_y^2)`` (summed).
No Tweedie plug-in and no guidance heuristic: the sampler simulates the tilted family

    Q(x, t) = p_t(x) exp(-mu(x)),     p_t = p * N(0, t^2 I)     (EDM / variance-exploding, sigma(t) = t)

from ``t = T`` (Stage I: an exact Gaussian, :mod:`invdiff.samplers.stage_one`) down to ``t = 0``, where
``Q(., 0)`` is the posterior, with weighted particles (paper Eq. 3.6).

Derivation (signs checked; reverse time tau, d tau = -dt)
---------------------------------------------------------
The forward diffusion ``dx = sqrt(2t) dW`` gives ``d_t p_t = t lap p_t``. With ``p = Q e^mu`` and
``g = grad mu``, ``lap(Q e^mu) = e^mu [lap Q + 2 <grad Q, g> + Q (|g|^2 + lap mu)]``, so

    d_tau Q = -t [ lap Q + 2 <grad Q, g> + Q (|g|^2 + lap mu) ].                                        (1)

Take any extra diffusion amplitude V(t) and the prior's reverse drift ``H = (t + V^2/2) score``,
``score = grad log p_t = (D(x, t) - x) / t^2``. Writing ``score = grad log Q + g``, so that
``H Q - V^2 g Q = (t + V^2/2) grad Q + (t - V^2/2) g Q``, the right-hand side of (1) equals

    -div([H - V^2 g] Q) + (V^2 / 2) lap Q + c Q,    c = (V^2 / 2)(|g|^2 - lap mu) - <H, g>,            (2)

the Fokker-Planck equation of ``dX = (H - V^2 g) d tau + V dW`` with a Feynman-Kac weight ``d log w = c d tau``
(paper Eq. 3.6): particles moved that way and weighted by ``exp(int c d tau)`` represent Q. (Check: with
A = 0, c = 0 and the SDE is the prior's reverse SDE; with V^2 = 2t the drift is ``2t grad log Q``.)
One Euler step ``t -> t_next`` (``dtau = t - t_next > 0``):

* SDE variant, ``V^2 = 2t`` (the reverse SDE's own noise), ``H = 2 t score = -d``, ``d = 2 (x - D) / t``:
  ``x <- x + (t_next - t) d + (t_next - t) 2 t g + sqrt(t - t_next) sqrt(2t) xi`` and (``weight_rule="paper"``)
  ``log w <- log w + (t - t_next) [ t (|g|^2 - lap mu) + <d, g> ]``.
  ``weight_rule="pathwise"`` integrates the same rate after Ito's formula,
  ``c dtau = -d[mu(X)] - (V^2/2) |g|^2 dtau + V <g, dW>``: ``log w += mu(x) - mu(x_next) - dtau t |g|^2
  + sqrt(2 t dtau) <g, xi>`` -- exactly the SMC weight of the Euler proposal against the Euler prior chain
  tilted by exp(-mu), with no ``lap mu`` (equal to the paper's rule as dtau -> 0).
* ODE variant, ``V = 0``, ``H = t score = -d``, ``d = (x - D) / t`` (probability flow): ``x <- x + (t_next - t) d``.
  Along the flow ``c = -<H, g> = -d/dtau mu(X)``, so the weight increment is integrated exactly:
  ``log w += mu(x) - mu(x_next)``. Then ``langevin_steps`` unadjusted Langevin moves targeting ``Q(., t_next)``
  (weights unchanged), ``x <- x + h (score(x, t_next) - g(x)) + sqrt(2h) xi``.
* The last step (to t = 0) uses ``V = 0`` in both variants (V may be any function of t; at t = 0 the SDE's
  Euler step would reflect x about D): ``x <- D(x, t_min)``.

For a linear operator ``lap mu = ||A||_F^2 / sigma_y^2`` is the same for every particle, so it cancels when the
weights are normalised and is dropped; ``laplacian_probes > 0`` estimates it with Rademacher probes
``z^T (Hessian of mu) z`` (Hutchinson; Hessian-vector products by autograd, so a nonlinear residual works too),
sharing the probes between the particles of a problem so that a constant Laplacian still cancels exactly.
Weights are float64 log-weights normalised by log-sum-exp (invariant to a common offset); ESS = 1 / sum_i w_i^2.
When ESS / N < ``ess_threshold`` the particles are resampled (systematic or multinomial), the weights reset to
1/N, and ``rejuvenation_steps`` Langevin moves spread the duplicates apart again (resample-move: late in the
run the SDE's own noise is too small to separate copies, so the ensemble would hold fewer distinct particles
than its ESS says). The last step never resamples, so the returned weights are informative.

Stiffness and ``stable_likelihood``
-----------------------------------
The SDE drift ``-2 t A^T (A x - y) / sigma_y^2`` makes explicit Euler unstable once
``2 t (t - t_next) ||A||^2 / sigma_y^2 > 2``: for image-level sigma_y at nearly every t > sigma_y, and on a
1-D oracle with sigma_y = 0.5 already at the first step (the diagnostics record the number per step as
``stiffness``; ``benchmarks/posterior_fidelity.py`` measures where it breaks). ``stable_likelihood=True`` (the
default; ``False`` is the paper's fixed likelihood) uses instead the t-dependent family

    mu_t(x) = ||a_t A x - y||^2 / (2 s_t^2),   a_t = sd^2 / (sd^2 + t^2),
    s_t^2 = sigma_y^2 + kappa sd^2 t^2 / (sd^2 + t^2),   kappa = ||A||^2 (or the number given),

with ``sd^2`` the prior's per-entry second moment (:func:`prior_second_moment`): ``exp(-mu_t)`` is the exact
``p(y | x_t)`` of an ``N(0, sd^2 I)`` prior with ``A A^T`` replaced by ``kappa I`` (exact for inpainting and
single-coil MRI, where ``A A^T`` is a projection). Redoing (1)-(2) with a t-dependent mu adds ``+ d_t mu_t`` to c,
integrated exactly at fixed x as ``mu_t(x) - mu_t_next(x)`` (the ODE and pathwise rules include it already).
What changes relative to the paper: the intermediate targets ``Q(., t) = p_t exp(-mu_t)``; Stage I (drawn for
mu_T); g, lap mu and the Langevin target (those of mu_t); the extra weight term. What does not: ``a_0 = 1``,
``s_0 = sigma_y``, so ``Q(., 0)`` is still exactly the posterior, and the scheme is still exact as dtau -> 0.
The Euler stability number becomes ``2 t dt a_t^2 ||A||^2 / s_t^2 <= 2 (dt / t) a_t ||A||^2 / kappa < 2``.
A closer twist also keeps the weights alive: on the d = 16 oracle the SDE resamples 1-2 times instead of ~20
with the plain inflation ``sigma_y^2 + kappa t^2``. An exponential integrator of the drift alone was not
chosen: it needs a diagonal basis (not CT, not multi-coil MRI) and leaves the weight rate ``t |g|^2`` as stiff.

The conditional proposal (``proposal="conditional"``, SDE variant)
--------------------------------------------------------------------
A second, unconditionally stable discretisation of the same Eq. 3.6. One Euler step of the prior's reverse SDE
is the Gaussian kernel ``K(x' | x) = N(c, rho^2 I)``, ``c = x - dt d``, ``rho^2 = 2 t dt``; for a linear
operator ``K(x' | x) exp(-mu_next(x'))`` is again a Gaussian in x' (Stage I's tilted Gaussian centred at c),
so the particle moves by an exact draw from it (pixel / Fourier diagonal or perturb-and-solve CG, as Stage I)
and takes the weight of that locally optimal proposal, its normaliser:

    log w += mu_t(x) + log int K(x' | x) exp(-mu_next(x')) dx'
           = mu_t(x) - r^T (s^2 I + rho^2 A A^T)^-1 r / 2 + const,    r = y' - A c,

(``y' = y / a_next``, ``s = s_next / a_next`` for the tempered family), so x' itself does not enter the weight.
Expanding in dt gives back Eq. 3.6: the mean of the draw is ``c - 2 t dt grad mu + O(dt^2)`` (the drift
``H - V^2 grad mu``) and the increment is ``dt [<d, g> + t |g|^2 - t lap mu] + O(dt^2)`` (the rate with
``V^2 = 2t``). What it changes: the likelihood drift is integrated implicitly (no stability limit, so the
paper's fixed likelihood runs at any sigma_y; ``stiffness`` is 0), at the cost of one linear solve per step
for non-diagonal operators (CT, multi-coil MRI); the tempered family still keeps the weights from
degenerating, so ``stable_likelihood=True`` stays the default.

The Tweedie proposal (``proposal="tweedie"``) and why the others are biased in high dimension
--------------------------------------------------------------------------------------------
Both families above twist the prior by an *isotropic* likelihood (``mu_y`` or ``mu_t``), while the intermediate
target that keeps the weights equal is the diffused posterior ``p(x_t | y) = p_t(x) p(y | x_t)``, with
``p(y | x_t) = N(y; A D(x_t, t), sigma_y^2 I + A C_t A^T)`` for a Gaussian prior, ``C_t = Cov[x0 | x_t] = t^2 dD/dx``
(Tweedie). Every observed direction in which ``C_t`` differs from the isotropic guess adds to the variance of the
log-weight increments, so the ESS collapses at a rate that grows with the number of observed directions: measured
on a 16 x 16 squared-exponential Gaussian prior (d = 256, 40 % of pixels observed, sigma_y 0.05, N = 500), the
conditional proposal without resampling reaches ESS 1 by t ~ 0.2; with resampling and rejuvenation the cloud ends
0.9 posterior std (total) from the posterior mean (floor 0.045). A dense reference SMC with the same conditional
weights isolates the parts: isotropic twist + exact Gaussian kernel 1.8, exact twist + Euler kernel 0.11, exact
twist + exact kernel 0.042 (``benchmarks/posterior_fidelity.py``, the README of the dimension sweep).
``proposal="tweedie"`` therefore uses the prior's own Tweedie covariance (``prior.tweedie_covariance``, closed
form for the analytic Gaussian priors) in both the kernel and the twist: it draws ``x_next ~ p(x_next | x, y)``
under ``p(x0 | x) = N(D, C_t)`` (pathwise conditioning, then the Gaussian bridge; :func:`_tweedie_step`). That is the
locally optimal proposal for the twist ``N(y; A D, sigma_y^2 I + A C_t A^T)``, whose normaliser equals the
previous twist exactly when D is affine: for Gaussian priors every intermediate target is ``p(x_t | y)``, the
weights stay equal at any step count (so the returned ESS is N), and Stage I's stand-in error is damped by
``(S + t^2) / (S + T^2)``.

Network and other non-Gaussian priors run the same step with the autodiff covariance of the base class,
``C_t = t^2 (J + J^T) / 2`` (:class:`invdiff.priors.base.JacobianCovariance`: one linearisation per step, one
JVP + VJP per CG iteration in measurement space, a ``lanczos_iterations``-step Lanczos square root for
``C_t^(1/2) xi``, a PSD guard). Its CG is preconditioned by ``(c A A^T + sigma_y^2 I)^-1`` (c a one-probe estimate
of ``tr(C_t) / d``, applied by an inner CG on the operator alone: without it sparse-view CT's condition number
``~ ||A||^2 c / sigma_y^2`` costs hundreds of JVPs a step), stops at the first non-positive curvature (a network's
symmetrised Jacobian is not exactly PSD) and at ``cg_max_iterations``, and returns its smallest-residual iterate;
a capped solve is inexact and its worst residual is recorded as ``conditional_cg_residual``.
Their weights are *not* corrected; what the sampler then targets, precisely: write ``p~(x0 | x) = N(D, C_t)``,
``p~(x' | x)`` the Gaussian reverse kernel it induces through the bridge, and
``L_t(x) = p~(y | x) = N(y; A D, A C_t A^T + sigma_y^2 I)`` the twist. The step draws x' from
``q(x' | x) = p~(x' | x, y) = p~(x' | x) p~(y | x, x') / L_t(x)``, so the SMC weight towards the twisted targets
``p~_t(x) L_t(x)`` (``p~_t`` the marginals of the chain ``p~``) is

    w = p~(x' | x) L_next(x') / (L_t(x) q(x' | x)) = L_next(x') / p~(y | x, x'),

two Gaussian densities in measurement space: ``N(y; A D', A C_next(x') A^T + sigma_y^2 I)`` and
``N(y; A m_b, A C_b A^T + sigma_y^2 I)`` with ``N(m_b, C_b)`` the law of x0 given x and x'
(``C_b = C_t - c^2 C_t (c^2 C_t + s^2 I)^-1 C_t``, ``c = 1 - r^2``, ``s^2 = r^2 (t^2 - t_next^2)``). For a Gaussian
prior the ratio is a constant (hence the equal weights). For a network both covariances depend on the particle,
so the log-determinants do not cancel between particles: each needs a stochastic Lanczos quadrature per particle
and step, the second with a nested solve per product (``C_b``), several times the step's own cost, and a noisy
log-determinant biases the weights. Not implemented. So for such priors the N particles are independent runs of
the Markov chain ``x' ~ p~(x' | x, y)`` from Stage I with equal weights (``diagnostics["tweedie_covariance"]`` is
``"jacobian"``; ESS = N there means "not reweighted", not "exact"): a moment-projected posterior sampler in the
manner of TMPD (Boys et al. 2023), exact when every ``p(x0 | x_t)`` is Gaussian, and as the steps shrink the reverse
SDE guided by ``grad log L_t`` with the derivative of ``C_t`` dropped (TMPD's approximation). The weighted
proposals stay the image-task default. (The auxiliary-variable weight ``L_next(x') / N(y; A x0, sigma_y^2 I)``,
with x0 kept as part of the state, drops the nested log-determinant but varies like a chi-square in the number of
measurements even for a Gaussian prior: no use in high dimension.)

Stage I (paper's initialisation) draws ``N(0, rho^2 I) exp(-mu_T)`` exactly with ``rho^2 = T^2 + sd^2``; that
Gaussian stand-in for ``p_T`` is the only approximation besides time discretisation and the network. The
Langevin step is ``h = langevin_step_size / (1/t^2 + a_t^2 ||A||^2 / s_t^2)``, a fraction of the inverse of the
largest curvature of ``-log Q(., t)`` (the prior part is at most ``1 / t^2``).

Measured (float64 Gaussian oracles, N = 6000, 120 steps, ``tests/test_smc.py``): Euler leaves a variance bias
of about +2-4 % (SDE) and -4 % (ODE predictor, partly offset by the Langevin corrector), on top of Monte Carlo
error; errors grow with the number of well-measured directions and with the spread of A's singular values
(a single kappa is then too large for most directions). The ODE variant needs its Langevin corrector: its
predictor is deterministic, so after resampling only the corrector separates copies.

Particles are ``(N, B, *in_shape)``; the prior sees them as one batch of ``N * B`` images.

    >>> result = sample_smc(problem, prior, num_particles=16, generator=torch.Generator().manual_seed(0))
    >>> result.x, result.diagnostics["std"], result.samples.shape, result.weights.shape
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from invdiff.operators.base import conjugate_gradient
from invdiff.priors.base import LANCZOS_ITERATIONS
from invdiff.problem import InverseProblem
from invdiff.registry import register_sampler
from invdiff.samplers._common import (NetworkCalls, SampleResult, call_prior, notify, timed, trajectory_of)
from invdiff.samplers.baselines import operator_norm_squared
from invdiff.samplers.stage_one import TiltedGaussian, map_particles, particle_noise
from invdiff.samplers.stage_one import particle_inner as _inner
from invdiff.schedules import karras

log = logging.getLogger(__name__)

VARIANTS = ("sde", "ode")
PROPOSALS = ("euler", "conditional", "tweedie")
RESAMPLING = ("systematic", "multinomial", "none")
WEIGHT_RULES = ("paper", "pathwise")
DEFAULT_SIGMA_DATA = 0.5     # EDM's data standard deviation, used when a prior does not say its own

Generators = torch.Generator | Sequence[torch.Generator] | None


# ---- the prior's scale at the start -------------------------------------------------------------------
def prior_second_moment(prior) -> float:
    """``sigma_data^2``, the prior's per-entry second moment ``E[x0^2]``: enters ``rho^2 = T^2 + sigma_data^2``.

    A network prior's ``sigma_data`` attribute (EDM preconditioning); for analytic priors
    ``(tr Cov + |mean|^2) / d``; otherwise EDM's 0.5^2.
    """
    sigma_data = getattr(prior, "sigma_data", None)
    if sigma_data is not None:
        return float(sigma_data) ** 2
    covariance, mean = getattr(prior, "covariance", None), getattr(prior, "mean", None)
    if callable(covariance) and isinstance(mean, torch.Tensor):
        try:
            cov = covariance()
        except ValueError:      # too large for dense algebra
            cov = None
        if cov is not None:
            return float((cov.diagonal().sum() + mean.double().pow(2).sum()) / mean.numel())
    log.info("smc: prior %s gives no sigma_data; Stage I assumes EDM's sigma_data = %.2f",
             type(prior).__name__, DEFAULT_SIGMA_DATA)
    return DEFAULT_SIGMA_DATA ** 2


# ---- weights ------------------------------------------------------------------------------------------
def normalise_log_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """``log w_i - logsumexp_j log w_j`` per problem (column): (N, B) float64, invariant to common offsets.

    Non-finite log-weights (a diverged particle) count as weight 0.
    """
    log_weights = torch.nan_to_num(log_weights.double(), nan=-math.inf, posinf=-math.inf)
    return log_weights - torch.logsumexp(log_weights, dim=0, keepdim=True)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """``ESS = 1 / sum_i w_i^2`` of normalised weights, per problem: (N, B) -> (B,) float64 in [1, N]."""
    return 1.0 / torch.exp(2 * normalise_log_weights(log_weights)).sum(dim=0)


def _problem_uniforms(batch: int, count: int, generator: Generators, device,
                      active: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms on [0, 1): (count, B). With one generator per problem, problem b's come from its own generator,
    drawn only when ``active[b]`` (so its stream does not depend on the other problems); inactive columns are 0."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand((batch, count), generator=generator, dtype=torch.float64, device=gen_device).T.to(device)
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"generator: got {len(generators)} generators for {batch} problems; expected one "
                         f"torch.Generator or one per problem")
    out = torch.zeros(count, batch, dtype=torch.float64, device=device)
    for b in range(batch) if active is None else active.nonzero().flatten().tolist():
        out[:, b] = torch.rand(count, generator=generators[b], dtype=torch.float64,
                               device=generators[b].device).to(device)
    return out


def resample_indices(weights: torch.Tensor, scheme: str, generator: Generators = None,
                     active: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestor indices (N, B) long for normalised weights (N, B): each scheme draws ``N w_i`` copies on average.

    systematic: one uniform u per problem, positions ``(u + i) / N``; multinomial: N independent uniforms.
    Either way ancestor = first j with ``cumsum(w)_j > position`` (inverse CDF). active: optional (B,) bool;
    inactive problems keep their particles (ancestor i for particle i) and draw no random numbers.
    """
    if scheme not in ("systematic", "multinomial"):
        raise ValueError(f"scheme must be 'systematic' or 'multinomial', got {scheme!r}")
    n, batch = weights.shape
    weights = weights.double()
    if scheme == "systematic":
        offsets = _problem_uniforms(batch, 1, generator, weights.device, active)                # (1, B)
        positions = (offsets + torch.arange(n, dtype=torch.float64, device=weights.device)[:, None]) / n
    else:
        positions = _problem_uniforms(batch, n, generator, weights.device, active)               # (N, B)
    cdf = torch.cumsum(weights, dim=0)
    cdf = cdf / cdf[-1:]                                                                        # exact 1 at the end
    ancestors = torch.searchsorted(cdf.T.contiguous(), positions.T.contiguous(), right=True).T.clamp_max(n - 1)
    if active is None:
        return ancestors
    keep = torch.arange(n, device=weights.device)[:, None].expand(n, batch)
    return torch.where(active.to(weights.device)[None, :], ancestors, keep)


def _select(particles: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """``particles[ancestors[i, b], b]``: (N, B, ...)."""
    columns = torch.arange(particles.shape[1], device=particles.device).expand_as(ancestors)
    return particles[ancestors, columns]


# ---- small helpers --------------------------------------------------------------------------------------
def _denoise(prior, x: torch.Tensor, t: float, calls: NetworkCalls) -> torch.Tensor:
    """``D(x, t)`` for particles (N, B, ...) in one network call on a batch of N * B images."""
    flat = x.reshape(-1, *x.shape[2:])
    sigma = torch.full((flat.shape[0],), t, dtype=x.dtype, device=x.device)
    return call_prior(prior, flat, sigma, calls).reshape(x.shape)


def _weighted_moments(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and pixelwise std over particles: (N, B, ...) -> two (B, ...)."""
    w = weights.to(x.dtype).reshape(*weights.shape, *([1] * (x.ndim - 2)))
    mean = (w * x).sum(dim=0)
    var = (w * (x - mean) ** 2).sum(dim=0)
    return mean, var.clamp_min(0).sqrt()


def _check_arguments(num_particles, steps, variant, proposal, resample, ess_threshold, langevin_steps,
                     langevin_step_size, rejuvenation_steps, weight_rule, laplacian_probes, sigma_min,
                     sigma_max) -> None:
    if int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {', '.join(PROPOSALS)}; got {proposal!r}")
    if proposal in ("conditional", "tweedie") and variant != "sde":
        raise ValueError(f"proposal={proposal!r} conditions a Gaussian reverse kernel on y; the ODE variant "
                         f"has no noise to condition: use variant='sde' or proposal='euler'")
    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLING)}; got {resample!r}")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must lie in [0, 1], got {ess_threshold!r}")
    if langevin_steps is not None and (int(langevin_steps) != langevin_steps or langevin_steps < 0):
        raise ValueError(f"langevin_steps must be a non-negative integer or None, got {langevin_steps!r}")
    if not langevin_step_size > 0:
        raise ValueError(f"langevin_step_size must be > 0, got {langevin_step_size!r}")
    if int(rejuvenation_steps) != rejuvenation_steps or rejuvenation_steps < 0:
        raise ValueError(f"rejuvenation_steps must be a non-negative integer, got {rejuvenation_steps!r}")
    if weight_rule not in WEIGHT_RULES:
        raise ValueError(f"weight_rule must be one of {', '.join(WEIGHT_RULES)}; got {weight_rule!r}")
    if int(laplacian_probes) != laplacian_probes or laplacian_probes < 0:
        raise ValueError(f"laplacian_probes must be a non-negative integer, got {laplacian_probes!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _tempering(stable_likelihood, norm_sq: float) -> float:
    """kappa of the tempered family: 0 (the paper's fixed likelihood), ``||A||^2`` (True) or the number given."""
    if isinstance(stable_likelihood, bool):
        return norm_sq if stable_likelihood else 0.0
    kappa = float(stable_likelihood)
    if not kappa > 0:
        raise ValueError(f"stable_likelihood must be True, False or a tempering constant kappa > 0; "
                         f"got {stable_likelihood!r}")
    return kappa


class _Likelihood:
    """``mu_t(x) = ||a_t A x - y||^2 / (2 s_t^2)`` on particles (N, B, ...); the paper's mu_y when kappa = 0.

    With kappa > 0: ``a_t = sd^2 / (sd^2 + t^2)``, ``s_t^2 = sigma_y^2 + kappa sd^2 t^2 / (sd^2 + t^2)``
    (``sd^2`` = the prior's second moment): ``exp(-mu_t)`` is then ``p(y | x_t)`` for an ``N(0, sd^2 I)``
    prior with ``A A^T`` replaced by ``kappa I``; a_0 = 1 and s_0 = sigma_y, so ``mu_0 = mu_y``.
    """

    def __init__(self, problem: InverseProblem, kappa: float, second_moment: float, dtype: torch.dtype):
        self.operator = problem.operator
        self.y = problem.y.to(dtype)
        self.sigma_y2 = float(problem.sigma_y) ** 2
        self.kappa = kappa
        self.second_moment = second_moment

    def scale(self, t: float) -> float:
        return 1.0 if self.kappa == 0 else self.second_moment / (self.second_moment + t * t)

    def variance(self, t: float) -> float:
        if self.kappa == 0:
            return self.sigma_y2
        return self.sigma_y2 + self.kappa * self.second_moment * t * t / (self.second_moment + t * t)

    def curvature(self, t: float, norm_sq: float) -> float:
        """Largest eigenvalue of the Hessian of mu_t: ``a_t^2 ||A||^2 / s_t^2``."""
        return self.scale(t) ** 2 * norm_sq / self.variance(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for particles (N, B, *in_shape) -> (N, B, ...)."""
        return map_particles(self.operator.A, x)

    def value(self, ax: torch.Tensor, t: float) -> torch.Tensor:
        """``mu_t`` per particle from ``A x``: (N, B) float64."""
        residual = self.scale(t) * ax - self.y
        return _inner(residual, residual) / (2 * self.variance(t))

    def gradient(self, ax: torch.Tensor, t: float) -> torch.Tensor:
        """``grad mu_t = a_t A^T (a_t A x - y) / s_t^2`` from ``A x``."""
        a = self.scale(t)
        return a * map_particles(self.operator.A_adjoint, a * ax - self.y) / self.variance(t)

    def laplacian(self, x: torch.Tensor, t: float, probes: torch.Tensor) -> torch.Tensor:
        """Hutchinson ``mean_k z_k^T (Hessian mu_t) z_k`` per particle: (N, B) float64; probes (K, B, ...)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            gradient = self.gradient(self.forward(x), t)
            total = torch.zeros(x.shape[:2], dtype=torch.float64, device=x.device)
            for z in probes:
                (hvp,) = torch.autograd.grad((gradient * z).sum(), x, retain_graph=True)
                total = total + _inner(z.expand_as(x), hvp)
        return total / len(probes)

    def stage_one_problem(self, t: float) -> InverseProblem:
        """``exp(-mu_t)`` as a plain problem: ``||a A x - y||^2 / s^2 = ||A x - y / a||^2 / (s / a)^2``."""
        a = self.scale(t)
        return InverseProblem(self.operator, self.y / a, math.sqrt(self.variance(t)) / a)


@register_sampler("smc", kind="diffusion")
def sample_smc(problem: InverseProblem, prior, *, num_particles: int = 16, steps: int = 100, variant: str = "sde",
               proposal: str = "euler", resample: str = "systematic", ess_threshold: float = 0.5,
               langevin_steps: int | None = None, langevin_step_size: float = 0.2, rejuvenation_steps: int = 2,
               weight_rule: str = "paper", stable_likelihood: bool | float = True, laplacian_probes: int = 0,
               lanczos_iterations: int = LANCZOS_ITERATIONS, cg_max_iterations: int = 1000,
               sigma_max: float | None = None,
               sigma_min: float | None = None, generator: Generators = None, callback=None) -> SampleResult:
    """AFDPS weighted-particle posterior sampler (paper Eq. 3.6), Euler steps on a Karras grid T -> 0.

    problem: y (B, ...), linear operator on (B, *in_shape) real images; prior: denoiser ``D(x, sigma)``.
    num_particles N per problem; steps: Euler steps (Karras spacing, rho 7, from sigma_max to sigma_min, then 0;
    both default to the prior's); variant "sde" (V^2 = 2t) or "ode" (V = 0, probability flow + Langevin);
    proposal (SDE): "euler" (Eq. 3.6 stepped explicitly), "conditional" (the Euler kernel conditioned on y,
    exact weights; stable at any sigma_y) or "tweedie" (the Tweedie-Gaussian transition conditioned on y, with
    ``prior.tweedie_covariance``: exact for Gaussian priors at any dimension; for network priors the autodiff
    covariance and no weight correction, an approximation: see the module docstring); lanczos_iterations: Lanczos
    steps of the square root ``C_t^(1/2) xi`` for priors without a closed form (one JVP + VJP each);
    cg_max_iterations: cap on the tweedie proposal's CG iterations per step (each one JVP + VJP on a network prior;
    the solve stops earlier at its tolerance, 1e-4 relative in float32; ``conditional_cg_residual`` records the worst
    residual, so a capped, inexact solve shows);
    resample: "systematic", "multinomial" or "none", when ESS / N < ess_threshold; langevin_steps: corrector
    moves after every step (None: 1 for "ode", 0 for "sde"; the tweedie proposal uses neither corrector moves nor
    resampling: its weights stay equal); rejuvenation_steps: extra corrector moves right
    after a resampling (resample-move: duplicated particles spread out again); langevin_step_size: h as a
    fraction of the inverse curvature bound; weight_rule (SDE): "paper" (Eq. 3.6 rate at the left point) or
    "pathwise" (the same rate rewritten by Ito's formula, exact for the Euler chain); stable_likelihood: False
    (paper), True or kappa > 0 (tempered likelihood, module docstring); laplacian_probes: Hutchinson probes for
    ``lap mu`` (0: dropped, a constant for linear operators); generator: one ``torch.Generator`` or one per
    problem (then a problem's particles do not depend on the batch it is solved in).

    Particles are float32, or float64 when y is; log-weights are float64. Returns
    ``SampleResult(x=weighted mean (B, ...), samples=(N, B, ...), weights=(N, B) float64, diagnostics)`` with
    ``nfe`` (batched network calls), ``particle_evaluations`` (nfe * N), ``seconds``, ``network_seconds``,
    ``ess`` (steps, B) after each step's reweighting, ``resampled`` (steps, B) bool, ``best_particle`` (B, ...),
    ``std`` (B, ...) pixelwise weighted std, ``stiffness`` (steps,) = ``2 t dt a_t^2 ||A||^2 / s_t^2`` of the
    SDE's likelihood drift (explicit Euler is unstable above 2; 0 for the ODE predictor), ``langevin_step``
    (steps,) the h used (0: no move), ``sigmas``, ``rho``, ``kappa``, ``operator_norm_sq``, and for the conditional
    proposal ``conditional_cg_residual`` (worst relative CG residual) and ``conditional_cg_iterations`` (normal-operator
    calls of its solves, 0 for the closed forms); for the tweedie proposal also ``tweedie_covariance``
    ("closed_form" or "jacobian"), ``jacobian_products`` (batched products ``C_t v``, Lanczos steps included; each
    is one JVP + one VJP, on top of ``nfe``) and ``tweedie_psd_shift`` (the largest PSD-guard shift over ``t^2``).
    """
    sigma_max = float(prior.sigma_max if sigma_max is None else sigma_max)
    sigma_min = float(prior.sigma_min if sigma_min is None else sigma_min)
    _check_arguments(num_particles, steps, variant, proposal, resample, ess_threshold, langevin_steps,
                     langevin_step_size, rejuvenation_steps, weight_rule, laplacian_probes, sigma_min, sigma_max)
    for name, value in (("lanczos_iterations", lanczos_iterations), ("cg_max_iterations", cg_max_iterations)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if proposal == "tweedie" and not callable(getattr(prior, "tweedie_covariance", None)):
        raise ValueError(f"proposal='tweedie' needs a prior with tweedie_covariance(x, sigma, v, power) "
                         f"(Cov[x0 | x_sigma] products; every invdiff.priors.base.Denoiser has one); "
                         f"{type(prior).__name__} has none")
    n, steps = int(num_particles), int(steps)
    corrector_moves = (1 if variant == "ode" else 0) if langevin_steps is None else int(langevin_steps)
    dtype = torch.promote_types(problem.y.dtype, torch.float32)
    y = problem.y.to(dtype)
    batch, in_shape = y.shape[0], tuple(problem.operator.in_shape)

    with timed(y) as wall:
        calls = NetworkCalls()
        like = torch.zeros((batch, *in_shape), dtype=dtype, device=y.device)
        power_generator = torch.Generator(device=y.device).manual_seed(0)   # leaves the user's stream untouched
        norm_sq = operator_norm_squared(problem.operator, like, generator=power_generator)
        second_moment = prior_second_moment(prior)
        likelihood = _Likelihood(problem, _tempering(stable_likelihood, norm_sq), second_moment, dtype)
        sigmas = karras(steps, sigma_min, sigma_max, append_zero=True)
        rho = math.sqrt(sigma_max ** 2 + second_moment)

        # Stage I: exact draws from N(0, rho^2 I) exp(-mu_T)
        stage_one = TiltedGaussian(likelihood.stage_one_problem(sigma_max), rho)
        x = stage_one.sample(n, generator).to(dtype)
        log_w = torch.full((n, batch), -math.log(n), dtype=torch.float64, device=y.device)

        ess = torch.empty(steps, batch, dtype=torch.float64)
        resampled = torch.zeros(steps, batch, dtype=torch.bool)
        stiffness = torch.zeros(steps, dtype=torch.float64)
        langevin_h = torch.zeros(steps, dtype=torch.float64)
        cg_residual, cg_iterations = 0.0, 0
        tweedie = {"covariance": None, "products": 0, "shift": 0.0}      # proposal="tweedie" bookkeeping
        ax = None                  # A x of the current particles when a step already computed it (else None)
        for i in range(steps):
            t, t_next = float(sigmas[i]), float(sigmas[i + 1])
            dt = t - t_next                                                   # d tau > 0
            last = t_next == 0.0
            x0_hat = _denoise(prior, x, t, calls)
            if proposal == "tweedie":
                # exact draw from p(x_next | x, y) under p(x0 | x) = N(D, Cov); weights stay equal (docstring)
                x, step_residual, step_iterations = _tweedie_step(prior, problem.operator, y, float(problem.sigma_y),
                                                                  x, x0_hat, t, t_next, generator,
                                                                  int(lanczos_iterations), tweedie,
                                                                  int(cg_max_iterations))
                cg_residual, cg_iterations = max(cg_residual, step_residual), cg_iterations + step_iterations
                ess[i] = effective_sample_size(log_w).cpu()
                if callback is not None:
                    weights = log_w.exp()
                    notify(callback, i, steps, {"x": _weighted_moments(x, weights)[0], "sigma": sigmas[i],
                                                "particles": x, "weights": weights, "ess": ess[i]})
                continue
            ax = likelihood.forward(x) if ax is None else ax
            ax_next = None
            if variant == "sde" and not last and proposal == "conditional":
                x_next, increment, step_residual, step_iterations = _conditional_step(likelihood, x, ax, x0_hat, t,
                                                                                      t_next, generator)
                cg_residual, cg_iterations = max(cg_residual, step_residual), cg_iterations + step_iterations
            elif variant == "sde" and not last:
                # V^2 = 2t, H = 2 t score = -d (Eq. 3.6 in the EDM parameterisation); g = grad mu_t(x)
                g = likelihood.gradient(ax, t)
                d = 2 * (x - x0_hat) / t
                noise = particle_noise(x.shape, x, generator)
                x_next = x - dt * d - dt * 2 * t * g + math.sqrt(2 * t * dt) * noise
                stiffness[i] = 2 * t * dt * likelihood.curvature(t, norm_sq)
                if weight_rule == "paper":
                    rate = t * _inner(g, g) + _inner(d, g)                    # (V^2/2)|g|^2 - <H, g>
                    if laplacian_probes:
                        probes = _rademacher(laplacian_probes, x, generator)
                        rate = rate - t * likelihood.laplacian(x, t, probes)  # -(V^2/2) lap mu
                    # + d_t mu_t (tempered family only) integrated exactly at fixed x
                    increment = dt * rate + likelihood.value(ax, t) - likelihood.value(ax, t_next)
                else:
                    # Ito: c dtau = -d[mu_t(X)] - (V^2/2)|g|^2 dtau + V <g, dW>
                    ax_next = likelihood.forward(x_next)
                    increment = (likelihood.value(ax, t) - likelihood.value(ax_next, t_next)
                                 - dt * t * _inner(g, g) + math.sqrt(2 * t * dt) * _inner(g, noise))
            else:
                # V = 0: H = t score = -d (probability flow). The rate -<H, g> + d_t mu_t is -d/dtau mu_t(X),
                # so its exact integral over the step is mu_t(x) - mu_t_next(x_next) (no gradient needed).
                d = (x - x0_hat) / t
                x_next = x - dt * d
                ax_next = likelihood.forward(x_next)
                increment = likelihood.value(ax, t) - likelihood.value(ax_next, t_next)
            x, ax = x_next, ax_next                      # A x_next carried into the next step when it was computed
            log_w = normalise_log_weights(log_w + increment)
            ess[i] = effective_sample_size(log_w).cpu()
            if resample != "none" and not last:
                x, log_w, resampled[i], ancestors = _resample_where_degenerate(x, log_w, ess[i], ess_threshold,
                                                                               resample, generator)
                if ax is not None and ancestors is not None:
                    ax = _select(ax, ancestors)
            if not last and (corrector_moves or bool(resampled[i].any())):
                h = langevin_step_size / (1 / t_next ** 2 + likelihood.curvature(t_next, norm_sq))
                langevin_h[i] = h
                for _ in range(corrector_moves):
                    x = _langevin_move(prior, likelihood, x, t_next, h, calls, generator)
                # resample-move: only the problems that just resampled (so a problem's run does not depend on
                # its batch neighbours)
                for _ in range(rejuvenation_steps if bool(resampled[i].any()) else 0):
                    x = _langevin_move(prior, likelihood, x, t_next, h, calls, generator,
                                       active=resampled[i].to(x.device))
                ax = None                                # the moves changed x
            if callback is not None:
                weights = log_w.exp()
                notify(callback, i, steps, {"x": _weighted_moments(x, weights)[0], "sigma": sigmas[i],
                                            "particles": x, "weights": weights, "ess": ess[i]})

        weights = log_w.exp()
        mean, std = _weighted_moments(x, weights)
        best = _select(x, weights.argmax(dim=0, keepdim=True)).squeeze(0)
    _warn_if_stiff(stiffness, variant, likelihood.kappa)
    diagnostics = {
        "nfe": calls.nfe, "particle_evaluations": calls.nfe * n, "seconds": wall.seconds,
        "network_seconds": calls.seconds, "steps": steps, "num_particles": n, "variant": variant,
        "resample": resample, "ess_threshold": ess_threshold, "langevin_steps": corrector_moves,
        "rejuvenation_steps": rejuvenation_steps, "weight_rule": weight_rule,
        "proposal": proposal, "conditional_cg_residual": cg_residual, "conditional_cg_iterations": cg_iterations,
        "tweedie_covariance": tweedie["covariance"], "jacobian_products": tweedie["products"],
        "tweedie_psd_shift": tweedie["shift"],
        "ess": ess, "resampled": resampled, "best_particle": best, "std": std,
        "stiffness": stiffness, "langevin_step": langevin_h, "sigmas": sigmas.tolist(), "rho": rho,
        "kappa": likelihood.kappa, "operator_norm_sq": norm_sq, "stage_one_method": stage_one.method,
        "finite_particles": int(torch.isfinite(x.flatten(2)).all(dim=2).sum()),
    }
    log.debug("smc: %d x %d particles, %d steps in %.2f s; final ESS %s", n, batch, steps, wall.seconds,
              [round(v, 1) for v in ess[-1].tolist()])
    return SampleResult(x=mean, diagnostics=diagnostics, samples=x, weights=weights,
                        trajectory=trajectory_of(callback))


# The conditional step's CG stopping rule, relative residual. Its weight error is second order in the solve's
# error (the quadratic is b^T Lambda^-1 b, and CG's error in it is the squared Lambda-norm of its error), and a 1e-4
# relative error in a draw is far below the draw's own spread, so float32 runs stop at 1e-4 instead of Stage I's
# 1e-6 (measured: a quarter to a third fewer iterations on the CT-30 and SENSE 4x tasks); float64 (the oracle
# tests) keeps the tight default.
CONDITIONAL_CG_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# proposal="tweedie": the solve only moves the draw (no weight depends on it), so a relative 1e-7 in float64 is far
# below a draw's spread (measured: 0.054 vs 0.054 mean error at d = 256 against 1e-10, with ~40 % fewer calls).
TWEEDIE_CG_TOL = {torch.float32: 1e-4, torch.float64: 1e-7}
# proposal="tweedie" with an autodiff covariance: the CG is preconditioned by (c A A^T + sigma_y^2 I)^-1, c the
# Rayleigh quotient of C_t at the root's random start (a one-probe tr(C_t) / d), solved by an inner CG on the operator
# alone (cheap next to a JVP) to a relative 1e-3 in at most this many iterations. Exact for C_t = c I; what is left
# is C_t's anisotropy on the measured directions instead of ||A||^2 c / sigma_y^2.
PRECONDITIONER_ITERATIONS = 100


def _conditional_step(likelihood: "_Likelihood", x: torch.Tensor, ax: torch.Tensor, x0_hat: torch.Tensor, t: float,
                      t_next: float, generator: Generators) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One SDE step with the Euler kernel conditioned on y: ``(x_next, log-weight increment, CG residual, CG
    iterations)`` (the worst relative residual of the step's solve and its normal-operator calls; 0 for the pixel
    and Fourier closed forms).

    The prior's Euler kernel ``K(x' | x) = N(c, rho^2 I)``, ``c = x - dt d``, ``rho^2 = 2 t dt``, times the next
    target's likelihood ``exp(-mu_next(x'))`` is a Gaussian in x' (a linear operator): the proposal draws from
    it exactly and the weight is its normaliser, ``log w += mu_t(x) + log int K(x' | x) exp(-mu_next(x')) dx'``
    = ``mu_t(x) - r^T (s^2 I + rho^2 A A^T)^-1 r / 2`` + a constant, ``r = y - A c`` (then ``x'`` does not
    enter the weight at all). By Woodbury the quadratic form is ``|r|^2 / s^2 - <A^T r / s^2, z>`` with z the mean
    of the tilted Gaussian (:meth:`TiltedGaussian.conditional`), so it costs the mean solve that the draw needs anyway.
    """
    d = 2 * (x - x0_hat) / t
    dt = t - t_next
    centre = x - dt * d
    target = likelihood.stage_one_problem(t_next)          # exp(-mu_next) as ||A x - y'||^2 / (2 s'^2)
    gaussian = TiltedGaussian(target, math.sqrt(2 * t * dt), cg_tol=CONDITIONAL_CG_TOL[x.dtype])
    residual = target.y.to(x.dtype) - likelihood.forward(centre)
    move = gaussian.conditional(residual, generator)
    return (centre + move.draw, likelihood.value(ax, t) - move.quadratic / 2, gaussian.cg_relative_residual or 0.0,
            gaussian.cg_iterations)


def _tweedie_operator(prior, x: torch.Tensor, sigma: torch.Tensor, lanczos_iterations: int):
    """``Cov[x0 | x]`` at fixed ``(x, sigma)`` as ``(v, power) -> Cov^power v``: the prior's ``tweedie_operator`` (one
    linearisation for the whole step, or its closed form), else its bare ``tweedie_covariance``."""
    make = getattr(prior, "tweedie_operator", None)
    if callable(make):
        return make(x, sigma, lanczos_iterations=lanczos_iterations)
    return lambda v, power: prior.tweedie_covariance(x, sigma, v, power)


def _tweedie_step(prior, operator, y: torch.Tensor, sigma_y: float, x: torch.Tensor, x0_hat: torch.Tensor, t: float,
                  t_next: float, generator: Generators, lanczos_iterations: int = LANCZOS_ITERATIONS,
                  record: dict | None = None, cg_max_iterations: int = 1000) -> tuple[torch.Tensor, float, int]:
    """One step of ``proposal="tweedie"``: ``(x_next, worst relative CG residual, normal-operator calls)``.

    With ``p(x0 | x) = N(D, C)``, ``C = prior.tweedie_covariance`` (exact for a Gaussian prior; for a network the
    symmetrised Jacobian with a Lanczos square root, :class:`invdiff.priors.base.JacobianCovariance`):

    1. ``x0 ~ p(x0 | x, y)`` by pathwise conditioning (Matheron's rule), ``z = D + C^(1/2) xi``,
       ``x0 = z + C A^T (A C A^T + sigma_y^2 I)^-1 (y - A z - sigma_y e)`` (CG in measurement space);
    2. ``x_next ~ p(x_next | x, x0)``, the Gaussian bridge of ``x = x0 + t n``:
       ``x_next = x0 + r^2 (x - x0) + sqrt(r^2 (t^2 - t_next^2)) xi'``, ``r = t_next / t`` (x0 itself at t_next = 0).
    """
    n, b = x.shape[:2]
    x0_hat = x0_hat.detach()            # a prior whose parameters require grad must not grow a graph through CG
    sigma = torch.full((n * b,), t, dtype=x.dtype, device=x.device)
    covariance_at = _tweedie_operator(prior, x.reshape(n * b, *x.shape[2:]), sigma, lanczos_iterations)

    def covariance(v: torch.Tensor, power: float) -> torch.Tensor:
        return covariance_at(v.reshape(n * b, *v.shape[2:]), power).reshape(v.shape)

    def adjoint(u: torch.Tensor) -> torch.Tensor:
        return map_particles(operator.A_adjoint, u)

    z = x0_hat + covariance(particle_noise(x.shape, x, generator), 0.5)
    e = particle_noise((n, *y.shape), y, generator)
    residual = y - map_particles(operator.A, z) - sigma_y * e
    calls = 0

    def normal(flat_u: torch.Tensor) -> torch.Tensor:               # (A C A^T + sigma_y^2 I) u
        nonlocal calls
        calls += 1
        u = flat_u.reshape(residual.shape)
        return (map_particles(operator.A, covariance(adjoint(u), 1.0)) + sigma_y ** 2 * u).reshape(flat_u.shape)

    rhs = residual.reshape(n * b, *residual.shape[2:])
    if hasattr(covariance_at, "products"):         # autodiff covariance: not exactly PSD, so stop at negative curvature
        level = covariance_at.rayleigh.clamp_min(0).reshape(-1, *([1] * (rhs.ndim - 1)))

        def precondition(flat_r: torch.Tensor) -> torch.Tensor:    # (c A A^T + sigma_y^2 I)^-1 r, operator calls only
            def isotropic(flat_w: torch.Tensor) -> torch.Tensor:
                w = flat_w.reshape(residual.shape)
                return level * map_particles(operator.A, adjoint(w)).reshape(flat_w.shape) + sigma_y ** 2 * flat_w
            return conjugate_gradient(isotropic, flat_r, max_iter=PRECONDITIONER_ITERATIONS, tol=1e-3)

        flat_u, relative = _guarded_conjugate_gradient(normal, rhs, max_iter=cg_max_iterations,
                                                       tol=TWEEDIE_CG_TOL[x.dtype], precondition=precondition)
    else:
        flat_u, relative = conjugate_gradient(normal, rhs, max_iter=cg_max_iterations, tol=TWEEDIE_CG_TOL[x.dtype],
                                              return_residual=True)
    x0 = z + covariance(adjoint(flat_u.reshape(residual.shape)), 1.0)
    if record is not None:
        products = getattr(covariance_at, "products", None)
        record["covariance"] = "closed_form" if products is None else "jacobian"
        record["products"] += products or 0
        if products is not None:
            record["shift"] = max(record["shift"], float(covariance_at.shift.max()) / (t * t))
    r2 = (t_next / t) ** 2
    if t_next == 0.0:
        return x0, float(relative.max()), calls
    bridge = particle_noise(x.shape, x, generator)
    return x0 + r2 * (x - x0) + math.sqrt(r2 * (t * t - t_next * t_next)) * bridge, float(relative.max()), calls


def _guarded_conjugate_gradient(normal, rhs: torch.Tensor, *, max_iter: int, tol: float,
                                precondition=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CG for ``normal(u) = rhs`` per batch element that freezes an element at the first direction of non-positive
    curvature ``p^T normal(p) <= 0`` (truncated CG, as Steihaug's): ``(u, relative residual (B,))``.

    precondition: optional ``r -> P r`` (P ~ normal^-1, SPD); it may be an inexact inner solve, so the direction
    update uses the flexible (Polak-Ribiere) ``beta = <r_new, z_new - z> / <r, z>`` (Notay's flexible CG).

    The tweedie solve with an autodiff covariance: the symmetrised network Jacobian can have negative eigenvalues
    beyond the PSD guard's Ritz-value shift, and plain CG then divides by a negative or zero curvature (NaN draws,
    measured on the CT prior). Stopping there keeps the iterate of the last positive-definite Krylov space; and since
    an indefinite system can also make the residual grow without a negative curvature showing, the iterate with the
    smallest residual is returned (never worse than u = 0, i.e. the unconditioned draw z).
    """
    dims = tuple(range(1, rhs.ndim))
    tiny = torch.finfo(rhs.dtype).tiny

    def dot(a, c):
        return (a * c).sum(dim=dims, keepdim=True)

    precondition = precondition or (lambda v: v)
    u, r = torch.zeros_like(rhs), rhs.clone()
    z = precondition(r)
    p, rz, rs = z.clone(), dot(r, z), dot(r, r)
    threshold = tol ** 2 * dot(rhs, rhs).clamp_min(tiny)
    active = rs > threshold
    best_u, best_rs = u, rs
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        normal_p = normal(p)
        curvature = dot(p, normal_p)
        active = active & (curvature > 0) & torch.isfinite(curvature)
        alpha = torch.where(active, rz / curvature.clamp_min(tiny), torch.zeros_like(rz))
        u, r_new = u + alpha * p, r - alpha * normal_p
        z_new = precondition(r_new)
        beta = dot(r_new, z_new - z) / rz.clamp_min(tiny)
        p = torch.where(active, z_new + beta * p, p)
        r, z = torch.where(active, r_new, r), torch.where(active, z_new, z)
        rz, rs = torch.where(active, dot(r, z), rz), dot(r, r)
        better = rs < best_rs
        best_u, best_rs = torch.where(better, u, best_u), torch.where(better, rs, best_rs)
        active = active & (rs > threshold) & (rz > 0)
    return best_u, (best_rs / dot(rhs, rhs).clamp_min(tiny)).sqrt().reshape(-1)


def _resample_where_degenerate(x: torch.Tensor, log_w: torch.Tensor, ess: torch.Tensor, threshold: float,
                               scheme: str, generator: Generators):
    """Resample the problems whose ESS fell below ``threshold * N``; their weights become 1/N.

    Returns ``(x, log_w, resampled (B,) bool, ancestors (N, B) or None when nothing was resampled)``.
    """
    n = log_w.shape[0]
    low = ess.to(log_w.device) < threshold * n
    if not bool(low.any()):
        return x, log_w, low.cpu(), None
    ancestors = resample_indices(log_w.exp(), scheme, generator, active=low)
    x = _select(x, ancestors)
    log_w = torch.where(low[None, :], torch.full_like(log_w, -math.log(n)), log_w)
    return x, log_w, low.cpu(), ancestors


def _langevin_move(prior, likelihood: _Likelihood, x: torch.Tensor, t: float, h: float, calls: NetworkCalls,
                   generator: Generators, active: torch.Tensor | None = None) -> torch.Tensor:
    """One unadjusted Langevin move for ``Q(., t) ∝ p_t exp(-mu_t)``: ``x + h (score - grad mu_t) + sqrt(2h) xi``.

    active: optional (B,) bool, the problems to move (the others are returned unchanged).
    """
    score = (_denoise(prior, x, t, calls) - x) / t ** 2
    g = likelihood.gradient(likelihood.forward(x), t)
    moved = x + h * (score - g) + math.sqrt(2 * h) * particle_noise(x.shape, x, generator, active)
    if active is None:
        return moved
    return torch.where(active.reshape(1, -1, *([1] * (x.ndim - 2))), moved, x)


def _rademacher(count: int, x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """``count`` +-1 probes per problem, shared by its particles: (K, B, ...)."""
    signs = particle_noise((count, *x.shape[1:]), x, generator)
    return torch.where(signs >= 0, 1.0, -1.0).to(x.dtype)


def _warn_if_stiff(stiffness: torch.Tensor, variant: str, kappa: float) -> None:
    worst = float(stiffness.max()) if len(stiffness) else 0.0
    if variant == "sde" and worst > 2:
        unstable = int((stiffness > 2).sum())
        log.warning("smc: explicit Euler is unstable on %d of %d steps (2 t dt ||A||^2 / s_t^2 up to %.3g > 2); "
                    "the particles may diverge. Use stable_likelihood=True%s, more steps or a smaller sigma_max.",
                    unstable, len(stiffness), worst, " with a larger kappa" if kappa > 0 else "")


__all__ = ["sample_smc", "resample_indices", "normalise_log_weights", "effective_sample_size",
           "prior_second_moment", "VARIANTS", "PROPOSALS", "RESAMPLING"]
