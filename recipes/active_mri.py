"""Active subsampling (ADS) on the shipped brain samples: ADS's chosen lines against fixed masks of the same budget.

For each budget (the scan's width / 4 and / 8) and each slice: ADS (``invdiff.samplers.active``) starts from the
calibration block that fastMRI's mask of that acceleration has (round(W * 0.08) centre lines at 4x, round(W * 0.04)
at 8x), measures the rest of the budget line by line through the slice's retrospective acquisition (columns the
scan never acquired, the header's padding, are not offered), and reconstructs. Then RED-Diff, with the same prior,
seed and settings, reconstructs the slice on ADS's final mask and on three fixed masks with exactly as many lines
and the same calibration block:

* ``random``: the other lines uniformly at random among the acquirable columns (fastMRI's RandomMaskFunc with
  the count fixed), seeded by the file name and the budget, the same for every slice (as fastMRI does);
* ``equispaced``: the other lines evenly spaced over the acquirable columns outside the block;
* ``variable-density``: the other lines drawn without replacement with probability proportional to
  ``(1 + |k|)^-2`` (``k`` the distance to the k-space centre in lines), seeded like ``random``.

Every solve uses the ESPIRiT maps of the shared calibration block (``--maps shared``, the default): a mask whose
lines happen to widen the contiguous centre would otherwise also get better maps, and the table would compare maps,
not lines. ``--maps own`` gives each mask its own calibration block's maps (what ``invdiff reconstruct --mask-file``
does).

    python recipes/active_mri.py --out runs/active_mri --threads 1 --set ads:steps=50 --set ads:particles=4
    python recipes/active_mri.py --tiny --out /tmp/active_mri     # seconds: 48 x 48 synthetic scan, analytic prior

Writes ``active.json`` (every number, per slice, the masks and ADS's acquisition order), ``active.md`` (the
tables) and ``active-masks.png`` (the mask growing over ADS's selections, the per-line score at the first
selection, and the four final masks) into ``--out``. ADS's hyperparameters come from the settings table and
``--set ads:NAME=VALUE``; RED-Diff's from the table, with ``--steps``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from invdiff import recipe
from invdiff.io import atomic_open

log = logging.getLogger("recipes.active_mri")

FIXED_MASKS = ("random", "equispaced", "variable-density")


@dataclass
class Config(recipe.RecipeConfig):
    scan: str = "data/brain_multislice_multicoil.h5"   # relative paths: the cwd, then the repository
    out: str = "runs/active_mri"
    solvers: tuple[str, ...] = ("reddiff",)           # the solver run on every mask
    steps: int = 50                                   # the solver's steps (RED-Diff's default is 100)
    fractions: tuple[int, ...] = (4, 8)               # budget = width // fraction
    slices: str = "all"
    cheap: str = ""                                   # a second, cheaper ADS run: "steps=5;particles=2" ("" none)
    fixed: str = "all"                                # fixed masks to compare: "all", "none" or a comma list
    maps: str = "shared"                              # "shared": every mask's solve uses the start block's coil
                                                      # maps; "own": each mask's own calibration block's maps

    def tiny_variant(self) -> "Config":
        """Seconds: a 48 x 48 synthetic 4-coil scan (k-space 96 x 48), analytic prior; ADS 12 steps x 3 particles, RED-Diff 100 steps from
        the zero-filled image (A^+ y, a CG solve with 4 to 12 of 48 lines, amplifies noise past what 100 steps undo)."""
        return replace(self, prior="analytic", steps=100, threads=1, slices="all",
                       set=self.set + ("ads:steps=12", "ads:particles=3", "reddiff:init=adjoint"))


# ---- masks --------------------------------------------------------------------------------------------------
def calibration_block(width: int, fraction: int) -> np.ndarray:
    """fastMRI's centre block for acceleration ``fraction``: round(W * cf) lines from (W - n + 1) // 2 (bool (W,))."""
    from invdiff.tasks import default_center_fraction

    n = max(round(width * default_center_fraction(fraction)), 4)     # ESPIRiT needs at least 4
    mask = np.zeros(width, dtype=bool)
    start = (width - n + 1) // 2
    mask[start:start + n] = True
    return mask


def fixed_mask(kind: str, start: np.ndarray, acquirable: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """``start`` plus ``budget - |start|`` acquirable lines chosen by ``kind`` (see the module docstring)."""
    mask = start.copy()
    free = np.flatnonzero(acquirable & ~start)
    count = budget - int(start.sum())
    if count <= 0:
        return mask
    rng = np.random.default_rng(seed)
    if kind == "random":
        chosen = rng.choice(free, size=count, replace=False)
    elif kind == "equispaced":
        chosen = free[np.round(np.linspace(0, len(free) - 1, count)).astype(int)]
    elif kind == "variable-density":
        distance = np.abs(free - len(start) / 2)
        weights = (1.0 + distance) ** -2.0
        chosen = rng.choice(free, size=count, replace=False, p=weights / weights.sum())
    else:
        raise ValueError(f"mask kind must be one of {', '.join(FIXED_MASKS)}, got {kind!r}")
    mask[chosen] = True
    return mask


def mask_seed(scan_path: Path, budget: int) -> int:
    """One seed per file and budget (fastMRI seeds by the file name), the same for every slice."""
    return zlib.crc32(f"{scan_path.name}:{budget}".encode())


# ---- data and prior -----------------------------------------------------------------------------------------
def tiny_scan(config: Config) -> Path:
    """A 48 x 48 (k-space 96 x 48, 4 coils) synthetic fastMRI file of the block-averaged T1 brain slice."""
    from invdiff.datasets.synthetic import write_fake_fastmri
    from invdiff.tasks import block_average

    with h5py.File(recipe.repository_path("data/brain_t1_multicoil.h5"), "r") as h5:
        image = block_average(h5["reconstruction_rss"][0], 48)
    path = Path(config.out) / "tiny_scan.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fake_fastmri(path, image, num_coils=4, noise_level=0.01 * float(image.max()), seed=config.seed)
    return path


def load_prior(config: Config, in_shape, device):
    if config.prior == "analytic":     # fitted on the multislice sample, never on the tiny test image
        return recipe.stand_in_prior(in_shape, "data/brain_multislice_multicoil.h5", key="reconstruction_rss",
                                     factor=2)
    return recipe.resolve_prior(config.prior, device)


def parse_cheap(text: str) -> dict:
    """``"steps=5;particles=2"`` -> typed ADS overrides (empty text: none)."""
    from invdiff.settings import parse_set

    items = [f"ads:{part.strip()}" for part in text.split(";") if part.strip()]
    return parse_set(items).get("ads", {}) if items else {}


# ---- the run ------------------------------------------------------------------------------------------------
def parse_fixed(text: str) -> tuple[str, ...]:
    """``--fixed``: "all" (every kind of FIXED_MASKS), "none" (ADS only: a settings sweep) or a comma list."""
    if text == "all":
        return FIXED_MASKS
    if text == "none":
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FIXED_MASKS]
    if unknown or not kinds:
        from invdiff.errors import InputError
        raise InputError(f"--fixed: expected all, none or some of {', '.join(FIXED_MASKS)}; got {text!r}")
    return kinds


def run(config: Config) -> "Report":
    from invdiff import metrics
    from invdiff.datasets.fastmri import read_scan
    from invdiff.settings import effective, parse_set
    from invdiff.tasks import parse_slices, scan_slice, solve

    if config.maps not in ("shared", "own"):
        from invdiff.errors import InputError
        raise InputError(f"--maps: expected shared or own, got {config.maps!r}")
    fixed_kinds = parse_fixed(config.fixed)
    device = recipe.prepare(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    scan_path = tiny_scan(config) if config.tiny else recipe.repository_path(config.scan)
    overrides = parse_set(config.set)
    solver = config.solvers[0]
    ads_settings = effective("ads", "mri", overrides.get("ads"))
    solver_settings = effective(solver, "mri", overrides.get(solver), steps=config.steps)
    cheap_settings = {**ads_settings, **parse_cheap(config.cheap)} if config.cheap else None
    records, figure_data, figure_masks = [], None, None
    with read_scan(scan_path) as scan:
        _, _, height, width = scan.kspace_shape
        left, right = scan.header.padding if scan.header.padding is not None else (0, width)
        acquirable = np.zeros(width, dtype=bool)
        acquirable[left:right] = True
        chosen_slices = list(parse_slices(None if config.slices == "all" else config.slices, scan.num_slices))
        targets = {i: scan.target(i) for i in chosen_slices}
        maxval = float(max(t.max() for t in targets.values()))
        prior = None
        for fraction in config.fractions:
            budget = width // fraction
            start = calibration_block(width, fraction) & acquirable
            seed = mask_seed(scan_path, budget)
            fixed = {kind: fixed_mask(kind, start, acquirable, budget, seed) for kind in fixed_kinds}
            for index in chosen_slices:
                image = scan_slice(scan, index, start, device=device)
                if prior is None:
                    prior = load_prior(config, image.problem.operator.in_shape, device)
                runs = {"ads": ads_settings}
                if cheap_settings is not None:
                    runs["ads-cheap"] = cheap_settings
                masks, ads_rows = {}, {}
                for name, settings in runs.items():
                    image = scan_slice(scan, index, start, device=device)
                    image.problem.acquisition.acquirable = torch.from_numpy(acquirable)   # the header's limits
                    solution = solve(image, "ads", prior, {**settings, "budget": budget}, seed=config.seed)
                    d = solution.result.diagnostics
                    masks[name] = d["mask"].numpy().astype(bool)
                    ads_rows[name] = {
                        "psnr": metrics.psnr(targets[index], solution.image, maxval),
                        "ssim": metrics.ssim(targets[index], solution.image, maxval),
                        "seconds": d["seconds"], "nfe": d["nfe"], "particle_evaluations": d["particle_evaluations"],
                        "steps": d["steps"], "particles": d["particles"], "acquisitions": d["acquisitions"],
                        "acquisition_order": d["acquisition_order"], "lines": int(masks[name].sum()),
                    }
                    if figure_data is None and name == "ads":
                        figure_data = {"order": d["acquisition_order"], "start": start, "scores": d["scores"],
                                       "selection_steps": d["selection_steps"], "slice": index, "budget": budget,
                                       "steps": d["steps"]}
                    log.info("slice %d, budget %d, %s: %d lines in %.0f s, own reconstruction %.2f dB", index, budget,
                             name, masks[name].sum(), d["seconds"], ads_rows[name]["psnr"])
                masks.update(fixed)
                if figure_masks is None and figure_data is not None:
                    figure_masks = dict(masks)
                solver_rows = {}
                for name, mask in masks.items():
                    posed = scan_slice(scan, index, mask, device=device,
                                       maps_mask=start if config.maps == "shared" else None)
                    solution = solve(posed, solver, prior, solver_settings, seed=config.seed)
                    solver_rows[name] = {"psnr": metrics.psnr(targets[index], solution.image, maxval),
                                         "ssim": metrics.ssim(targets[index], solution.image, maxval),
                                         "seconds": solution.result.diagnostics["seconds"],
                                         "lines": int(mask.sum()), "mask": np.flatnonzero(mask).tolist()}
                    log.info("slice %d, budget %d, %s on the %s mask: %.2f dB, SSIM %.4f", index, budget, solver, name,
                             solver_rows[name]["psnr"], solver_rows[name]["ssim"])
                records.append({"slice": index, "budget": budget, "fraction": fraction, "start_lines": int(start.sum()),
                                "ads": ads_rows, solver: solver_rows})
                partial = Report(config=config, scan=str(scan_path), width=width, height=height, solver=solver,
                                 ads_settings=ads_settings, cheap_settings=cheap_settings,
                                 solver_settings=solver_settings, records=records, acquirable=[left, right])
                partial.write(out, figure_data, figure_masks)          # a long run keeps what it has done
    report = Report(config=config, scan=str(scan_path), width=width, height=height, solver=solver,
                    ads_settings=ads_settings, cheap_settings=cheap_settings, solver_settings=solver_settings,
                    records=records, acquirable=[left, right])
    report.write(out, figure_data, figure_masks)
    return report


@dataclass
class Report:
    config: Config
    scan: str
    width: int
    height: int
    solver: str
    ads_settings: dict
    cheap_settings: dict | None
    solver_settings: dict
    records: list
    acquirable: list

    def means(self) -> dict:
        """{budget: {mask: (mean PSNR, mean SSIM)}} over the slices, plus ADS's own reconstructions."""
        table: dict = {}
        for record in self.records:
            row = table.setdefault(record["budget"], {})
            for name, values in record[self.solver].items():
                row.setdefault(name, []).append((values["psnr"], values["ssim"]))
            for name, values in record["ads"].items():
                row.setdefault(f"{name} (own)", []).append((values["psnr"], values["ssim"]))
        return {budget: {name: tuple(np.mean(v, axis=0).tolist()) for name, v in row.items()}
                for budget, row in table.items()}

    def summary_lines(self) -> list[str]:
        lines = [f"# ADS vs fixed masks, {self.solver} on each mask: {Path(self.scan).name}, k-space "
                 f"{self.height} x {self.width}", ""]
        lines += ["| budget | mask | " + " | ".join(f"slice {r['slice']} PSNR / SSIM" for r in self.records
                                                    if r["budget"] == self.records[0]["budget"]) + " | mean |",
                  "| --- | --- |" + " --- |" * (1 + sum(r["budget"] == self.records[0]["budget"] for r in self.records))]
        means = self.means()
        for budget in means:
            chosen = [r for r in self.records if r["budget"] == budget]
            names = list(chosen[0][self.solver]) + [f"{n} (own)" for n in chosen[0]["ads"]]
            for name in names:
                cells = []
                for r in chosen:
                    v = r["ads"][name[:-6]] if name.endswith(" (own)") else r[self.solver][name]
                    cells.append(f"{v['psnr']:.2f} / {v['ssim']:.4f}")
                mean = means[budget][name]
                lines.append(f"| {budget} | {name} | " + " | ".join(cells) + f" | {mean[0]:.2f} / {mean[1]:.4f} |")
        lines += ["", "ADS cost per slice:"]
        for r in self.records:
            for name, v in r["ads"].items():
                lines.append(f"- slice {r['slice']}, budget {r['budget']}, {name}: {v['steps']} steps x "
                             f"{v['particles']} particles: {v['particle_evaluations']} network forward passes "
                             f"and {v['steps'] * v['particles']} backward, {v['seconds']:.0f} s; {self.solver} "
                             f"{self.solver_settings.get('steps')} steps, "
                             f"{np.mean([s['seconds'] for s in r[self.solver].values()]):.0f} s per mask")
        return lines

    def write(self, out: Path, figure_data, figure_masks) -> None:
        payload = {"recipe": "recipes/active_mri.py", "config": dataclasses.asdict(self.config), "scan": self.scan,
                   "kspace": [self.height, self.width], "acquirable_columns": self.acquirable, "solver": self.solver,
                   "ads_settings": self.ads_settings, "cheap_settings": self.cheap_settings,
                   "solver_settings": self.solver_settings, "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "means": {str(b): v for b, v in self.means().items()}, "records": self.records}
        with atomic_open(out / "active.json") as f:
            f.write(json.dumps(payload, indent=1, default=str))
        with atomic_open(out / "active.md") as f:
            f.write("\n".join(self.summary_lines()) + "\n")
        if figure_data is not None:
            figure(out / "active-masks.png", figure_data, figure_masks, self.width)


def figure(path: Path, data: dict, final_masks: dict, width: int) -> None:
    """The mask growing over ADS's selections, the per-line score at the first selection, the final masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, start = data["order"], data["start"]
    grid = np.full((len(order) + 1, width), np.nan)
    grid[:, start] = 0
    for k, line in enumerate(order):
        grid[k + 1:, line] = k + 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    shown = axes[0].imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    axes[0].set(title=f"ADS mask growing (slice {data['slice']}, budget {data['budget']})", xlabel="k-space column",
                ylabel="lines chosen")
    fig.colorbar(shown, ax=axes[0], label="choice number (0: calibration block)")
    scores = np.asarray(data["scores"][0], dtype=float)
    scores = scores - np.nanmin(scores)               # the score's floor (N log N for agreeing particles) is common
    axes[1].bar(np.arange(width), np.nan_to_num(scores, nan=0.0), color="tab:blue", width=1.0)
    if order:
        axes[1].bar([order[0]], [scores[order[0]]], color="tab:red", width=1.0, label=f"chosen: column {order[0]}")
        axes[1].legend()
    axes[1].set(title=f"per-line score at the first selection (step {data['selection_steps'][0]} of {data['steps']})",
                xlabel="k-space column", ylabel="score - lowest score (measured: 0)")
    names = list(final_masks)
    axes[2].imshow(np.stack([final_masks[n] for n in names]).astype(float), aspect="auto", cmap="gray_r",
                   interpolation="nearest")
    axes[2].set(yticks=range(len(names)), yticklabels=names, xlabel="k-space column",
                title=f"final masks, {int(final_masks[names[0]].sum())} lines each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return recipe.run_recipe(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
