r"""ADS: Active Diffusion Subsampling (Nolan, Stevens, van Nierop, van Sloun, TMLR 2025), in the sigma convention.

A scanner user asks: with a budget of 32 lines, which lines should I measure for this patient, and in which order?
ADS answers during reverse diffusion. N particles run a guided reverse diffusion over the data measured so far; at
a few steps early in the reverse process (the acquisition window) each particle's Tweedie estimate ``x0_i`` predicts
every line that is not yet measured, ``Yhat_i(l) = A_l x0_i`` (coil maps included), the line where the particles
disagree most is measured, the operator becomes ``A.replace(mask=mask | l)`` and sampling goes on with more data.

The score (paper Sec. 3, the entropy of a Gaussian mixture of width sigma placed on the particles' predictions)
------------------------------------------------------------------------------------------------------------
With ``d2_ij(l) = ||Yhat_i(l) - Yhat_j(l)||^2`` summed over the line's entries (rows, coils, real and imaginary):

    positive (the reference code):  score(l) =  sum_j log sum_i exp(+d2_ij(l) / (2 sigma^2))
    negative (Kolchinsky-Tracey):   score(l) = -sum_j log sum_i exp(-d2_ij(l) / (2 sigma^2))

The negative form is the pairwise-distance upper bound on the mixture's entropy (Kolchinsky and Tracey 2017, up to
terms equal for every line); the positive form is what the authors' code computes. Both grow with the particles'
spread on the line: for large sigma both tend to ``sum_ij d2_ij / (2 N sigma^2) + const``, the ensemble variance of
the line; for small sigma the positive form tends to ``sum_j max_i d2_ij / (2 sigma^2)`` (the farthest pair) while
the negative one saturates at ``-N log 1 = 0`` for every line (every line looks alike), so the negative form needs
sigma of the order of the distances. Weighted particles (``weights="likelihood"``) enter as mixture weights
``w_i`` (normalised, ``sum_i w_i = 1``):

    score(l) = +-sum_j N w_j log sum_i N w_i exp(+-d2_ij(l) / (2 sigma^2)),

which is the unweighted score exactly when ``w_i = 1 / N``. Everything is float64 with ``logsumexp``: ``exp`` of
``d2 / (2 sigma^2)`` overflows float32 (and float64 beyond 709) long before the score means anything different.
Lines already measured (and lines the scanner cannot measure: ``problem.acquisition.acquirable``) are never chosen.

The sampler (paper Alg. 1 with DPS guidance)
--------------------------------------------
Deterministic DDIM (eta = 0) over the Karras grid from ``sigma_max`` to ``sigma_min`` and then 0, with DPS
guidance on the un-squared residual norm. In VE coordinates ``x_sigma = x0 + sigma n`` one step is

    x0_hat  = D(x, sigma)                                                         Tweedie estimate (paper Eq. 4)
    x'      = x0_hat + (sigma' / sigma) (x - x0_hat)                              DDIM, eta = 0
    x_next  = x' - guidance sqrt((1 + sigma^2)(1 + sigma'^2)) grad_x ||y - A x0_hat(x)||      DPS (paper Eq. 7)

the factor under the square root carrying the paper's VP-coordinate step into VE coordinates, exactly as
:func:`invdiff.samplers.diffusion_baselines.sample_dps` does. At a selection step the score uses ``x0_hat`` of that
step (before the guidance step, as the reference does), the chosen lines are measured, and the guidance of the same
step already uses the new data (the network pass is shared). After the last step each particle gets hard data
consistency, the minimum change that fits the data: ``x <- x + d`` with ``d`` from ``dc_iterations`` conjugate
gradient steps on ``A^H A d = A^H (y - A x)`` from 0. For single-coil Cartesian MRI and inpainting ``A^H A`` is a
projection and one step pastes the measured k-space lines (pixels) into each particle, the reference's rule; for
SENSE it is the least-squares correction of the measured lines.

Selection schedule. The reference measures one line per selection at steps ``k * interval`` inside a window
``[s0, s1)`` of 10,000 steps (``[50, 2500)``, 31 selections, interval 79). Here the window is given as fractions of
``steps`` (``window_start=0.005``, ``window_end=0.25``, the reference's 50 / 10,000 and 2,500 / 10,000) and the
``budget - |initial mask|`` choices are spread evenly over it; when there are more choices than steps in the window
(few steps, or pixels) a selection takes the top-k scores (``k`` as even as possible over the selections), a
greedy batch the reference never needs at 10,000 steps.

Where this differs from the reference code, and why
---------------------------------------------------
* Guidance norm: the reference takes one L2 norm over the whole particle batch, so a particle's step depends on the
  other particles' residuals (and shrinks like 1 / sqrt(N)). ``guidance_norm="particle"`` (default) gives each
  particle its own DPS chain, which the paper describes; ``"ensemble"`` is the reference's.
* Output: the reference scores the mean over particles of the magnitude. ``output="mean"`` (default) returns the
  complex particle mean (the posterior-mean estimate, what every other invdiff sampler returns);
  ``output="magnitude-mean"`` returns the image whose magnitude is the mean magnitude and whose phase is the mean's
  (so ``to_image`` reproduces the reference's output).
* sigma: the reference's 50 is on its own k-space scale (images in [-1, 1], an unnormalised FFT); here k-space is
  that of normalised images (magnitude ~1) under the unitary FFT, where per-line distances between particles are
  of order 0.1 to 10, so ``sigma=1``. With the positive form sigma changes the choices little (see above).
* ``score_dc_iterations`` (default 0, the reference): the Tweedie estimates may first be made consistent with the
  lines measured so far (the same CG correction as the final data consistency) before they predict the unmeasured
  lines, so that lines the data already pin down (neighbours of measured ones, through the coil maps) stop looking
  uncertain only because the guidance has not yet pulled the particles onto the data.
* ``score_lookahead`` (default 0, the reference): the particles may be scored on where they end, not on their
  Tweedie estimates. A Tweedie estimate at sigma >> sigma_data is the posterior mean given the noisy state, smooth by
  construction, so its spread across particles sits at low frequencies and the score favours the lines next to the
  centre block. With ``score_lookahead = K`` each particle's state is carried by K deterministic DDIM steps (Karras
  grid, sigma_t -> sigma_min, then the Tweedie estimate at sigma_min; no guidance, the data-consistency correction of
  ``score_dc_iterations`` after it) to an approximate sample, whose spread includes the detail the prior would still
  add; K x N extra forward passes (no backward) per selection step. Measured on the MRI tuning slices with K = 3: the
  same lines' quality as K = 0 (within 0.04 dB) at 1.9x the forward passes, so it stays off
  (``benchmarks/results/active_mri-2026-12-05-cpu-tuning-set.md``).
* Weighted particles: ``weights="likelihood"`` weights the particles' mixture by ``exp(-||A x0_i - y||^2 /
  (2 sigma_y^2))`` on the data measured so far (the importance weights of the Tweedie estimates); the SMC sampler
  itself (:mod:`invdiff.samplers.smc`) runs to t = 0 on fixed data and cannot take new lines mid-run, so its
  particles are not used here.

Data. The sampler never reads a line it did not choose: it calls ``problem.acquisition(mask)`` (retrospectively,
:class:`invdiff.tasks.scan.RetrospectiveAcquisition`) with the current mask after each selection and uses what comes
back as the new ``y``.

    >>> result = sample_ads(task_image.problem, prior, budget=32, particles=4, steps=100,
    ...                     generator=torch.Generator().manual_seed(0))
    >>> result.diagnostics["mask"], result.diagnostics["acquisition_order"]     # bool (W,), [column, ...]
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from invdiff.errors import InputError, UnsupportedOperatorError
from invdiff.operators.base import conjugate_gradient
from invdiff.operators.inpainting import Inpainting
from invdiff.operators.mri import CartesianMRI, SenseMRI
from invdiff.problem import InverseProblem
from invdiff.registry import register_solver
from invdiff.samplers._common import (NetworkCalls, SampleResult, call_prior, expand_sigma, notify, randn_like,
                                      sigma_schedule, timed, trajectory_of)

log = logging.getLogger(__name__)

EXPONENTS = ("positive", "negative")
GUIDANCE_NORMS = ("particle", "ensemble")
WEIGHTINGS = ("uniform", "likelihood")
OUTPUTS = ("mean", "magnitude-mean")


# ---- the score: pure float64 math ----------------------------------------------------------------------------
def pairwise_squared_distances(predictions: torch.Tensor) -> torch.Tensor:
    """``d2_ij(l) = sum_k |Y_i[k, l] - Y_j[k, l]|^2`` in float64.

    predictions: (N, K, L) real, particle i's prediction of candidate l's K entries -> (N, N, L) float64, >= 0.
    Computed as ``|Y_i|^2 + |Y_j|^2 - 2 <Y_i, Y_j>`` per candidate (one matrix product instead of N^2 differences);
    float64 keeps the cancellation far below any difference that matters.
    """
    y = predictions.to(torch.float64)
    gram = torch.einsum("ikl,jkl->ijl", y, y)
    energy = torch.diagonal(gram, dim1=0, dim2=1).transpose(0, 1)            # (N, L)
    return (energy[:, None, :] + energy[None, :, :] - 2 * gram).clamp_min(0.0)


def mixture_entropy_scores(d2: torch.Tensor, sigma: float, *, exponent: str = "positive",
                           weights: torch.Tensor | None = None) -> torch.Tensor:
    """Score of every candidate, ``+-sum_j N w_j logsumexp_i(log(N w_i) +- d2_ij / (2 sigma^2))``: (L,) float64.

    d2: (N, N, L) pairwise squared distances (:func:`pairwise_squared_distances`); exponent "positive" (the
    reference code) or "negative" (Kolchinsky-Tracey); weights: (N,) mixture weights (normalised here), None for
    ``1 / N`` (then ``N w = 1`` and this is exactly the reference formula).
    """
    if exponent not in EXPONENTS:
        raise ValueError(f"exponent must be one of {', '.join(EXPONENTS)}; got {exponent!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    d2 = d2.to(torch.float64)
    n = d2.shape[0]
    sign = 1.0 if exponent == "positive" else -1.0
    if weights is None:
        log_nw = torch.zeros(n, dtype=torch.float64, device=d2.device)
    else:
        w = weights.to(torch.float64)
        log_nw = torch.log(w / w.sum()) + math.log(n)
    # axis 0 is i (the mixture component), axis 1 is j (the point the entropy is evaluated at)
    inner = torch.logsumexp(log_nw[:, None, None] + sign * d2 / (2 * sigma ** 2), dim=0)   # (N_j, L)
    return sign * (log_nw.exp()[:, None] * inner).sum(dim=0)


# ---- what a candidate is: a k-space column or an image pixel (patch) ----------------------------------------
@dataclasses.dataclass
class _Candidates:
    """How the operator's mask maps to candidates: ``predict(x0) -> (N, K, L)``, ``to_mask(chosen) -> mask``."""

    kind: str                      # "column" | "pixel"
    shape: tuple[int, ...]         # the candidate grid: (W,) columns, (H / p, W / p) patches
    patch: int
    full: object                   # the operator measuring every candidate

    def predict(self, x0: torch.Tensor) -> torch.Tensor:
        predicted = self.full.A(x0)
        n = predicted.shape[0]
        if self.kind == "column":                    # (N, 2, [C,] H, W) -> (N, K, W)
            return predicted.reshape(n, -1, predicted.shape[-1])
        h, w = predicted.shape[-2:]                  # (N, C, H, W) -> (N, C p^2, H / p * W / p)
        p = self.patch
        blocks = predicted.reshape(n, -1, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
        return blocks.reshape(n, -1, (h // p) * (w // p))

    def taken(self, mask: torch.Tensor) -> torch.Tensor:
        """Candidates already measured: bool (L,). A patch counts as measured once all its pixels are."""
        if self.kind == "column":
            return mask.reshape(-1).clone()
        grid = mask.reshape(mask.shape[-2:])
        p = self.patch
        return grid.reshape(self.shape[0], p, self.shape[1], p).all(dim=3).all(dim=1).reshape(-1)

    def add(self, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """``mask`` with candidates ``chosen`` (indices into the flat grid) measured; a new tensor."""
        if self.kind == "column":
            new = mask.clone()
            new[chosen] = True
            return new
        p = self.patch
        grid = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=mask.device)
        grid[chosen] = True
        pixels = grid.reshape(self.shape).repeat_interleave(p, 0).repeat_interleave(p, 1)
        return mask | pixels.reshape(mask.shape[-2:]).expand_as(mask)


def _candidates(operator, patch: int) -> _Candidates:
    if isinstance(operator, (CartesianMRI, SenseMRI)):
        if operator.mask.ndim != 1:
            raise UnsupportedOperatorError(f"ads: selects k-space columns and needs a column mask (W,); the "
                                           f"operator's mask has shape {tuple(operator.mask.shape)}")
        width = operator.mask.shape[0]
        full = operator.replace(mask=torch.ones(width, dtype=torch.bool, device=operator.mask.device))
        return _Candidates("column", (width,), 1, full)
    if isinstance(operator, Inpainting):
        if operator.mask.shape[0] != 1 or operator.mask.shape[1] != 1:
            raise UnsupportedOperatorError(f"ads: pixel selection needs one (1, 1, H, W) mask shared by the "
                                           f"channels; got {tuple(operator.mask.shape)}")
        h, w = operator.mask.shape[-2:]
        if h % patch or w % patch:
            raise InputError(f"ads: patch={patch} does not divide the image size {h} x {w}")
        full = operator.replace(mask=torch.ones_like(operator.mask))
        return _Candidates("pixel", (h // patch, w // patch), patch, full)
    raise UnsupportedOperatorError(f"ads: selects k-space columns (CartesianMRI, SenseMRI) or pixels (Inpainting); "
                                   f"{type(operator).__name__} has neither")


def selection_schedule(steps: int, choices: int, window_start: float, window_end: float) -> list[tuple[int, int]]:
    """``[(step, how many candidates to acquire), ...]``: ``choices`` spread evenly over the steps in
    ``[round(window_start * steps), round(window_end * steps))`` (at least one step), as even as possible."""
    if choices <= 0:
        return []
    first = min(int(round(window_start * steps)), steps - 1)
    last = max(int(round(window_end * steps)), first + 1)
    available = list(range(first, min(last, steps)))
    count = min(choices, len(available))
    # evenly spaced selection steps inside the window, as the reference's k * interval
    positions = sorted({available[int(k * len(available) / count)] for k in range(count)})
    base, extra = divmod(choices, len(positions))
    return [(step, base + (1 if k < extra else 0)) for k, step in enumerate(positions)]


class RetrospectivePixels:
    """``measure(mask) -> y`` for inpainting from a fully observed image: ``y_full`` where ``mask``, exact zeros
    elsewhere, in the problem's units. The pixel counterpart of :class:`invdiff.tasks.scan.RetrospectiveAcquisition`:
    it keeps every mask it was asked for in ``requests``.

    y_full: (1, C, H, W), the measurement of every pixel (noise included); mask: (H, W) or (1, 1, H, W) bool.
    """

    def __init__(self, y_full: torch.Tensor):
        self._y_full = y_full
        self.requests: list[torch.Tensor] = []

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self._y_full.device)
        if tuple(mask.shape[-2:]) != tuple(self._y_full.shape[-2:]):
            raise InputError(f"acquisition: mask of shape {tuple(mask.shape)} does not fit images "
                             f"{tuple(self._y_full.shape[-2:])}")
        self.requests.append(mask.detach().cpu().clone())
        return torch.where(mask, self._y_full, torch.zeros((), dtype=self._y_full.dtype, device=mask.device))


# ---- the sampler -----------------------------------------------------------------------------------------
def _check_arguments(steps, particles, window_start, window_end, sigma, guidance, exponent, guidance_norm, weights,
                     output, dc_iterations, score_dc_iterations, score_lookahead, patch) -> None:
    if int(steps) != steps or steps < 1:
        raise InputError(f"ads: steps must be a positive integer, got {steps!r}")
    if int(particles) != particles or particles < 2:
        raise InputError(f"ads: particles must be an integer >= 2 (the score needs disagreement), got {particles!r}")
    if not 0 <= window_start < window_end <= 1:
        raise InputError(f"ads: need 0 <= window_start < window_end <= 1 (fractions of steps), got "
                         f"{window_start!r}, {window_end!r}")
    if not sigma > 0:
        raise InputError(f"ads: sigma must be > 0, got {sigma!r}")
    if not guidance >= 0:
        raise InputError(f"ads: guidance must be >= 0, got {guidance!r}")
    for name, value, allowed in (("exponent", exponent, EXPONENTS), ("guidance_norm", guidance_norm, GUIDANCE_NORMS),
                                 ("weights", weights, WEIGHTINGS), ("output", output, OUTPUTS)):
        if value not in allowed:
            raise InputError(f"ads: {name} must be one of {', '.join(allowed)}; got {value!r}")
    if int(dc_iterations) != dc_iterations or dc_iterations < 0:
        raise InputError(f"ads: dc_iterations must be an integer >= 0, got {dc_iterations!r}")
    if int(score_dc_iterations) != score_dc_iterations or score_dc_iterations < 0:
        raise InputError(f"ads: score_dc_iterations must be an integer >= 0, got {score_dc_iterations!r}")
    if int(score_lookahead) != score_lookahead or score_lookahead < 0:
        raise InputError(f"ads: score_lookahead must be an integer >= 0, got {score_lookahead!r}")
    if int(patch) != patch or patch < 1:
        raise InputError(f"ads: patch must be a positive integer, got {patch!r}")


def _residual_norms(y: torch.Tensor, operator, x0_hat: torch.Tensor, guidance_norm: str) -> torch.Tensor:
    """``||y - A x0_i||`` per particle (N,), or the one norm over the whole ensemble (the reference), (1,)."""
    residual = (y - operator.A(x0_hat)).reshape(x0_hat.shape[0], -1)
    if guidance_norm == "ensemble":
        return torch.linalg.vector_norm(residual).reshape(1)
    return torch.linalg.vector_norm(residual, dim=1)


def _data_consistency(x: torch.Tensor, operator, y: torch.Tensor, iterations: int) -> torch.Tensor:
    """``x + d``, ``d`` from CG on ``A^H A d = A^H (y - A x)`` started at 0 (a paste for projections)."""
    if iterations == 0:
        return x
    rhs = operator.A_adjoint(y - operator.A(x))
    normal = getattr(operator, "A_adjoint_A", None) or (lambda v: operator.A_adjoint(operator.A(v)))
    # stop at the dtype's resolution: past it CG on a projection (Cartesian, inpainting) divides rounding by rounding
    tol = 1e-5 if x.dtype == torch.float32 else 1e-12
    return x + conjugate_gradient(normal, rhs, max_iter=iterations, tol=tol)


def _lookahead(prior, x: torch.Tensor, x0_hat: torch.Tensor, sigma_t: float, sigma_min: float, steps: int,
               calls: NetworkCalls) -> torch.Tensor:
    """Where deterministic DDIM (eta = 0) carries ``x`` at ``sigma_t`` (Tweedie estimate ``x0_hat``) in ``steps``
    more network passes: the Tweedie estimate at the end of the Karras grid ``sigma_t -> sigma_min`` (no guidance)."""
    from invdiff.schedules import karras

    if not sigma_t > sigma_min:
        return x0_hat
    grid = karras(steps + 1, sigma_min, sigma_t, append_zero=False).tolist()        # sigma_t, ..., sigma_min
    x0 = x0_hat
    for current, following in zip(grid[:-1], grid[1:]):
        x = x0 + (following / current) * (x - x0)                                      # DDIM step to `following`
        x0 = call_prior(prior, x, expand_sigma(following, x), calls)
    return x0


@register_solver("ads", kind="diffusion")
def sample_ads(problem: InverseProblem, prior, *, budget: int | None = None, particles: int = 16,
               steps: int = 100, window_start: float = 0.005, window_end: float = 0.25, sigma: float = 1.0,
               guidance: float = 0.85, exponent: str = "positive", guidance_norm: str = "particle",
               weights: str = "uniform", output: str = "mean", dc_iterations: int = 1, score_dc_iterations: int = 0,
               score_lookahead: int = 0, patch: int = 1,
               sigma_max: float | None = None, sigma_min: float | None = None,
               generator=None, callback=None) -> SampleResult:
    """Active Diffusion Subsampling: choose and measure k-space columns (or pixels) while sampling with particles.

    problem: one image (batch 1) with ``problem.acquisition`` (``measure(mask) -> y``, see
    :class:`invdiff.problem.InverseProblem`); its operator's mask is the start (e.g. the calibration lines).
    budget: candidates measured in the end, the start included (MRI: columns; inpainting: pixels, or patches of
    ``patch`` x ``patch`` pixels counted in pixels); None: a quarter of them (the paper's 32 of 128 lines).
    particles: N; steps: DDIM steps (Karras grid, rho 7, sigma_max -> sigma_min -> 0, the prior's by default);
    window_start / window_end: the acquisition window as fractions of the steps; sigma: mixture width in the
    problem's (normalised) units; guidance: DPS weight; exponent: "positive" (reference) or "negative"
    (Kolchinsky-Tracey); guidance_norm: "particle" or "ensemble" (reference); weights: "uniform" or "likelihood";
    output: "mean" or "magnitude-mean" (reference); dc_iterations: CG steps of the final hard data consistency
    (0: none; 1 pastes for Cartesian MRI and inpainting); score_dc_iterations: the same correction applied to the
    Tweedie estimates before they are scored (0: the reference); score_lookahead: deterministic DDIM steps that
    carry each particle to an approximate sample before scoring (0: score the Tweedie estimates, the reference).
    The module docstring derives all of it.

    Returns ``SampleResult(x (1, C, H, W), samples (N, 1, C, H, W))`` with diagnostics ``mask`` (bool, the final
    mask: (W,) columns or (H, W) pixels, on the CPU), ``initial_mask``, ``acquisition_order`` (candidate indices in
    the order measured; pixels and patches as flat indices of the candidate grid), ``selection_steps``,
    ``scores`` (per selection, the score of every candidate, NaN where not selectable), ``chosen_scores``, ``nfe``
    (batched network calls = steps, plus score_lookahead per selection step), ``particle_evaluations`` (= nfe x N
    forward passes), ``backward_passes`` (= steps, batched),
    ``acquisitions`` (calls to ``problem.acquisition``), ``seconds``, ``network_seconds``.
    """
    _check_arguments(steps, particles, window_start, window_end, sigma, guidance, exponent, guidance_norm, weights,
                     output, dc_iterations, score_dc_iterations, score_lookahead, patch)
    if problem.acquisition is None:
        raise InputError("ads: the problem has no acquisition (measure(mask) -> y): ADS chooses which lines to "
                         "measure, so it needs a fully sampled scan (retrospective) or a scanner to ask; "
                         "a test-set file or an undersampled scan cannot provide new lines")
    if problem.y.shape[0] != 1:
        raise InputError(f"ads: acquires for one image at a time; got a batch of {problem.y.shape[0]}")
    steps, particles, patch = int(steps), int(particles), int(patch)
    operator, y = problem.operator, problem.y
    candidates = _candidates(operator, patch)
    mask = operator.mask.clone()
    total = int(math.prod(candidates.shape))
    unit = patch * patch if candidates.kind == "pixel" else 1        # budget counts pixels for inpainting
    measured = int(candidates.taken(mask).sum())
    target = total // 4 if budget is None else int(budget) // unit
    if target > total:
        raise InputError(f"ads: budget {budget} exceeds the {total * unit} candidates of the operator")
    choices = max(0, target - measured)
    if budget is not None and target < measured:
        log.warning("ads: budget %s is below the %d candidates already measured; nothing to choose", budget, measured)
    acquirable = getattr(problem.acquisition, "acquirable", None)
    selectable_everywhere = (torch.ones(total, dtype=torch.bool) if acquirable is None
                             else torch.as_tensor(acquirable, dtype=torch.bool).reshape(-1).cpu())
    schedule = dict(selection_schedule(steps, choices, window_start, window_end))

    dtype = torch.promote_types(y.dtype, torch.float32)
    with timed(y) as wall:
        calls = NetworkCalls()
        like = torch.empty((particles, *operator.in_shape), dtype=dtype, device=y.device)
        sigmas = sigma_schedule(prior, steps, sigma_min, sigma_max, like)                    # (steps + 1,), ends at 0
        x = sigmas[0] * randn_like(like, generator)
        order: list[int] = []
        selection_steps, scores_record, chosen_scores = [], [], []
        acquisitions = 0
        for i, (sigma_t, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                x0_hat = call_prior(prior, x, expand_sigma(sigma_t, x), calls)             # Tweedie, Eq. 4
                if i in schedule:                                                          # Alg. 1: select
                    with torch.no_grad():
                        # optionally the Tweedie estimates made consistent with the lines measured so far (not the reference)
                        ends = x0_hat.detach()
                        if score_lookahead:
                            ends = _lookahead(prior, x.detach(), ends, float(sigma_t), float(sigmas[-2]),
                                              int(score_lookahead), calls)
                        scored = _data_consistency(ends, operator, y.expand(particles, *y.shape[1:]),
                                                   int(score_dc_iterations))
                        predictions = candidates.predict(scored)
                        mixture = None
                        if weights == "likelihood":
                            residual = (y - operator.A(x0_hat.detach())).reshape(particles, -1).to(torch.float64)
                            mixture = torch.softmax(-residual.square().sum(1) / (2 * float(problem.sigma_y) ** 2), 0)
                        score = mixture_entropy_scores(pairwise_squared_distances(predictions), sigma,
                                                       exponent=exponent, weights=mixture).cpu()
                    selectable = selectable_everywhere & ~candidates.taken(mask).cpu()
                    if not torch.isfinite(score[selectable]).all():
                        raise FloatingPointError(f"ads: non-finite scores at step {i} (particles diverged?)")
                    score = torch.where(selectable, score, torch.tensor(float("nan"), dtype=score.dtype))
                    k = min(schedule[i], int(selectable.sum()))
                    if k > 0:
                        chosen = torch.topk(torch.nan_to_num(score, nan=-math.inf), k).indices
                        mask = candidates.add(mask, chosen.to(mask.device))
                        y = problem.acquisition(mask).to(dtype=y.dtype, device=y.device)   # only the chosen lines
                        operator = operator.replace(mask=mask)
                        acquisitions += 1
                        order.extend(int(c) for c in chosen)
                        chosen_scores.extend(float(score[c]) for c in chosen)
                    selection_steps.append(i)
                    scores_record.append(score.tolist())
                norms = _residual_norms(y, operator, x0_hat, guidance_norm)
                (grad,) = torch.autograd.grad(norms.sum(), x)                              # grad ||y - A x0_hat||
            x, x0_hat = x.detach(), x0_hat.detach()
            x = x0_hat + (sigma_next / sigma_t) * (x - x0_hat)                             # DDIM, eta = 0
            x = x - guidance * torch.sqrt((1 + sigma_t ** 2) * (1 + sigma_next ** 2)) * grad   # DPS, Eq. 7
            notify(callback, i, steps, {"x": x0_hat.mean(0, keepdim=True), "sigma": sigma_t, "particles": x,
                                        "mask": mask, "residual_norm": norms.detach()})
        with torch.no_grad():
            x = _data_consistency(x, operator, y.expand(particles, *y.shape[1:]), int(dc_iterations))
            estimate = x.mean(0, keepdim=True)
            if output == "magnitude-mean":
                if x.shape[1] != 2:
                    raise InputError(f"ads: output='magnitude-mean' needs complex (2-channel) images, got C = {x.shape[1]}")
                magnitude = torch.linalg.vector_norm(x, dim=1, keepdim=True).mean(0, keepdim=True)
                phase = estimate / torch.linalg.vector_norm(estimate, dim=1, keepdim=True).clamp_min(1e-12)
                estimate = magnitude * phase
    final_mask = mask.detach().cpu()
    if candidates.kind == "pixel":
        final_mask = final_mask.reshape(final_mask.shape[-2:])
    initial_mask = problem.operator.mask.detach().cpu()
    diagnostics = {
        "nfe": calls.nfe, "particle_evaluations": calls.nfe * particles, "backward_passes": steps,
        "seconds": wall.seconds, "network_seconds": calls.seconds, "steps": steps, "particles": particles,
        "budget": budget, "candidate": candidates.kind, "patch": patch,
        "mask": final_mask, "initial_mask": initial_mask.reshape(final_mask.shape),
        "acquisition_order": order, "selection_steps": selection_steps, "scores": scores_record,
        "chosen_scores": chosen_scores, "acquisitions": acquisitions, "sigma": sigma, "exponent": exponent,
        "guidance": guidance, "guidance_norm": guidance_norm, "score_dc_iterations": score_dc_iterations,
        "score_lookahead": score_lookahead,
        "weights": weights, "output": output,
        "window": [window_start, window_end], "sigmas": sigmas.tolist(),
    }
    log.debug("ads: %d steps x %d particles, %d candidates chosen in %d acquisitions, %.1f s", steps, particles,
              len(order), acquisitions, wall.seconds)
    return SampleResult(x=estimate.detach(), diagnostics=diagnostics, samples=x.detach()[:, None],
                        trajectory=trajectory_of(callback))


__all__ = ["sample_ads", "RetrospectivePixels", "pairwise_squared_distances", "mixture_entropy_scores", "selection_schedule"]
