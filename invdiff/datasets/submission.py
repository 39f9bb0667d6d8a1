"""Writing reconstructions in the fastMRI submission format, atomically.

One h5 file per volume: ``reconstruction`` float32 ``(slices, H, W)`` (the key fastMRI's evaluation reads),
optional ``mean``, ``std`` and ``samples``, and attrs recording what ran (solver, every hyperparameter, seed,
prior and its sha256, package version, metrics protocol).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from invdiff.io import atomic_path

log = logging.getLogger(__name__)


def write_reconstruction(path: str | os.PathLike, reconstruction, attrs: dict | None = None, mean=None,
                         std=None, samples=None, mask=None) -> Path:
    """Write a fastMRI submission file atomically: ``reconstruction`` float32 ``(slices, H, W)``.

    ``reconstruction``: an array/tensor ``(slices, H, W)`` or ``(H, W)``; complex values and
    ``(slices, 2, H, W)`` real/imaginary channels become magnitudes, ``(slices, 1, H, W)`` is squeezed;
    a ``SampleResult`` contributes its ``x`` (and its ``samples`` when ``samples`` is None).
    ``mean`` / ``std``: optional volumes of the same shape; ``samples``: optional ``(N, slices, H, W)``.
    ``attrs``: solver, hyperparameters (a dict becomes a JSON string), seed, prior name / sha256, ...;
    ``invdiff_version`` and ``metrics_protocol`` are added unless given; None values are skipped.
    The file appears complete or not at all (temporary file + ``os.replace``); the folder must exist.
    """
    from invdiff import __version__
    from invdiff.metrics import PROTOCOL

    result_samples = getattr(reconstruction, "samples", None) if hasattr(reconstruction, "diagnostics") else None
    if hasattr(reconstruction, "diagnostics") and hasattr(reconstruction, "x"):   # a SampleResult
        reconstruction = reconstruction.x
    volume = _as_volume("reconstruction", reconstruction)
    extras = {}
    for name, value in (("mean", mean), ("std", std)):
        if value is not None:
            extras[name] = _as_volume(name, value)
            if extras[name].shape != volume.shape:
                raise ValueError(f"{name} has shape {extras[name].shape}; expected the reconstruction's "
                                 f"{volume.shape}")
    samples = samples if samples is not None else result_samples
    if samples is not None:
        extras["samples"] = _as_samples(samples, volume.shape)
    if mask is not None:          # the k-space columns that were measured: (W,) as in fastMRI test files, or per slice
        mask = np.asarray(mask).astype(bool)
        if mask.ndim not in (1, 2) or (mask.ndim == 2 and mask.shape[0] != volume.shape[0]):
            raise ValueError(f"mask has shape {mask.shape}; expected (W,) or ({volume.shape[0]}, W)")
        extras["mask"] = mask
    all_attrs = {"invdiff_version": __version__, "metrics_protocol": PROTOCOL, **(attrs or {})}
    encoded_attrs = {key: _attr_value(key, value) for key, value in all_attrs.items() if value is not None}

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            for name, data in (("reconstruction", volume), *extras.items()):
                chunks = (1,) * (data.ndim - 2) + data.shape[-2:]
                h5.create_dataset(name, data=data, chunks=chunks, compression="gzip", compression_opts=4,
                                  shuffle=True, track_times=False)
            for key, value in encoded_attrs.items():
                h5.attrs[key] = value
    log.info("wrote %s: reconstruction %s%s", path, volume.shape,
             "".join(f", {name} {data.shape}" for name, data in extras.items()))
    return Path(path)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _as_volume(name: str, value) -> np.ndarray:
    """float32 ``(slices, H, W)`` magnitudes from the layouts :func:`write_reconstruction` accepts."""
    array = _to_numpy(value)
    if array.ndim == 4 and not np.iscomplexobj(array):
        if array.shape[1] == 2:            # (slices, 2, H, W): real and imaginary channels
            array = np.hypot(array[:, 0], array[:, 1])
        elif array.shape[1] == 1:
            array = array[:, 0]
    if np.iscomplexobj(array):
        array = np.abs(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"{name} has shape {array.shape}; expected (slices, H, W), (H, W), complex, or "
                         f"(slices, 1|2, H, W) channels")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} has dtype {array.dtype}; expected real or complex numbers")
    array = array.astype(np.float32)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(f"{name} has {bad} NaN/Inf values of {array.size}; expected finite values")
    return array


def _as_samples(value, volume_shape: tuple[int, ...]) -> np.ndarray:
    array = _to_numpy(value)
    stacked = np.stack([_as_volume(f"samples[{i}]", sample) for i, sample in enumerate(array)])
    if stacked.shape[1:] != volume_shape:
        raise ValueError(f"samples have shape {stacked.shape}; expected (N, *{volume_shape})")
    return stacked


def _attr_value(key: str, value: Any):
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, sort_keys=True)
        except TypeError as err:
            raise ValueError(f"attrs[{key!r}] cannot be stored as JSON: {err}") from None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, bool, int, float, np.generic)):
        return value
    raise ValueError(f"attrs[{key!r}] has type {type(value).__name__}; expected str, int, float, bool, or a "
                     f"dict/list (stored as JSON)")


__all__ = ["write_reconstruction"]
