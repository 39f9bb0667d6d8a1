"""Solver comparison: identical inputs for every solver, the invdiff reconstruct pipeline, the files written.

A tiny synthetic 4-coil fastMRI file (32 x 48 image, k-space 64 x 48) and the exact stationary Gaussian prior
keep each comparison to a second or two. What is checked:
* every solver of a task receives the same problem: the sha256 of (y, sigma_y, operator buffers) it was
  handed is one value per task, and the zero-filled row equals the pipeline's zero-filled image;
* the scan problem is the one ``invdiff reconstruct`` builds (a deterministic solver gives the same output);
* a solver's random stream depends only on (seed, image index), not on which solvers ran before it;
* metrics.csv has the columns and one row per (solver, task); n/a rows carry the reason;
* bad input (unknown solver, malformed --set) raises InputError naming it.
"""
import csv

import numpy as np
import pytest
import torch

from invdiff import metrics
from invdiff import settings
from invdiff.compare import CSV_COLUMNS, compare_problems, compare_scan, parse_accelerations
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.errors import InputError
from invdiff.operators.inpainting import random_pixel_mask
from invdiff.priors.analytic import smooth_gaussian_prior
from invdiff.reconstruct import ReconstructionRequest, reconstruct_scan
from invdiff.registry import check_solver_names
from invdiff.tasks import (SEED_STRIDE, block_average, inpainting_task, problem_fingerprint, scan_tasks,
                           superres_task)

from sample_objects import piecewise_smooth_image

CENTER_FRACTION = 0.17        # 8 of 48 columns: enough calibration lines for ESPIRiT on a tiny scan


_image = piecewise_smooth_image


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "tiny_brain.h5"
    write_fake_fastmri(path, _image(32, 48), num_coils=4, noise_level=0.01, seed=0)
    return path


@pytest.fixture(scope="module")
def prior():
    return smooth_gaussian_prior((2, 64, 48))


def _csv_rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_compare_scan_writes_one_row_per_solver_and_task(scan, prior, tmp_path):
    solvers = ["reddiff", "cg-sense", "tv"]
    report = compare_scan(scan, solvers, [4, 8], tmp_path / "out", prior=prior, steps=5, progress=False,
                          center_fraction=CENTER_FRACTION, overrides={"tv": {"max_iter": 20}})
    columns, rows = _csv_rows(tmp_path / "out" / "metrics.csv")
    assert tuple(columns) == CSV_COLUMNS
    # zero-filled is added first as the baseline of each task
    assert [(r["solver"], r["task"]) for r in rows] == [(s, t) for t in ("4x", "8x") for s in ["zero-filled", *solvers]]
    assert all(float(r["PSNR"]) > 0 and 0 < float(r["SSIM"]) <= 1 for r in rows)
    assert {r["NFE"] for r in rows if r["solver"] == "reddiff"} == {"5"}       # --steps reached RED-Diff
    assert report.row("tv", "4x").hyperparameters == {**settings.hyperparameters("tv"), "max_iter": 20}
    for task in ("4x", "8x"):
        assert (tmp_path / "out" / f"grid-{task}.png").stat().st_size > 0
    assert (tmp_path / "out" / "compare.json").is_file()
    with np.load(tmp_path / "out" / "reconstructions.npz") as saved:
        np.testing.assert_array_equal(saved["8x/tv"], report.row("tv", "8x").reconstruction)
        np.testing.assert_array_equal(saved["4x/target"], report.tasks[0].target)
    # metrics.csv holds the fastMRI-protocol scores of the reconstructions kept in the report
    row = report.row("reddiff", "8x")
    target = report.tasks[1].target
    assert float(rows[len(solvers) + 2]["PSNR"]) == pytest.approx(metrics.psnr(target, row.reconstruction), abs=1e-3)


def test_every_solver_gets_the_identical_input(scan, prior, tmp_path):
    """One sha256 of (y, sigma_y, mask, coil maps) per task across all solvers, different across accelerations;
    the zero-filled row is A^T y of that input (normalised units times the scale), zero outside the coil support."""
    report = compare_scan(scan, ["reddiff", "dps", "cg-sense"], [4, 8], tmp_path, prior=prior, steps=3,
                          progress=False, figures=False, center_fraction=CENTER_FRACTION)
    for task in report.tasks:
        hashes = {tuple(row.input_sha256) for row in report.rows if row.task == task.name}
        assert len(hashes) == 1
        assert list(hashes)[0] == tuple(problem_fingerprint(image.problem) for image in task.images)
    assert report.row("cg-sense", "4x").input_sha256 != report.row("cg-sense", "8x").input_sha256
    image = report.tasks[0].images[0]
    operator = image.problem.operator
    expected = image.to_image(operator.A_adjoint(image.problem.y))
    np.testing.assert_allclose(report.row("zero-filled", "4x").reconstruction[0], expected, rtol=1e-6)
    recon_size = report.tasks[0].target.shape[-2:]
    assert expected.shape == recon_size and np.abs(expected).max() > 0


@pytest.mark.parametrize("solver", ["cg-sense", "reddiff", "dps", "diffpir", "smc"])
def test_compare_row_is_the_reconstruct_command(scan, prior, solver, tmp_path, monkeypatch):
    """`invdiff compare` and `invdiff reconstruct` on the same slice, solver, seed and --set: the same pixels and
    the same effective hyperparameters (one task layer, one settings table; the tuned DPS zeta included)."""
    overrides = {"steps": 4} if settings.hyperparameters(solver).get("steps") else {}
    if solver == "smc":
        overrides["num_particles"] = 3
    report = compare_scan(scan, [solver], [4], tmp_path, prior=prior, progress=False, figures=False,
                          center_fraction=CENTER_FRACTION, overrides={solver: overrides} if overrides else None,
                          device="cpu")
    monkeypatch.setattr("invdiff.compare.resolve_prior", lambda name, device: prior)
    request = ReconstructionRequest(scan=str(scan), solver=solver, out=str(tmp_path / "r.h5"), acceleration=4,
                                    center_fraction=CENTER_FRACTION, device="cpu", progress=False,
                                    overrides=overrides)
    reconstructed = reconstruct_scan(request)
    np.testing.assert_array_equal(report.row(solver, "4x").reconstruction, reconstructed.reconstruction)
    assert reconstructed.attrs["hyperparameters"] == report.row(solver, "4x").hyperparameters
    if solver == "dps":
        assert reconstructed.attrs["hyperparameters"]["zeta"] == settings.TUNED["mri"]["dps"]["zeta"].value


def test_random_stream_depends_only_on_seed_and_image(scan, prior, tmp_path):
    """RED-Diff alone and RED-Diff after DPS (which draws noise too) give the same output: each solver starts a
    fresh generator seed * 1_000_003 + index; another seed gives another output."""
    common = dict(prior=prior, steps=4, progress=False, figures=False, center_fraction=CENTER_FRACTION)
    alone = compare_scan(scan, ["reddiff"], [4], tmp_path / "a", **common)
    after = compare_scan(scan, ["dps", "reddiff"], [4], tmp_path / "b", **common)
    other = compare_scan(scan, ["reddiff"], [4], tmp_path / "c", seed=1, **common)
    first = alone.row("reddiff", "4x").reconstruction
    np.testing.assert_array_equal(first, after.row("reddiff", "4x").reconstruction)
    assert not np.array_equal(first, other.row("reddiff", "4x").reconstruction)
    assert SEED_STRIDE == 1_000_003


def test_solver_that_cannot_run_is_na_with_reason(scan, prior, tmp_path):
    """DDRM needs an SVD; multi-coil SENSE has none. Its row is n/a with the reason; the others still run."""
    report = compare_scan(scan, ["ddrm", "cg-sense"], [4], tmp_path, prior=prior, steps=3, progress=False,
                          figures=False, center_fraction=CENTER_FRACTION)
    _, rows = _csv_rows(tmp_path / "metrics.csv")
    ddrm = next(r for r in rows if r["solver"] == "ddrm")
    assert ddrm["PSNR"] == ddrm["SSIM"] == ddrm["NMSE"] == ddrm["NFE"] == "n/a"
    assert ddrm["note"].startswith("n/a:") and "SenseMRI" in ddrm["note"]
    assert not report.row("ddrm", "4x").ran and report.row("cg-sense", "4x").ran


@pytest.mark.parametrize("solvers, needle", [(["reddiff", "no-such-solver"], "no-such-solver"),
                                             (["cg-sense", "cg-sense"], "cg-sense"), ([], "at least one")])
def test_bad_solver_lists_raise_input_error_naming_them(solvers, needle):
    with pytest.raises(InputError, match=needle):
        check_solver_names(solvers)


def test_invdiff_compare_is_mounted_in_the_cli(scan, tmp_path, capsys):
    """`invdiff compare` as a user types it: exit 0 with a table; a bad solver list exits 2 and writes nothing."""
    from invdiff.cli import main
    common = ["--accel", "4", "--set", "cg-sense:max_iter=5", "--center-fraction", str(CENTER_FRACTION),
              "--no-progress", "--device", "cpu"]
    assert main(["compare", str(scan), "--solvers", "cg-sense", "--out", str(tmp_path / "ok"), *common]) == 0
    assert "| 4x | cg-sense |" in capsys.readouterr().out
    assert (tmp_path / "ok" / "metrics.csv").is_file()
    assert main(["compare", str(scan), "--solvers", "cg-sense,fancy-net", "--out", str(tmp_path / "bad"),
                 *common]) == 2
    assert "fancy-net" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_accelerations_and_bad_overrides_fail_before_any_work(scan, prior, tmp_path):
    assert parse_accelerations("4,8") == [4, 8]
    with pytest.raises(InputError, match="'4x'"):
        parse_accelerations("4x")
    with pytest.raises(InputError, match="no hyperparameter 'zeta'"):
        compare_scan(scan, ["reddiff"], [4], tmp_path / "o", prior=prior, overrides={"reddiff": {"zeta": 1.0}})
    with pytest.raises(InputError, match="--steps"):
        compare_scan(scan, ["reddiff"], [4], tmp_path / "o", prior=prior, steps=0)
    assert not (tmp_path / "o").exists()


def test_prior_must_fit_the_images(scan, tmp_path):
    with pytest.raises(ValueError, match="1 channels"):
        compare_scan(scan, ["reddiff"], [4], tmp_path, prior=smooth_gaussian_prior((1, 64, 48)),
                     center_fraction=CENTER_FRACTION, progress=False)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        compare_scan(scan, ["reddiff"], [4], tmp_path, prior=smooth_gaussian_prior((2, 32, 32)),
                     center_fraction=CENTER_FRACTION, progress=False)


def test_compare_problems_on_image_tasks(tmp_path):
    """Each task's own baseline runs first; solvers listed once run on every task."""
    image = block_average(_image(32), 16)
    tasks = [inpainting_task(image, random_pixel_mask((16, 16), 0.5, generator=0), name="inpaint"),
             superres_task(image, 2, name="sr")]
    report = compare_problems(tasks, ["ddrm", "tv"], tmp_path, prior=smooth_gaussian_prior((2, 16, 16)), steps=3,
                              progress=False, figures=False)
    assert [(r.solver, r.task) for r in report.rows] == [("zero-filled", "inpaint"), ("ddrm", "inpaint"),
                                                          ("tv", "inpaint"), ("pinv", "sr"), ("ddrm", "sr"),
                                                          ("tv", "sr")]
    assert all(row.ran for row in report.rows)


def test_scan_comparison_uses_tuned_settings_unless_set(scan, prior, tmp_path):
    """DPS gets the MRI-tuned zeta of the settings table; a --set value wins over it; --steps reaches every solver;
    compare.json records every value that ran and where the tuned ones came from."""
    import json

    common = dict(prior=prior, steps=2, progress=False, figures=False, center_fraction=CENTER_FRACTION)
    tuned = compare_scan(scan, ["dps"], [4], tmp_path / "a", **common)
    signature = settings.hyperparameters("dps")
    assert signature["zeta"] != settings.TUNED["mri"]["dps"]["zeta"].value
    assert tuned.row("dps", "4x").hyperparameters == {**signature, "steps": 2,
                                                      "zeta": settings.TUNED["mri"]["dps"]["zeta"].value}
    chosen = compare_scan(scan, ["dps"], [4], tmp_path / "b", overrides={"dps": {"zeta": 0.5}}, **common)
    assert chosen.row("dps", "4x").hyperparameters == {**signature, "steps": 2, "zeta": 0.5}
    record = json.loads((tmp_path / "b" / "compare.json").read_text())
    row = next(r for r in record["rows"] if r["solver"] == "dps")
    assert row["hyperparameters"] == {**signature, "steps": 2, "zeta": 0.5}
    assert "swept" in row["tuned_from"]["zeta"]
