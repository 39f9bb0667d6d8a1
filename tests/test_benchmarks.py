"""benchmarks/run.py --quick: one run over every solver and task with an analytic prior, the report's keys.

The report must hold, per (solver, task) row: wall and network seconds, the overhead fraction
(wall - network) / wall, NFE, peak memory and PSNR/SSIM; and RED-Diff's time over DPS's per task. Overhead
fractions lie in [0, 1] and NFE equals the steps for diffusion solvers (0 for classical ones). About 10 s.
"""
import json
from pathlib import Path

import pytest

from repo_scripts import load_script


def _benchmark():
    return load_script("benchmarks/run.py", "benchmarks_run")


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    benchmark = _benchmark()
    ROW_KEYS = benchmark.ROW_KEYS
    report = benchmark.main(["--quick", "--out", str(tmp_path), "--solvers", "reddiff,dps,diffpir,ddrm,cg-sense",
                             "--ct-geometries", "parallel,fan,limited"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{report['date']}-cpu-quick.{suffix}" for suffix in ("json", "md", "png")]
    saved = json.loads((tmp_path / files[0]).read_text())
    for key in ("date", "device", "steps", "threads", "torch_version", "rows", "reddiff_vs_dps", "priors",
                "memory_method", "network_dtype"):
        assert key in saved
    tasks = {"mri-4x", "ct-60", "ct-fan-60", "ct-limited120-60", "inpainting"}
    assert {row["task"] for row in saved["rows"]} == tasks
    assert {row["solver"] for row in saved["rows"]} >= {"reddiff", "dps", "diffpir", "cg-sense"}
    for row in saved["rows"]:
        assert set(ROW_KEYS) <= set(row)
        if row["note"].startswith("n/a"):                         # DDRM: no SVD for SENSE or CT
            assert row["solver"] == "ddrm" and (row["task"] == "mri-4x" or row["task"].startswith("ct-"))
            continue
        assert row["wall_seconds"] > 0 and 0 <= row["network_seconds"] <= row["wall_seconds"]
        assert 0 <= row["overhead_fraction"] <= 1
        assert row["nfe"] == (saved["steps"] if row["solver"] in ("reddiff", "dps", "diffpir", "ddrm") else 0)
        assert row["peak_memory_mb"] is not None and row["psnr"] > 0 and -1 <= row["ssim"] <= 1
    assert set(saved["reddiff_vs_dps"]) == tasks
    for ratio in saved["reddiff_vs_dps"].values():
        assert ratio["reddiff_over_dps"] == pytest.approx(ratio["reddiff_seconds"] / ratio["dps_seconds"])
    table = (tmp_path / files[1]).read_text()
    assert "| ct-60 | reddiff |" in table and "DPS / RED-Diff" in table
    assert (tmp_path / files[2]).stat().st_size > 10_000               # the PSNR-against-time figure


# ------------------------------------------------------------------------------ benchmarks/gpu_train_priors.py
def test_gpu_train_priors_splits_workers_by_cost_and_reads_the_speed(tmp_path):
    script = load_script("benchmarks/gpu_train_priors.py", "gpu_train_priors")
    assert script.split_workers(14, {"brain": 0.003, "ct": 0.0135}) == {"brain": 3, "ct": 11}
    assert script.split_workers(2, {"brain": 0.003, "ct": 0.0135}) == {"brain": 1, "ct": 1}
    assert script.split_workers(8, {"brain": 0.003}) == {"brain": 8}
    assert script.seconds_per_step(tmp_path) is None                       # no run there
    lines = [{"step": 20, "sec_per_step": 9.0}, {"step": 40, "sec_per_step": 0.2}, {"step": 60, "sec_per_step": 0.4}]
    (tmp_path / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert script.seconds_per_step(tmp_path) == pytest.approx(0.3)     # start-up record left out


def test_gpu_train_priors_ct_recipe_warm_starts_the_shipped_prior(tmp_path):
    # The GPU's CT run continues the shipped prior: its arguments must give the shipped architecture (else --init
    # refuses) and train. One step at 16 px on the CPU proves both.
    script = load_script("benchmarks/gpu_train_priors.py", "gpu_train_priors")
    recipe = script.recipes(batch=2)["ct"]
    assert Path(recipe["init"]).is_file()
    from invdiff.priors import train as T

    assert T.main([*recipe["args"], "--init", recipe["init"], "--size", "16", "--steps", "1", "--threads", "1",
                   "--no-progress", "--out", str(tmp_path / "run"), "--export", "warm",
                   "--export-dir", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "warm.json").read_text())
    assert meta["warm_start_from"]["name"] == "ct-phantom-anatomy" and meta["sigma_data"] == 0.5


@pytest.mark.slow
def test_gpu_train_priors_cpu_smoke_trains_exports_and_reports(tmp_path):
    # Every step of the GPU script, tiny, on the CPU (about 3 minutes): training with a data worker, export,
    # the MRI and CT evaluations of the new and the shipped priors, the report.
    script = load_script("benchmarks/gpu_train_priors.py", "gpu_train_priors")
    assert script.main(["--cpu-smoke", "--out", str(tmp_path), "--priors", "ct"]) == 0
    report = json.loads(next(tmp_path.glob("gpu_train_priors-*-cpu-smoke.json")).read_text())
    assert report["trained"]["ct"]["steps"] == 3 and (tmp_path / "ct-phantom-anatomy-gpu.safetensors").is_file()
    assert {r["prior"] for r in report["tables"]["ct_tune"]} == {"new", "shipped"}
    assert report["ct_chosen"] is not None and not report["tables"]["brain"]


# ------------------------------------------------------------------------------- benchmarks/clean_reference.py
def test_clean_reference_rescores_compare_outputs_against_the_noise_free_sample(tmp_path):
    pytest.importorskip("nibabel", reason="the EPI sample is rebuilt from nibabel's example4d")
    import h5py
    import numpy as np

    from invdiff.metrics import evaluate

    script = load_script("benchmarks/clean_reference.py", "clean_reference")
    with h5py.File(script.REPO / "data" / "brain_multislice_multicoil.h5", "r") as f:
        target = f["reconstruction_rss"][1:3]                     # as `invdiff compare --slices 1:3` stores it
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "compare.json").write_text(json.dumps({"scan": "data/brain_multislice_multicoil.h5", "prior": None}))
    np.savez(folder / "reconstructions.npz", **{"4x/target": target, "4x/blurred": 0.9 * target})
    assert script.main([str(folder), "--out", str(tmp_path / "out")]) == 0
    report = json.loads(next((tmp_path / "out").glob("clean_reference-*.json")).read_text())
    ceiling = report["ceilings"]["brain_multislice_multicoil"]
    assert 29 < ceiling["psnr"] < 32                  # the noise-free image is far from its noisy target
    (row,) = report["rows"]
    assert row["slices"] == [1, 3]
    assert row["fastmri_target"]["psnr"] == pytest.approx(evaluate(target, 0.9 * target)["psnr"], abs=1e-3)
    clean = script.references("brain_multislice_multicoil", script.REPO / "data" / "brain_multislice_multicoil.h5",
                              tmp_path)["clean"][1:3]
    assert row["noise_free"]["psnr"] == pytest.approx(evaluate(clean, 0.9 * target)["psnr"], abs=1e-3)
    assert row["ceiling"]["psnr"] == pytest.approx(evaluate(target, clean)["psnr"], abs=1e-3)
    # a scan with no noise-free twin is refused by name
    (folder / "compare.json").write_text(json.dumps({"scan": "/data/other_scan.h5"}))
    with pytest.raises(ValueError, match="other_scan.h5"):
        script.main([str(folder), "--out", str(tmp_path / "out2")])
