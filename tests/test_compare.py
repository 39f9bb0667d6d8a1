"""Solver comparison: identical inputs for every solver, the invdiff reconstruct pipeline, the files written.

A tiny synthetic 4-coil fastMRI file (32 x 48 image, k-space 64 x 48) and the exact stationary Gaussian prior
keep each comparison to a second or two. What is checked:
* every solver of a task receives the same problem: the sha256 of (y, sigma_y, operator buffers) it was
  handed is one value per task, and the zero-filled row equals the pipeline's zero-filled image;
* the scan problem is the one ``invdiff reconstruct`` builds (a deterministic solver gives the same output);
* a solver's random stream depends only on (seed, image index), not on which solvers ran before it;
* metrics.csv has the columns and one row per (solver, task); n/a rows carry the reason;
* bad input (unknown solver, malformed --set) raises ValueError naming it.
"""
import argparse
import csv
import io

import numpy as np
import pytest
import torch

from invdiff import metrics
from invdiff.compare import (CSV_COLUMNS, SEED_STRIDE, add_compare_parser, block_average, check_solvers,
                             compare_problems, compare_scan, ct_task, inpainting_task, parse_accelerations,
                             parse_set_options, plan_solvers, problem_fingerprint, scan_tasks,
                             smooth_gaussian_prior, superres_task)
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.operators.inpainting import random_pixel_mask
from invdiff.reconstruct import ReconstructionRequest, reconstruct_scan

CENTER_FRACTION = 0.17        # 8 of 48 columns: enough calibration lines for ESPIRiT on a tiny scan


def _image(size=32, width=None):
    """A piecewise-smooth test object (two nested rectangles on a smooth background), max 1."""
    width = size if width is None else width
    rows, cols = np.mgrid[0:size, 0:width] / np.array([size, width])[:, None, None]
    image = 0.2 * np.exp(-((rows - 0.5) ** 2 + (cols - 0.5) ** 2) / 0.1)
    image[size // 4:3 * size // 4, width // 5:4 * width // 5] += 0.6
    image[3 * size // 8:5 * size // 8, 2 * width // 5:3 * width // 5] += 0.3
    return (image / image.max()).astype(np.float32)


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
                          center_fraction=CENTER_FRACTION, overrides={"tv": ["max_iter=20"]})
    columns, rows = _csv_rows(tmp_path / "out" / "metrics.csv")
    assert tuple(columns) == CSV_COLUMNS
    # zero-filled is added first as the baseline of each task
    assert [(r["solver"], r["task"]) for r in rows] == [(s, t) for t in ("4x", "8x") for s in ["zero-filled", *solvers]]
    assert all(float(r["PSNR"]) > 0 and 0 < float(r["SSIM"]) <= 1 for r in rows)
    assert {r["NFE"] for r in rows if r["solver"] == "reddiff"} == {"5"}       # --steps reached RED-Diff
    assert report.row("tv", "4x").hyperparameters == {"max_iter": 20}
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
    the zero-filled row is A^T y of that input, i.e. the pipeline's zero-filled image."""
    report = compare_scan(scan, ["reddiff", "dps", "cg-sense"], [4, 8], tmp_path, prior=prior, steps=3,
                          progress=False, figures=False, center_fraction=CENTER_FRACTION)
    for task in report.tasks:
        hashes = {tuple(row.input_sha256) for row in report.rows if row.task == task.name}
        assert len(hashes) == 1
        assert list(hashes)[0] == tuple(problem_fingerprint(image.problem) for image in task.images)
    assert report.row("cg-sense", "4x").input_sha256 != report.row("cg-sense", "8x").input_sha256
    tasks = scan_tasks(scan, [4], center_fraction=CENTER_FRACTION)
    from invdiff.datasets.fastmri import read_scan
    from invdiff.reconstruct import build_slice_problem
    with read_scan(scan) as opened:
        kspace = opened.kspace(0)
        mask = np.asarray(tasks[0].images[0].problem.operator.mask.cpu()).reshape(-1).astype(bool)
        coil_maps = tasks[0].images[0].problem.operator.coil_maps[0].cpu().numpy()
        item = build_slice_problem(kspace, mask, opened.recon_size, device=torch.device("cpu"), coil_maps=coil_maps)
    np.testing.assert_allclose(report.row("zero-filled", "4x").reconstruction[0], item.zero_filled, rtol=1e-5,
                               atol=1e-6 * item.zero_filled.max())


def test_scan_problem_is_the_reconstruct_pipelines(scan, tmp_path):
    """cg-sense is deterministic: compare's row must equal `invdiff reconstruct --solver cg-sense` on the same file."""
    report = compare_scan(scan, ["cg-sense"], [4], tmp_path, progress=False, figures=False,
                          center_fraction=CENTER_FRACTION)
    request = ReconstructionRequest(scan=str(scan), solver="cg-sense", out=str(tmp_path / "r.h5"), acceleration=4,
                                    center_fraction=CENTER_FRACTION, device="cpu", progress=False)
    expected = reconstruct_scan(request).reconstruction
    np.testing.assert_allclose(report.row("cg-sense", "4x").reconstruction, expected, rtol=1e-5,
                               atol=1e-5 * expected.max())


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
def test_bad_solver_lists_raise_value_error_naming_them(solvers, needle):
    with pytest.raises(ValueError, match=needle):
        check_solvers(solvers)


def test_cli_handler_rejects_unknown_solver_before_any_work(scan, tmp_path):
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", str(scan), "--solvers", "reddiff,fancy-net", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown solver 'fancy-net'"):
        args.run(args)
    assert not (tmp_path / "o").exists()


def test_cli_handler_runs_and_reports(scan, tmp_path):
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", str(scan), "--solvers", "cg-sense", "--accel", "4", "--out", str(tmp_path),
                              "--set", "cg-sense:max_iter=5", "--center-fraction", str(CENTER_FRACTION),
                              "--no-progress", "--device", "cpu"])
    stream = io.StringIO()
    assert args.run(args, stream=stream) == 0
    assert "| 4x | cg-sense |" in stream.getvalue() and (tmp_path / "metrics.csv").is_file()


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


def test_override_parsing():
    assert parse_set_options(["reddiff:lam=50", "dps:zeta=0.3", "reddiff:lr=0.1"]) == {
        "reddiff": ["lam=50", "lr=0.1"], "dps": ["zeta=0.3"]}
    assert parse_accelerations("4,8") == [4, 8]
    with pytest.raises(ValueError, match="SOLVER:NAME=VALUE"):
        parse_set_options(["lam=50"])
    with pytest.raises(ValueError, match="'4x'"):
        parse_accelerations("4x")
    plan = plan_solvers(["reddiff", "dps", "cg-sense"], {"reddiff": ["lam=50"]}, steps=20)
    assert plan.kwargs == {"reddiff": {"steps": 20, "lam": 50.0}, "dps": {"steps": 20}, "cg-sense": {}}
    with pytest.raises(ValueError, match="no hyperparameter 'zeta'"):
        plan_solvers(["reddiff"], {"reddiff": ["zeta=1"]})
    with pytest.raises(ValueError, match="not among the compared solvers"):
        plan_solvers(["reddiff"], {"dps": ["zeta=1"]})


def test_prior_must_fit_the_images(scan, tmp_path):
    with pytest.raises(ValueError, match="1 channels"):
        compare_scan(scan, ["reddiff"], [4], tmp_path, prior=smooth_gaussian_prior((1, 64, 48)),
                     center_fraction=CENTER_FRACTION, progress=False)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        compare_scan(scan, ["reddiff"], [4], tmp_path, prior=smooth_gaussian_prior((2, 32, 32)),
                     center_fraction=CENTER_FRACTION, progress=False)


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


def test_scan_comparison_uses_tuned_settings_unless_set(scan, prior, tmp_path):
    """DPS gets the MRI-tuned zeta of TASK_SETTINGS; a --set value wins over it; --steps reaches every sampler."""
    from invdiff.compare import TASK_SETTINGS
    common = dict(prior=prior, steps=2, progress=False, figures=False, center_fraction=CENTER_FRACTION)
    tuned = compare_scan(scan, ["dps"], [4], tmp_path / "a", **common)
    assert tuned.row("dps", "4x").hyperparameters == {"steps": 2, **TASK_SETTINGS["mri"]["dps"]}
    chosen = compare_scan(scan, ["dps"], [4], tmp_path / "b", overrides={"dps": ["zeta=0.5"]}, **common)
    assert chosen.row("dps", "4x").hyperparameters == {"steps": 2, "zeta": 0.5}
