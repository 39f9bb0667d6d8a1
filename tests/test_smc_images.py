"""benchmarks/smc_images.py --quick: SMC and RED-Diff on every image task with the analytic prior, the report's keys.

Per task the report must hold finite PSNRs (SMC's weighted mean and best particle, RED-Diff), coverage
fractions ``#{|mean - truth| <= 2 std} / #pixels`` in [0, 1], ESS in [1, N] with min <= final, NFE >= steps and
particle evaluations = NFE x N, and the cost ratio wall / steps / batch pass. The image-domain moments are
checked on two particles: weighted mean ``w1 a + w2 b`` and std ``sqrt(w1 w2) |a - b|``. A prior path that does
not exist fails before any task is built, naming the option. About 15 s on one thread.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from repo_scripts import load_script


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmarks/smc_images.py", "benchmarks_smc_images")


def test_quick_run_writes_a_row_per_task(benchmark, tmp_path):
    particles = 8
    report = benchmark.main(["--quick", "--particles", str(particles), "--out", str(tmp_path)])
    stem = f"smc_images-{report['date']}-cpu-quick"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    for key in ("date", "device", "steps", "seed", "threads", "torch_version", "priors", "smc_settings", "rows"):
        assert key in saved
    assert saved["threads"] == 1 and saved["smc_settings"]["num_particles"] == particles
    assert [row["task"] for row in saved["rows"]] == ["mri-4x", "mri-8x", "ct-30", "inpainting"]
    steps = saved["steps"]
    for row in saved["rows"]:
        for value in (row["psnr_mean"], row["psnr_best"], row["reddiff"]["psnr"]):
            assert value is not None and math.isfinite(value), row["task"]
        assert 0 <= row["coverage"] <= 1 and 0 <= row["coverage_support"] <= 1
        assert 0 < row["support_fraction"] < 1
        assert 1 - 1e-9 <= row["ess_min"] <= row["ess_final"] <= particles + 1e-9
        assert 0 <= row["resampling_events"] < steps                   # the last step never resamples
        assert row["nfe"] >= steps and row["particle_evaluations"] == row["nfe"] * particles
        assert row["finite_particles"] == particles
        assert 0 < row["network_seconds"] <= row["wall_seconds"]
        assert row["reddiff"]["nfe"] == steps and row["reddiff"]["wall_seconds"] > 0
        assert row["cost_ratio_per_step"] == pytest.approx(row["wall_seconds"] / steps / row["batch_pass_seconds"])
        assert row["smc_over_reddiff"] == pytest.approx(row["wall_seconds"] / row["reddiff"]["wall_seconds"])
    assert saved["rows"][2]["reddiff"]["hyperparameters"]["init"] == "fbp"   # CT's task-family settings
    table = (tmp_path / f"{stem}.md").read_text()
    assert "| ct-30 |" in table and "cost ratio / step" in table and "coverage (support)" in table


def test_image_moments_of_two_weighted_particles(benchmark):
    a, b = torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2, 3), 2.0)
    b[..., 0, 0] = 6.0
    samples = torch.stack([a, b])                                        # (N=2, B=1, 1, 2, 3)
    weights = torch.tensor([[0.25], [0.75]], dtype=torch.float64)
    mean, std = benchmark.image_moments(samples, weights, lambda x: x[0, 0].numpy())
    np.testing.assert_allclose(mean, 0.75 * b[0, 0].double().numpy(), rtol=1e-12)
    np.testing.assert_allclose(std, math.sqrt(0.25 * 0.75) * np.abs(b[0, 0].double().numpy()), rtol=1e-12)
    # mean = [4.5, 1.5, 1.5; 1.5, 1.5, 1.5], 2 std = [5.20, 1.73, 1.73; 1.73, 1.73, 1.73];
    # |mean - truth| = [5.3, 1.5, 1.5; 0, 0, 0]: all pixels inside but (0, 0); support truth > 2: (0, 0), (0, 2)
    truth = np.array([[4.5 + 5.3, 0.0, 3.0], [1.5, 1.5, 1.5]])
    assert benchmark.coverage(mean, std, truth) == pytest.approx(5 / 6)
    assert benchmark.coverage(mean, std, truth, truth > 2.0) == pytest.approx(1 / 2)


def test_missing_prior_path_fails_naming_the_option(benchmark, tmp_path):
    missing = tmp_path / "missing-prior.json"
    out = tmp_path / "results"
    with pytest.raises(ValueError, match=r"--mri-prior .*missing-prior\.json.*neither a shipped prior"):
        benchmark.main(["--mri-prior", str(missing), "--tasks", "inpainting", "--out", str(out)])
    assert not out.exists()
    with pytest.raises(ValueError, match="--quick runs the analytic prior"):
        benchmark.main(["--quick", "--ct-prior", str(missing), "--out", str(out)])
    with pytest.raises(ValueError, match="--tasks"):
        benchmark.main(["--quick", "--tasks", "mri-4x,ct-60", "--out", str(out)])


def test_image_std_is_the_samplers_std_for_ct(benchmark, tmp_path):
    # CT's to_image is the real image at scale 1, a linear map: the image-domain std must be diagnostics["std"]
    from invdiff.samplers.smc import sample_smc

    task = benchmark.build_tasks(["ct-30"], True, torch.device("cpu"), tmp_path)[0]
    image = task.images[0]
    result = sample_smc(image.problem, benchmark.quick_prior(task, torch.device("cpu")), num_particles=4, steps=5,
                        resample="none", generator=torch.Generator().manual_seed(0))
    mean, std = benchmark.image_moments(result.samples, result.weights, image.to_image)
    np.testing.assert_allclose(mean, result.x[0, 0].double().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(std, result.diagnostics["std"][0, 0].double().numpy(), rtol=1e-3, atol=1e-6)
    # the final weights here often sit on one particle (std 0): equal weights give the particles' own spread
    uniform = torch.full_like(result.weights, 1 / 4)
    _, spread = benchmark.image_moments(result.samples, uniform, image.to_image)
    expected = result.samples[:, 0, 0].double().std(dim=0, unbiased=False).numpy()
    np.testing.assert_allclose(spread, expected, rtol=1e-4, atol=1e-7)
    assert spread.max() > 0


def test_set_and_tag_change_the_smc_settings_and_the_file_name(benchmark, tmp_path):
    report = benchmark.main(["--quick", "--tasks", "inpainting", "--particles", "4", "--steps", "5",
                             "--set", "smc:proposal=conditional", "--tag", "conditional", "--out", str(tmp_path)])
    stem = f"smc_images-{report['date']}-cpu-quick-conditional"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    assert report["rows"][0]["hyperparameters"]["proposal"] == "conditional"
    assert report["rows"][0]["max_stiffness"] == 0                   # the conditional step has no Euler limit
    assert "except smc proposal=conditional" in (tmp_path / f"{stem}.md").read_text()
    with pytest.raises(ValueError, match="no hyperparameter 'proposl'"):
        benchmark.main(["--quick", "--tasks", "inpainting", "--set", "smc:proposl=x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--tag"):
        benchmark.main(["--quick", "--tag", "a/b", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="smc and reddiff only"):
        benchmark.main(["--quick", "--set", "dps:zeta=1", "--out", str(tmp_path)])


def test_proposals_give_a_row_each_beside_one_reddiff_run(benchmark, tmp_path):
    report = benchmark.main(["--quick", "--tasks", "inpainting", "--particles", "4", "--steps", "4",
                             "--proposals", "conditional,tweedie", "--out", str(tmp_path)])
    rows = report["rows"]
    assert [(row["task"], row["proposal"]) for row in rows] == [("inpainting", "conditional"), ("inpainting", "tweedie")]
    assert rows[0]["reddiff"] is rows[1]["reddiff"]                     # RED-Diff ran once for the task
    assert rows[1]["tweedie_covariance"] == "closed_form"                # the analytic quick prior
    assert rows[1]["ess_final"] == pytest.approx(4)
    stem = f"smc_images-{report['date']}-cpu-quick"
    assert "| inpainting | tweedie |" in (tmp_path / f"{stem}.md").read_text()
    with pytest.raises(ValueError, match="--proposals"):
        benchmark.main(["--quick", "--proposals", "conditional,magic", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--size"):
        benchmark.main(["--quick", "--size", "32", "--out", str(tmp_path)])
