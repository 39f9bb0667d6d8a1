"""Inpainting: observe the pixels where a boolean mask is True, ``y = M x``; and seeded mask makers.

Masks are ``True`` where a pixel is *observed*. The makers take a ``torch.Generator`` or an int seed and
never touch the global random state, so the same seed gives the same mask on every machine.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from invdiff.operators.base import Operator
from invdiff.registry import register_operator


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise ValueError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")


def _image_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be (H, W) with positive ints, got {shape!r}")
    return shape


def _check_fraction(name: str, value: float, *, low_open: bool = False) -> float:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def box_mask(shape: Sequence[int], box: Sequence[int] | None = None, *, fraction: float = 0.5) -> torch.Tensor:
    """Observed everywhere except one rectangle: bool (H, W), False inside the box.

    box: ``(top, left, height, width)`` of the missing rectangle; when None, a centred box whose sides are
    ``fraction`` of the image's (rounded to whole pixels).
    """
    height, width = _image_shape(shape)
    if box is None:
        _check_fraction("fraction", fraction)
        box_h, box_w = round(fraction * height), round(fraction * width)
        box = ((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)
    top, left, box_h, box_w = (int(v) for v in box)
    if top < 0 or left < 0 or box_h < 0 or box_w < 0 or top + box_h > height or left + box_w > width:
        raise ValueError(f"box (top, left, height, width) = {tuple(box)} does not fit in the image {(height, width)}")
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[top:top + box_h, left:left + box_w] = False
    return mask


def random_pixel_mask(shape: Sequence[int], fraction_observed: float,
                      generator: torch.Generator | int) -> torch.Tensor:
    """Exactly ``round(fraction_observed * H * W)`` observed pixels, chosen uniformly: bool (H, W)."""
    height, width = _image_shape(shape)
    _check_fraction("fraction_observed", fraction_observed)
    count = round(fraction_observed * height * width)
    chosen = torch.randperm(height * width, generator=_as_generator(generator))[:count]
    mask = torch.zeros(height * width, dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(height, width)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _within_capsule(rows: torch.Tensor, cols: torch.Tensor, start: tuple[float, float],
                    end: tuple[float, float], radius: float) -> torch.Tensor:
    """Pixels whose centre lies within ``radius`` of the segment start-end (a brush dab dragged along it)."""
    d_row, d_col = end[0] - start[0], end[1] - start[1]
    length_sq = d_row * d_row + d_col * d_col
    # closest point of the segment: start + t (end - start) with t clamped to [0, 1]
    if length_sq > 0:
        t = (((rows - start[0]) * d_row + (cols - start[1]) * d_col) / length_sq).clamp(0, 1)
    else:
        t = torch.zeros_like(rows)
    return (rows - start[0] - t * d_row) ** 2 + (cols - start[1] - t * d_col) ** 2 <= radius ** 2


def stroke_mask(shape: Sequence[int], generator: torch.Generator | int, *,
                num_strokes: tuple[int, int] = (1, 4), num_vertices: tuple[int, int] = (4, 10),
                max_segment: float = 0.25, width: tuple[float, float] = (0.04, 0.12),
                max_turn: float = math.pi / 2) -> torch.Tensor:
    """Free-form brush strokes missing: bool (H, W), False under the strokes.

    Each stroke is a random walk drawn with a round brush: a uniform start, a uniform first heading, then
    ``num_vertices`` segments, each turning by up to ``max_turn`` radians and as long as up to
    ``max_segment`` of the image's shorter side, clamped to the image. Its brush diameter is drawn once
    per stroke from ``width`` (fractions of the shorter side, at least one pixel). ``num_strokes`` and
    ``num_vertices`` are inclusive integer ranges. At least the start pixel of every stroke is missing.
    """
    height, width_px = _image_shape(shape)
    for name, (low, high) in (("num_strokes", num_strokes), ("num_vertices", num_vertices)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} must be an inclusive range (low, high) with 1 <= low <= high, got {(low, high)}")
    if not 0 < width[0] <= width[1]:
        raise ValueError(f"width must be a range (low, high) of fractions with 0 < low <= high, got {width}")
    _check_fraction("max_segment", max_segment, low_open=True)
    generator = _as_generator(generator)
    side = min(height, width_px)
    rows = torch.arange(height, dtype=torch.float64).unsqueeze(1)
    cols = torch.arange(width_px, dtype=torch.float64).unsqueeze(0)
    missing = torch.zeros(height, width_px, dtype=torch.bool)
    for _ in range(_randint(generator, *num_strokes)):
        point = (_uniform(generator, 0, height - 1), _uniform(generator, 0, width_px - 1))
        heading = _uniform(generator, 0, 2 * math.pi)
        radius = max(_uniform(generator, *width) * side, 1.0) / 2
        missing |= _within_capsule(rows, cols, point, point, radius)
        for _ in range(_randint(generator, *num_vertices)):
            heading += _uniform(generator, -max_turn, max_turn)
            length = _uniform(generator, 0.1, 1.0) * max_segment * side
            end = (min(max(point[0] + length * math.sin(heading), 0.0), height - 1.0),
                   min(max(point[1] + length * math.cos(heading), 0.0), width_px - 1.0))
            missing |= _within_capsule(rows, cols, point, end, radius)
            point = end
    return ~missing


def _as_mask(mask) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = observed), got dtype {mask.dtype}; "
                         "convert with mask.bool() if it holds 0/1")
    if mask.ndim == 2:
        return mask[None, None].clone()
    if mask.ndim == 4:
        return mask.clone()
    raise ValueError(f"mask must have shape (H, W) or (B|1, 1|C, H, W), got {tuple(mask.shape)}")


@register_operator("inpainting",
                   example=lambda: Inpainting(random_pixel_mask((12, 10), 0.6, generator=0), channels=2))
class Inpainting(Operator):
    """Pixel observation ``y = M x``: y has x's shape, with unobserved entries exactly 0.

    x: (B, C, H, W) real, float32 or float64; y: same shape and dtype. mask: bool (H, W) or
    (B|1, 1|C, H, W), True where observed, broadcast over batch and channels. channels: C of ``in_shape``
    (default: the mask's channel dimension, 1 for an (H, W) mask).

    Why ``y`` keeps x's shape instead of listing the observed values: masks of a batch may differ, and
    samplers and the CLI can show ``y`` as an image. Zeros come from ``torch.where``, not ``mask * x``:
    a product leaves ``-0.0`` for negative pixels and turns an unobserved NaN/Inf into NaN, while
    ``torch.where`` writes an exact ``+0.0``.

    ``M`` is an orthogonal projection, so ``A^T = A^+ = A^T A = M`` and ``||A|| = 1`` (0 for an empty mask).

    >>> op = Inpainting(box_mask((64, 64), fraction=0.25), channels=3)
    >>> op.A(torch.rand(1, 3, 64, 64)).shape
    torch.Size([1, 3, 64, 64])
    """

    normalized = True
    has_exact_pinv = True

    def __init__(self, mask, channels: int | None = None):
        super().__init__()
        mask = _as_mask(mask)
        if channels is None:
            channels = mask.shape[1]
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if mask.shape[1] not in (1, channels):
            raise ValueError(f"mask has {mask.shape[1]} channels; expected 1 or channels={channels}")
        self.channels = channels
        self.register_buffer("mask", mask)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.mask.shape[-2:])

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y = M x`` (unobserved entries exactly +0.0)."""
        return torch.where(self.mask, x, 0.0)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``M^T y = M y``."""
        return torch.where(self.mask, y, 0.0)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^+ y = M y`` exactly (M is an orthogonal projection)."""
        return torch.where(self.mask, y, 0.0)

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``A^T A x = M x``."""
        return torch.where(self.mask, x, 0.0)
