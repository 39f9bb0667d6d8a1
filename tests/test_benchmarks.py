"""benchmarks/run.py --quick: one run over every solver and task with an analytic prior, the report's keys.

The report must hold, per (solver, task) row: wall and network seconds, the overhead fraction
(wall - network) / wall, NFE, peak memory and PSNR/SSIM; and RED-Diff's time over DPS's per task. Overhead
fractions lie in [0, 1] and NFE equals the steps for diffusion solvers (0 for classical ones). About 10 s.
"""
import json

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
