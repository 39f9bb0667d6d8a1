"""Coil sensitivities for SENSE: ESPIRiT maps from the auto-calibration region, cached.

One map set (:func:`estimate_coil_maps`): sigpy's ``EspiritCalib`` does the work (imported on first use: sigpy
pulls in numba); this module chooses the kernel for narrow calibration regions and caches the maps in memory (LRU)
and optionally on disk.

Several map sets (:func:`estimate_coil_map_sets`, soft-SENSE): our own ESPIRiT (Uecker et al. 2014, "ESPIRiT -- an
eigenvalue approach to autocalibrating parallel MRI: where SENSE meets GRAPPA", MRM 71:990), since sigpy returns
only the top eigenvector. With coil images ``c(r) = (c_1(r) .. c_C(r))`` and k-space ``k = F c``:

1. calibration matrix ``A``: one row per position of a ``kw x kw`` window in the calibration region, holding the
   window's samples of every coil (length ``C kw^2``); k-space of coil images ``S_c x`` lies (nearly) in a
   low-dimensional row space of ``A``. SVD ``A = U Sigma V^H``; the signal subspace ``V_par`` is the right singular
   vectors with ``sigma_k > threshold * sigma_1`` (the paper's "Theory: calibration matrix and its null space");
2. projecting every window of ``k`` onto ``V_par`` is a convolution in k-space, i.e. a pointwise ``C x C`` matrix
   in image space, ``W(r) = (N / kw^2) sum_k g_k(r) g_k(r)^H`` with ``g_k = F^{-1}`` of kernel ``k`` zero-padded
   to the ``N = H W`` grid (the paper's operator ``G^H G`` of the eigenvalue problem);
3. the consistent coil images satisfy ``W(r) c(r) = c(r)``: the sensitivities are eigenvectors of ``W(r)`` with
   eigenvalue 1. Usually one eigenvalue is ~1; where the sensitivities are not periodic over the field of view
   (an object that fills it: the calibration kernel cannot tell which side of the wrap a signal came from) a second
   eigenvalue is ~1 too (the paper's "Multiple sets of maps");
4. map set ``m`` is the ``m``-th eigenvector, set to zero where its eigenvalue is at most ``crop`` (the paper's
   eigenvalue crop; one level per set may be given); each set's phase is made relative to coil 0, as sigpy does
   for its one set.

Soft-SENSE then models ``y = M F sum_m S_m x_m`` (:class:`invdiff.operators.soft_sense.SoftSenseMRI`).

    >>> maps = estimate_coil_maps(masked_kspace, calib_width=24)     # complex64 (coils, H, W)
    >>> op = SenseMRI(mask=mask, coil_maps=torch.from_numpy(maps)[None])
    >>> sets = estimate_coil_map_sets(masked_kspace, calib_width=10)  # .maps (2, coils, H, W), .eigenvalues (2, H, W)
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from invdiff.io import atomic_path

log = logging.getLogger(__name__)


class _CoilMapCache:
    """Thread-safe LRU of ESPIRiT maps in memory, with an optional folder of ``.npy`` files."""

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key) -> np.ndarray | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
            return None

    def put(self, key, maps: np.ndarray) -> None:
        with self._lock:
            self._entries[key] = maps
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


_COIL_MAP_CACHE = _CoilMapCache()


def clear_coil_map_cache() -> None:
    """Empty the in-memory ESPIRiT cache (files in a ``cache_dir`` are kept)."""
    _COIL_MAP_CACHE.clear()


def estimate_coil_maps(kspace: np.ndarray, calib_width: int = 24, *, threshold: float = 0.02,
                       kernel_width: int | None = None, crop: float = 0.95, max_iter: int = 100, cache_key=None,
                       cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """ESPIRiT coil sensitivities from the auto-calibration region, complex64 ``(coils, H, W)``.

    ``S = EspiritCalib(k)`` (sigpy): the ``calib_width^2`` centre of ``k`` gives the calibration matrix,
    ``threshold`` (relative singular value) its signal subspace, and ``S`` is the eigenvector of eigenvalue
    ~1 per pixel; pixels with eigenvalue below ``crop`` get ``S = 0``. Inside the object
    ``sum_c |S_c|^2 = 1`` and ``sum_c conj(S_c) F^H k_c`` is the image (up to a smooth phase).

    kspace: complex ``(coils, H, W)`` (masked k-space is fine while the calibration region is sampled).
    ``kernel_width`` defaults to ``min(6, max(3, calib_width // 2 - 1))``: 6 (sigpy's default) from 14
    calibration lines up; a narrower region with a 6 x 6 kernel has too few calibration rows
    ``(calib_width - kernel_width + 1)^2`` and leaves holes (S = 0) inside the object (measured: 15 % of the
    object at 10 lines with kernel 6, none with kernel 4).
    Results are cached in memory (LRU of 16) under ``cache_key`` (e.g. ``(file, slice)``) or, when None,
    under the sha256 of the k-space; with ``cache_dir`` also as ``.npy`` files there (keyed by content).
    """
    kspace = np.asarray(kspace)
    if not np.iscomplexobj(kspace) or kspace.ndim != 3:
        raise ValueError(f"kspace must be complex (coils, H, W), got {kspace.dtype} {kspace.shape}")
    calib_width = int(calib_width)
    kernel_width = min(6, max(3, calib_width // 2 - 1)) if kernel_width is None else int(kernel_width)
    if not kernel_width < calib_width <= min(kspace.shape[-2:]):
        raise ValueError(f"calib_width must satisfy kernel_width={kernel_width} < calib_width <= min(H, W)="
                         f"{min(kspace.shape[-2:])}, got {calib_width}")
    params = (calib_width, float(threshold), kernel_width, float(crop), int(max_iter))
    content_key = None
    if cache_key is None or cache_dir is not None:
        content_key = _content_key(kspace, params)
    memory_key = (("key", cache_key, kspace.shape, params) if cache_key is not None else ("sha", content_key))
    maps = _COIL_MAP_CACHE.get(memory_key)
    if maps is None and cache_dir is not None:
        maps = _load_cached_maps(Path(cache_dir) / f"espirit-{content_key}.npy", kspace.shape)
    if maps is None:
        maps = _espirit(kspace, *params)
        if cache_dir is not None:
            _save_cached_maps(Path(cache_dir) / f"espirit-{content_key}.npy", maps)
    _COIL_MAP_CACHE.put(memory_key, maps)
    return maps.copy()   # callers may modify their copy; the cached array stays intact


def _espirit(kspace: np.ndarray, calib_width: int, threshold: float, kernel_width: int, crop: float,
             max_iter: int) -> np.ndarray:
    from sigpy.mri.app import EspiritCalib   # sigpy imports numba: only pay for it when maps are needed

    maps = EspiritCalib(kspace.astype(np.complex64), calib_width=calib_width, thresh=threshold,
                        kernel_width=kernel_width, crop=crop, max_iter=max_iter, show_pbar=False).run()
    return np.asarray(maps, dtype=np.complex64)


def default_kernel_width(calib_width: int) -> int:
    """``min(6, max(3, calib_width // 2 - 1))``: sigpy's 6 from 14 calibration lines up, narrower below."""
    return min(6, max(3, int(calib_width) // 2 - 1))


@dataclass(frozen=True)
class CoilMapSets:
    """ESPIRiT map sets: ``maps`` complex64 ``(M, C, H, W)`` (set ``m`` is zero where ``eigenvalues[m] <= crop``),
    ``eigenvalues`` float32 ``(M, H, W)`` (descending in ``m``), and the calibration region that made them."""

    maps: np.ndarray
    eigenvalues: np.ndarray
    calibration: dict

    def fraction_above(self, m: int, level: float) -> float:
        """Fraction of set 0's support where set ``m``'s eigenvalue exceeds ``level`` (0 when set 0 is empty)."""
        first = self.maps[0].any(axis=0)
        inside = int(first.sum())
        return float((self.eigenvalues[m][first] > level).sum() / inside) if inside else 0.0


def estimate_coil_map_sets(kspace: np.ndarray, calib_width: int = 24, *, num_maps: int = 2, calib_rows: int = 24,
                           threshold: float = 0.02, kernel_width: int | None = None,
                           crop: float | tuple[float, ...] = 0.95, cache_key=None) -> CoilMapSets:
    """The top ``num_maps`` ESPIRiT eigenvector sets (see the module docstring), for soft-SENSE.

    kspace: complex ``(coils, H, W)``, masked is fine; columns (axis -1) are the phase-encoding direction. The
    calibration region is ``calib_rows`` readout rows (every sampled column is fully sampled along the readout, so
    rows are free calibration data: sigpy's square region has only ``(calib_width - kernel_width + 1)^2`` windows,
    9 at 5 lines) by at most ``calib_width`` columns of the sampled block around the centre column.
    ``kernel_width`` (square) defaults to :func:`default_kernel_width` of the columns used. ``crop``: one eigenvalue
    level for every set, or one per set (soft-SENSE in CG-SENSE crops set 2 at 0.8). ``num_maps = 1`` gives
    the same map as :func:`estimate_coil_maps` up to the power iteration's convergence; that function stays the
    one-map path. Cached in memory (the same LRU) under ``cache_key`` or the k-space's sha256.
    """
    kspace = np.asarray(kspace)
    if not np.iscomplexobj(kspace) or kspace.ndim != 3:
        raise ValueError(f"kspace must be complex (coils, H, W), got {kspace.dtype} {kspace.shape}")
    coils, height, width = kspace.shape
    if not 1 <= int(num_maps) <= coils:
        raise ValueError(f"num_maps must be in [1, coils={coils}], got {num_maps}")
    crops = tuple(float(c) for c in np.broadcast_to(np.asarray(crop, dtype=float), (int(num_maps),)))
    lo, hi = _sampled_block(kspace)
    cols = min(int(calib_width), hi - lo)
    rows = min(height, max(int(calib_rows), cols))
    kernel_width = default_kernel_width(cols) if kernel_width is None else int(kernel_width)
    if not kernel_width < cols:
        raise ValueError(f"the sampled block around the centre column has {hi - lo} columns (calib_width "
                         f"{calib_width}); ESPIRiT with kernel_width={kernel_width} needs more than {kernel_width}")
    col0 = int(np.clip(width // 2 - cols // 2, lo, hi - cols))
    row0 = height // 2 - rows // 2
    params = ("sets", int(num_maps), rows, cols, row0, col0, float(threshold), kernel_width, crops)
    memory_key = (("key", cache_key, kspace.shape, params) if cache_key is not None
                  else ("sha", _content_key(kspace, params)))
    cached = _COIL_MAP_CACHE.get(memory_key)
    if cached is None:
        calib = kspace[:, row0:row0 + rows, col0:col0 + cols]
        maps, eigenvalues = _espirit_sets(calib, (height, width), int(num_maps), float(threshold), kernel_width,
                                          crops)
        cached = CoilMapSets(maps, eigenvalues, {"rows": [row0, row0 + rows], "columns": [col0, col0 + cols],
                                                 "kernel_width": kernel_width, "threshold": float(threshold),
                                                 "crop": list(crops)})
    _COIL_MAP_CACHE.put(memory_key, cached)
    return CoilMapSets(cached.maps.copy(), cached.eigenvalues.copy(), dict(cached.calibration))


def _sampled_block(kspace: np.ndarray) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous sampled (non-zero) columns around the centre column ``W // 2``."""
    sampled = np.any(kspace != 0, axis=(0, 1))
    centre = kspace.shape[-1] // 2
    if not sampled[centre]:
        raise ValueError("the centre k-space column is not sampled: no calibration region for ESPIRiT")
    lo = hi = centre
    while lo > 0 and sampled[lo - 1]:
        lo -= 1
    while hi < len(sampled) and sampled[hi]:
        hi += 1
    return lo, hi


def _espirit_sets(calib: np.ndarray, shape: tuple[int, int], num_maps: int, threshold: float, kernel_width: int,
                  crops: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4 of the module docstring on a calibration region ``calib`` (C, rows, cols) -> maps, eigenvalues."""
    coils = calib.shape[0]
    height, width = shape
    kw = kernel_width
    # 1. calibration matrix A: rows = windows, columns = (coil, kr, kc); A = U Sigma V^H, V_par = sigma > t sigma_1
    windows = np.lib.stride_tricks.sliding_window_view(calib.astype(np.complex128), (kw, kw), axis=(1, 2))
    matrix = windows.transpose(1, 2, 0, 3, 4).reshape(-1, coils * kw * kw)
    _, singular, vh = np.linalg.svd(matrix, full_matrices=False)
    kernels = vh[singular > threshold * singular[0]].reshape(-1, coils, kw, kw)        # (K, C, kw, kw)
    # 2. W(r)_{ab} = (N / kw^2) sum_k g_ka(r) conj(g_kb(r)), g_k = centred unitary F^{-1} of kernel k on the grid.
    #    Expanding the products, W_ab(r) = (sqrt(N) / kw^2) F^{-1}[R_ab](r) with R_ab(d) = sum_k sum_p v_ka(p + d)
    #    conj(v_kb(p)) the kernels' cross-correlation (offsets |d| < kw): C^2 transforms of the grid, not K C.
    size = 2 * kw - 1
    padded = np.zeros((len(kernels), coils, size, size), dtype=np.complex128)
    padded[..., :kw, :kw] = kernels
    spectra = np.fft.fft2(padded)
    correlation = np.fft.fftshift(np.fft.ifft2(np.einsum("kaxy,kbxy->abxy", spectra, spectra.conj())), axes=(-2, -1))
    grid = np.zeros((coils, coils, height, width), dtype=np.complex128)
    top, left = height // 2 - (kw - 1), width // 2 - (kw - 1)                        # offset d = 0 at (H//2, W//2)
    grid[..., top:top + size, left:left + size] = correlation
    image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(grid, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    operator = image * (np.sqrt(height * width) / kw ** 2)                           # (C, C, H, W)
    # 3. per pixel, W(r) s = lambda s (Hermitian): eigh gives ascending eigenvalues; keep the top num_maps
    values, vectors = np.linalg.eigh(operator.transpose(2, 3, 0, 1))                # (H, W, C), (H, W, C, C)
    values = values[..., ::-1][..., :num_maps]
    vectors = vectors[..., ::-1][..., :num_maps]                                     # (H, W, C, M)
    maps = vectors.transpose(3, 2, 0, 1)                                             # (M, C, H, W)
    eigenvalues = values.transpose(2, 0, 1)                                          # (M, H, W)
    # 4. phase relative to coil 0, and the eigenvalue crop
    reference = maps[:, :1]
    magnitude = np.abs(reference)
    maps = maps * np.where(magnitude > 0, reference.conj() / np.where(magnitude > 0, magnitude, 1), 1)
    maps = maps * (eigenvalues > np.asarray(crops)[:, None, None])[:, None]
    return maps.astype(np.complex64), eigenvalues.astype(np.float32)


def _content_key(kspace: np.ndarray, params: tuple) -> str:
    digest = hashlib.sha256()
    digest.update(repr((kspace.shape, str(kspace.dtype), params)).encode())
    digest.update(np.ascontiguousarray(kspace).tobytes())
    return digest.hexdigest()


def _load_cached_maps(file: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    if not file.is_file():
        return None
    try:
        maps = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable cached coil maps (%s); recomputing", file, err)
        return None
    if maps.shape != tuple(shape) or maps.dtype != np.complex64:
        log.warning("%s: cached coil maps have %s %s, expected complex64 %s; recomputing",
                    file, maps.dtype, maps.shape, tuple(shape))
        return None
    return maps


def _save_cached_maps(file: Path, maps: np.ndarray) -> None:
    if not file.parent.is_dir():
        raise FileNotFoundError(f"cache_dir {file.parent} does not exist; expected an existing folder")
    with atomic_path(file, fsync=False) as tmp:
        np.save(tmp, maps, allow_pickle=False)


__all__ = ["estimate_coil_maps", "estimate_coil_map_sets", "CoilMapSets", "default_kernel_width",
           "clear_coil_map_cache"]
