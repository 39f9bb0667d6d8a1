"""Cartesian MRI forward operators: single-coil ``y = M F x`` and multi-coil SENSE ``y_c = M F S_c x``.

``F`` is the centred unitary 2-D DFT (:mod:`invdiff.operators.fft`, fastMRI's ``fft2c``), ``M`` keeps the
sampled k-space locations and sets the others to an exact ``+0.0`` (``torch.where``; multiplying by a
0/1 mask would leave ``-0.0`` where ``k`` is negative).

Masks are boolean (0/1 numbers are accepted) and broadcast over the image by their number of axes:

=============  ================================================================
mask shape     meaning
=============  ================================================================
``(W,)``       one column mask for every image (fastMRI's phase-encoding lines)
``(H, W)``     one 2-D mask for every image (e.g. Poisson disc)
``(B, 1, W)``  a column mask per batch element
``(B, H, W)``  a 2-D mask per batch element
=============  ================================================================

A 2-axis mask is always ``(H, W)``; a batch of column masks carries an explicit singleton row axis,
``(B, 1, W)`` (``masks[:, None, :]``), so the two can never be confused. A per-batch mask with ``B = 1``
applies to every image.

Images are real ``(B, 2, H, W)`` (real, imaginary); measurements are real, ``(B, 2, H, W)`` single-coil
and ``(B, 2, C, H, W)`` multi-coil. float32 and float64 inputs are computed in complex64 / complex128.
"""
from __future__ import annotations

import torch

from invdiff.operators.base import Operator
from invdiff.operators.fft import (centring_modulation, complex_dtype, complex_to_real, fft2c, ifft2c,
                                   real_to_complex)
from invdiff.operators.masks import make_mask
from invdiff.registry import register_operator

# ESPIRiT maps are normalised to sum_c |S_c|^2 = 1 inside the object; float32 rounding may exceed 1 by
# ~1e-7. Allowing 1e-5 keeps ||A|| <= 1 + 5e-6.
_NORMALISED_MAPS_TOL = 1e-5

_MASK_SHAPES = "(W,), (H, W), (B, 1, W) or (B, H, W)"


def _as_bool_mask(mask) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must be boolean or hold only 0 and 1, got dtype {mask.dtype} "
                             f"with other values; a weighting is not a sampling mask")
        mask = mask != 0
    if not bool(mask.any()):
        raise ValueError(f"mask of shape {tuple(mask.shape)} samples no column: there would be no measurement at "
                         f"all, and a solver would return its prior alone")
    return mask


def _check_mask_fits(mask: torch.Tensor, img_size: tuple[int, int]) -> None:
    height, width = img_size
    shape = tuple(mask.shape)
    fits = ((mask.ndim == 1 and shape == (width,))
            or (mask.ndim == 2 and shape == (height, width))
            or (mask.ndim == 3 and shape[1] in (1, height) and shape[2] == width))
    if not fits:
        raise ValueError(f"mask has shape {shape}, which does not fit images of shape (H, W) = {img_size}; "
                         f"expected {_MASK_SHAPES}")


def _mask_grid(mask: torch.Tensor) -> torch.Tensor:
    """Any accepted mask as ``(B|1, H|1, W)``, ready to broadcast against complex ``(B, H, W)``."""
    if mask.ndim == 1:
        return mask[None, None, :]
    if mask.ndim == 2:
        return mask[None]
    return mask


def _check_batch(name: str, batch_of_buffer: int, t: torch.Tensor, tensor_name: str) -> None:
    if batch_of_buffer not in (1, t.shape[0]):
        raise ValueError(f"{name} holds {batch_of_buffer} batch elements but {tensor_name} has batch "
                         f"{t.shape[0]} (shape {tuple(t.shape)}); give one {name} or one per element")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if t.ndim != len(expected) + 1 or tuple(t.shape[1:]) != expected:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, expected))}), got {tuple(t.shape)}")


class CoilMapsBuffer:
    """Complex sensitivity maps kept in a real buffer ``coil_maps_ri`` (``maps.shape + (2,)``) of an Operator.

    ``Module.to(float64)`` would drop the imaginary part of a complex buffer; a real one follows dtype and device
    moves. ``op.coil_maps`` gives the maps back as complex. Shared by the SENSE operators (2-D, soft-SENSE, 3-D).
    """

    def _store_coil_maps(self, coil_maps, layout: str) -> torch.Tensor:
        """Check ``coil_maps`` (``layout``, e.g. ``"(B|1, C, H, W)"``: its rank is the number of entries), make them
        complex, register the buffer; returns the complex maps."""
        maps = torch.as_tensor(coil_maps)
        if maps.ndim != layout.count(",") + 1:
            raise ValueError(f"coil_maps must have shape {layout}, got {tuple(maps.shape)}")
        if not maps.is_complex():
            maps = maps.to(complex_dtype(maps.dtype) if maps.is_floating_point() else torch.complex64)
        if not bool(torch.isfinite(torch.view_as_real(maps)).all()):
            raise ValueError("coil_maps contain NaN or Inf")
        self.register_buffer("coil_maps_ri", torch.view_as_real(maps.resolve_conj()).clone())
        return maps

    @property
    def coil_maps(self) -> torch.Tensor:
        """The maps as complex, in the layout the operator documents."""
        return torch.view_as_complex(self.coil_maps_ri.contiguous())


def _example_mask(img_size: tuple[int, int]) -> torch.Tensor:
    return make_mask("random", shape=img_size, acceleration=2, center_fraction=0.25, seed="example.h5")


@register_operator("cartesian_mri",
                   example=lambda: CartesianMRI(_example_mask((16, 12)), img_size=(16, 12)))
class CartesianMRI(Operator):
    """Single-coil Cartesian MRI, ``y = M F x`` with ``F`` the centred unitary 2-D DFT.

    x: (B, 2, H, W) real/imag, float32 or float64; y: (B, 2, H, W), exactly +0.0 where not sampled.
    mask: bool (W,), (H, W), (B, 1, W) or (B, H, W) (see the module docstring). ``A A^H = M`` is a
    projection, so ``||A|| <= 1`` and ``A^+ = A^H`` (the zero-filled reconstruction).

    >>> op = CartesianMRI(make_mask("random", (320, 320), 4, 0.08, seed="file1000001.h5"), img_size=(320, 320))
    >>> x_zf = op.zero_filled(op.A(x))
    """

    normalized = True
    has_exact_pinv = True

    def __init__(self, mask: torch.Tensor, img_size: tuple[int, int] | None = None):
        super().__init__()
        mask = _as_bool_mask(mask)
        if img_size is None:
            if mask.ndim not in (2, 3) or mask.shape[-2] == 1:
                raise ValueError(f"img_size=(H, W) is required with a column mask of shape {tuple(mask.shape)}")
            img_size = tuple(mask.shape[-2:])
        self.img_size = (int(img_size[0]), int(img_size[1]))
        _check_mask_fits(mask, self.img_size)
        self.register_buffer("mask", mask.clone())

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (2, *self.img_size)

    def _apply_mask(self, kspace: torch.Tensor) -> torch.Tensor:
        grid = _mask_grid(self.mask)
        _check_batch("mask", grid.shape[0], kspace, "the input")
        return torch.where(grid, kspace, 0)  # exact +0.0 where unsampled (never multiply: -0.0)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y = M F x``: (B, 2, H, W) -> (B, 2, H, W)."""
        _check_shape("x", x, self.in_shape)
        return complex_to_real(self._apply_mask(fft2c(real_to_complex(x))))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``x = F^H M y``: (B, 2, H, W) -> (B, 2, H, W)."""
        _check_shape("y", y, self.in_shape)
        return complex_to_real(ifft2c(self._apply_mask(real_to_complex(y))))

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^+ y = A^H (A A^H)^+ y = A^H M y = A^H y``: exact, since ``A A^H = M`` is a projection."""
        return self.A_adjoint(y)

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """The zero-filled reconstruction ``F^H M y`` (= ``A^H y`` = ``A^+ y``), (B, 2, H, W)."""
        return self.A_adjoint(y)


@register_operator("sense_mri", example=lambda: SenseMRI(_example_mask((16, 12)), _example_coil_maps(4, (16, 12))))
class SenseMRI(CoilMapsBuffer, Operator):
    """Multi-coil Cartesian MRI (SENSE), ``y_c = M F S_c x`` for coils ``c = 1..C``.

    x: (B, 2, H, W) real/imag; y: (B, 2, C, H, W), exactly +0.0 where not sampled.
    mask: bool (W,), (H, W), (B, 1, W) or (B, H, W); coil_maps: complex (B|1, C, H, W).
    Adjoint ``x = sum_c conj(S_c) F^H M y_c``. ``op.normalized`` is True when the maps satisfy
    ``sum_c |S_c|^2 <= 1`` everywhere (ESPIRiT maps do), which gives ``||A|| <= 1``. ``A_dagger`` is
    conjugate gradients on the normal equations.

    The maps are kept in a real buffer ``coil_maps_ri`` (B|1, C, H, W, 2): ``Module.to(float64)`` would
    drop the imaginary part of a complex buffer. ``op.coil_maps`` gives them back as complex.

    >>> op = SenseMRI(mask, maps)            # maps: (1, 15, 640, 368) complex64 from ESPIRiT
    >>> x_zf = op.zero_filled(op.A(x))       # coil-combined zero-filled image
    """

    has_exact_pinv = False

    def __init__(self, mask: torch.Tensor, coil_maps: torch.Tensor):
        super().__init__()
        coil_maps = self._store_coil_maps(coil_maps, "(B|1, C, H, W)")
        mask = _as_bool_mask(mask)
        self.img_size = (int(coil_maps.shape[-2]), int(coil_maps.shape[-1]))
        _check_mask_fits(mask, self.img_size)
        self.register_buffer("mask", mask.clone())
        # Instance-level flag: ||A||^2 = max over pixels of sum_c |S_c|^2 (times the sampled fraction <= 1).
        energy = coil_maps.abs().square().sum(dim=1).max()
        self.normalized = bool(energy <= 1 + _NORMALISED_MAPS_TOL)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (2, *self.img_size)

    @property
    def num_coils(self) -> int:
        return int(self.coil_maps_ri.shape[1])

    def _maps_for(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        maps = self.coil_maps.to(dtype)
        _check_batch("coil_maps", maps.shape[0], t, "the input")
        return maps

    def _apply_mask(self, kspace: torch.Tensor) -> torch.Tensor:
        grid = _mask_grid(self.mask)
        _check_batch("mask", grid.shape[0], kspace, "the input")
        return torch.where(grid[:, None], kspace, 0)  # mask shared by the coils; exact +0.0

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        """Complex (B, H, W) -> masked multi-coil k-space (B, C, H, W)."""
        maps = self._maps_for(image, image.dtype)
        checkerboard = centring_modulation(image)
        if checkerboard is None:
            return self._apply_mask(fft2c(maps * image[:, None]))
        # F = (s C) fft2 C on even sizes: the input pattern goes into the (1, C, H, W) maps, not the batch
        coil_images = (maps * checkerboard[0]) * image[:, None]
        return self._apply_mask(torch.fft.fft2(coil_images, norm="ortho") * checkerboard[1])

    def _adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """Complex (B, C, H, W) -> coil-combined image (B, H, W)."""
        maps = self._maps_for(kspace, kspace.dtype)
        checkerboard = centring_modulation(kspace)
        if checkerboard is None:
            return (maps.conj() * ifft2c(self._apply_mask(kspace))).sum(dim=1)
        # F^H = C ifft2 (s C) on even sizes: the output pattern goes into the conjugate maps
        coil_images = torch.fft.ifft2(self._apply_mask(kspace) * checkerboard[1], norm="ortho")
        return ((maps * checkerboard[0]).conj() * coil_images).sum(dim=1)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y_c = M F S_c x``: (B, 2, H, W) -> (B, 2, C, H, W)."""
        _check_shape("x", x, self.in_shape)
        return complex_to_real(self._forward(real_to_complex(x)))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``x = sum_c conj(S_c) F^H M y_c``: (B, 2, C, H, W) -> (B, 2, H, W)."""
        _check_shape("y", y, (2, self.num_coils, *self.img_size))
        return complex_to_real(self._adjoint(real_to_complex(y)))

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``A^H A x = sum_c conj(S_c) F^H M F S_c x``, computed in complex without real round trips."""
        _check_shape("x", x, self.in_shape)
        image = real_to_complex(x)
        checkerboard = centring_modulation(image)
        if checkerboard is None:
            return complex_to_real(self._adjoint(self._forward(image)))
        # Even sizes: F = s C fft2 C (invdiff.operators.fft), and the output patterns cancel around the diagonal
        # mask, F^H M F = C ifft2 M fft2 C, so the input pattern goes into the maps once per call and the
        # (B, C, H, W) k-space is never modulated (the normal operator is the inner loop of every CG solve).
        maps = self._maps_for(image, image.dtype) * checkerboard[0]
        kspace = self._apply_mask(torch.fft.fft2(maps * image[:, None], norm="ortho"))
        return complex_to_real((maps.conj() * torch.fft.ifft2(kspace, norm="ortho")).sum(dim=1))

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """The coil-combined zero-filled reconstruction ``sum_c conj(S_c) F^H M y_c`` (= ``A^H y``), (B, 2, H, W)."""
        return self.A_adjoint(y)

    def image_support(self) -> torch.Tensor:
        """Where some coil sees the pixel, ``sum_c |S_c|^2 > 0``: (B|1, 1, H, W) bool. Outside it ``A`` is blind."""
        return self.coil_maps_ri.square().sum(dim=(1, -1))[:, None] > 0


def _example_coil_maps(num_coils: int, img_size: tuple[int, int]) -> torch.Tensor:
    """Smooth synthetic maps normalised like ESPIRiT's, ``sum_c |S_c|^2 = 1``: complex64 (1, C, H, W).

    Coil ``c`` sits at angle ``a_c = 2 pi c / C`` on a ring: Gaussian magnitude around it and a linear
    phase ramp pointing at it. The ramps keep the aliased pixels distinguishable, so CG-SENSE on the
    example converges (smallest eigenvalue of ``A^H A`` ~4e-3 with 4 coils at 2x).
    """
    height, width = img_size
    rows = torch.linspace(-1, 1, height, dtype=torch.float64)[:, None]
    cols = torch.linspace(-1, 1, width, dtype=torch.float64)[None, :]
    maps = []
    for c in range(num_coils):
        angle = torch.tensor(2 * torch.pi * c / num_coils, dtype=torch.float64)
        along = torch.sin(angle) * rows + torch.cos(angle) * cols
        magnitude = torch.exp(-((rows - torch.sin(angle)) ** 2 + (cols - torch.cos(angle)) ** 2))
        maps.append(magnitude * torch.exp(1j * (angle + 3 * along)))
    maps = torch.stack(maps)
    maps = maps / maps.abs().square().sum(dim=0, keepdim=True).sqrt()
    return maps[None].to(torch.complex64)
