"""``invdiff compare --safeguard``: each prior solver's row is its safeguarded result, with the verdict per slice.

A tiny synthetic 4-coil scan of 2 slices at 2x (16 sampled columns outside the calibration block, 3 held out) and
exact stationary Gaussian priors: the fitted one, and one whose mean is far off (3.0 everywhere), which predicts the
held-out columns worse than CG-SENSE and must be overruled. What is checked:
* per slice, the row holds the image :func:`invdiff.tasks.safeguard.safeguarded_solve` returns: the plain
  solver's image where the verdict is ``kept``, CG-SENSE's where it is ``overruled``;
* metrics.csv gets a ``safeguard`` column (``<slice>:kept|overruled``), compare.json both prediction errors, NFE
  counts the check's trial run; classical rows are untouched;
* without --safeguard the table's columns and rows are what they were;
* a comparison with no prior solver, or a mask with too few columns to hold out, is refused before any work.
"""
import csv
import json

import numpy as np
import pytest
import torch

from invdiff import settings
from invdiff.compare import CSV_COLUMNS, CSV_COLUMNS_3D, SAFEGUARD_COLUMN, compare_scan, compare_volume
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.errors import InputError
from invdiff.priors.analytic import StationaryGaussianPrior, smooth_gaussian_prior

from sample_objects import piecewise_smooth_image

CENTER_FRACTION = 0.17
COMMON = dict(steps=3, progress=False, center_fraction=CENTER_FRACTION, device="cpu", figures=False)
SHAPE = (2, 64, 48)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "tiny_two_slices.h5"
    base = piecewise_smooth_image(32, 48)
    write_fake_fastmri(path, np.stack([base, 0.8 * base[::-1]]), num_coils=4, noise_level=0.01, seed=0)
    return path


@pytest.fixture(scope="module")
def prior():
    return smooth_gaussian_prior(SHAPE).float()


@pytest.fixture(scope="module")
def wrong_prior(prior):
    return StationaryGaussianPrior(torch.full(SHAPE, 3.0, dtype=torch.float64),
                                   prior.power_spectrum.clone().double()).float()


def _csv_rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("which", ["prior", "wrong_prior"])
def test_rows_are_the_safeguarded_results_with_a_verdict_per_slice(scan, which, request, tmp_path):
    chosen_prior = request.getfixturevalue(which)
    solvers = ["reddiff", "dps", "cg-sense"]
    plain = compare_scan(scan, solvers, [2], tmp_path / "plain", prior=chosen_prior, **COMMON)
    guarded = compare_scan(scan, solvers, [2], tmp_path / "guarded", prior=chosen_prior, safeguard=True, **COMMON)
    reference = guarded.row("cg-sense", "2x").reconstruction
    for solver in ("reddiff", "dps"):
        row = guarded.row(solver, "2x")
        assert [record["slice"] for record in row.safeguard] == [0, 1]
        for index, record in enumerate(row.safeguard):
            kept = record["solver_error"] <= record["reference_error"]
            assert record["verdict"] == ("kept" if kept else "overruled")
            assert record["chosen"] == (solver if kept else "cg-sense")
            source = plain.row(solver, "2x").reconstruction if kept else reference
            np.testing.assert_array_equal(row.reconstruction[index], source[index])
        per_slice = plain.row(solver, "2x").nfe // 2           # the check's trial run, then the kept solver's run
        assert row.nfe == sum(r["check_nfe"] + (per_slice if r["verdict"] == "kept" else 0) for r in row.safeguard)
        assert row.input_sha256 == plain.row(solver, "2x").input_sha256       # the same inputs, checked or not
    if which == "wrong_prior":                       # a prior far off the data is overruled on every slice
        assert all(r["verdict"] == "overruled" for r in guarded.row("reddiff", "2x").safeguard)
        assert guarded.row("reddiff", "2x").psnr > plain.row("reddiff", "2x").psnr + 1
    # classical rows are untouched and carry no verdict
    np.testing.assert_array_equal(reference, plain.row("cg-sense", "2x").reconstruction)
    assert guarded.row("cg-sense", "2x").safeguard is None
    columns, rows = _csv_rows(guarded.metrics_csv)
    assert tuple(columns) == CSV_COLUMNS + (SAFEGUARD_COLUMN,)
    by_solver = {r["solver"]: r for r in rows}
    assert by_solver["reddiff"][SAFEGUARD_COLUMN] == guarded.row("reddiff", "2x").verdicts()
    assert by_solver["reddiff"][SAFEGUARD_COLUMN].startswith("0:") and by_solver["cg-sense"][SAFEGUARD_COLUMN] == ""
    record = json.loads(guarded.summary_json.read_text())
    assert record["safeguard"]["reference"] == "cg-sense"
    reddiff = next(r for r in record["rows"] if r["solver"] == "reddiff")
    assert {"solver_error", "reference_error", "held_out_columns", "verdict"} <= set(reddiff["safeguard"][0])
    assert "| safeguard |" in guarded.table()


def test_without_safeguard_the_table_is_unchanged(scan, prior, tmp_path):
    report = compare_scan(scan, ["reddiff", "cg-sense"], [2], tmp_path, prior=prior, **COMMON)
    columns, _ = _csv_rows(report.metrics_csv)
    assert tuple(columns) == CSV_COLUMNS
    record = json.loads(report.summary_json.read_text())
    assert "safeguard" not in record and all("safeguard" not in row and "planes" not in row for row in record["rows"])
    assert "safeguard" not in report.table()


def test_safeguard_on_a_volume_gives_one_verdict_for_the_volume(scan, wrong_prior, tmp_path):
    report = compare_volume(scan, ["dds", "tv-3d"], [2], tmp_path, prior=wrong_prior, safeguard=True,
                            overrides={"tv-3d": {"max_iter": 5}}, **COMMON)
    columns, rows = _csv_rows(report.metrics_csv)
    assert tuple(columns) == CSV_COLUMNS_3D + (SAFEGUARD_COLUMN,)
    dds = report.row("dds", "2x-3d")
    assert [r["slice"] for r in dds.safeguard] == ["volume"] and dds.safeguard[0]["slices"] == [0, 1]
    assert dds.verdicts() == "volume:overruled"
    reference = compare_volume(scan, ["cg-sense"], [2], tmp_path / "cg", prior=None, **COMMON)
    np.testing.assert_array_equal(dds.reconstruction, reference.row("cg-sense", "2x-3d").reconstruction)
    assert dds.hyperparameters == settings.effective("dds", "mri", steps=3)


def test_safeguard_refuses_before_any_work(scan, prior, tmp_path):
    with pytest.raises(InputError, match="none of cg-sense uses a prior"):
        compare_scan(scan, ["cg-sense"], [2], tmp_path / "a", prior=prior, safeguard=True, **COMMON)
    with pytest.raises(InputError, match="leaves none"):          # 8x on 48 columns: the calibration block and 1-2
        compare_scan(scan, ["reddiff"], [2, 8], tmp_path / "b", prior=prior, safeguard=True, **COMMON)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compare_safeguard_on_the_command_line(scan, tmp_path, capsys):
    from invdiff.cli import main

    # the shipped brain prior is not needed: a wrong --prior path fails first, with exit 2 and nothing written
    args = ["compare", str(scan), "--solvers", "reddiff,cg-sense", "--accel", "2", "--center-fraction",
            str(CENTER_FRACTION), "--no-progress", "--device", "cpu", "--threads", "1", "--safeguard"]
    assert main([*args, "--prior", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["compare", str(scan), "--solvers", "cg-sense", "--accel", "2", "--safeguard", "--no-progress",
                 "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "y")]) == 2
    assert "uses a prior" in capsys.readouterr().err
