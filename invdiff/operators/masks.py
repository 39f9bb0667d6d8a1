"""Undersampling masks for Cartesian MRI, identical to fastMRI's ``subsample.py`` mask functions.

Column masks (bool ``(W,)``, one entry per phase-encoding column, the last image axis):

* ``"random"`` (fastMRI ``RandomMaskFunc``): ``num_low = round(W * center_fraction)`` contiguous centre
  columns starting at ``(W - num_low + 1) // 2``; every column is also kept independently with probability
  ``p = (W / acc - num_low) / (W - num_low)``, so the expected number of columns is ``W / acc``.
* ``"equispaced"`` (``EquiSpacedMaskFunc``): centre columns plus every ``acc``-th column from a random
  offset in ``[0, acc)``; the achieved acceleration is below ``acc`` because the centre is extra.
* ``"equispaced_fraction"`` (``EquispacedMaskFractionFunc``, used for the brain data): centre columns plus
  columns spaced by ``acc_adj = acc (num_low - W) / (num_low acc - W)`` from a random offset in
  ``[0, round(acc_adj))``, rounded to the nearest column, so the total is close to ``W / acc``.

and a 2-D mask (bool ``(H, W)``):

* ``"poisson"``: variable-density Poisson-disc sampling (``sigpy.mri.poisson``) with a fully sampled
  ``round(H cf) x round(W cf)`` calibration box.

Seeding follows fastMRI: a string seed is a file name and seeds ``np.random.RandomState`` with
``tuple(map(ord, file_name))``; an int or a tuple of ints seeds it directly; ``None`` draws fresh entropy.
Each call uses its own ``RandomState`` (the global numpy generator is never read or changed). The draws
happen in fastMRI's order: first ``rng.randint(len(pairs))`` picks the (center_fraction, acceleration)
pair, then ``rng.uniform(size=W)`` (random) or ``rng.randint(0, round(spacing))`` (the offset of the
equispaced kinds). So ``make_mask("random", (H, W), 4, 0.08, seed="file1000001.h5")`` is the mask that
fastMRI's ``RandomMaskFunc([0.08], [4])`` gives for that file.

Encoding limits (fastMRI's header-based padding): with ``padding=(left, right)`` the columns outside
``[left, right)`` were never acquired and are removed from the mask after it is drawn, as fastMRI's
``apply_mask`` does, so the random draws are unaffected (``right > W`` removes nothing on the right).

    >>> mask = make_mask("random", shape=(640, 368), acceleration=4, center_fraction=0.08,
    ...                  seed="file1000001.h5")          # torch.bool (368,)
"""
from __future__ import annotations

import logging
import math
import os
from numbers import Integral, Real
from typing import Sequence, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

COLUMN_KINDS = ("random", "equispaced", "equispaced_fraction")
MASK_KINDS = COLUMN_KINDS + ("poisson",)

Seed = Union[None, int, str, os.PathLike, Sequence[int]]


def make_mask(kind: str, shape: Sequence[int], acceleration: float | Sequence[float] = 4,
              center_fraction: float | Sequence[float] = 0.08, seed: Seed = None,
              padding: tuple[int, int] | None = None) -> torch.Tensor:
    """An undersampling mask: bool ``(W,)`` for column kinds, bool ``(H, W)`` for ``"poisson"``.

    ``acceleration`` and ``center_fraction`` may be equal-length sequences of pairs, e.g. ``(4, 8)`` with
    ``(0.08, 0.04)``; one pair is then drawn uniformly per call from the seeded generator, as in fastMRI.
    ``seed``: a file name (``"file1000001.h5"``; a path contributes only its base name), an int, a tuple
    of ints or None. ``padding=(left, right)``: only columns in ``[left, right)`` may be sampled.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    height, width = _check_shape(shape)
    pairs = _check_pairs(acceleration, center_fraction)
    if padding is not None:
        padding = _check_padding(padding, width)
    if kind == "poisson":
        mask = _poisson_mask(height, width, pairs, seed)
    else:
        mask = _column_mask(kind, width, pairs, seed)
    if padding is not None:
        left, right = padding
        mask[..., :left] = False
        mask[..., right:] = False
    return torch.from_numpy(mask)


def num_low_frequencies(width: int, center_fraction: float) -> int:
    """Number of fully sampled centre columns, ``round(W * center_fraction)`` (Python rounding, as fastMRI)."""
    return round(width * center_fraction)


def center_columns(width: int, num_low: int) -> np.ndarray:
    """Bool ``(W,)``: the ``num_low`` contiguous columns starting at ``(W - num_low + 1) // 2``."""
    columns = np.zeros(width, dtype=bool)
    start = (width - num_low + 1) // 2
    columns[start:start + num_low] = True
    return columns


def fastmri_rng(seed: Seed) -> np.random.RandomState:
    """A private ``RandomState`` seeded as fastMRI seeds its masks (file name -> ``tuple(map(ord, name))``)."""
    if seed is None:
        return np.random.RandomState()
    if isinstance(seed, os.PathLike):
        seed = os.path.basename(os.fspath(seed))
    if isinstance(seed, str):
        if not seed:
            raise ValueError("seed: a file-name seed must not be empty")
        return np.random.RandomState(tuple(map(ord, seed)))
    if isinstance(seed, bool) or not isinstance(seed, (Integral, tuple, list)):
        raise ValueError(f"seed must be a file name, an int, a tuple of ints or None, got {seed!r}")
    return np.random.RandomState(seed if isinstance(seed, Integral) else tuple(seed))


# ---- column masks --------------------------------------------------------------------------------------

def _column_mask(kind: str, width: int, pairs: list[tuple[float, float]], seed: Seed) -> np.ndarray:
    rng = fastmri_rng(seed)
    # Draw 1 (fastMRI MaskFunc.choose_acceleration): the pair index, even when there is a single pair.
    center_fraction, acceleration = pairs[rng.randint(len(pairs))]
    num_low = num_low_frequencies(width, center_fraction)
    _check_outer_columns(width, num_low, center_fraction)
    # Draw 2: the outer columns (the centre mask takes no draws).
    if kind == "random":
        outer = _random_outer(rng, width, acceleration, num_low)
    elif kind == "equispaced":
        outer = _equispaced_outer(rng, width, acceleration)
    else:
        outer = _equispaced_fraction_outer(rng, width, acceleration, num_low)
    return center_columns(width, num_low) | outer


def _random_outer(rng: np.random.RandomState, width: int, acceleration: float, num_low: int) -> np.ndarray:
    # Keeping each column with probability p makes E[#columns] = num_low + p (W - num_low) ~ W / acc
    # (the centre columns are also drawn, but they are kept anyway).
    prob = (width / acceleration - num_low) / (width - num_low)
    if prob <= 0:
        log.warning("random mask: %d centre columns already exceed W / acceleration = %.1f; only the centre "
                    "is sampled (acceleration %.2f)", num_low, width / acceleration, width / max(num_low, 1))
    return rng.uniform(size=width) < prob


def _equispaced_outer(rng: np.random.RandomState, width: int, acceleration: float) -> np.ndarray:
    if acceleration != int(acceleration):
        raise ValueError(f"acceleration must be an integer for kind 'equispaced' (a column step), "
                         f"got {acceleration!r}; use 'equispaced_fraction' for fractional spacing")
    step = int(acceleration)
    offset = rng.randint(0, high=round(step))
    outer = np.zeros(width, dtype=bool)
    outer[offset::step] = True
    return outer


def _equispaced_fraction_outer(rng: np.random.RandomState, width: int, acceleration: float,
                               num_low: int) -> np.ndarray:
    if num_low * acceleration >= width:
        raise ValueError(f"center_fraction gives {num_low} centre columns of {width}, which alone reach "
                         f"acceleration {acceleration}; 'equispaced_fraction' needs num_low * acceleration < W")
    # Spacing s such that num_low + (W - num_low) / s = W / acc  =>  s = acc (num_low - W) / (num_low acc - W).
    spacing = acceleration * (num_low - width) / (num_low * acceleration - width)
    offset = rng.randint(0, high=round(spacing))
    # Positions offset, offset + s, ... below W - 1, rounded half-to-even to whole columns.
    positions = np.rint(np.arange(offset, width - 1, spacing)).astype(np.int64)
    outer = np.zeros(width, dtype=bool)
    outer[positions] = True
    return outer


# ---- 2-D Poisson-disc mask -----------------------------------------------------------------------------

def _poisson_mask(height: int, width: int, pairs: list[tuple[float, float]], seed: Seed) -> np.ndarray:
    import sigpy.mri  # imported here: numba compilation is slow and only this kind needs it

    if len(pairs) != 1:
        raise ValueError(f"kind 'poisson' takes one acceleration and one center_fraction, got pairs {pairs}")
    center_fraction, acceleration = pairs[0]
    if acceleration == 1:
        return np.ones((height, width), dtype=bool)
    calib = (num_low_frequencies(height, center_fraction), num_low_frequencies(width, center_fraction))
    try:
        # sigpy's sampler seeds its own (numba) generator; numpy's global state is saved and restored.
        mask = sigpy.mri.poisson((height, width), acceleration, calib=calib, dtype=np.float32,
                                 seed=_integer_seed(seed))
    except ValueError as err:
        raise ValueError(f"poisson mask: cannot reach acceleration={acceleration} on shape "
                         f"{(height, width)} with calibration {calib}: {err}") from None
    return mask != 0


def _integer_seed(seed: Seed) -> int:
    """sigpy takes an int seed: ints pass through; a file name seeds a RandomState that draws one."""
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        return int(seed)
    return int(fastmri_rng(seed).randint(0, 2 ** 31 - 1))


# ---- validation ----------------------------------------------------------------------------------------

def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if height < 1 or width < 2:
        raise ValueError(f"shape must be (H, W) with H >= 1 and W >= 2 columns, got {tuple(shape)}")
    return height, width


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_pairs(acceleration, center_fraction) -> list[tuple[float, float]]:
    accelerations, fractions = _as_tuple(acceleration), _as_tuple(center_fraction)
    if len(accelerations) != len(fractions) or not accelerations:
        raise ValueError(f"acceleration {acceleration!r} and center_fraction {center_fraction!r} must pair up: "
                         f"give one of each or equal-length sequences")
    for acc in accelerations:
        if not isinstance(acc, Real) or not math.isfinite(acc) or acc < 1:
            raise ValueError(f"acceleration must be a number >= 1, got {acc!r}")
    for fraction in fractions:
        if not isinstance(fraction, Real) or not 0 < fraction < 1:
            raise ValueError(f"center_fraction must be in (0, 1), got {fraction!r}")
    return [(float(f), a) for f, a in zip(fractions, accelerations)]


def _check_outer_columns(width: int, num_low: int, center_fraction: float) -> None:
    if num_low >= width:
        raise ValueError(f"center_fraction={center_fraction} gives {num_low} centre columns for W={width}, "
                         f"leaving no outer columns to undersample; use a smaller center_fraction or larger W")


def _check_padding(padding, width: int) -> tuple[int, int]:
    try:
        left, right = (int(p) for p in padding)
    except (TypeError, ValueError):
        raise ValueError(f"padding must be (left, right) column indices, got {padding!r}") from None
    if not 0 <= left < min(right, width):
        raise ValueError(f"padding must satisfy 0 <= left < right and left < W={width}, got {padding!r}")
    # A right limit past the last column removes nothing, as in fastMRI's apply_mask.
    return left, min(right, width)
