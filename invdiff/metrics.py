"""Image quality metrics with fastMRI's ``evaluate.py`` protocol, on magnitude volumes ``(slices, H, W)``.

Per volume (one scan), with ``gt`` the target and ``pred`` the reconstruction:

* ``nmse = ||gt - pred||^2 / ||gt||^2`` over the whole volume;
* ``psnr = 10 log10(maxval^2 / mean((gt - pred)^2))`` over the whole volume (scikit-image
  ``peak_signal_noise_ratio`` with ``data_range = maxval``);
* ``ssim`` = mean over slices of scikit-image ``structural_similarity(gt[s], pred[s], data_range=maxval)``
  with its defaults (7 x 7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03);

with ``maxval = gt.max()`` of the *whole volume* unless given. Per-slice data ranges change SSIM by ~0.05
and PSNR by ~1.8 dB, so results must always carry :data:`PROTOCOL`.

    >>> scores = evaluate(target, reconstruction)     # float32 (slices, H, W) each
    >>> scores["ssim"], scores["protocol"]
"""
from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["PROTOCOL", "nmse", "psnr", "ssim", "evaluate"]

PROTOCOL = ("fastMRI evaluate.py: per volume, data_range = volume max, SSIM 7x7 uniform window, "
            "mean over slices")


def nmse(gt, pred) -> float:
    """``||gt - pred||^2 / ||gt||^2`` over the volume. gt, pred: real ``(slices, H, W)`` (or ``(H, W)``)."""
    gt, pred = _volumes(gt, pred)
    gt_norm = np.linalg.norm(gt)
    if not gt_norm > 0:
        raise ValueError(f"nmse: ||gt|| must be > 0, got {gt_norm}: the target is all zeros (or NaN)")
    return float(np.linalg.norm(gt - pred) ** 2 / gt_norm ** 2)


def psnr(gt, pred, maxval: float | None = None) -> float:
    """``10 log10(maxval^2 / MSE)`` over the volume, ``maxval = gt.max()`` unless given (dB)."""
    gt, pred = _volumes(gt, pred)
    maxval = _maxval(gt, maxval)
    return float(peak_signal_noise_ratio(gt, pred, data_range=maxval))


def ssim(gt, pred, maxval: float | None = None) -> float:
    """Mean over slices of SSIM(gt[s], pred[s]) with one ``data_range = maxval`` (``gt.max()`` of the volume)."""
    gt, pred = _volumes(gt, pred)
    maxval = _maxval(gt, maxval)
    if min(gt.shape[-2:]) < 7:
        raise ValueError(f"ssim: slices must be at least 7 x 7 for the 7 x 7 window, got {gt.shape[-2:]}")
    per_slice = [structural_similarity(gt[s], pred[s], data_range=maxval) for s in range(gt.shape[0])]
    return float(np.mean(per_slice))


def evaluate(gt, pred, maxval: float | None = None) -> dict:
    """``{"nmse", "psnr", "ssim", "protocol"}`` for one volume, as fastMRI's ``evaluate.py`` computes them."""
    return {"nmse": nmse(gt, pred), "psnr": psnr(gt, pred, maxval), "ssim": ssim(gt, pred, maxval),
            "protocol": PROTOCOL}


def _volumes(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    """Both as floating ``(slices, H, W)`` arrays; a single ``(H, W)`` image is one slice."""
    gt, pred = _as_real_array("gt", gt), _as_real_array("pred", pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got gt {gt.shape} and pred {pred.shape}")
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    if gt.ndim != 3:
        raise ValueError(f"gt and pred must be volumes (slices, H, W) or images (H, W), got shape {gt.shape}")
    return gt, pred


def _as_real_array(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):                      # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if np.iscomplexobj(array):
        raise ValueError(f"{name} is complex ({array.dtype}); expected magnitude images (take np.abs first)")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise ValueError(f"{name} has dtype {array.dtype}; expected a real numeric array")
    # Floating inputs keep their precision, as in evaluate.py (scikit-image then computes in it too);
    # integers and booleans become float64.
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return array


def _maxval(gt: np.ndarray, maxval: float | None) -> float:
    value = float(gt.max()) if maxval is None else float(maxval)
    if not value > 0:
        raise ValueError(f"maxval (the data range) must be > 0, got {value!r}"
                         + (" from gt.max(): the target is all zeros or negative" if maxval is None else ""))
    return value
