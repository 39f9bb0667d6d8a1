"""fastMRI reading and writing: reference images, the ISMRMRD header, lazy access, coil maps, output files."""
import logging
import pickle

import h5py
import numpy as np
import pytest
import torch

from invdiff.datasets import fastmri
from invdiff.datasets.fastmri import FastMRIDataset, center_crop, ifft2c_numpy, read_scan, reference_image
from invdiff.datasets.ismrmrd import HeaderError, parse_ismrmrd_header
from invdiff.datasets.submission import write_reconstruction
from invdiff.operators import coil_maps
from invdiff.operators.coil_maps import estimate_coil_maps
from invdiff.datasets.synthetic import ismrmrd_header_xml, write_fake_fastmri
from invdiff.metrics import PROTOCOL
from invdiff.samplers._common import SampleResult


def _blob_volume(slices=3, height=24, width=20):
    """Smooth objects of different brightness per slice, zero at the border."""
    y, x = np.mgrid[:height, :width]
    radius = ((y - height / 2) / (0.35 * height)) ** 2 + ((x - width / 2) / (0.35 * width)) ** 2
    blob = np.clip(1 - radius, 0, None)
    return np.stack([(1 + 0.5 * s) * blob for s in range(slices)])


@pytest.fixture
def multicoil_file(tmp_path):
    path = tmp_path / "multi.h5"
    scan = write_fake_fastmri(path, _blob_volume(), num_coils=4, noise_level=0.01, seed=3, kspace_padding=(1, 2))
    return path, scan


# ---- reference image and round trip ----------------------------------------------------------------------

@pytest.mark.parametrize("multicoil", [True, False])
def test_round_trip_reference_image_equals_stored_target(tmp_path, multicoil):
    # target = sqrt(sum_c |crop(F^H k_c)|^2) recomputed from the k-space read back equals the stored target.
    path = tmp_path / "scan.h5"
    write_fake_fastmri(path, _blob_volume(), num_coils=4, multicoil=multicoil, noise_level=0.02, seed=1)
    with read_scan(path) as scan:
        assert scan.is_multicoil == multicoil
        assert scan.target_key == ("reconstruction_rss" if multicoil else "reconstruction_esc")
        for index in range(scan.num_slices):
            target = scan.target(index)
            recomputed = reference_image(scan.kspace(index), scan.recon_size)
            assert recomputed.dtype == np.float32 and recomputed.shape == target.shape == (24, 20)
            assert np.abs(recomputed - target).max() <= 1e-5 * np.abs(target).max()


def test_reference_image_of_noiseless_scan_is_the_image_magnitude(tmp_path):
    # With sum_c |S_c|^2 = 1 and no noise: RSS of crop(F^H F S_c x_enc) = |x|, so the crop sits where the
    # image was placed in the oversampled readout.
    scan = write_fake_fastmri(tmp_path / "clean.h5", _blob_volume(), num_coils=4, seed=0)
    expected = np.abs(scan.image)
    assert np.abs(scan.target - expected).max() <= 1e-5 * expected.max()


def test_reference_image_crops_complex_coil_images_before_the_magnitude():
    rng = np.random.RandomState(0)
    kspace = (rng.standard_normal((3, 16, 12)) + 1j * rng.standard_normal((3, 16, 12))).astype(np.complex64)
    images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    by_hand = np.sqrt((np.abs(images[:, 4:12, 2:10]) ** 2).sum(axis=0))     # start (16-8)//2, (12-8)//2
    assert np.allclose(reference_image(kspace, (8, 8)), by_hand, rtol=1e-5, atol=1e-6)
    assert np.allclose(reference_image(kspace[None], (8, 8))[0], by_hand, rtol=1e-5, atol=1e-6)
    assert np.allclose(reference_image(kspace[0], (8, 8)), np.abs(images[0, 4:12, 2:10]), rtol=1e-5, atol=1e-6)


def test_center_crop_matches_fastmri_offsets():
    array = np.arange(7 * 6).reshape(7, 6)
    assert np.array_equal(center_crop(array, (4, 3)), array[1:5, 1:4])   # (7-4)//2 = 1, (6-3)//2 = 1
    with pytest.raises(ValueError, match="fit"):
        center_crop(array, (8, 3))


# ---- ISMRMRD header --------------------------------------------------------------------------------------

KNEE_LIKE_HEADER = b"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>
  <encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize>
    <fieldOfView_mm><x>280</x><y>161</y><z>4.5</z></fieldOfView_mm></encodedSpace>
  <reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>
    <fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm></reconSpace>
  <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>333</maximum><center>176</center>
  </kspace_encoding_step_1></encodingLimits><trajectory>cartesian</trajectory>
</encoding></ismrmrdHeader>"""


def test_header_sizes_and_padding_by_fastmri_formula():
    header = parse_ismrmrd_header(KNEE_LIKE_HEADER, kspace_shape=(35, 15, 640, 368))
    assert header.encoded_size == (640, 368, 1) and header.recon_size == (320, 320, 1)
    # padding_left = enc_y // 2 - center = 184 - 176 = 8; padding_right = 8 + maximum + 1 = 342.
    assert header.padding == (8, 342)
    assert header.kspace_center == 176 and header.kspace_maximum == 333
    assert header.encoded_fov_mm == (280.0, 161.0, 4.5) and header.recon_fov_mm == (140.0, 140.0, 3.0)
    assert header.source == "ismrmrd_header"


def test_header_written_by_synthetic_round_trips():
    xml = ismrmrd_header_xml(encoded_size=(384, 192, 1), recon_size=(192, 192, 1), padding=(6, 186))
    header = parse_ismrmrd_header(xml, kspace_shape=(1, 8, 384, 192))
    assert header.padding == (6, 186) and header.recon_size == (192, 192, 1)


@pytest.mark.parametrize("xml, reason", [
    (b"<ismrmrdHeader", "ParseError"),
    (KNEE_LIKE_HEADER.replace(b' xmlns="http://www.ismrm.org/ISMRMRD"', b""), "root element"),
    (KNEE_LIKE_HEADER.replace(b"<center>176</center>", b""), "missing element"),
    (KNEE_LIKE_HEADER.replace(b"<x>320</x>", b"<x>big</x>"), "expected an integer"),
    (KNEE_LIKE_HEADER.replace(b"<maximum>333</maximum>", b"<maximum>400</maximum>"), "0 <= left < right"),
    (b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "EntitiesForbidden"),      # defusedxml refuses
])
def test_malformed_headers_raise_header_error(xml, reason):
    with pytest.raises(HeaderError, match=reason):
        parse_ismrmrd_header(xml, kspace_shape=(1, 2, 640, 368))


def test_file_header_gives_padding_and_unacquired_columns_are_zero(multicoil_file):
    path, _ = multicoil_file
    with read_scan(path) as scan:
        assert scan.header.source == "ismrmrd_header"
        assert scan.header.encoded_size[:2] == scan.kspace_shape[-2:] == (48, 20)
        assert scan.header.padding == (1, 18)
        kspace = scan.kspace(0)
        assert not kspace[..., :1].any() and not kspace[..., 18:].any() and kspace[..., 1:18].all()


def _drop_header(path, replacement=None):
    with h5py.File(path, "a") as h5:
        del h5["ismrmrd_header"]
        if replacement is not None:
            h5.create_dataset("ismrmrd_header", data=np.bytes_(replacement))


@pytest.mark.parametrize("replacement", [None, b"<not xml"])
def test_missing_or_malformed_header_falls_back_with_a_warning(tmp_path, caplog, replacement):
    path = tmp_path / "headerless.h5"
    write_fake_fastmri(path, _blob_volume(1), num_coils=2, seed=0, test_set=True)
    _drop_header(path, replacement)
    with caplog.at_level(logging.WARNING, logger="invdiff.datasets.fastmri"):
        scan = read_scan(path)
    assert str(path) in caplog.text and "ismrmrd_header" in caplog.text and "k-space shape" in caplog.text
    # Fallback: encoded = k-space grid, recon = min(H, 320) x min(W, 320), every column acquirable.
    assert scan.header.source == "fallback"
    assert scan.header.encoded_size == (48, 20, 1) and scan.recon_size == (48, 20) and scan.header.padding == (0, 20)


def test_fallback_recon_size_is_320_when_kspace_is_larger(tmp_path, caplog):
    path = tmp_path / "large.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("kspace", data=np.ones((1, 1, 640, 340), np.complex64))
    with caplog.at_level(logging.WARNING):
        with read_scan(path) as scan:
            assert scan.recon_size == (320, 320) and scan.header.padding == (0, 340)
    assert "320" in caplog.text


# ---- lazy access, pickling, datasets ---------------------------------------------------------------------

def test_only_requested_slices_are_read(multicoil_file, monkeypatch):
    path, _ = multicoil_file
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        reads.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    with read_scan(path) as scan:
        assert not any(name == "/kspace" for name, _ in reads), "opening must not read k-space"
        scan.kspace(2)
        scan.target(1)
    assert [r for r in reads if r[0] == "/kspace"] == [("/kspace", 2)]
    assert [r for r in reads if r[0] == "/reconstruction_rss"] == [("/reconstruction_rss", 1)]


def test_scan_attrs_and_shapes(multicoil_file):
    path, synthetic = multicoil_file
    with read_scan(path) as scan:
        assert (scan.num_slices, scan.num_coils, scan.is_multicoil) == (3, 4, True)
        assert scan.kspace(0).dtype == np.complex64 and scan.kspace(-1).shape == (4, 48, 20)
        assert scan.max == pytest.approx(float(synthetic.target.max()))
        assert scan.norm == pytest.approx(float(np.linalg.norm(synthetic.target)), rel=1e-6)
        assert scan.acquisition == "AXT1" and len(scan.patient_id) == 64
        assert scan.mask is None and scan.acceleration is None


def test_scan_pickles_and_reopens_lazily(multicoil_file):
    path, _ = multicoil_file
    with read_scan(path) as scan:
        expected = scan.kspace(1)
        clone = pickle.loads(pickle.dumps(scan))
    assert clone._h5 is None
    np.testing.assert_array_equal(clone.kspace(1), expected)
    clone.close()


def test_dataset_lists_file_slice_pairs(tmp_path):
    write_fake_fastmri(tmp_path / "a.h5", _blob_volume(3), num_coils=2, seed=0)
    write_fake_fastmri(tmp_path / "b.h5", _blob_volume(2), num_coils=2, seed=1)
    dataset = FastMRIDataset(tmp_path)
    assert dataset._index is None, "the index is built on first use"
    assert len(dataset) == 5
    assert [(f.name, i) for f, i in dataset.slices] == [("a.h5", 0), ("a.h5", 1), ("a.h5", 2), ("b.h5", 0), ("b.h5", 1)]
    item = dataset[3]
    with read_scan(tmp_path / "b.h5") as scan:
        np.testing.assert_array_equal(item.kspace, scan.kspace(0))
        np.testing.assert_array_equal(item.target, scan.target(0))
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[4].target, dataset[4].target)
    shapes = FastMRIDataset(tmp_path, transform=lambda s: s.kspace.shape)
    assert shapes[0] == (2, 48, 20)
    dataset.close()


# ---- coil maps -------------------------------------------------------------------------------------------

@pytest.fixture
def espirit_scan(tmp_path):
    return write_fake_fastmri(tmp_path / "espirit.h5", _blob_volume(1, 32, 32), num_coils=4, seed=5,
                              noise_level=1e-4)


def test_espirit_maps_are_unit_rss_and_combine_to_the_image(espirit_scan):
    with read_scan(espirit_scan.path) as scan:
        kspace = scan.kspace(0)
    coil_maps.clear_coil_map_cache()
    maps = estimate_coil_maps(kspace, calib_width=20)
    assert maps.shape == kspace.shape and maps.dtype == np.complex64
    inside = np.zeros(kspace.shape[-2:], bool)                 # the object on the 2x oversampled grid
    inside[16:48] = np.abs(espirit_scan.image[0]) > 0.2 * np.abs(espirit_scan.image[0]).max()
    # sum_c |S_c|^2 = 1 inside the object.
    rss = np.sqrt((np.abs(maps) ** 2).sum(axis=0))
    assert np.abs(rss[inside] - 1).max() < 1e-3
    # sum_c conj(S_c) x_c = x up to a phase: magnitudes agree with the true image.
    combined = (np.conj(maps) * ifft2c_numpy(kspace)).sum(axis=0)
    truth = np.zeros(kspace.shape[-2:], np.complex64)
    truth[16:48] = espirit_scan.image[0]
    error = np.linalg.norm(np.abs(combined[inside]) - np.abs(truth[inside])) / np.linalg.norm(truth[inside])
    assert error < 2e-3
    # The estimated maps span the true ones: |<S_est, S_true>| = 1 per pixel (same maps up to a phase).
    overlap = np.abs((np.conj(maps) * espirit_scan.coil_maps).sum(axis=0))
    assert np.abs(overlap[inside] - 1).max() < 5e-3


def test_coil_maps_are_cached_in_memory_and_on_disk(espirit_scan, tmp_path, monkeypatch):
    with read_scan(espirit_scan.path) as scan:
        kspace = scan.kspace(0)
    calls = []
    original = coil_maps._espirit
    monkeypatch.setattr(coil_maps, "_espirit", lambda *a: calls.append(1) or original(*a))
    coil_maps.clear_coil_map_cache()
    cache_dir = tmp_path / "maps"
    cache_dir.mkdir()
    first = estimate_coil_maps(kspace, calib_width=12, cache_dir=cache_dir)
    first[:] = 0                                                    # the caller's copy, not the cache
    second = estimate_coil_maps(kspace, calib_width=12, cache_dir=cache_dir)
    assert len(calls) == 1 and np.abs(second).max() > 0
    assert len(list(cache_dir.glob("espirit-*.npy"))) == 1
    coil_maps.clear_coil_map_cache()
    third = estimate_coil_maps(kspace, calib_width=12, cache_dir=cache_dir)  # from disk, not recomputed
    assert len(calls) == 1 and np.array_equal(second, third)
    estimate_coil_maps(kspace, calib_width=16)                     # other parameters: a new entry
    assert len(calls) == 2
    estimate_coil_maps(kspace, calib_width=16, cache_key=("espirit.h5", 0))
    estimate_coil_maps(kspace, calib_width=16, cache_key=("espirit.h5", 0))
    assert len(calls) == 3


def test_narrow_calibration_region_gets_a_smaller_kernel_and_no_holes(espirit_scan):
    # 10 calibration lines (4x at W = 128): a 6 x 6 kernel leaves only 5^2 calibration rows and ESPIRiT
    # zeroes part of the object; the default kernel (4 here) keeps sum_c |S_c|^2 = 1 everywhere inside.
    with read_scan(espirit_scan.path) as scan:
        kspace = scan.kspace(0)
    inside = np.zeros(kspace.shape[-2:], bool)
    inside[16:48] = np.abs(espirit_scan.image[0]) > 0.2 * np.abs(espirit_scan.image[0]).max()
    rss_default = np.sqrt((np.abs(estimate_coil_maps(kspace, calib_width=10)) ** 2).sum(axis=0))
    rss_kernel6 = np.sqrt((np.abs(estimate_coil_maps(kspace, calib_width=10, kernel_width=6)) ** 2).sum(axis=0))
    assert np.abs(rss_default[inside] - 1).max() < 1e-3
    assert (rss_kernel6[inside] < 0.5).mean() > 0.05


@pytest.mark.parametrize("calib_width, kernel_width", [(20, None), (6, 6)])
def test_espirit_rejects_bad_calibration_width(calib_width, kernel_width):
    with pytest.raises(ValueError, match=f"got {calib_width}"):
        estimate_coil_maps(np.ones((2, 16, 16), np.complex64), calib_width=calib_width, kernel_width=kernel_width)


# ---- writing reconstructions -----------------------------------------------------------------------------

def test_write_reconstruction_round_trip_and_attrs(tmp_path):
    rng = np.random.RandomState(0)
    volume = rng.uniform(size=(2, 8, 6)).astype(np.float32)
    out = write_reconstruction(tmp_path / "recon.h5", volume,
                               attrs={"solver": "reddiff", "hyperparameters": {"lr": 0.5, "steps": 100},
                                      "seed": 7, "prior": "brain-mri-complex", "prior_sha256": "ab" * 32,
                                      "unused": None},
                               mean=volume, std=0.1 * volume, samples=np.stack([volume, volume]))
    with h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(h5["reconstruction"][()], volume)
        assert h5["reconstruction"].dtype == np.float32
        assert h5["samples"].shape == (2, 2, 8, 6) and h5["std"].shape == (2, 8, 6)
        attrs = dict(h5.attrs)
    assert attrs["solver"] == "reddiff" and attrs["seed"] == 7 and "unused" not in attrs
    assert attrs["hyperparameters"] == '{"lr": 0.5, "steps": 100}'
    assert attrs["metrics_protocol"] == PROTOCOL and attrs["invdiff_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["recon.h5"]


def test_write_reconstruction_accepts_channels_tensors_and_sample_results(tmp_path):
    x = torch.tensor([[[[3.0]], [[4.0]]]])                         # (B=1, 2, 1, 1): real 3, imaginary 4
    write_reconstruction(tmp_path / "a.h5", x)
    # A SampleResult: x (B=2, 2, 1, 1) and samples (N=3, B=2, 2, 1, 1) become (2, 1, 1) and (3, 2, 1, 1).
    result = SampleResult(x=x.repeat(2, 1, 1, 1), diagnostics={"nfe": 1}, samples=x.repeat(3, 2, 1, 1, 1))
    write_reconstruction(tmp_path / "b.h5", result)
    write_reconstruction(tmp_path / "c.h5", np.full((4, 5), 2 + 0j))
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        assert a["reconstruction"][()].tolist() == [[[5.0]]]       # |3 + 4i|
        assert b["reconstruction"].shape == (2, 1, 1) and b["samples"].shape == (3, 2, 1, 1)
        assert c["reconstruction"].shape == (1, 4, 5) and np.all(c["reconstruction"][()] == 2)
    with pytest.raises(ValueError, match="mean has shape"):
        write_reconstruction(tmp_path / "d.h5", np.ones((2, 4, 4)), mean=np.ones((1, 4, 4)))
