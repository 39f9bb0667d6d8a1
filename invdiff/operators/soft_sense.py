"""Soft-SENSE: multi-coil Cartesian MRI with several ESPIRiT map sets, ``y_c = M F sum_m S_{m,c} x_m``.

Uecker et al. 2014 (ESPIRiT, "Multiple sets of maps"): where one set of sensitivities cannot explain the coil
images (an object that fills the phase-encoding field of view, whose sensitivities are not periodic across the
wrap), the eigenvalue problem has a second eigenvalue near 1 and the image is modelled as one component per map
set. With orthonormal sets per pixel (ESPIRiT's eigenvectors) the coil images' root-sum-of-squares is
``sqrt(sum_m |x_m|^2)``: :func:`combine_components` turns the components into one image on that rule.

x: (B, 2M, H, W) real, channels ``(re_1, im_1, re_2, im_2, ...)``; y: (B, 2, C, H, W) as :class:`SenseMRI`'s.
"""
from __future__ import annotations

import torch

from invdiff.operators.base import Operator
from invdiff.operators.fft import complex_to_real, fft2c, ifft2c, real_to_complex
from invdiff.operators.mri import (_NORMALISED_MAPS_TOL, CoilMapsBuffer, _as_bool_mask, _check_batch,
                                   _check_mask_fits, _check_shape, _mask_grid)
from invdiff.registry import register_operator


def _example() -> "SoftSenseMRI":
    from invdiff.operators.mri import _example_coil_maps, _example_mask

    first = _example_coil_maps(4, (16, 12))[0]                         # (C, H, W), sum_c |S_c|^2 = 1
    # a second set orthogonal to the first at every pixel: Gram-Schmidt on coil-permuted maps, zero on the left half
    other = first.roll(1, dims=0)
    other = other - (first.conj() * other).sum(0, keepdim=True) * first
    other = other / other.abs().square().sum(0, keepdim=True).sqrt()
    other[..., :6] = 0
    return SoftSenseMRI(_example_mask((16, 12)), torch.stack([first, other])[None])


@register_operator("soft_sense_mri", example=_example)
class SoftSenseMRI(CoilMapsBuffer, Operator):
    """Soft-SENSE with ``M`` map sets, ``y_c = M F sum_m S_{m,c} x_m`` for coils ``c = 1..C``.

    x: (B, 2M, H, W) real/imag per component; y: (B, 2, C, H, W), exactly +0.0 where not sampled.
    mask: bool (W,), (H, W), (B, 1, W) or (B, H, W) (as :class:`invdiff.operators.mri.SenseMRI`); coil_maps: complex
    (B|1, M, C, H, W). Adjoint ``x_m = sum_c conj(S_{m,c}) F^H M y_c``. ``op.normalized`` when every pixel's
    ``C x M`` matrix ``S(r)`` has spectral norm <= 1 (orthonormal ESPIRiT eigenvectors do).

    >>> sets = estimate_coil_map_sets(masked_kspace, calib_width=10)
    >>> op = SoftSenseMRI(mask, torch.from_numpy(sets.maps)[None])       # x: (1, 4, H, W)
    """

    has_exact_pinv = False

    def __init__(self, mask: torch.Tensor, coil_maps: torch.Tensor):
        super().__init__()
        coil_maps = self._store_coil_maps(coil_maps, "(B|1, M, C, H, W)")
        mask = _as_bool_mask(mask)
        self.img_size = (int(coil_maps.shape[-2]), int(coil_maps.shape[-1]))
        _check_mask_fits(mask, self.img_size)
        self.register_buffer("mask", mask.clone())
        # ||A||^2 = max over pixels of the largest eigenvalue of S(r)^H S(r) (M x M); orthonormal ESPIRiT sets give 1.
        per_pixel = coil_maps.to(torch.complex128).permute(0, 3, 4, 2, 1)           # (B, H, W, C, M)
        gram = per_pixel.conj().transpose(-1, -2) @ per_pixel                        # (B, H, W, M, M)
        self.normalized = bool(torch.linalg.eigvalsh(gram).max() <= 1 + _NORMALISED_MAPS_TOL)

    @property
    def num_maps(self) -> int:
        return int(self.coil_maps_ri.shape[1])

    @property
    def num_coils(self) -> int:
        return int(self.coil_maps_ri.shape[2])

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (2 * self.num_maps, *self.img_size)

    def _components(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2M, H, W) real -> (B, M, H, W) complex."""
        b = x.shape[0]
        return real_to_complex(x.reshape(b, self.num_maps, 2, *self.img_size).transpose(1, 2))

    def _apply_mask(self, kspace: torch.Tensor) -> torch.Tensor:
        grid = _mask_grid(self.mask)
        _check_batch("mask", grid.shape[0], kspace, "the input")
        return torch.where(grid[:, None], kspace, 0)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y_c = M F sum_m S_{m,c} x_m``: (B, 2M, H, W) -> (B, 2, C, H, W)."""
        _check_shape("x", x, self.in_shape)
        components = self._components(x)
        maps = self.coil_maps.to(components.dtype)
        _check_batch("coil_maps", maps.shape[0], x, "the input")
        coil_images = (maps * components[:, :, None]).sum(dim=1)                     # (B, C, H, W)
        return complex_to_real(self._apply_mask(fft2c(coil_images)))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``x_m = sum_c conj(S_{m,c}) F^H M y_c``: (B, 2, C, H, W) -> (B, 2M, H, W)."""
        _check_shape("y", y, (2, self.num_coils, *self.img_size))
        coil_images = ifft2c(self._apply_mask(real_to_complex(y)))                   # (B, C, H, W)
        maps = self.coil_maps.to(coil_images.dtype)
        _check_batch("coil_maps", maps.shape[0], y, "the input")
        components = (maps.conj() * coil_images[:, None]).sum(dim=2)                 # (B, M, H, W)
        return complex_to_real(components).transpose(1, 2).reshape(y.shape[0], -1, *self.img_size)

    def image_support(self) -> torch.Tensor:
        """Where some map set sees the pixel: (B|1, 1, H, W) bool."""
        return self.coil_maps_ri.square().sum(dim=(1, 2, -1))[:, None] > 0


def combine_components(x: torch.Tensor) -> torch.Tensor:
    """Soft-SENSE components (B, 2M, H, W) -> one complex image (B, 2, H, W): modulus ``sqrt(sum_m |x_m|^2)``, the
    root-sum-of-squares of the model's coil images ``sum_m S_m x_m`` wherever the sets are orthonormal (so the
    modulus is what fastMRI's RSS target measures), and the phase of the first component (the one-map SENSE image's
    phase), or of the largest where the first is zero."""
    b, channels, height, width = x.shape
    components = real_to_complex(x.reshape(b, channels // 2, 2, height, width).transpose(1, 2))   # (B, M, H, W)
    modulus = components.abs().square().sum(dim=1).sqrt()
    first = components[:, 0]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))[:, 0]
    lead = torch.where(first.abs() > 0, first, largest)
    phase = torch.where(lead.abs() > 0, lead / lead.abs().clamp_min(torch.finfo(modulus.dtype).tiny), 1)
    return complex_to_real(modulus * phase)


__all__ = ["SoftSenseMRI", "combine_components"]
