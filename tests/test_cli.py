"""The command line: exit 0 on success, 2 with one line naming the problem on bad input, never a partial file."""
from pathlib import Path

import h5py
import numpy as np
import pytest

from invdiff.cli import main
from invdiff.datasets.synthetic import write_fake_fastmri


def _good_scan(path: Path, **kwargs) -> Path:
    image = np.zeros((1, 24, 16))
    image[:, 6:18, 4:12] = 1.0
    write_fake_fastmri(path, image, num_coils=2, seed=0, **kwargs)
    return path


def _rewrite(path: Path, key: str, value=None) -> Path:
    with h5py.File(path, "a") as h5:
        del h5[key]
        if value is not None:
            h5.create_dataset(key, data=value)
    return path


def _malformed(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.h5"
    if kind == "missing":
        return path
    if kind == "text":
        path.write_text("not a scan\n")
        return path
    if kind == "random_bytes":
        path.write_bytes(np.random.RandomState(0).bytes(2048))
        return path
    _good_scan(path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no_kspace":
        _rewrite(path, "kspace")
    elif kind == "float_kspace":
        with h5py.File(path, "r") as h5:
            real = np.abs(h5["kspace"][()]).astype(np.float32)
        _rewrite(path, "kspace", real)
    elif kind == "wrong_ndim":
        _rewrite(path, "kspace", np.zeros((4, 4), np.complex64))
    elif kind == "nan_kspace":
        with h5py.File(path, "a") as h5:
            k = h5["kspace"][()]
            k[0, 0, 0, 0] = np.nan
            h5["kspace"][...] = k
    elif kind == "mask_length":
        with h5py.File(path, "a") as h5:
            h5.create_dataset("mask", data=np.ones(h5["kspace"].shape[-1] - 1, dtype=bool))
    return path


CASES = ["missing", "text", "random_bytes", "truncated", "no_kspace", "float_kspace", "wrong_ndim", "nan_kspace",
         "mask_length"]


@pytest.mark.parametrize("kind", CASES)
def test_malformed_scan_exits_2_with_one_line_and_no_output(kind, tmp_path, capsys):
    scan = _malformed(kind, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status = main(["reconstruct", str(scan), "--solver", "zero-filled", "--out", str(out_dir / "r.h5"),
                   "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("invdiff: error:") and "\n" not in err, err
    assert scan.name in err, err
    assert list(out_dir.iterdir()) == [], "a failed run must leave no output"


def test_output_in_missing_folder(tmp_path, capsys):
    scan = _good_scan(tmp_path / "scan.h5")
    status = main(["reconstruct", str(scan), "--out", str(tmp_path / "nope" / "r.h5"), "--no-progress"])
    assert status == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("header", ["missing", "malformed"])
def test_bad_header_falls_back_with_a_warning(header, tmp_path, capsys, caplog):
    scan = _good_scan(tmp_path / "scan.h5")
    with h5py.File(scan, "a") as h5:
        del h5["ismrmrd_header"]
        if header == "malformed":
            h5.create_dataset("ismrmrd_header", data=b"<ismrmrdHeader><encoding>")
    out = tmp_path / "r.h5"
    status = main(["reconstruct", str(scan), "--solver", "zero-filled", "--accel", "2", "--center-fraction", "0.3",
                   "--out", str(out), "--no-progress"])
    assert status == 0 and out.exists()
    assert any("header" in r.getMessage().lower() for r in caplog.records if r.levelname == "WARNING")


def test_reconstruct_writes_submission_file_and_metrics(tmp_path, capsys):
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "r.h5"
    status = main(["reconstruct", str(scan), "--solver", "cg-sense", "--accel", "2", "--center-fraction", "0.3",
                   "--out", str(out), "--png", "--no-progress", "--set", "max_iter=5"])
    text = capsys.readouterr().out
    assert status == 0 and "PSNR" in text and "fastMRI" in text
    with h5py.File(out, "r") as h5:
        assert h5["reconstruction"].dtype == np.float32 and h5["reconstruction"].ndim == 3
        assert h5.attrs["solver"] == "cg-sense" and "max_iter" in h5.attrs["hyperparameters"]
    assert out.with_suffix(".png").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["reconstruct", "x.h5", "--out", "o.h5", "--solver", "nope"], "unknown solver 'nope'"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--set", "bogus=1"], "no hyperparameter 'bogus'"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--set", "dps:zeta=1"], "uses solver 'cg-sense'"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--accel", "0"], "--accel"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--mask", "spiral"], "--mask"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--steps", "0"], "--steps"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--threads", "-1"], "--threads"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--device", "cuda:7"], "--device"),
    (["reconstruct", "x.h5", "--out", "o.png", "--png"], "expected a .h5 file name"),
    (["reconstruct", "x.h5", "--out", "o.h5", "--solver", "reddiff", "--prior", "no-such-prior"], "--prior"),
    (["compare", "x.h5", "--out", "o", "--solvers", "cg-sense", "--set", "max_iter=5"], "SOLVER:NAME=VALUE"),
    (["compare", "x.h5", "--out", "o", "--accel", "4x"], "--accel"),
    (["info", "nothing-here"], "no operator, solver or prior"),
])
def test_bad_arguments_exit_2(argv, fragment, tmp_path, capsys, monkeypatch):
    """Bad input exits 2 with one line naming it, and leaves nothing behind (no o.h5, no o.png, no folder o)."""
    monkeypatch.chdir(tmp_path)
    _good_scan(tmp_path / "x.h5")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.startswith("invdiff: error:") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """Only InputError means bad input: any other exception (here a ValueError from inside a solver) is a bug and
    propagates with its traceback (the console script then exits 1), instead of hiding behind exit 2."""
    import invdiff.reconstruct

    def broken(*args, **kwargs):
        raise ValueError("internal invariant broken")

    scan = _good_scan(tmp_path / "scan.h5")
    monkeypatch.setattr(invdiff.reconstruct, "solve", broken)
    with pytest.raises(ValueError, match="internal invariant broken"):
        main(["reconstruct", str(scan), "--solver", "zero-filled", "--accel", "2", "--center-fraction", "0.3",
              "--out", str(tmp_path / "r.h5"), "--no-progress"])
    assert not (tmp_path / "r.h5").exists()


def test_reconstruct_records_every_hyperparameter_that_ran(tmp_path):
    """The output file records the full effective hyperparameters (signature defaults, tuned values, --set),
    not only the overrides; a bool | float hyperparameter takes a number on the command line."""
    import json

    from invdiff import settings
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "r.h5"
    assert main(["reconstruct", str(scan), "--solver", "tv", "--accel", "2", "--center-fraction", "0.3",
                 "--out", str(out), "--no-progress", "--set", "tv:max_iter=7", "--threads", "1"]) == 0
    with h5py.File(out, "r") as h5:
        recorded = json.loads(h5.attrs["hyperparameters"])
    assert recorded == {**settings.hyperparameters("tv"), "max_iter": 7}


def test_list_and_info(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("cartesian_mri", "sense_mri", "parallel_beam_ct", "inpainting", "cg-sense", "reddiff"):
        assert name in text
    assert main(["info", "cg-sense"]) == 0
    assert "lam" in capsys.readouterr().out
    assert main(["info", "dps"]) == 0                     # the tuned values per task family, with their sources
    text = capsys.readouterr().out
    assert "tuned for mri:" in text and "zeta = 3.0" in text and "swept" in text


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "r.h5"
    out.write_bytes(b"precious")
    argv = ["reconstruct", str(scan), "--solver", "zero-filled", "--accel", "2", "--center-fraction", "0.3",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main([*argv, "--overwrite"]) == 0
    with h5py.File(out, "r") as h5:
        assert h5["reconstruction"].shape[0] == 1


@pytest.mark.parametrize("case", ["not_h5", "zero_kspace", "corrupt_weights", "prior_without_json"])
def test_more_bad_inputs_exit_2_and_leave_nothing(case, tmp_path, capsys):
    """Issue 16's list: each exits 2 with one line naming the file or flag, and writes nothing."""
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["reconstruct", str(scan), "--accel", "2", "--center-fraction", "0.3", "--no-progress",
            "--out", str(out / "r.h5")]
    needle = None
    if case == "not_h5":
        argv[-1], needle = str(out / "r.png"), ".h5"
    elif case == "zero_kspace":
        with h5py.File(scan, "a") as h5:
            h5["kspace"][...] = 0
        needle = "all zeros"
    else:
        from invdiff.priors.loading import WEIGHTS_DIR
        weights = tmp_path / "p.safetensors"
        if case == "corrupt_weights":          # the sha256 in the JSON matches the (corrupt) bytes
            import hashlib
            import json
            weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
            meta = json.loads((WEIGHTS_DIR / "brain-mri-complex.json").read_text())
            meta["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
            (tmp_path / "p.json").write_text(json.dumps(meta))
            needle = "p.safetensors"
        else:
            weights.write_bytes(b"0")
            needle = "p.safetensors"
        argv += ["--solver", "reddiff", "--prior", str(weights)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error:") and "\n" not in err and needle in err, err
    assert list(out.iterdir()) == []


def test_effective_acceleration_and_prior_provenance_are_recorded(tmp_path):
    """A centre fraction that caps the undersampling is recorded as what ran; a shipped prior is recorded with its
    sha256 and its steps over the whole warm-start chain (not the last stage's)."""
    from invdiff.priors.loading import prior_info, trained_steps
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "r.h5"
    assert main(["reconstruct", str(scan), "--solver", "reddiff", "--set", "steps=2", "--accel", "1000",
                 "--center-fraction", "0.3", "--out", str(out), "--no-progress"]) == 0
    info = prior_info("brain-mri-complex")
    with h5py.File(out, "r") as h5:
        assert h5.attrs["acceleration"] == 1000
        assert h5.attrs["effective_acceleration"] == pytest.approx(16 / h5.attrs["sampled_columns"], rel=1e-3)
        assert h5.attrs["effective_acceleration"] < 4
        assert h5.attrs["prior_sha256"] == info["sha256"]
        assert h5.attrs["prior_steps_trained"] == trained_steps(info)


def test_info_takes_a_prior_path_and_help_shows_defaults(capsys):
    from invdiff.priors.loading import WEIGHTS_DIR
    assert main(["info", str(WEIGHTS_DIR / "ct-phantom-anatomy.json")]) == 0
    assert '"sha256"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample-prior", "--help"])
    text = capsys.readouterr().out
    assert "--device" in text and "(default: 16)" in text and "--spacing-mm" in text


def test_info_on_a_retired_prior_names_its_successor(capsys):
    assert main(["info", "ct-phantom"]) == 2
    err = capsys.readouterr().err
    assert "replaced by 'ct-phantom-anatomy'" in err and "git show" in err


def test_sample_prior_on_the_cpu_device(tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert main(["sample-prior", "ct-phantom-anatomy", "--n", "2", "--size", "16", "--steps", "2", "--device", "cpu",
                 "--png", str(png)]) == 0
    assert png.stat().st_size > 0


def test_unknown_operator_says_how_to_load_plugins():
    import invdiff
    with pytest.raises(KeyError, match=r"invdiff.load_plugins\(\)"):
        invdiff.operator("my_own_operator")


def test_mask_file_is_used_as_given_and_checked(tmp_path, capsys):
    """--mask-file: any solver on exactly the columns given (recorded in the output); a mask that does not fit the
    scan is refused before any work."""
    scan = _good_scan(tmp_path / "scan.h5")
    with h5py.File(scan, "r") as h5:
        width = h5["kspace"].shape[-1]
    mask = np.zeros(width, dtype=bool)
    mask[width // 2 - 3: width // 2 + 3] = True
    mask[1::4] = True
    np.save(tmp_path / "m.npy", mask)
    out = tmp_path / "r.h5"
    assert main(["reconstruct", str(scan), "--solver", "zero-filled", "--mask-file", str(tmp_path / "m.npy"),
                 "--out", str(out), "--no-progress"]) == 0
    with h5py.File(out, "r") as h5:
        assert h5.attrs["sampled_columns"] == mask.sum() and "m.npy" in h5.attrs["mask_source"]
    np.save(tmp_path / "short.npy", mask[:-1])
    assert main(["reconstruct", str(scan), "--mask-file", str(tmp_path / "short.npy"), "--out",
                 str(tmp_path / "s.h5"), "--no-progress"]) == 2
    assert "expected (16,)" in capsys.readouterr().err and not (tmp_path / "s.h5").exists()


def test_active_solver_writes_its_mask_and_order(tmp_path):
    """`--solver ads --budget N` on a fully sampled scan: it starts from the calibration block, the file holds the
    reconstruction, the measured columns as dataset 'mask' (N of them) and the order they were measured in; the
    mask written can be given back with --mask-file to any solver."""
    import json
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "ads.h5"
    assert main(["reconstruct", str(scan), "--solver", "ads", "--budget", "8", "--center-fraction", "0.3",
                 "--prior", "brain-mri-complex", "--set", "steps=4", "--set", "particles=2", "--out", str(out),
                 "--no-progress"]) == 0
    with h5py.File(out, "r") as h5:
        mask = h5["mask"][()]
        order = json.loads(h5.attrs["acquisition_order"])
    assert mask.dtype == bool and mask.shape == (16,) and mask.sum() == 8
    assert len(order[0]) == 8 - 5 and all(mask[i] for i in order[0])         # 5 calibration columns at 0.3
    np.save(tmp_path / "m.npy", mask)
    assert main(["reconstruct", str(scan), "--solver", "cg-sense", "--mask-file", str(tmp_path / "m.npy"),
                 "--out", str(tmp_path / "cg.h5"), "--no-progress"]) == 0


def test_safeguard_verdict_is_recorded(tmp_path):
    import json
    scan = _good_scan(tmp_path / "scan.h5")
    out = tmp_path / "r.h5"
    assert main(["reconstruct", str(scan), "--solver", "reddiff", "--set", "steps=3", "--accel", "2",
                 "--center-fraction", "0.3", "--safeguard", "--out", str(out), "--no-progress"]) == 0
    with h5py.File(out, "r") as h5:
        verdict = json.loads(h5.attrs["safeguard"])[0]
    assert verdict["chosen"] in ("reddiff", "cg-sense") and verdict["held_out_columns"] >= 1
    assert (verdict["chosen"] == "reddiff") == (verdict["solver_error"] <= verdict["reference_error"])


def test_volume_reconstruction_writes_h5_and_nifti(tmp_path, capsys):
    """--3d: the slices as one volume through a 3-D solver (the 2-D prior slice by slice), h5 + NIfTI with the
    voxel size; --nifti without --3d is bad input."""
    import nibabel
    image = np.zeros((3, 24, 16))
    image[:, 6:18, 4:12] = 1.0
    scan = tmp_path / "vol.h5"
    write_fake_fastmri(scan, image, num_coils=2, seed=0)
    out = tmp_path / "v.h5"
    assert main(["reconstruct", str(scan), "--3d", "--nifti", "--solver", "dds", "--set", "steps=3", "--accel", "2",
                 "--center-fraction", "0.3", "--out", str(out), "--no-progress"]) == 0
    with h5py.File(out, "r") as h5:
        assert h5["reconstruction"].shape[0] == 3 and h5.attrs["volume"]
        voxel = json_list(h5.attrs["voxel_size_mm"])
    nifti = nibabel.load(str(out.with_suffix(".nii.gz")))
    assert nifti.shape[-1] == 3 and np.allclose(nifti.header.get_zooms()[::-1], voxel, rtol=1e-5)
    capsys.readouterr()
    assert main(["reconstruct", str(scan), "--nifti", "--out", str(tmp_path / "n.h5"), "--no-progress"]) == 2
    assert "--3d" in capsys.readouterr().err


def json_list(value):
    import json
    return json.loads(value) if isinstance(value, str) else list(value)
