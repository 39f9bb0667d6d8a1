"""recipes/active_mri.py: the fixed masks have exactly the budget, and the --tiny run writes its JSON, Markdown and
figure with ADS's mask and three fixed masks of the same size per budget and slice."""
import json

import numpy as np
import pytest

from repo_scripts import load_script

active_mri = load_script("recipes/active_mri.py", "recipe_active_mri")


@pytest.mark.parametrize("kind", active_mri.FIXED_MASKS)
def test_fixed_masks_have_the_budget_and_the_block(kind):
    width = 128
    acquirable = np.zeros(width, dtype=bool)
    acquirable[4:124] = True
    start = active_mri.calibration_block(width, 4)
    assert start.sum() == 10 and start[59:69].all()                         # fastMRI: round(128 * 0.08) at 4x
    mask = active_mri.fixed_mask(kind, start, acquirable, 32, seed=7)
    assert mask.sum() == 32 and (mask & start).sum() == 10
    assert not (mask & ~acquirable).any()
    assert np.array_equal(mask, active_mri.fixed_mask(kind, start, acquirable, 32, seed=7))
    if kind != "equispaced":
        assert not np.array_equal(mask, active_mri.fixed_mask(kind, start, acquirable, 32, seed=8))


def test_variable_density_favours_the_centre():
    width, start = 128, active_mri.calibration_block(128, 8)
    counts = np.zeros(width)
    for seed in range(200):
        counts += active_mri.fixed_mask("variable-density", start, np.ones(width, bool), 16, seed) & ~start
    assert counts[44:84].sum() > 2 * (counts[:44].sum() + counts[84:].sum())


def test_tiny_run_writes_masks_and_metrics(tmp_path):
    out = tmp_path / "active"
    report = active_mri.main(["--tiny", "--out", str(out), "--cheap", "steps=6;particles=2"])
    payload = json.loads((out / "active.json").read_text())
    assert (out / "active-masks.png").stat().st_size > 0
    assert "| mask |" in (out / "active.md").read_text()
    width = payload["kspace"][1]
    assert {r["budget"] for r in payload["records"]} == {width // 4, width // 8}
    for record in payload["records"]:
        rows = record["reddiff"]
        assert set(rows) == {"ads", "ads-cheap", *active_mri.FIXED_MASKS}
        for name, row in rows.items():
            assert row["lines"] == record["budget"], name                  # the same budget for every mask
            assert np.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1
        ads = record["ads"]["ads"]
        assert len(ads["acquisition_order"]) == record["budget"] - record["start_lines"]
        assert sorted(rows["ads"]["mask"]) == sorted(set(rows["ads"]["mask"]) | set(ads["acquisition_order"]))
        assert ads["particle_evaluations"] == 12 * 3 and record["ads"]["ads-cheap"]["particle_evaluations"] == 12
    assert set(report.means()[width // 4]) >= {"ads", "random", "ads (own)"}


def test_fixed_option_selects_the_masks_to_compare():
    from invdiff.errors import InputError

    assert active_mri.parse_fixed("all") == active_mri.FIXED_MASKS
    assert active_mri.parse_fixed("none") == ()
    assert active_mri.parse_fixed("random, equispaced") == ("random", "equispaced")
    with pytest.raises(InputError, match="--fixed"):
        active_mri.parse_fixed("radial")
