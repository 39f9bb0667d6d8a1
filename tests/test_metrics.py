"""fastMRI evaluate.py protocol: NMSE, PSNR over the volume, SSIM averaged over slices, data_range = volume max."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from invdiff import metrics

# gt = 1..8 as a (2, 2, 2) volume; pred differs by +1 at one voxel and -2 at another.
GT = np.arange(1, 9, dtype=np.float64).reshape(2, 2, 2)
PRED = GT.copy()
PRED[0, 0, 0] += 1.0
PRED[1, 1, 1] -= 2.0
# By hand: ||gt - pred||^2 = 1 + 4 = 5, ||gt||^2 = 1 + 4 + ... + 64 = 204, MSE = 5 / 8, max(gt) = 8.
NMSE_BY_HAND = 5 / 204
PSNR_BY_HAND = 10 * math.log10(8 ** 2 / (5 / 8))       # = 10 log10(102.4) = 20.1030 dB


def test_nmse_by_hand():
    assert metrics.nmse(GT, PRED) == pytest.approx(NMSE_BY_HAND, rel=1e-12)


def test_psnr_by_hand_uses_the_volume_max():
    assert metrics.psnr(GT, PRED) == pytest.approx(PSNR_BY_HAND, rel=1e-12)
    assert PSNR_BY_HAND == pytest.approx(20.10299956639812, rel=1e-12)


def test_psnr_maxval_override():
    assert metrics.psnr(GT, PRED, maxval=16.0) == pytest.approx(10 * math.log10(256 / (5 / 8)), rel=1e-12)


def test_ssim_of_identical_volumes_is_one():
    volume = np.random.RandomState(0).uniform(size=(3, 16, 16))
    assert metrics.ssim(volume, volume) == pytest.approx(1.0, abs=1e-12)


def _two_slice_volume():
    """Slices of very different brightness, so a per-slice data range would change the result."""
    rng = np.random.RandomState(1)
    gt = rng.uniform(size=(2, 20, 18)).astype(np.float32)
    gt[1] *= 0.3
    pred = (gt + 0.05 * rng.standard_normal(gt.shape)).astype(np.float32)
    return gt, pred


def test_ssim_is_the_slice_mean_of_skimage_with_the_volume_max():
    gt, pred = _two_slice_volume()
    volume_max = gt.max()
    expected = np.mean([structural_similarity(gt[s], pred[s], data_range=volume_max) for s in range(2)])
    assert metrics.ssim(gt, pred) == pytest.approx(expected, rel=1e-12)
    per_slice_max = np.mean([structural_similarity(gt[s], pred[s], data_range=gt[s].max()) for s in range(2)])
    assert abs(metrics.ssim(gt, pred) - per_slice_max) > 1e-3, "the protocol is not per-slice data ranges"


def test_ssim_uses_skimage_defaults_7x7_uniform_window():
    gt, pred = _two_slice_volume()
    explicit = np.mean([structural_similarity(gt[s], pred[s], data_range=gt.max(), win_size=7,
                                              gaussian_weights=False) for s in range(2)])
    assert metrics.ssim(gt, pred) == pytest.approx(explicit, rel=1e-12)
    assert metrics.ssim(gt, pred, maxval=2.0) == pytest.approx(
        np.mean([structural_similarity(gt[s], pred[s], data_range=2.0) for s in range(2)]), rel=1e-12)


def test_evaluate_reports_all_three_and_the_protocol():
    gt, pred = _two_slice_volume()
    scores = metrics.evaluate(gt, pred)
    assert set(scores) == {"nmse", "psnr", "ssim", "protocol"}
    assert scores["protocol"] == metrics.PROTOCOL
    assert "data_range = volume max" in metrics.PROTOCOL and "7x7" in metrics.PROTOCOL
    assert scores["nmse"] == metrics.nmse(gt, pred) and scores["ssim"] == metrics.ssim(gt, pred)


def test_accepts_torch_tensors_and_single_images():
    gt, pred = _two_slice_volume()
    assert metrics.psnr(torch.from_numpy(gt), torch.from_numpy(pred)) == pytest.approx(metrics.psnr(gt, pred))
    assert metrics.ssim(gt[0], pred[0]) == pytest.approx(
        structural_similarity(gt[0], pred[0], data_range=gt[0].max()), rel=1e-12)


@pytest.mark.parametrize("bad, match", [
    ((np.ones((2, 8, 8)), np.ones((2, 8, 9))), "same shape"),
    ((np.ones((2, 8, 8), complex), np.ones((2, 8, 8), complex)), "complex"),
    ((np.zeros((1, 8, 8)), np.zeros((1, 8, 8))), "all zeros"),
    ((np.ones((1, 1, 8, 8)), np.ones((1, 1, 8, 8))), "volumes"),
])
def test_bad_inputs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.evaluate(*bad)
