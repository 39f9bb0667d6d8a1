"""RED-Diff against an exact two-mode posterior: how far its outputs are from posterior samples.

Prior: ``two_mode_mixture`` (two isotropic modes ``N(+-separation/2 u, var I)``, u the normalised diagonal) on
d = 16 entries, scaled to the normalised image range (magnitude ~1). Problems ``y = A x + n``:

* ``symmetric``: 8 random measurements orthogonal to u, so the data cannot tell the modes apart and the exact
  posterior has two equal modes;
* ``tilted``: the same plus a weak measurement along u, so one mode is favoured (unequal posterior weights).

RED-Diff is run from ``--chains`` seeds at once (a batch of independent copies of the problem, every copy with
its own noise draws) and its outputs are compared with exact posterior samples by the sliced Wasserstein
distance SW2 (``invdiff.metrics_distributions``), next to the distance between two independent exact sample
sets of the same size (the floor) and to a point mass at the exact posterior mean (what a perfect MMSE
estimator would give). Also reported: the fraction of outputs on the ``+`` side of the mode axis against the
exact posterior weight, and the spread along and across the mode axis against the exact posterior's.

    python benchmarks/reddiff_oracle.py                  # ~1 min on 2 CPU cores
    python benchmarks/reddiff_oracle.py --quick          # seconds, smaller sets

Writes ``benchmarks/results/reddiff_oracle-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):                  # `python benchmarks/reddiff_oracle.py` as well as `python -m ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reports import write_json_and_markdown  # noqa: E402
import invdiff  # noqa: E402
from invdiff.metrics_distributions import sliced_wasserstein  # noqa: E402
from invdiff.operators.matrix import MatrixOperator  # noqa: E402
from invdiff.priors.analytic import two_mode_mixture  # noqa: E402
from invdiff.problem import InverseProblem  # noqa: E402
from invdiff.samplers.reddiff import sample_reddiff  # noqa: E402

log = logging.getLogger("benchmarks.reddiff_oracle")
F64 = torch.float64
DIM = 16
SEPARATION = 2.0          # modes at +-1 along u: +-0.25 per entry
VAR = 0.1                 # per-entry std 0.32: 99.5th-percentile magnitude ~1 (the normalised scale)
SIGMA_Y = 0.05
NUM_PROJECTIONS = 512


def make_problem(kind: str, seed: int) -> tuple[InverseProblem, torch.Tensor]:
    """One measurement of a prior draw; returns the problem and the mode axis u (d,)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.ones(DIM, dtype=F64) / math.sqrt(DIM)
    rows = torch.randn(8, DIM, generator=generator, dtype=F64) / math.sqrt(DIM)
    rows = rows - (rows @ u)[:, None] * u                  # A u = 0: the data say nothing about the mode
    if kind == "tilted":
        rows = torch.cat([rows, 0.02 * u[None]])           # a weak look along the mode axis
    elif kind != "symmetric":
        raise ValueError(f"kind must be 'symmetric' or 'tilted', got {kind!r}")
    operator = MatrixOperator(rows, in_shape=(1, 1, DIM))
    prior = make_prior()
    x = prior.sample(1, generator)
    return invdiff.simulate(operator, x, SIGMA_Y, generator), u


def make_prior():
    return two_mode_mixture(DIM, separation=SEPARATION, var=VAR)


def summarise(samples: torch.Tensor, u: torch.Tensor) -> dict:
    """Fraction on the + side of the mode axis; std along u and mean std across it."""
    flat = samples.reshape(len(samples), -1)
    along = flat @ u
    across = flat - along[:, None] * u
    return {"fraction_plus": float((along > 0).double().mean()), "std_along_axis": float(along.std()),
            "std_across_axis": float(across.std(dim=0).mean())}


def run_case(kind: str, chains: int, exact_size: int, variants: dict, seed: int) -> dict:
    problem, u = make_problem(kind, seed)
    prior = make_prior()
    posterior = prior.posterior(problem)
    exact = posterior.sample(exact_size, torch.Generator().manual_seed(seed + 1))
    exact_other = posterior.sample(exact_size, torch.Generator().manual_seed(seed + 2))

    def distance(samples):
        # Same directions for every row of the table (same seed), so the numbers are comparable.
        return float(sliced_wasserstein(samples, exact, num_projections=NUM_PROJECTIONS,
                                        generator=torch.Generator().manual_seed(seed + 3)))

    weights = posterior.weights.tolist()
    plus_weight = weights[1]                               # component 1 is the + mode
    post_mean = posterior.mean.unsqueeze(0)
    rows = {
        "exact (independent set, the floor)": {"sw2": distance(exact_other), **summarise(exact_other, u)},
        "posterior mean (point mass)": {"sw2": distance(post_mean.expand(exact_size, *post_mean.shape[1:])),
                                        "fraction_plus": None, "std_along_axis": 0.0, "std_across_axis": 0.0},
    }
    batch = InverseProblem(problem.operator, problem.y.expand(chains, -1).contiguous(), problem.sigma_y)
    for name, hyper in variants.items():
        start = time.perf_counter()
        result = sample_reddiff(batch, prior, generator=torch.Generator().manual_seed(seed + 4), **hyper)
        rows[name] = {"sw2": distance(result.x), **summarise(result.x, u), "hyperparameters": hyper,
                      "nfe": result.diagnostics["nfe"], "seconds": time.perf_counter() - start}
        log.info("%s / %s: SW2 %.4f", kind, name, rows[name]["sw2"])
    return {"posterior_weights": weights, "plus_weight": plus_weight,
            "exact_std_along_axis": summarise(exact, u)["std_along_axis"], "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# RED-Diff on an exact two-mode posterior ({report['date']})", "",
             f"d = {DIM}, modes +-{SEPARATION / 2} along the diagonal, var {VAR}, sigma_y {SIGMA_Y}; "
             f"{report['chains']} RED-Diff chains (one batch), {report['exact_size']} exact samples; "
             f"SW2 over {NUM_PROJECTIONS} random directions. Command: `{report['command']}`.", ""]
    for kind, case in report["cases"].items():
        lines += [f"## {kind}: exact posterior weights {case['posterior_weights'][0]:.3f} / "
                  f"{case['posterior_weights'][1]:.3f}", "",
                  "| estimate | SW2 to exact | fraction on + side | std along mode axis | std across |",
                  "|---|---|---|---|---|"]
        for name, row in case["rows"].items():
            fraction = "-" if row["fraction_plus"] is None else f"{row['fraction_plus']:.3f}"
            lines.append(f"| {name} | {row['sw2']:.4f} | {fraction} | "
                         f"{row['std_along_axis']:.3f} | {row['std_across_axis']:.3f} |")
        lines.append("")
    lines += ["Exact posterior: fraction on + side = the + weight above; its std along the axis is the "
              "spread of the two modes together.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=2000)
    parser.add_argument("--exact-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sets and short runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chains, exact_size = (200, 200) if args.quick else (args.chains, args.exact_size)
    variants = {"RED-Diff, defaults": {},
                "RED-Diff, 1000 steps, lr 0.01": {"steps": 1000, "lr": 0.01},
                "RED-Diff, defaults, init zeros": {"init": "zeros"}}
    if args.quick:
        variants = {"RED-Diff, 30 steps": {"steps": 30}}
    report = {"date": datetime.date.today().isoformat(), "chains": chains, "exact_size": exact_size,
              "command": "python benchmarks/reddiff_oracle.py" + (" --quick" if args.quick else ""),
              "torch": torch.__version__, "machine": platform.machine(), "cases": {}}
    for kind in ("symmetric", "tilted"):
        report["cases"][kind] = run_case(kind, chains, exact_size, variants, args.seed)
    stem = f"reddiff_oracle-{report['date']}{'-quick' if args.quick else ''}"
    write_json_and_markdown(args.out, stem, report, markdown(report))
    log.info("wrote %s.json and .md", args.out / stem)
    return report


if __name__ == "__main__":
    main()
