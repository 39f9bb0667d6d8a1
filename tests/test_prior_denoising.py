"""Helpers of benchmarks/prior_denoising.py: PSNR, grid search, noise, the complex-prior mapping, held-out seeds."""
import math

import numpy as np
import pytest
import torch

from invdiff.datasets.training import CTPhantomSource
from invdiff.priors.base import Denoiser

from repo_scripts import load_script

B = load_script("benchmarks/prior_denoising.py", "benchmarks_prior_denoising")


def test_psnr01_is_ten_log10_of_one_over_mse_after_clipping():
    clean = np.zeros((8, 8))
    # MSE = 0.1^2 = 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert B.psnr01(clean, np.full((8, 8), 0.1)) == pytest.approx(20.0)
    # Values below 0 are clipped to 0 = clean: zero error, infinite PSNR.
    assert B.psnr01(clean, np.full((8, 8), -0.5)) == math.inf


def test_log_grid_search_finds_the_maximum_within_one_fine_step():
    # score(t) = -(ln t - ln t*)^2 peaks at t* = 0.37; the fine grid spans two coarse steps in `fine` points.
    budget = B.GridSearch(coarse=9, fine=7)
    low, high = 0.01, 10.0
    best, value, at_edge = B.log_grid_search(lambda t: -(math.log(t) - math.log(0.37)) ** 2, low, high, budget)
    fine_step = 2 * math.log(high / low) / (budget.coarse - 1) / (budget.fine - 1)
    assert abs(math.log(best) - math.log(0.37)) <= fine_step / 2 + 1e-12
    assert value == pytest.approx(-(math.log(best) - math.log(0.37)) ** 2)
    assert not at_edge
    # A score increasing in t peaks at the upper end of the range: reported as at the edge.
    assert B.log_grid_search(lambda t: t, low, high, budget)[2]
    with pytest.raises(ValueError, match="low"):
        B.log_grid_search(lambda t: t, 1.0, 0.5, budget)


def test_noise_is_seeded_per_image_and_sigma_and_channel_zero_does_not_depend_on_channels():
    one = B.draw_noise((6, 5), "img", 0.1, channels=1)
    two = B.draw_noise((6, 5), "img", 0.1, channels=2)
    assert one.shape == (1, 6, 5) and two.shape == (2, 6, 5) and one.dtype == np.float64
    np.testing.assert_array_equal(one[0], two[0])          # the baselines' noise = the prior's real-channel noise
    assert not np.allclose(two[0], two[1])                  # the imaginary noise is a separate draw
    assert not np.allclose(one, B.draw_noise((6, 5), "img", 0.2))
    assert not np.allclose(one, B.draw_noise((6, 5), "other", 0.1))
    np.testing.assert_array_equal(one, B.draw_noise((6, 5), "img", 0.1))


def test_brain_prior_inputs_put_the_scaled_noisy_image_in_the_real_channel():
    # ((x + sigma n_re) / s, sigma n_im / s) with sigma' = sigma / s
    rng = np.random.RandomState(0)
    clean, noise, scale = rng.rand(4, 3), rng.randn(2, 2, 4, 3), 0.8
    inputs, sigmas = B.brain_prior_inputs(clean, noise, [0.1, 0.5], scale)
    np.testing.assert_allclose(inputs[1, 0], (clean + 0.5 * noise[1, 0]) / scale)
    np.testing.assert_allclose(inputs[1, 1], 0.5 * noise[1, 1] / scale)
    np.testing.assert_allclose(sigmas, [0.1 / scale, 0.5 / scale])


class OraclePrior(Denoiser):
    """D(y, sigma) = (clean / s, 0): the perfect denoiser for one known real image on the prior's scale."""

    channels = 2

    def __init__(self, clean: np.ndarray, scale: float):
        super().__init__()
        self.target = torch.from_numpy(clean / scale).float()
        self.seen_sigmas = []
        self.seen_inputs = []

    def forward(self, x, sigma):
        self.seen_sigmas.append(sigma.clone())
        self.seen_inputs.append(x.clone())
        out = torch.zeros_like(x)
        out[:, 0] = self.target
        return out


def test_evaluate_image_maps_the_complex_prior_to_and_from_its_scale():
    # A perfect denoiser on the prior's scale, mapped back by s, recovers the clean image: PSNR ~ float32 limit.
    yy, xx = np.mgrid[:24, :24]
    clean = np.where((yy - 12) ** 2 + (xx - 12) ** 2 < 60, 0.6, 0.1) + 0.3 * (xx == 5)
    clean = clean / clean.max()
    scale = B.reference_scale_of(clean)
    prior = OraclePrior(clean, scale)
    test = B.HeldOutImage("disc", clean, "synthetic")
    sigmas = (0.1, 0.5)
    out = B.evaluate_image(prior, test, complex_prior=True, budget=B.GridSearch(5, 3), sigmas=sigmas)
    assert out["reference_scale"] == pytest.approx(np.percentile(clean, 99.5), rel=1e-6)
    torch.testing.assert_close(prior.seen_sigmas[0], torch.tensor(sigmas) / scale)
    # The imaginary input channel is pure noise of std sigma / s.
    imag_std = prior.seen_inputs[0][:, 1].std(dim=(1, 2))
    torch.testing.assert_close(imag_std, torch.tensor(sigmas) / scale, rtol=0.15, atol=0)
    for row in out["results"]:
        assert row["prior_psnr"] > 100
        assert row["prior_beats_both"] and row["margin_db"] > 0
        # The tuned baselines improve on the noisy input.
        assert row["tv"]["psnr"] > row["noisy_psnr"] and row["wavelet"]["psnr"] > row["noisy_psnr"]


def test_held_out_ct_seeds_lie_outside_the_training_seed_range(monkeypatch):
    # Training renders phantom(seed) for seeds drawn by CTPhantomSource.batch; record them.
    drawn = []
    monkeypatch.setattr(CTPhantomSource, "phantom",
                        lambda self, seed: drawn.append(seed) or torch.zeros(1, self.size, self.size))
    CTPhantomSource(size=8, batch=256).batch(torch.Generator().manual_seed(0))
    assert len(drawn) == 256 and all(0 <= s < B.CT_TRAINING_SEED_BOUND for s in drawn)
    # The draws do span the range up to the bound (so the bound is the one training uses, not a loose guess).
    assert max(drawn) > B.CT_TRAINING_SEED_BOUND // 2
    held_out = B.held_out_ct_seeds(8)
    assert len(set(held_out)) == 8 and min(held_out) >= B.CT_TRAINING_SEED_BOUND
    torch.Generator().manual_seed(max(held_out))             # a valid torch seed (< 2**64)


class _Identity(Denoiser):
    """D(y, sigma) = y: the one-step relative error is then sigma ||n|| / ||x||; records the spacing it was given."""

    def __init__(self, spacing=None):
        super().__init__()
        self.spacing = spacing
        self.channels = 2

    def at_spacing(self, spacing_mm):
        return _Identity(spacing_mm)

    def forward(self, x, sigma):
        assert self.spacing is not None
        return x


def test_whole_head_views_shrink_the_padded_slice_and_scale_the_spacing():
    image = np.zeros((40, 20))
    image[10:30, 5:15] = 1.0
    (view,) = B.whole_head_views([B.HeldOutImage("x", image, "test", 2.0)], size=16)
    assert view.image.shape == (16, 16) and view.spacing_mm == pytest.approx(2.0 * 40 / 16)
    # Area shrinking keeps the mean of the square-padded image: 200 ones over 40 x 40 pixels.
    assert view.image.mean() == pytest.approx(200 / 1600)


def test_whole_head_error_of_the_identity_is_sigma_times_noise_over_signal():
    image = np.full((16, 16), 0.5)
    view = B.HeldOutImage("flat", image, "test", 4.0)
    rows = B.whole_head_errors(_Identity(), [view], complex_prior=True, sigmas=(0.5, 2.0), draws=64)
    # x / s is 1 in the real channel (s = 0.5, the percentile of a flat image): ||x|| = 16, ||n|| ~ sqrt(512).
    for row in rows:
        assert row["spacing_mm"] == 4.0
        assert row["relative_error"] == pytest.approx(row["sigma"] * math.sqrt(512) / 16, rel=0.05)


def test_real_ct_slices_are_padded_resized_and_put_on_the_ct_scale(tmp_path):
    hu = np.full((40, 20), -1000.0)
    hu[10:30, :] = 0.0                                   # water: 0.5 on (HU + 1000) / 2000
    np.save(tmp_path / "slice.npy", hu)
    (tmp_path / "spacing.json").write_text('{"slice": 0.5}')
    (image,) = B.real_ct_images(tmp_path, size=8)
    assert image.image.shape == (8, 8) and image.spacing_mm == pytest.approx(0.5 * 40 / 8)
    assert image.image.mean() == pytest.approx(0.5 * (20 * 20) / (40 * 40))
    assert image.image.max() == pytest.approx(0.5)
