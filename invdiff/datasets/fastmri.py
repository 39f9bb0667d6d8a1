"""fastMRI h5 files: lazy reading with validation, reference images, and a torch-style dataset of slices.

The ISMRMRD header is parsed in :mod:`invdiff.datasets.ismrmrd`, submission files are written by
:mod:`invdiff.datasets.submission`, coil maps come from :mod:`invdiff.operators.coil_maps`.

File layout (one volume per file, facebookresearch/fastMRI):

* ``kspace`` complex64 ``(slices, coils, H, W)`` multi-coil or ``(slices, H, W)`` single-coil; H is the
  (usually 2x oversampled) readout, W the phase encoding;
* ``reconstruction_rss`` (multi-coil) / ``reconstruction_esc`` (single-coil) float32 ``(slices, H_r, W_r)``;
  absent from test files, which instead carry ``mask`` (W,) and attrs ``acceleration``,
  ``num_low_frequency`` and already undersampled k-space;
* ``ismrmrd_header``: ISMRMRD XML with the encoded and recon matrix sizes and the encoding limits;
* attrs ``max``, ``norm`` (of the target volume), ``acquisition``, ``patient_id``.

Reference image (how fastMRI made its targets): ``x_c = F^H k_c`` (centred orthonormal inverse DFT),
centre-crop the complex coil images to the recon size, ``target = sqrt(sum_c |x_c|^2)``.

    >>> with read_scan("file_brain_AXT1.h5") as scan:       # opens lazily: no slice is read yet
    ...     k = scan.kspace(3)                               # complex64 (coils, H, W), only slice 3 read
    ...     image = reference_image(k, scan.recon_size)      # float32 (H_r, W_r) == scan.target(3)
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
import torch

from invdiff.datasets.ismrmrd import HeaderError, ScanHeader, fallback_header, parse_ismrmrd_header
from invdiff.errors import InputError
from invdiff.operators.fft import ifft2c

log = logging.getLogger(__name__)

__all__ = ["ScanError", "ScanNotFoundError", "Scan", "ScanSlice", "read_scan", "reference_image", "center_crop",
           "ifft2c_numpy", "FastMRIDataset"]

TARGET_KEYS = {True: ("reconstruction_rss", "reconstruction_esc"), False: ("reconstruction_esc", "reconstruction_rss")}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_KSPACE_LAYOUT = "(slices, H, W) single-coil or (slices, coils, H, W) multi-coil"


# ---- errors ---------------------------------------------------------------------------------------------

class ScanError(InputError):
    """A fastMRI file that cannot be used: one line naming the file, the key, what was expected and found.

    The CLI reports it and exits with status 2.
    """


class ScanNotFoundError(ScanError, FileNotFoundError):
    """The scan file does not exist (both a :class:`ScanError` and a :class:`FileNotFoundError`)."""


def _scan_error(path, subject: str, expected: str, found: str, cls: type[ScanError] = ScanError) -> ScanError:
    return cls(f"{path}: {subject}: expected {expected}, found {found}")


# ---- reading a scan -------------------------------------------------------------------------------------

def read_scan(path: str | os.PathLike, *, check_finite: bool = False) -> "Scan":
    """Open a fastMRI h5 file lazily and validate its structure; see :class:`Scan`.

    ``check_finite=True`` also reads every slice once up front and rejects NaN/Inf k-space (slices are
    always checked when read). Raises :class:`ScanError` (``ValueError``) for unusable files.
    """
    return Scan(path, check_finite=check_finite)


class Scan:
    """One fastMRI volume, read lazily: metadata at open, one k-space slice per :meth:`kspace` call.

    A context manager (closes the h5 file). Picklable for dataloader workers: the open handle is dropped
    and the file reopened (and revalidated) on first access in the new process, also after a fork.

    Attributes: ``path``, ``num_slices``, ``num_coils`` (1 for single-coil), ``is_multicoil``,
    ``kspace_shape`` ``(slices, coils, H, W)``, ``header`` (:class:`ScanHeader`, never None),
    ``recon_size`` ``(H_r, W_r)`` (the target's shape when there is one, else the header's), ``attrs``
    (all file attrs as Python values), ``max``, ``norm``, ``acquisition``, ``patient_id``, and for test
    files ``mask`` (bool ``(W,)``), ``acceleration``, ``num_low_frequency`` (None otherwise).
    """

    def __init__(self, path: str | os.PathLike, *, check_finite: bool = False):
        self.path = Path(path)
        self.check_finite = check_finite
        self._h5: h5py.File | None = None
        self._owner_pid: int | None = None
        self._load()
        if check_finite:
            for index in range(self.num_slices):
                self.kspace(index)

    # ---- file handle ----------------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        """The open h5 file, reopened (and revalidated) after unpickling or in a forked child process."""
        if self._h5 is None or self._owner_pid != os.getpid():
            self._load()
        return self._h5

    def _load(self) -> None:
        handle = _open_hdf5(self.path)
        try:
            self._read_metadata(handle)
        except BaseException:
            handle.close()
            raise
        self._h5, self._owner_pid = handle, os.getpid()

    def close(self) -> None:
        if self._h5 is not None and self._owner_pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __enter__(self) -> "Scan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"], state["_owner_pid"] = None, None
        return state

    def __repr__(self) -> str:
        kind = "multi-coil" if self.is_multicoil else "single-coil"
        return (f"Scan({str(self.path)!r}, {kind}, kspace {self.kspace_shape}, recon {self.recon_size}, "
                f"{'test set' if self.mask is not None else 'target ' + str(self.target_key)})")

    # ---- validation at open ---------------------------------------------------------------------------
    def _read_metadata(self, h5: h5py.File) -> None:
        kspace = _kspace_dataset(self.path, h5)
        self.is_multicoil = kspace.ndim == 4
        slices, height, width = kspace.shape[0], kspace.shape[-2], kspace.shape[-1]
        coils = kspace.shape[1] if self.is_multicoil else 1
        self.kspace_shape = (slices, coils, height, width)
        self.num_slices, self.num_coils = slices, coils
        self.attrs = {key: _python_value(value) for key, value in h5.attrs.items()}
        self.header = _scan_header(self.path, h5, kspace.shape)
        self.target_key = _target_key(self.path, h5, self.is_multicoil, slices)
        self.mask = _test_mask(self.path, h5, width)
        if self.target_key is not None:
            self.recon_size = tuple(int(s) for s in h5[self.target_key].shape[-2:])
        else:
            self.recon_size = (min(self.header.recon_size[0], height), min(self.header.recon_size[1], width))

    # ---- data access ----------------------------------------------------------------------------------
    def kspace(self, slice_index: int) -> np.ndarray:
        """Slice ``slice_index``'s k-space, complex64 ``(coils, H, W)`` (``(1, H, W)`` single-coil).

        Only this slice is read from disk. Raises :class:`ScanError` if it holds NaN or Inf.
        """
        index = self._check_index(slice_index)
        data = np.asarray(self._file()["kspace"][index]).astype(np.complex64, copy=False)
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise _scan_error(self.path, f"dataset 'kspace' slice {index}", "finite values",
                              f"{bad} NaN/Inf of {data.size}")
        return data if self.is_multicoil else data[None]

    def target(self, slice_index: int) -> np.ndarray | None:
        """The stored reference image float32 ``(H_r, W_r)`` of one slice, or None (test files)."""
        index = self._check_index(slice_index)
        if self.target_key is None:
            return None
        return np.asarray(self._file()[self.target_key][index], dtype=np.float32)

    def coil_maps(self, slice_index: int, **espirit) -> np.ndarray:
        """ESPIRiT maps of one slice, complex64 ``(coils, H, W)`` (cached; see :func:`estimate_coil_maps`)."""
        if "calib_width" not in espirit and self.num_low_frequency is not None:
            espirit["calib_width"] = self.num_low_frequency
        from invdiff.operators.coil_maps import estimate_coil_maps
        return estimate_coil_maps(self.kspace(slice_index), cache_key=(str(self.path.resolve()), slice_index),
                                  **espirit)

    def _check_index(self, slice_index: int) -> int:
        index = int(slice_index)
        if not -self.num_slices <= index < self.num_slices:
            raise IndexError(f"{self.path}: slice {slice_index} out of range for {self.num_slices} slices")
        return index % self.num_slices

    # ---- attrs ----------------------------------------------------------------------------------------
    @property
    def max(self) -> float | None:
        return self.attrs.get("max")

    @property
    def norm(self) -> float | None:
        return self.attrs.get("norm")

    @property
    def acquisition(self) -> str | None:
        return self.attrs.get("acquisition")

    @property
    def patient_id(self) -> str | None:
        return self.attrs.get("patient_id")

    @property
    def acceleration(self) -> int | None:
        return self.attrs.get("acceleration")

    @property
    def num_low_frequency(self) -> int | None:
        return self.attrs.get("num_low_frequency")


def _open_hdf5(path: Path) -> h5py.File:
    """``h5py.File(path, "r")`` with one-line errors for missing, empty, foreign, truncated or corrupt files."""
    if not path.exists():
        raise _scan_error(path, "file", "an existing fastMRI .h5 file", "no such file", ScanNotFoundError)
    if path.is_dir():
        raise _scan_error(path, "file", "a fastMRI .h5 file", "a folder")
    if not h5py.is_hdf5(path):
        with open(path, "rb") as handle:
            head = handle.read(8)
        found = "an empty file" if not head else f"first bytes {head.hex(' ')}"
        raise _scan_error(path, "file format", f"HDF5 (signature {_HDF5_SIGNATURE.hex(' ')})", found)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        message = str(err)
        truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", message)
        if truncated:
            raise _scan_error(path, "file size (truncated HDF5 file)",
                              f"{truncated.group(2)} bytes recorded in the superblock",
                              f"{truncated.group(1)} bytes") from None
        raise _scan_error(path, "HDF5 structure", "a readable HDF5 file", f"corrupt data ({message})") from None


def _kspace_dataset(path: Path, h5: h5py.File) -> h5py.Dataset:
    if "kspace" not in h5:
        raise _scan_error(path, "dataset 'kspace'", f"complex64 {_KSPACE_LAYOUT}",
                          f"no such key (keys: {sorted(h5.keys())})")
    kspace = h5["kspace"]
    if not isinstance(kspace, h5py.Dataset):
        raise _scan_error(path, "'kspace'", f"a complex64 dataset {_KSPACE_LAYOUT}", "a group")
    if kspace.dtype.kind != "c":
        raise _scan_error(path, "dataset 'kspace' dtype", f"complex64 {_KSPACE_LAYOUT}", str(kspace.dtype))
    if kspace.ndim not in (3, 4):
        raise _scan_error(path, "dataset 'kspace' dimensions", f"3 or 4 {_KSPACE_LAYOUT}",
                          f"{kspace.ndim} (shape {kspace.shape})")
    if min(kspace.shape) < 1:
        raise _scan_error(path, "dataset 'kspace' shape", "at least one slice, coil, row and column",
                          str(kspace.shape))
    return kspace


def _scan_header(path: Path, h5: h5py.File, kspace_shape: tuple[int, ...]) -> ScanHeader:
    fallback = fallback_header(kspace_shape)
    reason = None
    if "ismrmrd_header" not in h5:
        reason = "no dataset 'ismrmrd_header'"
    elif not isinstance(h5["ismrmrd_header"], h5py.Dataset):
        reason = "'ismrmrd_header' is a group, not an XML string dataset"
    else:
        try:
            header = parse_ismrmrd_header(_header_bytes(h5["ismrmrd_header"]), kspace_shape)
        except (HeaderError, TypeError) as err:
            reason = f"malformed 'ismrmrd_header' ({err})"
    if reason is not None:
        log.warning("%s: %s; using the k-space shape instead: encoded %s, recon %s, all %d columns acquired",
                    path, reason, fallback.encoded_size[:2], fallback.recon_size[:2], kspace_shape[-1])
        return fallback
    height, width = kspace_shape[-2], kspace_shape[-1]
    if header.recon_size[0] > height or header.recon_size[1] > width:
        log.warning("%s: header recon size %s exceeds the k-space grid (%d, %d); cropping to at most the grid",
                    path, header.recon_size[:2], height, width)
    if header.encoded_size[:2] != (height, width):
        log.debug("%s: header encoded size %s differs from the k-space grid (%d, %d)",
                  path, header.encoded_size[:2], height, width)
    return header


def _header_bytes(dataset: h5py.Dataset) -> bytes:
    value = dataset[()]
    if isinstance(value, np.ndarray):     # stored as a 1-element array rather than a scalar
        value = value.reshape(-1)[0] if value.size == 1 else value.tobytes()
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, np.bytes_)):
        raise TypeError(f"dataset holds {type(value).__name__}; expected an XML string")
    return bytes(value)


def _target_key(path: Path, h5: h5py.File, is_multicoil: bool, num_slices: int) -> str | None:
    for key in TARGET_KEYS[is_multicoil]:
        if key in h5:
            target = h5[key]
            if not isinstance(target, h5py.Dataset) or target.ndim != 3 or target.shape[0] != num_slices:
                found = "a group" if not isinstance(target, h5py.Dataset) else f"shape {target.shape}"
                raise _scan_error(path, f"dataset {key!r}", f"float32 ({num_slices}, H_r, W_r) like 'kspace'", found)
            if target.dtype.kind != "f":
                raise _scan_error(path, f"dataset {key!r} dtype", "float32", str(target.dtype))
            return key
    return None


def _test_mask(path: Path, h5: h5py.File, width: int) -> np.ndarray | None:
    if "mask" not in h5:
        return None
    raw = np.asarray(h5["mask"][()])
    if raw.ndim != 1 or raw.shape[0] != width:
        raise _scan_error(path, "dataset 'mask' shape", f"({width},), one entry per k-space column W={width}",
                          str(raw.shape))
    if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
        raise _scan_error(path, "dataset 'mask' values", "0/1 (a boolean column mask)",
                          f"values {np.unique(raw)[:5].tolist()}")
    return raw.astype(bool)


def _python_value(value: Any) -> Any:
    """h5 attrs as plain Python values (bytes -> str, numpy scalars -> int/float)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- reference image ------------------------------------------------------------------------------------

def center_crop(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre crop of the last two axes to ``size = (h, w)``, start ``(n - c) // 2`` as fastMRI's ``center_crop``."""
    height, width = array.shape[-2:]
    crop_h, crop_w = int(size[0]), int(size[1])
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(f"crop size {tuple(size)} must be positive and fit in the image {(height, width)}")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return array[..., top:top + crop_h, left:left + crop_w]


def reference_image(kspace: np.ndarray, recon_size: Sequence[int]) -> np.ndarray:
    """fastMRI's target: ``sqrt(sum_c |crop(F^H k_c)|^2)``, float32 ``(H_r, W_r)``.

    kspace: complex ``(coils, H, W)`` (``(H, W)`` = one coil) or ``(slices, coils, H, W)`` (returns
    ``(slices, H_r, W_r)``). The complex coil images are cropped before the magnitude, as fastMRI does.
    """
    kspace = np.asarray(kspace)
    if not np.iscomplexobj(kspace) or kspace.ndim not in (2, 3, 4):
        raise ValueError(f"kspace must be complex (H, W), (coils, H, W) or (slices, coils, H, W), "
                         f"got {kspace.dtype} {kspace.shape}")
    if kspace.ndim == 2:
        kspace = kspace[None]
    coil_images = center_crop(ifft2c_numpy(kspace), recon_size)
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=-3)).astype(np.float32)


def ifft2c_numpy(kspace: np.ndarray) -> np.ndarray:
    """:func:`invdiff.operators.fft.ifft2c` (centred orthonormal inverse DFT of the last two axes) on numpy."""
    kspace = np.asarray(kspace)
    if not kspace.flags.writeable or not kspace.flags.c_contiguous:
        kspace = np.array(kspace, order="C")
    return ifft2c(torch.from_numpy(kspace)).numpy()


# ---- datasets -------------------------------------------------------------------------------------------

@dataclass
class ScanSlice:
    """One (file, slice) item of a :class:`FastMRIDataset`.

    kspace complex64 ``(coils, H, W)``; target float32 ``(H_r, W_r)`` or None; mask bool ``(W,)`` or None.
    """

    kspace: np.ndarray
    target: np.ndarray | None
    mask: np.ndarray | None
    file: Path
    slice_index: int
    recon_size: tuple[int, int]
    header: ScanHeader
    attrs: dict = field(default_factory=dict)


class FastMRIDataset:
    """All ``(file, slice)`` pairs of the fastMRI h5 files in ``folder`` (sorted by name), read lazily.

    The index is built on first use from the k-space shapes only; items are :class:`ScanSlice` (or
    ``transform(ScanSlice)``). Picklable for ``torch.utils.data.DataLoader`` workers; at most
    ``max_open_files`` files stay open per process.

    >>> dataset = FastMRIDataset("data/")
    >>> item = dataset[0]; item.kspace.shape, item.file.name, item.slice_index
    """

    def __init__(self, folder: str | os.PathLike, *, pattern: str = "*.h5",
                 transform: Callable[[ScanSlice], Any] | None = None, check_finite: bool = False,
                 max_open_files: int = 8):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise _scan_error(self.folder, "folder", "an existing folder of fastMRI .h5 files", "no such folder",
                              ScanNotFoundError)
        self.files = sorted(p for p in self.folder.glob(pattern) if p.is_file())
        if not self.files:
            raise _scan_error(self.folder, f"files matching {pattern!r}", "at least one", "none")
        self.transform = transform
        self.check_finite = check_finite
        self.max_open_files = max_open_files
        self._index: list[tuple[Path, int]] | None = None
        self._open: OrderedDict[Path, Scan] = OrderedDict()

    @property
    def slices(self) -> list[tuple[Path, int]]:
        """The ``(file, slice)`` pairs, in file order then slice order."""
        if self._index is None:
            self._index = [(file, index) for file in self.files for index in range(_num_slices(file))]
        return self._index

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, item: int):
        file, index = self.slices[item]
        scan = self._scan(file)
        sample = ScanSlice(kspace=scan.kspace(index), target=scan.target(index), mask=scan.mask, file=file,
                           slice_index=index, recon_size=scan.recon_size, header=scan.header,
                           attrs=dict(scan.attrs))
        return self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator:
        for item in range(len(self)):
            yield self[item]

    def _scan(self, file: Path) -> Scan:
        scan = self._open.get(file)
        if scan is None:
            scan = Scan(file, check_finite=self.check_finite)
            self._open[file] = scan
            while len(self._open) > self.max_open_files:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(file)
        return scan

    def close(self) -> None:
        for scan in self._open.values():
            scan.close()
        self._open.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def _num_slices(file: Path) -> int:
    with Scan(file) as scan:
        return scan.num_slices
