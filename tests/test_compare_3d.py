"""``invdiff compare --3d``: volume solvers and 2-D solvers on one volume problem of a fastMRI scan.

A tiny synthetic 4-coil scan of 8 slices (32 x 48 images, k-space 64 x 48, the object changing along z) and the exact
stationary Gaussian prior applied slice by slice keep each comparison to a few seconds. What is checked:
* every row, 3-D solver or 2-D solver, receives the same volume problem (one sha256 of y, sigma_y, mask and coil
  maps), and that problem holds the same mask and k-space as the 2-D comparison's slices: per slice ``y_3d * s_3d ==
  y_2d * s_2d`` (only the normalisation differs: one scale per volume);
* a row is ``invdiff reconstruct --3d`` for that solver, bit for bit, with the same effective hyperparameters;
* metrics.csv gives PSNR / SSIM per plane (axial, coronal, sagittal), seconds, NFE, peak memory and the settings
  each solver ran with (:func:`invdiff.settings.effective`); a grid per plane;
* solvers that cannot take a volume are n/a with the reason; a 3-D solver in a 2-D comparison is n/a too.
"""
import csv
import json

import numpy as np
import pytest
import torch

from invdiff import settings
from invdiff.compare import CSV_COLUMNS_3D, compare_scan, compare_volume
from invdiff.datasets.fastmri import read_scan
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.priors.analytic import smooth_gaussian_prior
from invdiff.reconstruct import ReconstructionRequest, reconstruct_scan
from invdiff.tasks import problem_fingerprint, scan_mask, scan_slice
from invdiff.tasks.volume import fastmri_volume_task, plane_metrics

from sample_objects import piecewise_smooth_image

CENTER_FRACTION = 0.17        # 8 of 48 columns: enough calibration lines for ESPIRiT on a tiny scan
DEPTH = 8                     # >= 7 slices, so coronal and sagittal images fit SSIM's 7 x 7 window
COMMON = dict(steps=3, progress=False, center_fraction=CENTER_FRACTION, device="cpu")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "tiny_volume.h5"
    base = piecewise_smooth_image(32, 48)
    volume = np.stack([base * (0.7 + 0.3 * np.cos(np.pi * d / DEPTH)) for d in range(DEPTH)])
    write_fake_fastmri(path, volume, num_coils=4, noise_level=0.01, seed=0)
    return path


@pytest.fixture(scope="module")
def prior():
    return smooth_gaussian_prior((2, 64, 48)).float()


@pytest.fixture(scope="module")
def report(scan, prior, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare3d")
    return compare_volume(scan, ["dds", "diffusion-mbir", "tv-3d", "reddiff", "cg-sense", "l1-wavelet"], [4], out,
                          prior=prior, overrides={"tv-3d": {"max_iter": 20}}, **COMMON)


def _csv_rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_table_has_plane_metrics_time_memory_and_settings(report):
    columns, rows = _csv_rows(report.metrics_csv)
    assert tuple(columns) == CSV_COLUMNS_3D
    assert [r["solver"] for r in rows] == ["zero-filled", "dds", "diffusion-mbir", "tv-3d", "reddiff", "cg-sense",
                                           "l1-wavelet"]
    target = report.tasks[0].images[0].target
    for r in rows[:-1]:
        row = report.row(r["solver"], "4x-3d")
        assert row.reconstruction.shape == target.shape == (DEPTH, 32, 48)
        expected = plane_metrics(target, row.reconstruction)
        for plane in ("axial", "coronal", "sagittal"):
            assert float(r[f"PSNR_{plane}"]) == pytest.approx(expected["psnr"][plane], abs=1e-3)
            assert 0 < float(r[f"SSIM_{plane}"]) <= 1
        assert float(r["seconds"]) >= 0 and float(r["peak_memory_MB"]) > 0
        # the settings column is every value the solver ran with: signature, tuned MRI row, --steps, --set
        overrides = {"max_iter": 20} if r["solver"] == "tv-3d" else None
        assert json.loads(r["hyperparameters"]) == settings.effective(r["solver"], "mri", overrides, steps=3)
    assert json.loads(rows[1]["hyperparameters"])["lam"] == settings.TUNED["mri"]["dds"]["lam"].value
    assert int(rows[1]["NFE"]) == 3 and int(rows[2]["NFE"]) == 2 * 3 - 1        # MBIR: predictor + corrector
    assert rows[-1]["PSNR_axial"] == "n/a" and "wavelet transform is 2-D" in rows[-1]["note"]
    for plane in ("axial", "coronal", "sagittal"):
        assert (report.out_dir / f"grid-4x-3d-{plane}.png").stat().st_size > 0
    record = json.loads(report.summary_json.read_text())
    dds = next(row for row in record["rows"] if row["solver"] == "dds")
    assert set(dds["planes"]["psnr"]) == {"axial", "coronal", "sagittal"} and dds["peak_memory_bytes"] > 0
    assert "safeguard" not in dds and "tuned_from" in dds and record["volume"]["planes"] == ["axial", "coronal",
                                                                                           "sagittal"]
    table = report.table()
    assert "PSNR ax / cor / sag" in table and "peak memory" in table and '"lam": 0.005' in table


def test_2d_and_3d_solvers_get_the_same_volume_and_the_2d_comparisons_mask_and_data(report, scan):
    ran = [row for row in report.rows if row.ran]
    hashes = {h for row in ran for h in row.input_sha256}
    assert len(ran) == 6 and len(hashes) == 1 and all(len(row.input_sha256) == 1 for row in ran)
    task = fastmri_volume_task(scan, acceleration=4, center_fraction=CENTER_FRACTION)
    image = task.images[0]
    assert hashes == {problem_fingerprint(image.problem)}
    operator = image.problem.operator
    with read_scan(scan) as opened:
        mask, _ = scan_mask(opened, acceleration=4, center_fraction=CENTER_FRACTION)
        slices = [scan_slice(opened, d, mask) for d in range(DEPTH)]
    np.testing.assert_array_equal(operator.mask.numpy(), mask)                  # the 2-D comparison's mask
    y_volume = image.problem.y * image.info["scale"]                             # (1, 2, C, D, H, W), file units
    for d, flat in enumerate(slices):
        np.testing.assert_array_equal(flat.problem.operator.mask.reshape(-1).numpy(), mask)
        torch.testing.assert_close(y_volume[:, :, :, d], flat.problem.y * flat.info["scale"], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(image.target[d], flat.target)


@pytest.mark.parametrize("solver", ["dds", "reddiff"])
def test_a_row_is_reconstruct_3d(report, scan, prior, solver, monkeypatch, tmp_path):
    """compare --3d and reconstruct --3d: the same pixels and the same effective hyperparameters."""
    monkeypatch.setattr("invdiff.compare.resolve_prior", lambda name, device: prior)
    request = ReconstructionRequest(scan=str(scan), solver=solver, out=str(tmp_path / "r.h5"), acceleration=4,
                                    center_fraction=CENTER_FRACTION, device="cpu", progress=False, steps=3,
                                    volume=True)
    reconstructed = reconstruct_scan(request)
    row = report.row(solver, "4x-3d")
    np.testing.assert_array_equal(row.reconstruction, reconstructed.reconstruction)
    assert reconstructed.attrs["hyperparameters"] == row.hyperparameters


def test_a_3d_solver_in_a_2d_comparison_is_na(scan, prior, tmp_path):
    report = compare_scan(scan, ["dds", "cg-sense"], [4], tmp_path, prior=prior, slices="0:1", figures=False,
                          **COMMON)
    assert not report.row("dds", "4x").ran and "volume operator" in report.row("dds", "4x").note
    assert report.row("cg-sense", "4x").ran


def test_compare_3d_on_the_command_line(scan, tmp_path, capsys):
    from invdiff.cli import main

    common = ["--accel", "4", "--center-fraction", str(CENTER_FRACTION), "--no-progress", "--device", "cpu",
              "--threads", "1", "--set", "tv-3d:max_iter=10", "--set", "cg-sense:max_iter=5"]
    assert main(["compare", str(scan), "--3d", "--solvers", "tv-3d,cg-sense", "--out", str(tmp_path / "ok"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "| 4x-3d | tv-3d |" in out and "PSNR ax / cor / sag" in out
    columns, _ = _csv_rows(tmp_path / "ok" / "metrics.csv")
    assert tuple(columns) == CSV_COLUMNS_3D
    assert main(["compare", str(scan), "--3d", "--solvers", "tv-3d,no-such", "--out", str(tmp_path / "bad"),
                 *common]) == 2
    assert "no-such" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_thin_volume_has_no_coronal_or_sagittal_ssim_and_says_n_a(scan, tmp_path):
    """SSIM's 7 x 7 window does not fit 4-slice coronal / sagittal images: n/a in the table, PSNR still given."""
    report = compare_volume(scan, ["cg-sense"], [4], tmp_path, slices="0:4", figures=False,
                            overrides={"cg-sense": {"max_iter": 5}}, **COMMON)
    _, rows = _csv_rows(report.metrics_csv)
    assert rows[1]["SSIM_coronal"] == rows[1]["SSIM_sagittal"] == "n/a" and float(rows[1]["SSIM_axial"]) > 0
    assert float(rows[1]["PSNR_sagittal"]) > 0 and "nan" not in report.table()
    assert any(line.startswith("plane metrics:") for line in report.summary_lines())
