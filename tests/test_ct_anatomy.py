"""Anatomical CT phantoms (invdiff.datasets.ct_anatomy): seeded, on the (HU + 1000) / 2000 scale, anatomy where
the layout puts it."""
import pytest
import torch

from invdiff.datasets import ct_anatomy as ct
from invdiff.datasets.training import CT_NORMALISATION, make_source, normalisation_for


def hu(value):
    return (value + 1000.0) / 2000.0


def render(anatomy, spacing, seed=0, size=64):
    return ct.render_phantom(torch.Generator().manual_seed(seed), size, anatomy=anatomy, spacing_mm=spacing)


def test_batches_are_seeded_in_range_and_carry_their_spacing():
    source = make_source("ct-anatomy", channels=1, size=32, batch=6)
    a, spacing = source.batch_with_spacing(torch.Generator().manual_seed(3))
    b, spacing_b = source.batch_with_spacing(torch.Generator().manual_seed(3))
    c = source.batch(torch.Generator().manual_seed(4))
    assert a.shape == (6, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(spacing, spacing_b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    lo, hi = ct.SPACING_RANGE_MM
    assert ((spacing >= lo) & (spacing <= hi)).all()
    # No two alike within a batch.
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(6) * 1e3).min() > 0.1
    assert normalisation_for("ct-anatomy") == CT_NORMALISATION == source.normalisation


def test_library_randomness_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    make_source("ct-anatomy", channels=1, size=16, batch=2).batch(torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_whole_head_has_air_outside_bone_around_and_brain_inside(seed):
    # 4 mm pixels: a 256 mm view holds the whole head (semi-axes up to 80 x 100 mm).
    image, info = render("head", 4.0, seed)
    assert info["anatomy"] == "head" and info["spacing_mm"] == 4.0
    corners = torch.stack([image[:3, :3], image[:3, -3:], image[-3:, :3], image[-3:, -3:]])
    assert corners.mean() < hu(-950)                          # air (plus noise) around the head
    assert (image > hu(300)).sum() > 40                       # a skull ring (partial-volumed at 4 mm)
    centre = image[28:36, 28:36].median()
    assert hu(-20) < centre < hu(80)                          # brain / CSF at the centre, soft-tissue HU


@pytest.mark.parametrize("seed", [0, 1])
def test_a_thorax_has_lungs_soft_tissue_and_bone(seed):
    image, _ = render("thorax", 6.0, seed)
    body = image > hu(-500)
    assert (image[body.nonzero()[:, 0].min():, :] < hu(-700)).sum() > 80      # lungs inside the body
    assert (image > hu(600)).sum() > 10                                       # vertebra and ribs
    soft = (image > hu(-150)) & (image < hu(150))
    assert soft.sum() > 300                                                    # fat, muscle, heart


def test_abdomen_and_spine_views_render_and_differ_from_one_another():
    images = [render(anatomy, 2.0, seed)[0] for anatomy in ("abdomen", "spine") for seed in (0, 1)]
    for image in images:
        assert torch.isfinite(image).all() and image.std() > 0.02
    assert min((a - b).abs().mean() for i, a in enumerate(images) for b in images[i + 1:]) > 0.01


def test_noise_is_scanner_like_correlated_not_white():
    # Neighbouring pixels of the noise are correlated (reconstruction kernel): the lag-1 correlation of the
    # difference between two renders of the same phantom with different noise is clearly non-zero.
    g1 = torch.Generator().manual_seed(5)
    image, info = ct.render_phantom(g1, 64, anatomy="head", spacing_mm=0.7)
    assert info["noise_hu"] > 0 and 0.5 <= info["psf_fwhm_mm"] <= 1.2
    patch = image[16:48, 16:48] - image[16:48, 16:48].mean()
    lag1 = (patch[:, 1:] * patch[:, :-1]).mean() / patch.pow(2).mean()
    assert lag1.abs() > 0.1


def test_unknown_anatomy_is_refused():
    with pytest.raises(ValueError, match="anatomy"):
        ct.render_phantom(torch.Generator(), 16, anatomy="knee")
    with pytest.raises(ValueError, match="anatomies"):
        ct.CTAnatomySource(size=16, batch=1, anatomies=("knee",))
    with pytest.raises(ValueError, match="channels"):
        ct.CTAnatomySource(channels=2, size=16, batch=1)


def test_clean_targets_keep_the_anatomy_and_drop_the_scanner():
    """``ct-anatomy:clean``: the same seed gives the same anatomy without PSF blur and noise (the scanner draws come
    last), so the clean image is the noisy one's smooth part: close to it, with far less high-frequency energy."""
    noisy_source = make_source("ct-anatomy", channels=1, size=64, batch=2)
    clean_source = make_source("ct-anatomy:clean", channels=1, size=64, batch=2)
    assert clean_source.name == "ct-anatomy:clean" and normalisation_for("ct-anatomy:clean") == CT_NORMALISATION
    for seed in (3, 4):
        noisy, noisy_info = noisy_source.phantom(seed, spacing_mm=2.0)
        clean, clean_info = clean_source.phantom(seed, spacing_mm=2.0)
        assert clean_info["anatomy"] == noisy_info["anatomy"] and clean_info["noise_hu"] == 0.0
        assert noisy_info["noise_hu"] > 0 and not torch.equal(clean, noisy)
        assert (clean - noisy).abs().mean() < 0.01                       # 2-20 HU of noise is < 0.01 on this scale
        laplacian = lambda x: (4 * x[..., 1:-1, 1:-1] - x[..., 2:, 1:-1] - x[..., :-2, 1:-1]  # noqa: E731
                               - x[..., 1:-1, 2:] - x[..., 1:-1, :-2]).square().mean()
        assert laplacian(clean) < laplacian(noisy)


def test_a_written_phantom_set_is_the_source_s_images_with_their_spacing(tmp_path):
    """write_phantom_set: data/ct_samples.h5's layout plus one spacing per image, the very images of the source,
    read back by recipes/compare_ct.py with the spacing scaled by its block averaging."""
    import json

    import h5py
    import numpy as np

    from repo_scripts import load_script

    path = tmp_path / "set.h5"
    infos = ct.write_phantom_set(path, [7, 8], size=32)
    with h5py.File(path, "r") as h5:
        images, names, spacing = h5["images"][...], json.loads(h5.attrs["names"]), h5.attrs["spacing_mm"]
    assert images.shape == (2, 32, 32) and images.dtype == np.float32 and len(names) == 2
    np.testing.assert_allclose(spacing, [i["spacing_mm"] for i in infos])
    np.testing.assert_array_equal(images[1], ct.CTAnatomySource(size=32).phantom(8)[0][0].numpy())

    compare_ct = load_script("recipes/compare_ct.py", "recipe_compare_ct")
    config = compare_ct.Config(data=str(path), phantoms=(1,), size=16)
    chosen, chosen_names, spacings = compare_ct.load_phantoms(config)
    assert chosen.shape == (1, 16, 16) and chosen_names == [names[1]]
    assert spacings == pytest.approx([2 * spacing[1]])                 # 32 -> 16 px doubles the pixel
    tasks = compare_ct.build_tasks(config, "cpu")
    assert all(t.images[0].spacing_mm == pytest.approx(2 * spacing[1]) for t in tasks)
    with h5py.File(path, "a") as h5:
        h5.attrs["spacing_mm"] = np.array([1.0, 2.0, 3.0])
    with pytest.raises(Exception, match="spacing_mm: expected 2 values"):
        compare_ct.load_phantoms(config)
