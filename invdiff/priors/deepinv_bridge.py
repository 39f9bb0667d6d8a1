"""Bridges between invdiff priors and deepinv denoisers, so either library's code can run the other's network.

Both sides are minimum-mean-squared-error Gaussian denoisers, ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` with
``n ~ N(0, I)`` per entry; they differ only in the value range of ``x0`` and in how ``sigma`` is passed:

=================  ===============================================  ==============================================
                   invdiff prior (EDM convention)                   deepinv ``Denoiser``
=================  ===============================================  ==============================================
images ``x``       the prior's training range (shipped priors:      ``[0, 1]`` (deepinv's documented convention;
                   magnitude / CT images normalised to ``~[0, 1]``, its diffusion samplers map their ``[-1, 1]``
                   complex MRI as C = 2 channels in ``~[-1, 1]``)   state to ``[0, 1]`` before calling it)
``sigma``          tensor ``(B,)``, same units as ``x``              float, 0-d tensor, ``(B,)``, ``(B, 1, ..., 1)``
                                                                    or a list, same units as ``x``
dtype              ``prior.dtype`` (callers cast at the boundary)   whatever the caller passes
=================  ===============================================  ==============================================

With the affine map ``x_invdiff = scale * x_deepinv + shift`` between the two ranges, noise scales by ``scale``
too, and because conditional expectation commutes with affine maps the conversion is *exact*::

    D_deepinv(u, s) = (D_invdiff(scale * u + shift, scale * s) - shift) / scale
    D_invdiff(x, sigma) = scale * D_deepinv((x - shift) / scale, sigma / scale) + shift

The default ``scale = 1, shift = 0`` is right for invdiff's shipped priors (trained on images normalised to
``~[0, 1]``, deepinv's range); a prior trained on ``[-1, 1]`` data takes ``scale = 2, shift = -1``.

    >>> denoiser = as_deepinv_denoiser(prior)                     # a deepinv.models.Denoiser
    >>> denoiser(x01, 0.1).shape == x01.shape                      # float sigma, [0, 1] images
    >>> prior_back = as_invdiff_prior(deepinv_net, sigma_max=1.0)  # e.g. a DRUNet with local weights
"""
from __future__ import annotations

import math

import torch
from deepinv.models import Denoiser as DeepinvDenoiserBase

from invdiff.priors.base import Denoiser


def _check_affine(scale: float, shift: float) -> tuple[float, float]:
    scale, shift = float(scale), float(shift)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 (x_invdiff = scale * x_deepinv + shift), got {scale!r}")
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite, got {shift!r}")
    return scale, shift


def deepinv_sigma_to_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """Any sigma deepinv may pass (float, int, 0-d, (1,), (B,), (B, 1, ..., 1), list) -> (B,) on x's device/dtype."""
    batch = x.shape[0]
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 1:
        if sigma.numel() not in (1, batch):
            raise ValueError(f"sigma must hold 1 or {batch} (batch size) values, got shape {tuple(sigma.shape)}")
        sigma = sigma.reshape(-1)
    sigma = DeepinvDenoiserBase._handle_sigma(sigma, batch_size=batch, dtype=x.dtype, device=x.device)
    return sigma.reshape(batch)


class PriorAsDeepinvDenoiser(DeepinvDenoiserBase):
    """An invdiff prior seen as a deepinv denoiser: ``D_deepinv(u, s) = (D(scale u + shift, scale s) - shift) / scale``.

    x: (B, C, H, W) real in deepinv's range; sigma: anything :func:`deepinv_sigma_to_batch` accepts, in the
    same units as x. The prior runs in ``prior.dtype``; the output has x's dtype and is differentiable in x
    (deepinv's DPS backpropagates through it). Extra keyword arguments deepinv passes are ignored.
    """

    def __init__(self, prior: Denoiser, *, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.prior = prior
        self.scale, self.shift = _check_affine(scale, shift)

    def forward(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        sigma_batch = deepinv_sigma_to_batch(sigma, x)
        dtype = self.prior.dtype
        x_prior = (self.scale * x + self.shift).to(dtype)
        x0_hat = self.prior(x_prior, (self.scale * sigma_batch).to(dtype))
        return ((x0_hat - self.shift) / self.scale).to(x.dtype)


class DeepinvDenoiserAsPrior(Denoiser):
    """A deepinv denoiser d as an invdiff prior: ``D(x, sigma) = scale d((x - shift) / scale, sigma / scale) + shift``.

    x: (B, C, H, W); sigma: (B,) (or a scalar), in invdiff units. ``sigma_min``, ``sigma_max`` (invdiff units),
    ``channels`` and ``image_size`` describe the range the network was trained for; deepinv denoisers such
    as DRUNet are trained up to sigma ~ 0.2-0.4 on [0, 1] images, far below EDM's 80, so say so here.
    """

    def __init__(self, denoiser: torch.nn.Module, *, sigma_min: float, sigma_max: float, channels: int,
                 image_size: tuple[int, int] | None = None, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.denoiser = denoiser
        self.scale, self.shift = _check_affine(scale, shift)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.channels, self.image_size = channels, image_size

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        x0_hat = self.denoiser((x - self.shift) / self.scale, sigma / self.scale)
        return self.scale * x0_hat + self.shift


def as_deepinv_denoiser(prior: Denoiser, *, scale: float = 1.0, shift: float = 0.0) -> DeepinvDenoiserBase:
    """Wrap an invdiff prior for deepinv (``x_invdiff = scale * x_deepinv + shift``); unwraps a bridged deepinv net."""
    if isinstance(prior, DeepinvDenoiserAsPrior) and (prior.scale, prior.shift) == _check_affine(scale, shift):
        return prior.denoiser
    return PriorAsDeepinvDenoiser(prior, scale=scale, shift=shift)


def as_invdiff_prior(denoiser: torch.nn.Module, *, sigma_min: float, sigma_max: float, channels: int,
                     image_size: tuple[int, int] | None = None, scale: float = 1.0,
                     shift: float = 0.0) -> Denoiser:
    """Wrap a deepinv denoiser ``d(u, s)`` as an invdiff prior (the reverse of :func:`as_deepinv_denoiser`).

    Never downloads: build the deepinv network with ``pretrained=None`` or a local checkpoint path first.
    """
    if isinstance(denoiser, PriorAsDeepinvDenoiser) and (denoiser.scale, denoiser.shift) == _check_affine(scale, shift):
        return denoiser.prior
    return DeepinvDenoiserAsPrior(denoiser, sigma_min=sigma_min, sigma_max=sigma_max, channels=channels,
                                  image_size=image_size, scale=scale, shift=shift)


__all__ = ["as_deepinv_denoiser", "as_invdiff_prior", "PriorAsDeepinvDenoiser", "DeepinvDenoiserAsPrior",
           "deepinv_sigma_to_batch"]
