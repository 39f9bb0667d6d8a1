"""fastMRI-compatible undersampling masks (``invdiff.operators.masks``).

The column masks must equal what fastMRI's ``subsample.py`` gives for the same file. fastMRI seeds a
``np.random.RandomState`` with ``tuple(map(ord, file_name))`` and draws, in this order:

    1. ``rng.randint(len(pairs))``         -> index of the (center_fraction, acceleration) pair
    2. random:               ``rng.uniform(size=W)``, column kept where the draw is < p,
                             ``p = (W / acc - num_low) / (W - num_low)``
       equispaced:           ``offset = rng.randint(0, round(acc))``, columns ``offset::acc``
       equispaced_fraction:  ``offset = rng.randint(0, round(s))``, ``s = acc (num_low - W) / (num_low acc - W)``,
                             columns ``rint(arange(offset, W - 1, s))``
    then the ``num_low = round(W cf)`` centre columns from ``(W - num_low + 1) // 2`` are set.

The ``_expected_*`` helpers below spell that sequence out draw by draw; the tests compare make_mask to it.
"""
import numpy as np
import pytest
import torch

from invdiff.operators.masks import MASK_KINDS, center_columns, fastmri_rng, make_mask, num_low_frequencies

FILE = "file1000001.h5"


def _rng(file_name):
    return np.random.RandomState(tuple(ord(ch) for ch in file_name))


def _center(width, center_fraction):
    num_low = round(width * center_fraction)
    center = np.zeros(width, dtype=bool)
    start = (width - num_low + 1) // 2
    center[start:start + num_low] = True
    return center, num_low


def _expected_random(width, pairs, file_name):
    rng = _rng(file_name)
    center_fraction, acc = pairs[rng.randint(len(pairs))]              # draw 1
    center, num_low = _center(width, center_fraction)
    outer = rng.uniform(size=width) < (width / acc - num_low) / (width - num_low)  # draw 2
    return center | outer


def _expected_equispaced(width, pairs, file_name):
    rng = _rng(file_name)
    center_fraction, acc = pairs[rng.randint(len(pairs))]              # draw 1
    center, _ = _center(width, center_fraction)
    offset = rng.randint(0, round(acc))                                # draw 2
    outer = np.zeros(width, dtype=bool)
    outer[offset::acc] = True
    return center | outer


def _expected_equispaced_fraction(width, pairs, file_name):
    rng = _rng(file_name)
    center_fraction, acc = pairs[rng.randint(len(pairs))]              # draw 1
    center, num_low = _center(width, center_fraction)
    spacing = acc * (num_low - width) / (num_low * acc - width)
    offset = rng.randint(0, round(spacing))                            # draw 2
    outer = np.zeros(width, dtype=bool)
    outer[np.around(np.arange(offset, width - 1, spacing)).astype(np.uint64)] = True
    return center | outer


EXPECTED = {"random": _expected_random, "equispaced": _expected_equispaced,
            "equispaced_fraction": _expected_equispaced_fraction}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@pytest.mark.parametrize("width", [368, 320, 37])
@pytest.mark.parametrize("pairs", [[(0.08, 4)], [(0.08, 4), (0.04, 8)]])
@pytest.mark.parametrize("file_name", [FILE, "file_brain_AXT2_200_2000019.h5"])
def test_mask_follows_fastmri_draw_order(kind, width, pairs, file_name):
    fractions, accelerations = zip(*pairs)
    mask = make_mask(kind, shape=(640, width), acceleration=accelerations, center_fraction=fractions,
                     seed=file_name)
    assert mask.dtype == torch.bool and mask.shape == (width,)
    np.testing.assert_array_equal(mask.numpy(), EXPECTED[kind](width, pairs, file_name))


def test_path_seed_uses_the_base_name_and_tuple_seed_equals_file_name():
    from pathlib import Path
    by_name = make_mask("random", (64, 368), seed=FILE)
    assert torch.equal(make_mask("random", (64, 368), seed=Path("/data/knee") / FILE), by_name)
    assert torch.equal(make_mask("random", (64, 368), seed=tuple(map(ord, FILE))), by_name)


@pytest.mark.parametrize("width,center_fraction,num_low,start", [
    (368, 0.08, 29, 170),  # 29.44 -> 29; (368 - 29 + 1) // 2 = 170
    (320, 0.08, 26, 147),  # 25.6 -> 26
    (320, 0.04, 13, 154),  # 12.8 -> 13
    (25, 0.1, 2, 12),      # 2.5 -> 2 (round half to even, as Python's round)
])
def test_center_columns_are_exact(width, center_fraction, num_low, start):
    assert num_low_frequencies(width, center_fraction) == num_low
    expected = np.zeros(width, dtype=bool)
    expected[start:start + num_low] = True
    np.testing.assert_array_equal(center_columns(width, num_low), expected)
    for kind in ("random", "equispaced", "equispaced_fraction"):
        for seed in range(5):
            mask = make_mask(kind, (8, width), acceleration=4, center_fraction=center_fraction, seed=seed).numpy()
            assert mask[start:start + num_low].all(), f"{kind}: centre column missing"


@pytest.mark.parametrize("kind,acceleration", [("random", 4), ("random", 8), ("equispaced_fraction", 4),
                                                ("equispaced_fraction", 8)])
def test_achieved_acceleration_matches_target_on_average(kind, acceleration):
    """E[#columns] = W / acc for random and equispaced_fraction masks (fastMRI's design)."""
    width, center_fraction = 368, 0.32 / acceleration
    counts = [int(make_mask(kind, (8, width), acceleration, center_fraction, seed=f"file{i}.h5").sum())
              for i in range(300)]
    assert abs(np.mean(counts) - width / acceleration) < 0.03 * width / acceleration


def test_equispaced_undershoots_its_nominal_acceleration():
    """Equispaced lines add to the centre, so the achieved acceleration is below the nominal one."""
    width = 368
    for i in range(20):
        mask = make_mask("equispaced", (8, width), 4, 0.08, seed=i)
        assert width / 4 < int(mask.sum()) <= width / 4 + round(width * 0.08) + 1


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_determinism_per_seed_and_different_files_differ(kind):
    shape = (48, 40)
    first = make_mask(kind, shape, 4, 0.08, seed="file1000001.h5")
    assert torch.equal(first, make_mask(kind, shape, 4, 0.08, seed="file1000001.h5"))
    others = [make_mask(kind, shape, 4, 0.08, seed=f"file10000{i:02d}.h5") for i in range(10, 16)]
    assert any(not torch.equal(first, other) for other in others)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("seed", ["file1000001.h5", 3, None])
def test_global_numpy_rng_untouched(kind, seed):
    np.random.seed(1234)  # test-local: put the global generator in a known state
    before = np.random.get_state()
    make_mask(kind, (48, 40), 4, 0.08, seed=seed)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_fastmri_rng_is_private():
    rng = fastmri_rng(FILE)
    assert isinstance(rng, np.random.RandomState) and rng is not np.random.mtrand._rand


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_padding_removes_unacquired_columns_without_changing_draws(kind):
    """Columns outside [left, right) are never sampled; inside, the mask is the unpadded one."""
    shape, padding = (48, 40), (5, 33)
    full = make_mask(kind, shape, 4, 0.08, seed=FILE)
    padded = make_mask(kind, shape, 4, 0.08, seed=FILE, padding=padding)
    left, right = padding
    assert not padded[..., :left].any() and not padded[..., right:].any()
    assert torch.equal(padded[..., left:right], full[..., left:right])
    # A right limit past the last column (header wider than k-space) removes nothing there.
    assert torch.equal(make_mask(kind, shape, 4, 0.08, seed=FILE, padding=(0, 41)), full)


def test_poisson_mask_is_2d_variable_density_with_calibration():
    shape, acceleration, center_fraction = (64, 48), 4, 0.1
    mask = make_mask("poisson", shape, acceleration, center_fraction, seed=7)
    assert mask.dtype == torch.bool and mask.shape == shape
    achieved = mask.numel() / int(mask.sum())
    assert abs(achieved - acceleration) < 0.1  # sigpy's tolerance
    calib_h, calib_w = round(64 * 0.1), round(48 * 0.1)
    box = mask[32 - calib_h // 2: 32 + calib_h // 2, 24 - calib_w // 2: 24 + calib_w // 2]
    assert box.all(), "calibration box not fully sampled"
    # Variable density: the central quarter is sampled more densely than the periphery.
    centre = mask[16:48, 12:36].float().mean()
    assert centre > mask.float().mean()
    assert torch.equal(make_mask("poisson", (8, 6), 1, 0.1, seed=0), torch.ones(8, 6, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,argument", [
    (dict(kind="random", shape=(16, 12), acceleration=0.5), "acceleration"),
    (dict(kind="random", shape=(16, 12), acceleration=float("nan")), "acceleration"),
    (dict(kind="random", shape=(16, 12), center_fraction=0.0), "center_fraction"),
    (dict(kind="random", shape=(16, 12), center_fraction=1.0), "center_fraction"),
    (dict(kind="random", shape=(16, 12), center_fraction=1.5), "center_fraction"),
    (dict(kind="radial", shape=(16, 12)), "kind"),
    (dict(kind="random", shape=(16, 1)), "shape"),
    (dict(kind="random", shape=(16,)), "shape"),
    (dict(kind="random", shape=(16, 3), center_fraction=0.9), "center_fraction"),
    (dict(kind="equispaced", shape=(16, 12), acceleration=2.5), "acceleration"),
    (dict(kind="equispaced_fraction", shape=(16, 12), acceleration=4, center_fraction=0.4), "center_fraction"),
    (dict(kind="random", shape=(16, 12), acceleration=(4, 8), center_fraction=0.08), "center_fraction"),
    (dict(kind="random", shape=(16, 12), padding=(6, 6)), "padding"),
    (dict(kind="random", shape=(16, 12), padding=(-1, 6)), "padding"),
    (dict(kind="random", shape=(16, 12), padding=(12, 14)), "padding"),
    (dict(kind="random", shape=(16, 12), seed=1.5), "seed"),
    (dict(kind="poisson", shape=(16, 12), acceleration=(4, 8), center_fraction=(0.08, 0.04)), "poisson"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_mask(**kwargs)


# ---- against fastMRI's own code -------------------------------------------------------------------------
# The transcription above can share a misreading with masks.py; these tests ask the fastmri package itself
# (a dev dependency) for the mask of a file, with the seed fastMRI's SliceDataset uses, through its apply_mask.
FASTMRI_CASES = [(368, 4, 0.08, "file1000001.h5"), (368, 8, 0.04, "file1000007.h5"),
                 (320, 4, 0.08, "file_brain_AXT2_200_2000019.h5"), (372, 8, 0.04, "file1002538.h5"),
                 (640, 4, 0.08, "x.h5"), (36, 4, 0.17, "tiny_scan.h5")]


@pytest.mark.parametrize("kind, fastmri_class", [("random", "RandomMaskFunc"),
                                                 ("equispaced_fraction", "EquispacedMaskFractionFunc")])
@pytest.mark.parametrize("width, acceleration, center_fraction, file_name", FASTMRI_CASES)
def test_masks_equal_fastmris_mask_functions(kind, fastmri_class, width, acceleration, center_fraction, file_name):
    from fastmri.data import subsample, transforms                    # the dev extra installs fastmri
    mask_func = getattr(subsample, fastmri_class)([center_fraction], [acceleration])
    kspace = torch.ones(2, 24, width, 2)                              # fastMRI's (coils, rows, cols, re/im)
    seed = tuple(map(ord, file_name))                                 # as SliceDataset seeds it
    _, theirs, _ = transforms.apply_mask(kspace, mask_func, seed=seed)
    ours = make_mask(kind, shape=(24, width), acceleration=acceleration, center_fraction=center_fraction,
                     seed=file_name)
    np.testing.assert_array_equal(ours.numpy(), theirs.reshape(-1).numpy().astype(bool))


@pytest.mark.parametrize("padding", [(10, 350), (0, 368), (3, 360)])
def test_padding_equals_fastmris_apply_mask(padding):
    from fastmri.data import subsample, transforms                    # the dev extra installs fastmri
    kspace = torch.ones(1, 8, 368, 2)
    seed = tuple(map(ord, FILE))
    _, theirs, _ = transforms.apply_mask(kspace, subsample.RandomMaskFunc([0.08], [4]), seed=seed, padding=padding)
    ours = make_mask("random", shape=(8, 368), acceleration=4, center_fraction=0.08, seed=FILE, padding=padding)
    np.testing.assert_array_equal(ours.numpy(), theirs.reshape(-1).numpy().astype(bool))
