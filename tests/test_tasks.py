"""The task layer: data -> a normalised InverseProblem, its target and its output mapping, in one place.

What is checked: CT keeps its fixed scale with the stated noise; inpainting / SR are normalised by their reference
image and ``to_image`` undoes it; a scan slice carries the pixel spacing of its header; the seed rule is one
function; block averaging and the analytic stand-in prior behave as documented.
"""
import numpy as np
import pytest
import torch

from invdiff.datasets.fastmri import read_scan
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.errors import InputError
from invdiff.operators.inpainting import random_pixel_mask
from invdiff.priors.analytic import smooth_gaussian_prior
from invdiff.tasks import (SEED_STRIDE, block_average, ct_task, image_generator, inpainting_task, parse_slices,
                           pixel_spacing_mm, scan_mask, scan_slice, solve, superres_task)

from sample_objects import piecewise_smooth_image

_image = piecewise_smooth_image


def test_ct_task_keeps_the_fixed_scale():
    """CT is not percentile-normalised: y = A x + sigma_y n exactly, with sigma_y = 1 % of the sinogram RMS."""
    image = _image(16)
    task = ct_task(image, 12, noise_fraction=0.01, seed=3)
    problem = task.images[0].problem
    clean = problem.operator.A(torch.from_numpy(image)[None, None])
    assert problem.sigma_y == pytest.approx(0.01 * float(clean.pow(2).mean().sqrt()))
    noise = (problem.y - clean) / problem.sigma_y
    assert abs(float(noise.std()) - 1) < 0.15 and task.images[0].info["scale"] == 1.0
    assert task.baseline == "fbp"
    np.testing.assert_array_equal(task.images[0].to_image(torch.from_numpy(image)[None, None]), image)


def test_fan_beam_and_limited_angle_ct_tasks():
    """The CT task in its three geometries: the operator and angles they name, FBP as the baseline that works
    (the fan-beam FBP, the parallel FBP with an empty wedge), and bad geometry settings as InputError."""
    from invdiff.errors import InputError
    from invdiff.operators.ct import FanBeamCT, ParallelBeamCT

    image = _image(24)
    fan = ct_task(image, 16, seed=1, geometry="fan")
    limited = ct_task(image, 16, seed=1, geometry="limited", angle_range=90)
    assert fan.name == "ct-fan-16" and limited.name == "ct-limited90-16"
    assert isinstance(fan.images[0].problem.operator, FanBeamCT)
    assert isinstance(limited.images[0].problem.operator, ParallelBeamCT)
    np.testing.assert_allclose(fan.images[0].problem.operator.angles.cpu().numpy(), np.arange(16) * 22.5)
    np.testing.assert_allclose(limited.images[0].problem.operator.angles.cpu().numpy(), np.arange(16) * 5.625)
    full = ct_task(image, 16, seed=1)
    corr = {task.name: np.corrcoef(solve(task.images[0], "fbp", None, {}).image.ravel(), image.ravel())[0, 1]
            for task in (full, fan, limited)}
    assert corr["ct-16"] > 0.8 and corr["ct-fan-16"] > 0.8, corr
    assert 0.5 < corr["ct-limited90-16"] < corr["ct-16"] - 0.05, corr      # the missing wedge costs FBP, visibly
    with pytest.raises(InputError, match="geometry"):
        ct_task(image, 8, geometry="cone")
    with pytest.raises(InputError, match=r"\(0, 180\)"):
        ct_task(image, 8, geometry="limited", angle_range=200)
    with pytest.raises(InputError, match="angle_range"):
        ct_task(image, 8, geometry="parallel", angle_range=90)


def test_inpainting_and_superres_tasks():
    """Inpainting: y = M (x + n), zero where unobserved; both normalised by p99.5 of their reference image, and
    to_image undoes it (the clean zero-phase image maps back to the target)."""
    image = _image(16)
    mask = random_pixel_mask((16, 16), 0.5, generator=0)
    task = inpainting_task(image, mask, name="inpaint", noise_fraction=0.01)
    problem = task.images[0].problem
    assert torch.all(problem.y[:, :, ~mask] == 0)
    scale = task.images[0].info["scale"]
    assert scale == pytest.approx(float(np.percentile(np.abs(problem.y[0, 0].numpy()) * scale, 99.5)), rel=1e-5)
    x = torch.stack([torch.from_numpy(image), torch.zeros(16, 16)])[None] / scale
    np.testing.assert_allclose(task.images[0].to_image(x), image, rtol=1e-5, atol=1e-6)
    sr = superres_task(image, 4)
    assert sr.baseline == "pinv" and tuple(sr.images[0].problem.y.shape) == (1, 2, 4, 4)


def test_block_average_and_smooth_prior():
    image = np.arange(36, dtype=np.float32).reshape(6, 6)
    small = block_average(image, 3)
    assert small.shape == (3, 3) and small[0, 0] == pytest.approx(np.mean([0, 1, 6, 7]))
    assert small.mean() == pytest.approx(image.mean())
    with pytest.raises(ValueError, match="size 4"):
        block_average(image, 4)
    prior = smooth_gaussian_prior((1, 8, 8), std=0.5)
    samples = prior.sample(4000, torch.Generator().manual_seed(0))
    assert float(samples.var()) == pytest.approx(0.25, rel=0.05)       # per-pixel variance std^2


def test_scan_slice_is_normalised_and_knows_its_pixel_spacing(tmp_path):
    """The zero-filled image of a normalised slice has its 99.5th percentile at 1; the spacing is the encoded field of
    view over the grid (the fake writer's header says 220 mm over the encoded matrix)."""
    path = tmp_path / "scan.h5"
    write_fake_fastmri(path, _image(32, 48), num_coils=4, noise_level=0.01, seed=0)
    with read_scan(path) as scan:
        mask, info = scan_mask(scan, acceleration=4, center_fraction=0.17)
        image = scan_slice(scan, 0, mask)
        header = scan.header
        grid = scan.kspace_shape[-2:]
    zero_filled = image.problem.operator.A_adjoint(image.problem.y)
    modulus = zero_filled.pow(2).sum(dim=1).sqrt()
    assert float(torch.quantile(modulus.flatten(), 0.995)) == pytest.approx(1.0, rel=1e-4)
    assert info["acceleration"] == 4 and mask.dtype == bool
    if header.encoded_fov_mm is not None:
        expected = (header.encoded_fov_mm[0] / grid[0] + header.encoded_fov_mm[1] / grid[1]) / 2
        assert image.spacing_mm == pytest.approx(expected)
    assert pixel_spacing_mm(type("H", (), {"encoded_fov_mm": (240.0, 120.0, 1.0)})(), (480, 120)) == 0.75
    assert pixel_spacing_mm(type("H", (), {"encoded_fov_mm": None})(), (480, 120)) is None


def test_scan_slice_takes_its_coil_maps_from_maps_mask(tmp_path):
    """maps_mask: the maps come from its calibration block, the data and the mask from ``mask``."""
    path = tmp_path / "scan.h5"
    write_fake_fastmri(path, _image(32, 48), num_coils=4, noise_level=0.01, seed=0)
    with read_scan(path) as scan:
        narrow, _ = scan_mask(scan, acceleration=4, center_fraction=0.17)
        wide = narrow.copy()
        centre = len(wide) // 2
        wide[centre - 8:centre + 8] = True                       # a wider contiguous centre: other maps
        own = scan_slice(scan, 0, wide)
        shared = scan_slice(scan, 0, wide, maps_mask=narrow)
        reference = scan_slice(scan, 0, narrow)
        with pytest.raises(InputError, match="maps_mask"):
            scan_slice(scan, 0, wide, maps_mask=narrow[:-1])
    assert torch.equal(shared.problem.operator.coil_maps, reference.problem.operator.coil_maps)
    assert not torch.equal(own.problem.operator.coil_maps, reference.problem.operator.coil_maps)
    # the same data (the normalisation, from the zero-filled image, follows the maps) and the same mask
    torch.testing.assert_close(shared.problem.y * shared.info["scale"], own.problem.y * own.info["scale"])
    assert torch.equal(shared.problem.operator.mask, own.problem.operator.mask)


@pytest.mark.parametrize("kwargs, needle", [({"acceleration": 0}, "--accel"), ({"acceleration": 2.5}, "--accel"),
                                            ({"mask_kind": "spiral"}, "--mask"),
                                            ({"center_fraction": 1.5}, "--center-fraction"),
                                            ({"center_fraction": 1.0}, "--center-fraction")])
def test_bad_mask_requests_are_input_errors(tmp_path, kwargs, needle):
    path = tmp_path / "scan.h5"
    write_fake_fastmri(path, _image(32, 48), num_coils=2, noise_level=0.01, seed=0)
    with read_scan(path) as scan, pytest.raises(InputError, match=needle):
        scan_mask(scan, **kwargs)


def test_seed_rule_and_slice_parsing():
    a = torch.randn(3, generator=image_generator(2, 5))
    b = torch.randn(3, generator=torch.Generator().manual_seed(2 * SEED_STRIDE + 5))
    assert torch.equal(a, b)
    assert list(parse_slices("1:3", 5)) == [1, 2] and list(parse_slices("-1", 5)) == [4]
    assert list(parse_slices(None, 2)) == [0, 1] == list(parse_slices("all", 2))
    with pytest.raises(InputError, match="selects no slice"):
        parse_slices("7", 5)


def test_a_fully_sampled_slice_can_be_measured_line_by_line_and_nothing_else(tmp_path):
    """The retrospective acquisition returns exactly the chosen columns of the slice's k-space in the problem's
    units (so at the initial mask it reproduces y), exact zeros elsewhere, and records every request."""
    path = tmp_path / "scan.h5"
    write_fake_fastmri(path, _image(32, 48), num_coils=4, noise_level=0.01, seed=0)
    with read_scan(path) as scan:
        mask, _ = scan_mask(scan, acceleration=4, center_fraction=0.17)
        image = scan_slice(scan, 0, mask)
    acquisition = image.problem.acquisition
    assert acquisition is not None
    torch.testing.assert_close(acquisition(torch.from_numpy(mask)), image.problem.y)
    one_line = torch.zeros(48, dtype=torch.bool)
    one_line[5] = True
    y = acquisition(one_line)
    assert y.abs().sum() > 0 and torch.all(y[..., ~one_line] == 0)
    assert len(acquisition.requests) == 2 and torch.equal(acquisition.requests[1], one_line)
    with pytest.raises(InputError, match="columns"):
        acquisition(torch.ones(47, dtype=torch.bool))


def test_ct_task_carries_the_pixel_spacing_to_each_image():
    """spacing_mm: one value for all images or one per image (told to a resolution-aware prior); a wrong count or
    a non-positive spacing is refused."""
    from invdiff.errors import InputError

    images = np.stack([_image(16), _image(16)])
    assert [i.spacing_mm for i in ct_task(images, 8).images] == [None, None]
    assert [i.spacing_mm for i in ct_task(images, 8, spacing_mm=1.5).images] == [1.5, 1.5]
    assert [i.spacing_mm for i in ct_task(images, 8, spacing_mm=[0.7, 2.0]).images] == [0.7, 2.0]
    with pytest.raises(InputError, match="one value or 2"):
        ct_task(images, 8, spacing_mm=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="positive"):
        ct_task(images, 8, spacing_mm=[1.0, 0.0])
