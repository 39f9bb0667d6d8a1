"""Gaussian blur ``y = g_sigma * x``: a user operator, written as a plugin, that needs only the public API.

Two boundary models:

- ``circular``: periodic convolution, diagonal in Fourier (``A = F^H diag(g_hat) F``): the kernel is
  symmetric, so ``g_hat`` is real and ``A^T = A``; the pseudo-inverse divides by ``g_hat`` where
  ``|g_hat| > rcond * max |g_hat|`` and zeroes the rest.
- ``reflect``: ``A = crop(conv(pad_reflect(x)))`` with a "valid" convolution, so the output keeps x's size.
  Its transpose is ``pad^T conv^T``: the transposed convolution, then the reflected border values are
  folded back onto the pixels they were copied from. No closed-form inverse: ``A_dagger`` is the base
  class's conjugate gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from invdiff.operators.base import Operator
from invdiff.registry import register_operator

PADDINGS = ("circular", "reflect")


def gaussian_taps(sigma: float, kernel_size: int) -> torch.Tensor:
    """Sampled Gaussian ``exp(-t^2 / (2 sigma^2))`` at ``t = -k//2 .. k//2``, normalised to sum 1 (float64)."""
    t = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    return taps / taps.sum()


def circular_spectrum(taps: torch.Tensor, size: int) -> torch.Tensor:
    """DFT of the centred kernel wrapped onto a periodic grid of ``size`` points; real since taps are symmetric."""
    wrapped = torch.zeros(size, dtype=taps.dtype)
    wrapped.index_add_(0, (torch.arange(len(taps)) - len(taps) // 2) % size, taps)
    return torch.fft.fft(wrapped).real


def reflect_indices(size: int, pad: int, device) -> torch.Tensor:
    """Source index of every padded position for reflect padding (edge not repeated, like ``F.pad``)."""
    positions = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(positions > size - 1, 2 * (size - 1) - positions, positions)


@register_operator("gaussian_blur", example=lambda: GaussianBlur((16, 20), sigma=1.5, channels=2))
class GaussianBlur(Operator):
    """Gaussian blur ``y = g_sigma * x`` with circular or reflect boundaries.

    x: (B, C, H, W) real, float32 or float64; y: same shape and dtype. kernel_size: odd, default
    ``2 ceil(3 sigma) + 1``, at most min(H, W). rcond: relative singular-value cut-off of ``A_dagger``
    (circular padding only).

    >>> op = GaussianBlur((64, 64), sigma=2.0, padding="reflect", channels=3)
    >>> op.A(torch.rand(1, 3, 64, 64)).shape
    torch.Size([1, 3, 64, 64])
    """

    def __init__(self, img_size, sigma: float, kernel_size: int | None = None, padding: str = "circular",
                 channels: int = 1, rcond: float = 1e-6):
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)[-2:]
        if len(size) != 2:
            raise ValueError(f"img_size must be H, (H, W) or (C, H, W), got {img_size!r}")
        height, width = size
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        kernel_size = 2 * math.ceil(3 * sigma) + 1 if kernel_size is None else kernel_size
        if kernel_size % 2 == 0 or not 0 < kernel_size <= min(height, width):
            raise ValueError(f"kernel_size must be odd and in [1, min(H, W) = {min(height, width)}], got {kernel_size}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.size, self.channels, self.padding, self.rcond = (height, width), channels, padding, rcond
        # circular: a non-negative kernel summing to 1 has max |g_hat| = g_hat(0) = 1. reflect: pixels near
        # the border are counted twice, so ||A|| exceeds 1 (1.014 for sigma = 1.5 on 32x40).
        self.normalized = padding == "circular"
        self.has_exact_pinv = padding == "circular"
        taps = gaussian_taps(sigma, kernel_size)
        self.register_buffer("taps", taps)
        # separable: g_hat(k_h, k_w) = g_hat_h(k_h) g_hat_w(k_w); the W axis keeps the rfft half-spectrum
        self.register_buffer("spectrum_h", circular_spectrum(taps, height))
        self.register_buffer("spectrum_w", circular_spectrum(taps, width)[: width // 2 + 1])

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    # ---- circular: diagonal in Fourier -----------------------------------------------------------
    def _fourier_multiply(self, x: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(x) * spectrum, s=self.size)

    def _spectrum(self, dtype: torch.dtype) -> torch.Tensor:
        return self.spectrum_h.to(dtype).unsqueeze(1) * self.spectrum_w.to(dtype).unsqueeze(0)

    # ---- reflect: pad -> valid convolution, and its exact transpose --------------------------------
    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = self.taps.to(x.dtype)
        channels = x.shape[1]
        return taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def _reflect_blur(self, x: torch.Tensor) -> torch.Tensor:
        pad = len(self.taps) // 2
        rows, cols = (reflect_indices(n, pad, x.device) for n in self.size)
        padded = x.index_select(-2, rows).index_select(-1, cols)
        weight_h, weight_w = self._weights(x)
        return F.conv2d(F.conv2d(padded, weight_h, groups=x.shape[1]), weight_w, groups=x.shape[1])

    def _reflect_blur_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        pad = len(self.taps) // 2
        weight_h, weight_w = self._weights(y)
        grown = F.conv_transpose2d(F.conv_transpose2d(y, weight_w, groups=y.shape[1]), weight_h, groups=y.shape[1])
        rows, cols = (reflect_indices(n, pad, y.device) for n in self.size)
        # transpose of the gather x[rows]: scatter-add every padded value back onto its source pixel
        folded = grown.new_zeros(*grown.shape[:-1], self.size[1]).index_add(-1, cols, grown)
        return folded.new_zeros(*folded.shape[:-2], *self.size).index_add(-2, rows, folded)

    # ---- the operator ---------------------------------------------------------------------------
    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        if self.padding == "circular":
            return self._fourier_multiply(x, self._spectrum(x.dtype))
        return self._reflect_blur(x)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        if self.padding == "circular":  # symmetric kernel: A^T = A
            return self._fourier_multiply(y, self._spectrum(y.dtype))
        return self._reflect_blur_adjoint(y)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """Circular: ``F^H diag(1 / g_hat) F y`` on the kept frequencies (exact); reflect: CG."""
        if self.padding != "circular":
            return super().A_dagger(y, **kwargs)
        spectrum = self._spectrum(y.dtype)
        kept = spectrum.abs() > self.rcond * spectrum.abs().max()
        inverse = torch.where(kept, 1.0 / torch.where(kept, spectrum, 1.0), 0.0)
        return self._fourier_multiply(y, inverse)
