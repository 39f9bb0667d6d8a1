"""Every unusable input gives one line naming the file, the key, what was expected and what was found.

Errors are ``ScanError`` (a ``ValueError``; the CLI maps it to exit status 2); a missing file is also a
``FileNotFoundError``. Writers leave no partial file behind, whatever fails.
"""
from pathlib import Path

import h5py
import numpy as np
import pytest

from invdiff.datasets.fastmri import ScanError, ScanNotFoundError, read_scan
from invdiff.datasets.submission import write_reconstruction
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.io import atomic_path


def _good_scan(path: Path, **kwargs) -> Path:
    image = np.zeros((2, 16, 12))
    image[:, 4:12, 3:9] = 1.0
    write_fake_fastmri(path, image, num_coils=2, seed=0, **kwargs)
    return path


def _write_h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as h5:
        for key, value in datasets.items():
            h5.create_dataset(key, data=value)
    return path


def _complex_kspace(shape=(2, 2, 8, 6)) -> np.ndarray:
    rng = np.random.RandomState(0)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _expect_scan_error(path: Path, *fragments: str, cls=ScanError, **read_kwargs) -> str:
    with pytest.raises(cls) as info:
        read_scan(path, **read_kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert str(path) in message and "expected" in message and "found" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.h5"
    _expect_scan_error(path, "no such file", cls=ScanNotFoundError)
    with pytest.raises(FileNotFoundError):       # also an ordinary FileNotFoundError for generic handlers
        read_scan(path)


def test_folder_instead_of_file(tmp_path):
    _expect_scan_error(tmp_path, "a folder")


def test_not_hdf5_text_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("kspace,1,2,3\n")
    # The message shows the expected HDF5 signature and the first bytes actually found ("ksp" = 6b 73 70).
    _expect_scan_error(path, "89 48 44 46 0d 0a 1a 0a", "first bytes 6b 73 70")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.h5"
    payload = np.random.RandomState(1).bytes(4096)
    path.write_bytes(payload)
    _expect_scan_error(path, "HDF5", f"first bytes {payload[:8].hex(' ')}")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    _expect_scan_error(path, "an empty file")


def test_truncated_file(tmp_path):
    path = _good_scan(tmp_path / "whole.h5")
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    # Expected: the size the superblock records; found: the bytes left on disk.
    _expect_scan_error(cut, "truncated", f"{len(data)} bytes", f"found {len(data) // 2} bytes")


def test_corrupt_superblock(tmp_path):
    path = tmp_path / "corrupt.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.RandomState(2).bytes(2048))
    _expect_scan_error(path, "corrupt")


def test_missing_kspace(tmp_path):
    path = _write_h5(tmp_path / "no_kspace.h5", reconstruction_rss=np.zeros((1, 4, 4), np.float32))
    _expect_scan_error(path, "'kspace'", "complex64", "no such key", "reconstruction_rss")


def test_kspace_is_a_group(tmp_path):
    path = tmp_path / "group.h5"
    with h5py.File(path, "w") as h5:
        h5.create_group("kspace")
    _expect_scan_error(path, "'kspace'", "a group")


def test_float_kspace(tmp_path):
    path = _write_h5(tmp_path / "float.h5", kspace=np.zeros((2, 2, 8, 6), np.float32))
    _expect_scan_error(path, "dtype", "expected complex64", "found float32")


@pytest.mark.parametrize("shape", [(8, 6), (1, 2, 2, 8, 6)])
def test_wrong_kspace_ndim(tmp_path, shape):
    path = _write_h5(tmp_path / "ndim.h5", kspace=np.zeros(shape, np.complex64))
    _expect_scan_error(path, "dimensions", "expected 3 or 4", f"found {len(shape)} (shape {shape})")


def test_empty_kspace(tmp_path):
    path = _write_h5(tmp_path / "zero_slices.h5", kspace=np.zeros((0, 2, 8, 6), np.complex64))
    _expect_scan_error(path, "shape", "(0, 2, 8, 6)")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_kspace_on_access_and_up_front(tmp_path, bad_value):
    kspace = _complex_kspace((3, 2, 8, 6))
    kspace[1, 0, 2, 3] = bad_value
    kspace[1, 1, 0, 0] = bad_value
    path = _write_h5(tmp_path / "nan.h5", kspace=kspace)
    with read_scan(path) as scan:                  # lazy: the bad slice is not read at open
        scan.kspace(0)
        with pytest.raises(ScanError) as info:
            scan.kspace(1)
    message = str(info.value)
    assert str(path) in message and "slice 1" in message and "expected finite" in message
    assert "found 2 NaN/Inf of 96" in message      # 2 bad entries of 2 coils x 8 x 6
    _expect_scan_error(path, "slice 1", "2 NaN/Inf", check_finite=True)


def test_mask_length_differs_from_kspace_width(tmp_path):
    path = _write_h5(tmp_path / "mask.h5", kspace=_complex_kspace(), mask=np.ones(5, bool))
    _expect_scan_error(path, "'mask'", "expected (6,)", "W=6", "found (5,)")


def test_mask_not_binary(tmp_path):
    path = _write_h5(tmp_path / "mask_values.h5", kspace=_complex_kspace(), mask=np.array([0, 1, 2, 0, 1, 0.5]))
    _expect_scan_error(path, "'mask' values", "0/1", "0.5")


def test_target_with_wrong_number_of_slices(tmp_path):
    path = _write_h5(tmp_path / "target.h5", kspace=_complex_kspace((2, 2, 8, 6)),
                     reconstruction_rss=np.zeros((3, 4, 4), np.float32))
    _expect_scan_error(path, "'reconstruction_rss'", "(2, H_r, W_r)", "shape (3, 4, 4)")


def test_slice_index_out_of_range(tmp_path):
    with read_scan(_good_scan(tmp_path / "ok.h5")) as scan:
        with pytest.raises(IndexError, match="slice 2 out of range for 2 slices"):
            scan.kspace(2)


# ---- writers leave nothing behind ------------------------------------------------------------------------

def test_write_reconstruction_into_missing_folder(tmp_path):
    out = tmp_path / "no_such_folder" / "recon.h5"
    with pytest.raises(FileNotFoundError) as info:
        write_reconstruction(out, np.ones((1, 4, 4), np.float32))
    assert str(out) in str(info.value) and "does not exist" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_exception_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    calls = []
    original = h5py.Group.create_dataset

    def fail_on_second_dataset(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:                        # 'reconstruction' is already on disk at this point
            raise OSError("disk full (simulated)")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_second_dataset)
    volume = np.ones((2, 4, 4), np.float32)
    with pytest.raises(OSError, match="disk full"):
        write_reconstruction(tmp_path / "recon.h5", volume, mean=volume, std=volume)
    assert calls == ["reconstruction", "mean"]
    assert list(tmp_path.iterdir()) == [], "neither the output nor its temporary file may remain"


def test_exception_keeps_an_existing_file_intact(tmp_path):
    out = tmp_path / "recon.h5"
    write_reconstruction(out, np.ones((1, 4, 4), np.float32))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="attrs\\['seed'\\] has type object"):
        write_reconstruction(out, np.zeros((1, 4, 4), np.float32), attrs={"seed": object()})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon.h5"]


def test_non_finite_reconstruction_is_refused(tmp_path):
    volume = np.ones((1, 4, 4), np.float32)
    volume[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="reconstruction has 1 NaN/Inf values of 16"):
        write_reconstruction(tmp_path / "recon.h5", volume)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_inside_atomic_path_removes_the_temporary_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "figure.png") as tmp:
            tmp.write_bytes(b"half a png")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
