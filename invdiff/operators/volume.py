"""Volume operators: a 2-D acquisition applied to every slice of a volume, and 3-D Cartesian MRI.

Volumes are real ``(B, C, D, H, W)``: ``D`` is the slice axis (z), ``(H, W)`` the in-plane axes a 2-D prior sees
(:class:`invdiff.priors.base.SliceDenoiser`). All three operators are block diagonal over slices except
:class:`Cartesian3DMRI`, whose Fourier transform also runs along ``D``.

* :class:`VolumeParallelBeamCT` - ``y_d = A x_d`` for every axial slice ``d``, one parallel-beam geometry shared
  by all slices (sparse view: few equispaced angles; limited angle: a contiguous wedge). The CSR projector of
  :class:`invdiff.operators.ct.ParallelBeamCT` runs over the whole volume in one sparse product: the ``C * D``
  slices become the columns of one dense matrix, so a volume costs one matrix product, not ``D`` of them.
* :class:`MultiSliceSenseMRI` - ``y_{c,d} = M_d F S_{c,d} x_d``: 2-D SENSE on each slice, with a column mask per
  slice (or one for all) and 3-D coil maps.
* :class:`Cartesian3DMRI` - ``y_c = M F_3 S_c x``: a 3-D acquisition, readout along ``H`` fully sampled, the two
  phase-encode directions ``(k_z, k_y) = (D, W)`` undersampled by a 2-D mask.

``F`` is the centred unitary DFT (fastMRI's ``fft2c``; ``F_3`` its 3-D version), so the MRI operators have
``||A|| <= 1`` when ``sum_c |S_c|^2 <= 1``.

    >>> op = VolumeParallelBeamCT(64, angles=np.linspace(0, 180, 8, endpoint=False), depth=64)
    >>> y = op.A(x)                   # x: (B, 1, 64, 64, 64) -> y: (B, 1, 64, 8, 91)
    >>> x_fbp = op.fbp(y)             # (B, 1, 64, 64, 64)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from invdiff.operators.base import Operator
from invdiff.operators.ct import ParallelBeamCT
from invdiff.operators.fft import complex_to_real, fft2c, ifft2c, real_to_complex
from invdiff.operators.mri import _NORMALISED_MAPS_TOL, CoilMapsBuffer, _as_bool_mask, _example_coil_maps
from invdiff.registry import register_operator

__all__ = ["VolumeParallelBeamCT", "MultiSliceSenseMRI", "Cartesian3DMRI", "fft3c", "ifft3c", "limited_angles",
           "sparse_view_angles"]

_FFT3_DIMS = (-3, -2, -1)


def sparse_view_angles(views: int) -> np.ndarray:
    """``views`` equispaced angles in [0, 180) degrees (sparse-view CT)."""
    return np.linspace(0.0, 180.0, int(views), endpoint=False)


def limited_angles(wedge_degrees: float, views: int) -> np.ndarray:
    """``views`` equispaced angles in the contiguous wedge [0, wedge_degrees) (limited-angle CT)."""
    return np.linspace(0.0, float(wedge_degrees), int(views), endpoint=False)


def _check_volume(name: str, t: torch.Tensor, trailing: tuple[int, ...]) -> None:
    if t.is_complex() or t.ndim != len(trailing) + 1 or tuple(t.shape[1:]) != tuple(trailing):
        raise ValueError(f"{name} must be a real tensor (B, {', '.join(map(str, trailing))}), got "
                         f"{'complex ' if t.is_complex() else ''}shape {tuple(t.shape)}")


# ---- CT ----------------------------------------------------------------------------------------------------
@register_operator("volume_parallel_beam_ct",
                   example=lambda: VolumeParallelBeamCT(16, angles=[30.0 * i for i in range(6)], depth=3))
class VolumeParallelBeamCT(Operator):
    """Parallel-beam CT of every axial slice, ``y[:, :, d] = A_2d x[:, :, d]`` (shared angles, unit-step rays).

    x: (B, 1, D, H, W) float32/float64; y: (B, 1, D, num_angles, num_detectors). angles in degrees (any 1-D set:
    :func:`sparse_view_angles`, :func:`limited_angles`); the 2-D geometry is exactly :class:`ParallelBeamCT`'s.

        >>> op = VolumeParallelBeamCT(32, angles=sparse_view_angles(8), depth=32)
    """

    def __init__(self, img_size: int | tuple[int, int], angles: Sequence[float] | np.ndarray | torch.Tensor,
                 depth: int, num_detectors: int | None = None, detector_spacing: float = 1.0):
        super().__init__()
        if isinstance(depth, bool) or int(depth) != depth or depth < 1:
            raise ValueError(f"depth must be a positive int (number of slices), got {depth!r}")
        self.depth = int(depth)
        self.slice_operator = ParallelBeamCT(img_size, angles, num_detectors=num_detectors,
                                             detector_spacing=detector_spacing)
        self.img_size = self.slice_operator.img_size

    @property
    def angles(self) -> torch.Tensor:
        return self.slice_operator.angles

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (1, self.depth, *self.img_size)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (1, self.depth, self.slice_operator.num_angles, self.slice_operator.num_detectors)

    def _slicewise(self, function, t: torch.Tensor, out_tail: tuple[int, int]) -> torch.Tensor:
        # (B, C, D, h, w) -> (B, C*D, h, w): the CSR product takes every (B, C*D) slice as one column.
        batch, channels = t.shape[:2]
        out = function(t.reshape(batch, channels * self.depth, *t.shape[-2:]))
        return out.reshape(batch, channels, self.depth, *out_tail)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y = A x`` slice by slice: (B, C, D, H, W) -> (B, C, D, num_angles, num_detectors)."""
        _check_volume("x", x, (x.shape[1] if x.ndim == 5 else 1, self.depth, *self.img_size))
        return self._slicewise(self.slice_operator.A, x, tuple(self.out_shape[-2:]))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^T y`` slice by slice (the exact transpose): (B, C, D, M, Dt) -> (B, C, D, H, W)."""
        _check_volume("y", y, (y.shape[1] if y.ndim == 5 else 1, *self.out_shape[1:]))
        return self._slicewise(self.slice_operator.A_adjoint, y, self.img_size)

    def A_dagger(self, y: torch.Tensor, *, max_iter: int = 500, tol: float = 1e-8, **kwargs) -> torch.Tensor:  # noqa: N802
        """Minimum-norm least squares by CG on the normal equations (slow; :meth:`fbp` is the fast inverse)."""
        return super().A_dagger(y, max_iter=max_iter, tol=tol, **kwargs)

    def fbp(self, sinogram: torch.Tensor, filter: str = "ramp") -> torch.Tensor:  # noqa: A002
        """Filtered back-projection of every slice (:meth:`ParallelBeamCT.fbp`): (B, C, D, M, Dt) -> (B, C, D, H, W)."""
        _check_volume("sinogram", sinogram, (sinogram.shape[1] if sinogram.ndim == 5 else 1, *self.out_shape[1:]))
        return self._slicewise(lambda s: self.slice_operator.fbp(s, filter=filter), sinogram, self.img_size)


# ---- MRI ---------------------------------------------------------------------------------------------------
def fft3c(volume: torch.Tensor) -> torch.Tensor:
    """Centred unitary 3-D DFT over the last three axes, ``fftshift(fftn(ifftshift(x)))``: complex in, complex out."""
    shifted = torch.fft.ifftshift(volume, dim=_FFT3_DIMS)
    return torch.fft.fftshift(torch.fft.fftn(shifted, dim=_FFT3_DIMS, norm="ortho"), dim=_FFT3_DIMS)


def ifft3c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred unitary inverse 3-D DFT (the adjoint of :func:`fft3c`)."""
    shifted = torch.fft.ifftshift(kspace, dim=_FFT3_DIMS)
    return torch.fft.fftshift(torch.fft.ifftn(shifted, dim=_FFT3_DIMS, norm="ortho"), dim=_FFT3_DIMS)


class _VolumeSense(CoilMapsBuffer, Operator):
    """Shared parts of the two volume MRI operators: 3-D coil maps (B|1, C, D, H, W), the mask, shapes, support."""

    def _init_maps(self, coil_maps) -> torch.Tensor:
        maps = self._store_coil_maps(coil_maps, "(B|1, C, D, H, W)")
        self.volume_size = tuple(int(s) for s in maps.shape[-3:])
        self.normalized = bool(maps.abs().square().sum(dim=1).max() <= 1 + _NORMALISED_MAPS_TOL)
        return maps

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (2, *self.volume_size)

    @property
    def num_coils(self) -> int:
        return int(self.coil_maps_ri.shape[1])

    def _maps_for(self, t: torch.Tensor) -> torch.Tensor:
        maps = self.coil_maps.to(t.dtype)
        if maps.shape[0] not in (1, t.shape[0]):
            raise ValueError(f"coil_maps hold {maps.shape[0]} batch elements but the input has batch {t.shape[0]}")
        return maps

    def _masked(self, kspace: torch.Tensor) -> torch.Tensor:
        return torch.where(self._mask_grid(), kspace, 0)  # exact +0.0 where unsampled (never multiply: -0.0)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y_c = M F S_c x``: (B, 2, D, H, W) -> (B, 2, C, D, H, W)."""
        _check_volume("x", x, self.in_shape)
        image = real_to_complex(x)
        return complex_to_real(self._masked(self._transform(self._maps_for(image) * image[:, None])))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``x = sum_c conj(S_c) F^H M y_c``: (B, 2, C, D, H, W) -> (B, 2, D, H, W)."""
        _check_volume("y", y, (2, self.num_coils, *self.volume_size))
        kspace = real_to_complex(y)
        coil_images = self._inverse_transform(self._masked(kspace))
        return complex_to_real((self._maps_for(kspace).conj() * coil_images).sum(dim=1))

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^H A x`` in complex, without the real round trip of the measurements."""
        _check_volume("x", x, self.in_shape)
        image = real_to_complex(x)
        maps = self._maps_for(image)
        coil_images = self._inverse_transform(self._masked(self._transform(maps * image[:, None])))
        return complex_to_real((maps.conj() * coil_images).sum(dim=1))

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """The coil-combined zero-filled volume ``A^H y``, (B, 2, D, H, W)."""
        return self.A_adjoint(y)

    def image_support(self) -> torch.Tensor:
        """Where some coil sees the voxel, ``sum_c |S_c|^2 > 0``: (B|1, 1, D, H, W) bool."""
        return self.coil_maps_ri.square().sum(dim=(1, -1))[:, None] > 0


@register_operator("multislice_sense_mri",
                   example=lambda: MultiSliceSenseMRI(_example_slice_masks(3, 12), _example_volume_maps(4, 3, (16, 12))))
class MultiSliceSenseMRI(_VolumeSense):
    """2-D SENSE on every slice, ``y_{c,d} = M_d F S_{c,d} x_d`` (F: centred unitary 2-D DFT over (H, W)).

    x: (B, 2, D, H, W) real/imag; y: (B, 2, C, D, H, W). mask: bool (W,) for every slice, (D, W) one column mask
    per slice, or (D, H, W) a 2-D mask per slice. coil_maps: complex (B|1, C, D, H, W). A single-coil multi-slice
    acquisition is ``C = 1`` with maps of ones.

        >>> op = MultiSliceSenseMRI(masks, maps)    # masks (D, W), maps (1, 8, D, H, W)
    """

    has_exact_pinv = False

    def __init__(self, mask: torch.Tensor, coil_maps: torch.Tensor):
        super().__init__()
        self._init_maps(coil_maps)
        mask = _as_bool_mask(mask)
        depth, height, width = self.volume_size
        fits = ((mask.ndim == 1 and mask.shape == (width,)) or (mask.ndim == 2 and tuple(mask.shape) == (depth, width))
                or (mask.ndim == 3 and tuple(mask.shape) == (depth, height, width)))
        if not fits:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; for volumes (D, H, W) = {self.volume_size} expected "
                             f"(W,), (D, W) or (D, H, W)")
        self.register_buffer("mask", mask.clone())

    def _mask_grid(self) -> torch.Tensor:
        # -> (1, 1, D|1, H|1, W), broadcast against complex (B, C, D, H, W)
        if self.mask.ndim == 1:
            return self.mask[None, None, None, None]
        if self.mask.ndim == 2:
            return self.mask[None, None, :, None, :]
        return self.mask[None, None]

    def _transform(self, coil_images: torch.Tensor) -> torch.Tensor:
        return fft2c(coil_images)

    def _inverse_transform(self, kspace: torch.Tensor) -> torch.Tensor:
        return ifft2c(kspace)


@register_operator("cartesian3d_mri",
                   example=lambda: Cartesian3DMRI(_example_phase_encode_mask(8, 12), _example_volume_maps(4, 8, (6, 12))))
class Cartesian3DMRI(_VolumeSense):
    """3-D Cartesian multi-coil MRI, ``y_c = M F_3 S_c x``: F_3 the centred unitary 3-D DFT; readout along H.

    x: (B, 2, D, H, W) real/imag; y: (B, 2, C, D, H, W). mask: bool (D, W) over the two phase-encode directions
    ``(k_z, k_y)`` (every readout sample of a chosen (k_z, k_y) line is kept), or (D, H, W).
    coil_maps: complex (B|1, C, D, H, W).
    """

    has_exact_pinv = False

    def __init__(self, mask: torch.Tensor, coil_maps: torch.Tensor):
        super().__init__()
        self._init_maps(coil_maps)
        mask = _as_bool_mask(mask)
        depth, height, width = self.volume_size
        if tuple(mask.shape) not in ((depth, width), (depth, height, width)):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (D, W) = ({depth}, {width}) over "
                             f"(k_z, k_y) or (D, H, W) = {self.volume_size}")
        self.register_buffer("mask", mask.clone())

    def _mask_grid(self) -> torch.Tensor:
        return self.mask[None, None, :, None, :] if self.mask.ndim == 2 else self.mask[None, None]

    def _transform(self, coil_images: torch.Tensor) -> torch.Tensor:
        return fft3c(coil_images)

    def _inverse_transform(self, kspace: torch.Tensor) -> torch.Tensor:
        return ifft3c(kspace)


def phase_encode_mask(shape: tuple[int, int], acceleration: float, *, center_fraction: float = 0.08,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A variable-density random (k_z, k_y) mask for :class:`Cartesian3DMRI`: bool (D, W).

    A fully sampled centre box of ``center_fraction`` of each side, then uniform random points elsewhere until
    ``D * W / acceleration`` points are kept.
    """
    depth, width = int(shape[0]), int(shape[1])
    mask = torch.zeros(depth, width, dtype=torch.bool)
    cz, cy = max(1, round(depth * center_fraction ** 0.5)), max(1, round(width * center_fraction ** 0.5))
    mask[(depth - cz) // 2:(depth - cz) // 2 + cz, (width - cy) // 2:(width - cy) // 2 + cy] = True
    wanted = int(round(depth * width / float(acceleration)))
    free = (~mask).reshape(-1).nonzero().squeeze(1)
    extra = max(0, wanted - int(mask.sum()))
    order = torch.randperm(len(free), generator=generator)[:extra]
    mask.view(-1)[free[order]] = True
    return mask


# ---- small examples for the contract tests ---------------------------------------------------------------
def _example_slice_masks(depth: int, width: int) -> torch.Tensor:
    """A different 2x column mask per slice (centre 4 columns plus every other one, shifted by the slice index)."""
    masks = torch.zeros(depth, width, dtype=torch.bool)
    for d in range(depth):
        masks[d, (torch.arange(width) + d) % 2 == 0] = True
        masks[d, width // 2 - 2:width // 2 + 2] = True
    return masks


def _example_phase_encode_mask(depth: int, width: int) -> torch.Tensor:
    return phase_encode_mask((depth, width), 2.0, center_fraction=0.25, generator=torch.Generator().manual_seed(0))


def _example_volume_maps(num_coils: int, depth: int, img_size: tuple[int, int]) -> torch.Tensor:
    """The 2-D example maps of :mod:`invdiff.operators.mri` on every slice, with a coil-dependent magnitude and phase
    ramp along z (so aliasing along k_z is resolvable and CG-SENSE on the 3-D example converges), then normalised
    to ``sum_c |S_c|^2 = 1`` as ESPIRiT maps are."""
    maps = _example_coil_maps(num_coils, img_size)[0].to(torch.complex128)           # (C, H, W)
    z = torch.linspace(-1, 1, depth, dtype=torch.float64)
    angle = 2 * torch.pi * torch.arange(num_coils, dtype=torch.float64) / num_coils
    along_z = (1 + 0.6 * torch.cos(angle[:, None] + 2 * z[None])) * torch.exp(1j * 2 * torch.sin(angle[:, None]) * z[None])
    maps = maps[:, None] * along_z[:, :, None, None]                                  # (C, D, H, W)
    maps = maps / maps.abs().square().sum(dim=0, keepdim=True).sqrt()
    return maps[None].to(torch.complex64)                                            # (1, C, D, H, W)
