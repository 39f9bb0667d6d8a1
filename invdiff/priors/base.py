"""The prior protocol: a denoiser ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` in the EDM convention.

Every sampler talks to a prior only through this protocol. Variance-preserving models (DDPM/ADM epsilon
networks) are wrapped by an adapter (``invdiff.priors.adapters``) that converts ``x_vp = x / sqrt(1 + sigma^2)``;
samplers never special-case them.
"""
from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    """Base class of every prior.

    Subclasses implement :meth:`forward` ``(x: (B, C, H, W), sigma: (B,)) -> x0_hat (B, C, H, W)`` and set
    ``sigma_min``, ``sigma_max``, ``channels`` and ``image_size`` (``None`` for fully convolutional priors
    that run at any size). ``dtype`` is the dtype the network wants its input in; callers cast at the
    boundary: ``prior(x.to(prior.dtype), sigma.to(prior.dtype)).to(x.dtype)``.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    channels: int = 1
    image_size: tuple[int, int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.float32

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, sigma)")

    def at_spacing(self, spacing_mm: float | None) -> "Denoiser":
        """This prior at pixel spacing ``spacing_mm`` (mm per pixel; None: the prior's documented default).

        Priors that take the spacing as conditioning return a view that passes it at every call; the default
        (every prior without that conditioning) ignores it and returns ``self``.
        """
        return self

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie)."""
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return (self(x, sigma) - x) / sigma_b ** 2


def as_sigma_batch(sigma, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Turn a float, 0-d or (B,) sigma into a (B,) tensor on ``like``'s device and dtype."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(sigma.shape)}")
    return sigma


class SliceDenoiser(Denoiser):
    """Apply a 2-D prior to a volume ``(B, C, D, H, W)`` slice by slice along ``D``, ``chunk`` slices at a time.

    Each slice gets the volume's sigma; chunking bounds memory for long volumes (DiffusionMBIR / DDS style).
    """

    def __init__(self, prior: Denoiser, chunk: int = 16):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.prior = prior
        self.chunk = chunk
        self.sigma_min, self.sigma_max = prior.sigma_min, prior.sigma_max
        self.channels, self.image_size = prior.channels, prior.image_size

    def at_spacing(self, spacing_mm: float | None) -> "SliceDenoiser":
        """The same slice-wise prior with the 2-D prior at ``spacing_mm`` (in-plane spacing); ``self`` if unchanged."""
        inner = self.prior.at_spacing(spacing_mm)
        return self if inner is self.prior else SliceDenoiser(inner, chunk=self.chunk)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"SliceDenoiser expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        sigmas = sigma.repeat_interleave(d)
        out = torch.cat([self.prior(slices[i:i + self.chunk], sigmas[i:i + self.chunk])
                         for i in range(0, b * d, self.chunk)])
        return out.reshape(b, d, c, h, w).permute(0, 2, 1, 3, 4)
