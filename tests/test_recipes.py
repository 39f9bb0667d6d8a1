"""The comparison recipes run end to end in --tiny mode (analytic prior, tiny images, a few steps).

Each must write metrics.csv with the columns solver, task, PSNR, SSIM, NMSE, seconds, NFE, note and exactly
one row per (solver, task) -- the task's baseline first, then every configured solver -- plus one PNG grid
per task; solvers that cannot run on a task's operator (DDRM on SENSE and CT) are rows reading n/a.
"""
import csv

import pytest

from invdiff.compare import CSV_COLUMNS

from repo_scripts import load_script


def _load(name):
    return load_script(f"recipes/{name}.py", f"recipe_{name}")


def _rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return tuple(reader.fieldnames), list(reader)


def _check(out, config, tasks, baselines, not_applicable=()):
    columns, rows = _rows(out / "metrics.csv")
    assert columns == CSV_COLUMNS
    expected = [(solver, task) for task, baseline in zip(tasks, baselines)
                for solver in [baseline, *(s for s in config.solvers if s != baseline)]]
    assert [(r["solver"], r["task"]) for r in rows] == expected
    for row in rows:
        if row["solver"] in not_applicable:
            assert row["PSNR"] == "n/a" and row["note"].startswith("n/a:")
        else:
            assert float(row["PSNR"]) > 0 and -1 <= float(row["SSIM"]) <= 1 and float(row["seconds"]) >= 0
            assert int(row["NFE"]) in (0, config.steps)
    for task in tasks:
        assert (out / f"grid-{task}.png").stat().st_size > 0
    assert (out / "compare.json").is_file()


DIFFUSION = ("reddiff", "dps", "diffpir", "ddrm")


def _best_diffusion_beats_baseline(report, task, baseline, margin_db=0.5):
    """With a Gaussian prior fitted on other images (the --tiny stand-in), the best diffusion solver must beat the
    task's baseline: a broken normalisation, data path or output mapping would not."""
    best = max(row.psnr for row in report.rows if row.task == task and row.solver in DIFFUSION and row.ran)
    assert best > report.row(baseline, task).psnr + margin_db, (task, best, report.row(baseline, task).psnr)


def test_compare_mri_tiny(tmp_path):
    recipe = _load("compare_mri")
    report = recipe.main(["--tiny", "--out", str(tmp_path)])
    config = recipe.Config().tiny_variant()
    _check(tmp_path, config, ["4x", "8x"], ["zero-filled"] * 2, not_applicable={"ddrm"})
    assert report.row("ddrm", "4x").note.startswith("n/a") and "SenseMRI" in report.row("ddrm", "4x").note
    for task in ("4x", "8x"):
        _best_diffusion_beats_baseline(report, task, "zero-filled")


def test_compare_ct_tiny(tmp_path):
    recipe = _load("compare_ct")
    report = recipe.main(["--tiny", "--out", str(tmp_path)])
    config = recipe.Config().tiny_variant()
    tasks = [f"ct-{views}" for views in config.views] + ["ct-fan-16", "ct-limited120-16"]
    _check(tmp_path, config, tasks, ["fbp"] * len(tasks), not_applicable={"ddrm"})
    from invdiff import settings
    assert report.row("reddiff", tasks[0]).hyperparameters == settings.effective("reddiff", "ct", steps=config.steps)
    assert report.row("reddiff", tasks[0]).hyperparameters["init"] == "fbp"        # the CT row of the table
    assert report.tasks[0].images[0].info["scale"] == 1.0           # CT keeps its fixed scale
    for task in tasks:
        _best_diffusion_beats_baseline(report, task, "fbp")


def test_compare_inpainting_sr_tiny(tmp_path):
    recipe = _load("compare_inpainting_sr")
    report = recipe.main(["--tiny", "--out", str(tmp_path), "--set", "dps:zeta=0.5", "--set", "tv:max_iter=50"])
    config = recipe.Config().tiny_variant()
    _check(tmp_path, config, ["inpaint-random", "inpaint-box", "sr-4x"], ["zero-filled", "zero-filled", "pinv"])
    assert report.row("dps", "sr-4x").hyperparameters["zeta"] == 0.5          # --set wins over the table
    assert report.row("dps", "inpaint-box").hyperparameters["zeta"] == 0.5
    assert report.row("tv", "sr-4x").hyperparameters["max_iter"] == 50
    for task in ("inpaint-random", "inpaint-box"):         # not SR: at 32 px from 8 x 8 data A^+ y is as good
        _best_diffusion_beats_baseline(report, task, "zero-filled")


def test_recipe_config_parsing():
    recipe = _load("compare_ct")
    from invdiff.recipe import parse_config
    config = parse_config(recipe.Config, ["--views", "20,40", "--set", "dps:zeta=0.02", "--no-tiny", "--size", "64",
                                          "--set", "reddiff:lam=3,tv:lam=1e-3"])
    assert config.views == (20, 40) and config.size == 64 and not config.tiny
    assert config.set == ("dps:zeta=0.02", "reddiff:lam=3", "tv:lam=1e-3")     # repeated and comma-separated
    assert parse_config(recipe.Config, []).set == ()
    with pytest.raises(SystemExit):
        parse_config(recipe.Config, ["--views", "many"])
