"""Unconditional samples from a prior (EDM's deterministic Heun sampler), for looking at what it learned.

The sampler starts at ``sigma_max = min(prior.sigma_max, SIGMA_MAX_PER_SIGMA_DATA * sigma_data)`` when the prior
has a ``sigma_data``: at 20 data standard deviations the noisy marginal is N(mean, sigma^2 + sd^2) ~ N(0, sigma^2)
to 0.25 % in variance, so starting higher (80, EDM's choice for data of std 0.5 in [-1, 1]) spends the first
third of Karras' steps on noise that has not yet met the data.

    >>> x = sample_unconditional(prior, n=8, size=64, steps=40, generator=torch.Generator().manual_seed(0))
    >>> save_sample_grid(x, "samples.png")
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from invdiff.io import atomic_path
from invdiff.schedules import karras

SIGMA_MAX_PER_SIGMA_DATA = 20.0


def default_sigma_max(prior) -> float:
    """``min(prior.sigma_max, 20 sigma_data)`` for priors with a ``sigma_data``, else ``prior.sigma_max``."""
    sigma_data = getattr(prior, "sigma_data", None)
    if not sigma_data:
        return float(prior.sigma_max)
    return float(min(prior.sigma_max, SIGMA_MAX_PER_SIGMA_DATA * sigma_data))


@torch.no_grad()
def sample_unconditional(prior, n: int, size, steps: int = 40, generator: torch.Generator | None = None, *,
                         sigma_min: float | None = None, sigma_max: float | None = None,
                         rho: float = 7.0, spacing_mm: float | None = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 (Heun, 2nd order) on ``dx/dsigma = (x - D(x, sigma)) / sigma``.

    size: int or (H, W). Returns (n, C, H, W) float32 on the prior's device. ``2 steps - 1`` evaluations of D.
    sigma_max: default :func:`default_sigma_max`. spacing_mm: pixel spacing for a spacing-conditioned prior
    (``prior.at_spacing``; None: its default).
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"need n >= 1 and a positive size, got n={n}, size={size}")
    sigma_min = prior.sigma_min if sigma_min is None else sigma_min
    sigma_max = default_sigma_max(prior) if sigma_max is None else sigma_max
    if hasattr(prior, "at_spacing"):
        prior = prior.at_spacing(spacing_mm)
    sigmas = karras(steps, sigma_min, sigma_max, rho)                        # float64, ends with 0
    device = next((p.device for p in prior.parameters()), torch.device("cpu"))
    x = torch.randn(n, prior.channels, h, w, generator=generator, dtype=torch.float64) * sigmas[0]
    x = x.to(device)

    def denoise(x_t, sigma):
        x0_hat = prior(x_t.to(prior.dtype), sigma.expand(n).to(device=device, dtype=prior.dtype))
        return x0_hat.to(x_t.dtype)

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, sigma)) / sigma                                   # Alg. 1 line 4
        x_next = x + (sigma_next - sigma) * d                                 # Euler step, line 5
        if sigma_next > 0:                                                    # 2nd-order correction, lines 6-8
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x.float()


def save_sample_grid(samples: torch.Tensor, path, *, ncols: int | None = None, title: str | None = None) -> Path:
    """Save (N, C, H, W) samples as a grayscale grid PNG: the channel for C = 1, the magnitude sqrt(re^2 + im^2)
    for C = 2. Each image uses the common range [0, 99.5th percentile of all images]: images are non-negative
    intensities, so small negative values of a sample (noise around air) show as black, not grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if samples.ndim != 4 or samples.shape[1] not in (1, 2):
        raise ValueError(f"samples must be (N, 1|2, H, W), got shape {tuple(samples.shape)}")
    images = samples.detach().float().cpu()
    images = images[:, 0] if images.shape[1] == 1 else images.norm(dim=1)
    vmax = float(torch.quantile(images.abs().flatten(), 0.995)) or 1.0
    vmin = 0.0
    n = images.shape[0]
    ncols = ncols or min(n, 8)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows + (0.3 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(image.numpy(), cmap="gray", vmin=vmin, vmax=vmax)
    if title:
        fig.suptitle(title)
    fig.tight_layout(pad=0.4, h_pad=0.4, w_pad=0.4)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
