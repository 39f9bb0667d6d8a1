"""fastMRI scan slices as normalised problems: the one place where a scan becomes something a solver can run on.

Per slice (DESIGN.md, "Data and normalisation"):

1. k-space ``(coils, H, W)``; a test-set file keeps its own mask, otherwise fastMRI's mask function seeded by the
   file name undersamples it retrospectively (the same mask for every slice, as fastMRI does), acquired columns
   only (the header's encoding limits);
2. the operator: ``SenseMRI`` with ESPIRiT maps from the auto-calibration lines (multi-coil) or ``CartesianMRI``
   (single-coil), on the full acquired grid (readout oversampling included);
3. ``sigma_y`` from the k-space periphery (Rayleigh median of the outer readout rows), floored for noiseless
   synthetic scans;
4. ``y`` and ``sigma_y`` divided by the 99.5th percentile of the zero-filled magnitude
   (:func:`invdiff.normalisation.normalise`, the priors' training rule), so solvers and priors see images of
   magnitude ~1;
5. the output mapping: zero outside the coil-map support (where ``A`` is blind and a generative prior would paint
   structure no measurement can refute), multiply back by the scale, centre crop the complex image to the recon
   size, magnitude: fastMRI's own targets are made this way;
6. the pixel spacing of the image grid (encoded field of view / encoded matrix, from the ISMRMRD header), for
   resolution-aware priors.

    >>> with read_scan("file.h5") as scan:
    ...     mask, info = scan_mask(scan, acceleration=4)
    ...     image = scan_slice(scan, 3, mask)                       # TaskImage: problem, target, to_image
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from invdiff.errors import InputError
from invdiff.tasks.base import Task, TaskImage, magnitude_image

log = logging.getLogger(__name__)

# fastMRI's standard (acceleration, centre fraction) pairs; other accelerations keep 0.32 / acceleration.
STANDARD_CENTER_FRACTIONS = {4: 0.08, 8: 0.04}
NORMALISATION_PERCENTILE = 99.5
# ESPIRiT's smallest kernel (3) needs a calibration region wider than itself.
MIN_CALIBRATION_LINES = 4
# ESPIRiT calibrates on at most sigpy's default 24 x 24 centre; a wider region adds cost, not accuracy.
MAX_ESPIRIT_CALIBRATION = 24
# sigpy's square w x w calibration region has (w - k + 1)^2 kernel windows: 9 at 5 lines (kernel 3), too few for the
# signal subspace, and the maps then cover only part of the object (a 128-px camera at 8x: zero-filled 8.9 dB,
# CG-SENSE 3.5) or none of it (4 lines). Below this many lines the maps come from 24 readout rows x the calibration
# lines (every sampled column is fully sampled along the readout; estimate_coil_map_sets): 14.5 / 15.0 dB there; from 6
# lines up the two regions agree within 0.3 dB on the camera, a margined camera and the brain sample (swept 5-13 lines,
# benchmarks/results/soft_sense-2026-12-05-cpu.md).
MIN_SQUARE_CALIBRATION_LINES = 6
MASK_KINDS = ("random", "equispaced", "equispaced_fraction")
NORMALISATION_NOTE = f"y / p{NORMALISATION_PERCENTILE} of the zero-filled magnitude"
NOISE_NOTE = "Rayleigh median of the outer 1/16 readout rows in sampled columns"


def default_center_fraction(acceleration: int) -> float:
    return STANDARD_CENTER_FRACTIONS.get(acceleration, 0.32 / acceleration)


def parse_slices(text: str | None, num_slices: int) -> range:
    """``"a:b"`` (python semantics, negative allowed) or ``"k"`` -> a non-empty range of slice indices."""
    if text is None or text == "all":
        return range(num_slices)
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            chosen = range(num_slices)[slice(int(start) if start else None, int(stop) if stop else None)]
        else:
            index = int(text)
            chosen = range(num_slices)[index:index + 1 if index != -1 else None]
    except ValueError:
        raise InputError(f"--slices: expected 'a:b' or an index, got {text!r}") from None
    if len(chosen) == 0:
        raise InputError(f"--slices {text!r} selects no slice of the {num_slices} in the scan")
    return chosen


def estimate_noise_sigma(kspace: np.ndarray, mask: np.ndarray, edge_fraction: float = 1 / 16) -> float:
    """Per-component noise std of complex k-space from its periphery.

    Uses the outer ``edge_fraction`` of readout rows in the sampled columns, where the object's signal is
    negligible: for complex Gaussian noise of per-component std ``s``, ``|z|`` is Rayleigh with median
    ``s sqrt(2 ln 2)``. The median is robust to the little signal left there.
    """
    rows = max(1, int(round(kspace.shape[-2] * edge_fraction)))
    periphery = np.concatenate([kspace[..., :rows, :], kspace[..., -rows:, :]], axis=-2)[..., mask]
    return float(np.median(np.abs(periphery)) / math.sqrt(2 * math.log(2)))


def calibration_width(mask: np.ndarray) -> int:
    """Width of the contiguous sampled block around the centre column (the auto-calibration region)."""
    centre = len(mask) // 2
    left = right = centre
    while left > 0 and mask[left - 1]:
        left -= 1
    while right < len(mask) - 1 and mask[right + 1]:
        right += 1
    return right - left + 1 if mask[centre] else 0


# In-plane pixel spacings a scanner can produce (mm): outside this a field of view is a broken header, not a scan.
PLAUSIBLE_SPACING_MM = (0.01, 50.0)


def pixel_spacing_mm(header, grid: tuple[int, int], *, source: str = "") -> float | None:
    """Mean in-plane pixel spacing (mm) of the ``grid = (H, W)`` image the operator works on: the encoded field
    of view over the encoded matrix, rescaled to the grid. None (the prior's default, with a warning naming the
    value) when the header gives no field of view or an implausible one."""
    fov = getattr(header, "encoded_fov_mm", None)
    if fov is None:
        return None
    spacing = float((fov[0] / grid[0] + fov[1] / grid[1]) / 2) if min(fov[:2]) > 0 else float("nan")
    low, high = PLAUSIBLE_SPACING_MM
    if not low <= spacing <= high:
        log.warning("%s: ISMRMRD encoded field of view %g x %g mm over a %d x %d grid gives a pixel spacing of "
                    "%.3g mm, outside [%g, %g]: ignored, the prior's default spacing is used", source or "scan",
                    fov[0], fov[1], grid[0], grid[1], spacing, low, high)
        return None
    return spacing


def load_mask_file(path, scan) -> np.ndarray:
    """A user's column mask (``.npy``, bool or 0/1, shape (W,)) checked against the scan: bool (W,)."""
    from pathlib import Path

    path = Path(path)
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"--mask-file {path}: not a readable .npy array ({err})") from None
    width = scan.kspace_shape[-1]
    if mask.ndim != 1 or mask.shape[0] != width:
        raise InputError(f"--mask-file {path}: shape {mask.shape}; expected ({width},), one entry per k-space column "
                         f"of {scan.path.name}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise InputError(f"--mask-file {path}: values {np.unique(mask)[:5].tolist()}; expected 0/1 or bool")
    mask = mask.astype(bool)
    left, right = scan.header.padding
    if mask[:left].any() or mask[right:].any():
        raise InputError(f"--mask-file {path}: samples columns outside the acquired range [{left}, {right}) of "
                         f"{scan.path.name}")
    if not mask.any():
        raise InputError(f"--mask-file {path}: samples no column")
    return mask


def scan_mask(scan, *, acceleration: int = 4, center_fraction: float | None = None,
              mask_kind: str = "random", mask_file=None) -> tuple[np.ndarray, dict]:
    """The file's own test-set mask, a user's ``mask_file``, or fastMRI's retrospective mask seeded by the file
    name: bool (W,), info."""
    if scan.mask is not None:
        if mask_file is not None:
            raise InputError(f"{scan.path}: the file carries its own (test-set) mask; --mask-file cannot replace it")
        return np.asarray(scan.mask, dtype=bool), {"mask_source": "file", "acceleration": scan.acceleration}
    if mask_file is not None:
        mask = load_mask_file(mask_file, scan)
        acquired = scan.header.padding[1] - scan.header.padding[0]
        return mask, {"mask_source": f"--mask-file {mask_file}", "sampled_columns": int(mask.sum()),
                      "effective_acceleration": round(acquired / int(mask.sum()), 4)}
    from invdiff.operators.masks import make_mask

    if isinstance(acceleration, bool) or int(acceleration) != acceleration or acceleration < 1:
        raise InputError(f"--accel: expected a positive integer acceleration, got {acceleration!r}")
    if mask_kind not in MASK_KINDS:
        raise InputError(f"--mask: expected one of {', '.join(MASK_KINDS)}, got {mask_kind!r}")
    center_fraction = center_fraction or default_center_fraction(int(acceleration))
    if not 0 < center_fraction < 1:
        raise InputError(f"--center-fraction: expected a fraction in (0, 1), got {center_fraction!r}")
    _, _, height, width = scan.kspace_shape
    mask = make_mask(mask_kind, shape=(height, width), acceleration=int(acceleration),
                     center_fraction=center_fraction, seed=scan.path.name, padding=scan.header.padding).numpy()
    # What ran, not only what was asked: the centre fraction caps how far a mask can undersample.
    acquired = scan.header.padding[1] - scan.header.padding[0]
    effective = acquired / max(int(mask.sum()), 1)
    if abs(effective - acceleration) > 0.25 * acceleration:
        log.warning("%s: --accel %s with centre fraction %.3g samples %d of %d acquired columns: an effective "
                    "acceleration of %.2f", scan.path.name, acceleration, center_fraction, int(mask.sum()), acquired,
                    effective)
    info = {"mask_source": f"fastMRI {mask_kind} mask seeded by file name", "acceleration": int(acceleration),
            "center_fraction": center_fraction, "effective_acceleration": round(effective, 4),
            "sampled_columns": int(mask.sum())}
    return mask.astype(bool), info


def slice_coil_maps(masked_kspace: np.ndarray, calibration: int, cache_key=None) -> np.ndarray:
    """ESPIRiT maps complex64 ``(coils, H, W)`` of one masked slice with ``calibration`` centre lines: sigpy's square
    region (at most 24 x 24), or 24 rows x the lines below :data:`MIN_SQUARE_CALIBRATION_LINES`."""
    from invdiff.operators.coil_maps import estimate_coil_map_sets, estimate_coil_maps

    if calibration < MIN_SQUARE_CALIBRATION_LINES:
        return estimate_coil_map_sets(masked_kspace, calib_width=calibration, num_maps=1,
                                      calib_rows=MAX_ESPIRIT_CALIBRATION, cache_key=cache_key).maps[0]
    return estimate_coil_maps(masked_kspace, calib_width=min(MAX_ESPIRIT_CALIBRATION, calibration), cache_key=cache_key)


def calibration_block(mask: np.ndarray) -> np.ndarray:
    """Only the contiguous sampled block around the centre column of ``mask``: where an active solver starts."""
    width = calibration_width(mask)
    block = np.zeros_like(mask, dtype=bool)
    if width:
        left = len(mask) // 2
        while left > 0 and mask[left - 1]:
            left -= 1
        block[left:left + width] = True
    return block


def check_calibration(scan, mask: np.ndarray) -> int:
    """The calibration width of ``mask``; :class:`InputError` when a multi-coil scan has too few lines for ESPIRiT."""
    width = calibration_width(mask)
    if scan.is_multicoil and width < MIN_CALIBRATION_LINES:
        raise InputError(f"{scan.path}: the mask has {width} contiguous centre lines; ESPIRiT needs at least "
                         f"{MIN_CALIBRATION_LINES} (raise --center-fraction)")
    return width


class RetrospectiveAcquisition:
    """``measure(mask) -> y``: the lines ``mask`` selects of a fully sampled slice, divided by ``scale`` (the units of
    the problem's ``y``), as (1, 2, [C,] H, W) real channels; every other entry is an exact zero.

    It holds the whole k-space (that is what "retrospective" means) but hands out only what is asked for, and keeps
    the masks it was asked for in ``requests``, so a test can check that an active solver read nothing it did not
    choose. ``multicoil``: keep the coil axis (SENSE) or take coil 0 (single-coil Cartesian).
    """

    def __init__(self, kspace: torch.Tensor, scale: float, *, multicoil: bool,
                 acquirable: torch.Tensor | None = None):
        self._kspace = kspace                      # complex (C, H, W)
        self.scale = float(scale)
        self.multicoil = multicoil
        self.requests: list[torch.Tensor] = []
        # Columns the scanner acquired (the header's encoding limits): the only ones worth asking for.
        self.acquirable = (torch.ones(kspace.shape[-1], dtype=torch.bool) if acquirable is None
                           else torch.as_tensor(acquirable, dtype=torch.bool))

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        from invdiff.operators.fft import complex_to_real

        mask = torch.as_tensor(mask, dtype=torch.bool, device=self._kspace.device)
        if mask.shape[-1] != self._kspace.shape[-1]:
            raise InputError(f"acquisition: mask has {mask.shape[-1]} columns; the scan has {self._kspace.shape[-1]}")
        self.requests.append(mask.detach().cpu().clone())
        chosen = torch.where(mask, self._kspace, torch.zeros((), dtype=self._kspace.dtype, device=mask.device))
        y = complex_to_real(chosen[None] if self.multicoil else chosen[None, 0])
        return y / self.scale


def scan_slice(scan, index: int, mask: np.ndarray, *, device: torch.device | str = "cpu",
               min_relative_sigma: float = 1e-4, maps_mask: np.ndarray | None = None) -> TaskImage:
    """Slice ``index`` of an open :class:`invdiff.datasets.fastmri.Scan` under ``mask`` as a :class:`TaskImage`.

    maps_mask: the columns whose calibration block gives the ESPIRiT maps (default: ``mask``'s own). Masks of one
    budget compared with the maps of one shared calibration block show what the lines buy, apart from what a wider
    calibration block buys (a mask whose lines happen to widen the contiguous centre also gets better maps).
    """
    from invdiff.normalisation import normalise
    from invdiff.operators.fft import complex_to_real
    from invdiff.operators.mri import CartesianMRI, SenseMRI
    from invdiff.problem import InverseProblem

    device = torch.device(device)
    kspace = scan.kspace(index)
    calibration = check_calibration(scan, mask)
    if not np.any(kspace[..., mask]):
        raise InputError(f"{scan.path}: dataset 'kspace' slice {index}: expected measured data in the sampled "
                         f"columns, found all zeros")
    mask_t = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    k = torch.from_numpy(np.ascontiguousarray(kspace)).to(device)
    k = torch.where(mask_t, k, torch.zeros((), dtype=k.dtype, device=device))    # exact zeros, never -0.0
    if scan.is_multicoil:
        maps_from = mask
        if maps_mask is not None:
            if np.shape(maps_mask) != np.shape(mask):
                raise InputError(f"maps_mask: expected {np.shape(mask)} like the mask, got {np.shape(maps_mask)}")
            maps_from = np.asarray(maps_mask, dtype=bool)
            calibration = check_calibration(scan, maps_from)
        maps = slice_coil_maps(np.where(maps_from, kspace, 0), calibration,
                               cache_key=(str(scan.path), index, calibration))
        operator = SenseMRI(mask=mask_t, coil_maps=torch.from_numpy(maps).to(device)[None])
        y = complex_to_real(k[None])                                         # (1, 2, C, H, W)
    else:
        operator = CartesianMRI(mask=mask_t, img_size=tuple(kspace.shape[-2:]))
        y = complex_to_real(k[None, 0])                                      # (1, 2, H, W)
    sigma_kspace = estimate_noise_sigma(np.where(mask, kspace, 0), mask)
    # A noiseless (synthetic) scan would give sigma 0; keep the likelihood finite and say so.
    sigma_floor = min_relative_sigma * float(np.abs(kspace).max())
    if sigma_kspace < sigma_floor:
        log.info("k-space noise estimate %.3g is below the floor %.3g; using the floor", sigma_kspace, sigma_floor)
        sigma_kspace = sigma_floor
    problem, scale = normalise(InverseProblem(operator, y, sigma_kspace), percentile=NORMALISATION_PERCENTILE)
    if scan.mask is None:           # a fully sampled file: active solvers may ask for more lines
        acquirable = torch.zeros(kspace.shape[-1], dtype=torch.bool)
        acquirable[scan.header.padding[0]:scan.header.padding[1]] = True
        problem = dataclasses.replace(problem, acquisition=RetrospectiveAcquisition(
            torch.from_numpy(np.ascontiguousarray(kspace)).to(device), scale, multicoil=scan.is_multicoil,
            acquirable=acquirable))
    recon_size = scan.recon_size
    return TaskImage(problem, scan.target(index),
                     functools.partial(magnitude_image, scale=scale, crop=recon_size,
                                       support=operator.image_support()),
                     index=int(index), spacing_mm=pixel_spacing_mm(scan.header, tuple(kspace.shape[-2:]),
                                                                   source=str(scan.path)),
                     info={"scale": scale, "sigma_kspace": sigma_kspace, "sigma_y_normalised": float(problem.sigma_y)})


def scan_images(scan, slices: Sequence[int], mask: np.ndarray, *, device="cpu") -> Iterator[TaskImage]:
    """:func:`scan_slice` for each slice, one at a time (a whole volume's coil maps need not fit in memory)."""
    for index in slices:
        yield scan_slice(scan, index, mask, device=device)


def scan_tasks(scan_path: str | Path, accelerations: Sequence[int], *, slices: str | None = None, device="cpu",
               center_fraction: float | None = None, mask_kind: str = "random",
               require_target: bool = True) -> list[Task]:
    """One task per acceleration (named ``"4x"``, ...) on the chosen slices of a fastMRI scan, images built up
    front (a comparison runs every solver on each). The target is the file's reference image."""
    from invdiff.datasets.fastmri import read_scan

    tasks = []
    with read_scan(scan_path) as scan:
        chosen = parse_slices(slices, scan.num_slices)
        if require_target and scan.target(chosen[0]) is None:
            raise InputError(f"{scan_path}: the file has no reference image (reconstruction_rss / _esc); a "
                             f"comparison needs targets to score against (a fastMRI test-set file has none)")
        if scan.mask is not None and len(accelerations) > 1:
            raise InputError(f"{scan_path}: the file carries its own mask (acceleration {scan.acceleration}); "
                             f"--accel must name one acceleration, got {list(accelerations)}")
        for acceleration in accelerations:
            mask, mask_info = scan_mask(scan, acceleration=acceleration, center_fraction=center_fraction,
                                        mask_kind=mask_kind)
            images = list(scan_images(scan, chosen, mask, device=device))
            info = {**mask_info, "sampled_columns": int(mask.sum()), "columns": int(mask.size),
                    "calibration_lines": calibration_width(mask), "slices": list(chosen), "scan": str(scan_path),
                    "normalisation": NORMALISATION_NOTE, "noise_estimate": NOISE_NOTE}
            name = f"{acceleration}x" if scan.mask is None else f"{scan.acceleration}x"
            tasks.append(Task(name, "mri", images, baseline="zero-filled", info=info))
    return tasks


__all__ = ["RetrospectiveAcquisition", "calibration_block", "slice_coil_maps", "scan_mask", "scan_slice", "scan_images",
           "scan_tasks", "parse_slices", "estimate_noise_sigma",
           "calibration_width", "check_calibration", "pixel_spacing_mm", "default_center_fraction",
           "STANDARD_CENTER_FRACTIONS", "NORMALISATION_PERCENTILE", "MIN_CALIBRATION_LINES", "MASK_KINDS"]
