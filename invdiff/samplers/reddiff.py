r"""RED-Diff: regularisation by denoising diffusion (Mardani, Song, Kautz, Vahdat 2023), in the sigma convention.

The posterior is approximated by ``q = N(mu, s^2 I)`` with ``s -> 0``, and ``mu`` minimises the paper's variational objective

    L(mu) = ||y - A mu||^2 / (2 sigma_y^2) + E_{t, eps}[ lambda_t ||eps_hat(x_t, t) - eps||^2 / 2 ]

Each step draws eps, evaluates the prior once *without* backpropagating through it, and takes one Adam step
(betas 0.9, 0.99) on the surrogate whose gradient is the paper's stop-gradient gradient:

    loss_t(mu) = ||y - A mu||^2 / (2 sigma_y^2)  +  lam w(sigma_t) < sg(eps_hat - eps), mu >

with the data term *summed* over the measurements of each image, and noise levels swept from high to low, one
prior call and one Adam step per level.

From the paper's VP notation to ours
------------------------------------
The paper perturbs ``x_t^VP = alpha_t mu + sigma_t^VP eps`` (alpha_t = sqrt(abar_t), sigma_t^VP =
sqrt(1 - abar_t)) and queries an eps-network. Dividing by alpha_t gives the EDM/variance-exploding state

    x_t = x_t^VP / alpha_t = mu + sigma_t eps,      sigma_t = sigma_t^VP / alpha_t = sqrt((1 - abar_t) / abar_t),

and the eps-prediction in terms of a denoiser ``D(x, sigma) = E[x0 | x]`` is, in both conventions,

    eps_hat = (x_t^VP - alpha_t D) / sigma_t^VP = (x_t - D(x_t, sigma_t)) / sigma_t.

The paper's weighting is the inverse square-root SNR, ``lambda_t = lam sigma_t^VP / alpha_t``, which is exactly
``lam * sigma_t`` in EDM units: ``w(sigma) = sigma``. The prior's gradient then has a plain image-space form,

    lam w(sigma) (eps_hat - eps) = lam (x_t - D(x_t, sigma) - sigma eps) = lam (mu - D(mu + sigma eps, sigma)),

the RED gradient ``mu - D(mu)`` evaluated at a noisy copy of ``mu`` (this is how it is computed below: no
division by a small sigma, no cancellation).

Scale of ``lam`` and ``lr`` against the reference code
------------------------------------------------------
The reference code (NVlabs/RED-diff) uses *means*: ``mean(e_obs^2) / 2 + lam_ref w <sg(.), mu> / numel(mu)``
with no sigma_y, on images in [-1, 1]. Multiplying by ``d = numel(x)`` shows its gradient is
``(d / m) A^T (A mu - y) + lam_ref (mu - D)``: its data/prior balance changes with the number of measurements
``m`` and ignores the noise level. Ours is ``A^T (A mu - y) / sigma_y^2 + lam (mu - D)``, the data term with
its true weight, so the reference balance corresponds to ``lam = lam_ref m / (d sigma_y^2)``; ``lam sigma_y^2``
is scale-free (rescaling the images rescales ``sigma_y`` too), so this holds on any image scale. With
``lam_ref = 0.25`` (the reference config) and m / d = 1/4 (single-coil 4x) the reference balance is
``lam = 0.0625 / sigma_y^2``: 100 at ``sigma_y = 0.025``, 280 at 0.015 (the shipped MRI samples normalise to
sigma_y 0.012 to 0.020: k-space periphery noise over the 99.5th percentile of the zero-filled magnitude).
``lam`` is a precision on the normalised image scale: in the directions A does not measure only the prior
acts, whatever ``lam``; in measured ones ``lam`` against ``1 / sigma_y^2`` decides how much the prior may
denoise. Raise it towards ``0.06 / sigma_y^2`` for clean data and a trusted prior.
Adam normalises each coordinate's step, so the overall size of the loss does not matter, only this ratio;
``lr`` is an absolute step in image units (Adam moves a pixel by about ``lr`` at most per step), so
``steps * lr`` bounds how far ``mu`` travels from its initialisation (the reference's lr 0.1 to 0.5 is on
[-1, 1] images with 1000 steps and a near-zero data weight).

Defaults (normalised images, magnitude ~1): ``steps=100``, ``lr=0.05``, ``lam=100``, the Karras grid (rho 7)
between the prior's ``sigma_max`` and ``sigma_min`` swept downwards, initialisation ``A^+ y``. They were chosen
on exact oracles: a smooth Gaussian prior and a 6-component low-rank Gaussian mixture on 8x8 images, random
16- and 32-row operators, sigma_y 0.01 and 0.05 (6 cases, 8 problems each). Over lam in {30, 100, 300} x
lr in {0.01, 0.02, 0.03, 0.05} at 100 steps, (100, 0.05) was within 25 % of the best setting's MSE on every
case and 1.8 to 30 times below the MSE of ``A^+ y``; lam 300 lost a mixture mode on one case (13x worse),
lam 30 was 1.6x worse on the sigma_y = 0.01 Gaussian case, and lr 0.01 was worse on 5 of 6 cases (too short a
path in 100 steps). Doubling ``steps`` (200 at lr 0.02 against 100) lowered the MSE on every case: 100 is a budget
choice (100 network calls). RED-Diff is not an MMSE estimator: on these cases its MSE stays 2 to 150 times the
exact posterior mean's.

Exact oracle (Gaussian prior)
-----------------------------
For ``x0 ~ N(m, S)`` the denoiser is ``D(x, s) = m + S (S + s^2 I)^-1 (x - m)``, so with ``x_t = mu + s eps``

    eps_hat = (x_t - D) / s = s (S + s^2 I)^-1 (x_t - m)       (as I - S (S + s^2 I)^-1 = s^2 (S + s^2 I)^-1)
    eps_hat - eps = s (S + s^2 I)^-1 (mu - m) - S (S + s^2 I)^-1 eps

hence ``E[eps_hat - eps | mu] = s (S + s^2 I)^-1 (mu - m)``
(the paper's ``alpha sigma (alpha^2 S + sigma^2 I)^-1 (mu - m)`` with ``sigma = sigma^VP / alpha``), and the expected
gradient at level ``s`` is ``A^T (A mu - y) / sigma_y^2 + lam w(s) s (S + s^2 I)^-1 (mu - m)``. Averaged over the
noise levels, a stationary point of the stochastic iteration minimises

    ||y - A mu||^2 / (2 sigma_y^2) + lam (mu - m)^T W (mu - m) / 2,   W = mean_t w(s_t) s_t (S + s_t^2 I)^-1,
    mu* = (A^T A / sigma_y^2 + lam W)^-1 (A^T y / sigma_y^2 + lam W m).

That is the fixed point of the objective when the noise level of each step is drawn from the schedule
(``time_order="random"``, the expectation over t in the objective). The paper's default, a single descending sweep, is
an annealing of the same objective: its end point depends on ``lr`` and ``steps`` and is not a stationary
point of the averaged objective (the descending sweep is the paper's and the reference code's choice). The oracle
test therefore checks ``mu*`` with ``time_order="random"``; see ``tests/test_reddiff.py``.

Reaching the posterior mean of a Gaussian prior (``weighting="score"``, ``antithetic=True``)
-----------------------------------------------------------------------------------------
With the paper's ``w(s) = s`` the regulariser above is ``lam mean_t s_t^2 (S + s_t^2 I)^-1``: close to ``lam I`` in
every direction whose prior variance is below most of the grid's ``s_t^2``, so it ignores the prior's correlations
and cannot equal ``S^-1`` for any lam. Measured on a 16 x 16 squared-exponential Gaussian prior (d = 256, 40 % of
pixels observed, sigma_y 0.05): the fixed point ``mu*`` is 2.9 to 4.5 posterior std (``||mu - m_post|| /
sqrt(tr C_post)``) from the posterior mean for lam from 1 to 1e5, and the descending sweep's best end point over
steps 100..3000, lr 0.003..0.1, lam 1..1e4 is 0.80 (defaults: 2.0). ``weighting="score"`` uses
``w(s) = 1 / s`` instead, so the prior gradient is ``lam (mu - D(mu + s eps, s)) / s^2``, whose expectation for a
Gaussian prior is ``lam (S + s^2 I)^-1 (mu - m) = -lam grad log p_s(mu)``: at each level the iteration is gradient
descent on ``data + lam (-log p_s)``, and with lam = 1 its stationary point is the posterior mean under the prior
diffused to ``s``, which tends to the exact posterior mean as the sweep reaches ``sigma_min``. Its noise
``lam D'(.) eps / s`` grows like ``1 / s``; ``antithetic=True`` evaluates ``D`` at ``mu + s eps`` and
``mu - s eps`` and averages (two prior calls per step), which removes the noise exactly for an affine D (Gaussian
priors) and its odd-order part in general. Measured on the same case (lam 1): 0.13 / 0.022 / 0.010 posterior std at
100 / 300 / 1000 steps with lr 0.01 / 0.003 / 0.003 (without the antithetic pair 0.84 at best, the noise wins).
The defaults stay the paper's (``weighting="snr"``, no pair): the image-task settings are tuned for them.

RED-Diff is mode-seeking: on a two-mode mixture each seed ends near one mode, with too little spread, and the
share of seeds per mode follows the optimisation path rather than the posterior weights
(``benchmarks/reddiff_oracle.py``). ``A^+ y`` amplifies noise along weakly measured directions, which can push
every seed towards the less probable mode (seen there with weights 0.82 / 0.18); ``init="zeros"`` or ``"fbp"``
avoid that for ill-conditioned operators (CT through an iterative pseudo-inverse).
"""
from __future__ import annotations

import logging

import torch

from invdiff.problem import InverseProblem
from invdiff.registry import register_sampler
from invdiff.samplers._common import (NetworkCalls, SampleResult, batch_sum, call_prior,
                                      expand_sigma, first_generator, initial_mean, notify, randn_like, timed,
                                      trajectory_of)
from invdiff.schedules import karras

log = logging.getLogger(__name__)

TIME_ORDERS = ("descending", "random")
WEIGHTINGS = ("snr", "score")
ADAM_BETAS = (0.9, 0.99)     # the paper's choice (Adam's default beta2 is 0.999)


def noise_levels(steps: int, sigma_min: float, sigma_max: float, time_order: str,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The ``steps`` noise levels visited, float64 on the CPU.

    descending: the Karras grid (rho 7) from ``sigma_max`` to ``sigma_min``; random: the same levels in a random
    order (a permutation drawn with ``generator``), so each level is used exactly once and the average over the
    steps is the average over the grid (a stratified estimate of the expectation over t).
    """
    grid = karras(steps, sigma_min, sigma_max, append_zero=False)
    if time_order == "descending":
        return grid
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(len(grid), generator=generator, device=device).cpu()
    return grid[order]


def _check_arguments(steps, lr, lam, time_order, sigma_min, sigma_max, weighting="snr") -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if time_order not in TIME_ORDERS:
        raise ValueError(f"time_order must be one of {', '.join(TIME_ORDERS)}; got {time_order!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


@register_sampler("reddiff", kind="diffusion")
def sample_reddiff(problem: InverseProblem, prior, *, steps: int = 100, lr: float = 0.05, lam: float = 100.0,
                   init: str = "pinv", sigma_max: float | None = None, sigma_min: float | None = None,
                   time_order: str = "descending", weighting: str = "snr", antithetic: bool = False,
                   generator=None, callback=None) -> SampleResult:
    """RED-Diff: Adam on ``||y - A mu||^2 / (2 sigma_y^2) + lam sigma_t <sg(eps_hat - eps), mu>``, sigma_t descending.

    problem: y (B, ...) with operator acting on (B, C, H, W) real images (complex MRI: C = 2); prior: a
    denoiser ``D(x, sigma)``; sigma_max / sigma_min default to the prior's. ``generator``: a
    ``torch.Generator`` (or one per image) driving every eps draw (and the levels when
    ``time_order="random"``). weighting: "snr" (the paper's ``lambda_t = lam sigma_t``) or "score"
    (``lambda_t = lam / sigma_t``: the prior gradient is lam times minus the diffused prior's score; use lam 1;
    module docstring); antithetic: average D over ``mu +- sigma eps`` (two prior calls per step). mu is kept in
    float32, or float64 when y is float64; the prior runs in its own dtype. Returns ``SampleResult(x=mu)`` with
    diagnostics ``nfe`` (= steps; 2 steps with the antithetic pair), ``seconds`` (all of it),
    ``network_seconds`` (inside the prior), ``init_seconds`` (computing mu_0), and per step ``sigmas``, ``loss_data`` (the summed data term) and ``loss_prior``
    (the surrogate ``lam w <sg(eps_hat - eps), mu>``), each averaged over the batch.

    >>> result = sample_reddiff(problem, prior, steps=100, generator=torch.Generator().manual_seed(0))
    """
    sigma_max = float(prior.sigma_max if sigma_max is None else sigma_max)
    sigma_min = float(prior.sigma_min if sigma_min is None else sigma_min)
    _check_arguments(steps, lr, lam, time_order, sigma_min, sigma_max, weighting)
    steps = int(steps)
    state_dtype = torch.promote_types(problem.y.dtype, torch.float32)
    with timed(problem.y) as wall:
        calls = NetworkCalls()
        sigmas = noise_levels(steps, sigma_min, sigma_max, time_order, first_generator(generator))
        with timed(problem.y) as init_time:                 # A^+ y is an iterative solve for some operators
            mu = initial_mean(problem, init, state_dtype).requires_grad_(True)
        optimiser = torch.optim.Adam([mu], lr=lr, betas=ADAM_BETAS)
        loss_data = torch.empty(steps, mu.shape[0], dtype=state_dtype, device=mu.device)
        loss_prior = torch.empty_like(loss_data)
        sigmas_device = sigmas.to(device=mu.device, dtype=state_dtype)
        for i in range(steps):
            sigma = sigmas_device[i]
            with torch.no_grad():
                eps = randn_like(mu, generator)
                x_t = mu + sigma * eps                                             # x_t = mu + sigma_t eps
                x0_hat = call_prior(prior, x_t, expand_sigma(sigma, mu), calls)    # D(x_t, sigma_t), no backprop
                if antithetic:                                                     # the pair mu -+ sigma eps
                    x0_hat = (x0_hat + call_prior(prior, mu - sigma * eps, expand_sigma(sigma, mu), calls)) / 2
                # lam w(sigma) (eps_hat - eps) with eps_hat = (x_t - x0_hat) / sigma: w = sigma ("snr") gives
                # lam (mu - D); w = 1 / sigma ("score") gives lam (mu - D) / sigma^2, -lam grad log p_sigma on average
                prior_gradient = lam * (mu - x0_hat)
                if weighting == "score":
                    prior_gradient = prior_gradient / sigma ** 2
            data = batch_sum(problem.residual(mu) ** 2) / (2 * problem.sigma_y ** 2)   # ||y - A mu||^2 / 2 sigma_y^2
            surrogate = batch_sum(prior_gradient * mu)                                  # <sg(.), mu>
            optimiser.zero_grad(set_to_none=True)
            (data.sum() + surrogate.sum()).backward()
            optimiser.step()
            loss_data[i], loss_prior[i] = data.detach(), surrogate.detach()
            notify(callback, i, steps, {"x": mu.detach(), "x0_hat": x0_hat, "sigma": sigma,
                                        "loss_data": loss_data[i], "loss_prior": loss_prior[i]})
        x = mu.detach()
    diagnostics = {
        "nfe": calls.nfe, "seconds": wall.seconds, "network_seconds": calls.seconds,
        "init_seconds": init_time.seconds, "steps": steps,
        "lr": lr, "lam": lam, "init": init, "time_order": time_order, "weighting": weighting,
        "antithetic": antithetic,
        "sigma_min": sigma_min, "sigma_max": sigma_max, "sigmas": sigmas.tolist(),
        "loss_data": loss_data.mean(dim=1).tolist(), "loss_prior": loss_prior.mean(dim=1).tolist(),
    }
    log.debug("reddiff: %d steps in %.2f s (network %.2f s), final data term %.4g", steps, wall.seconds,
              calls.seconds, diagnostics["loss_data"][-1])
    return SampleResult(x=x, diagnostics=diagnostics, trajectory=trajectory_of(callback))
