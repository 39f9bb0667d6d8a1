"""Posterior fidelity on exact Gaussian-mixture posteriors: SMC (AFDPS) against RED-Diff, DPS, DiffPIR and the floor.

Every number is a sliced Wasserstein distance SW2 (``invdiff.metrics_distributions``, 128 random directions, the
same directions for every row) between a sampler's output set and a large reference set of exact posterior
samples (``GaussianMixturePrior.posterior``). The floor is an independent exact sample set *of the same size*:
an ideal sampler's N samples are that far from the reference. SMC's N particles are scored with their weights;
the other samplers give one sample per chain, so their N samples are N independent chains. Each cell is the mean
over ``--repeats`` independent runs (SMC: a batch of copies of the problem, one generator each; the other
samplers: disjoint subsets of 1024 chains, so their N = 1024 cell is a single run).

Cases (the images are tiny, entries of magnitude ~1, the scale the samplers' defaults are set for):

* ``two_mode``: d = 16 (a 4 x 4 image), 14 pixels observed (``Inpainting``, sigma_y = 0.05); the prior has two
  modes ``+-m`` whose difference lies mostly in the 2 unobserved pixels (1.0 there, 0.05 elsewhere; variance
  0.1 per pixel). The data tilt the modes' weights but cannot settle them: a bimodal posterior.
* ``grid25``: the 25-mode grid of the MCGdiff benchmark scaled to spacing 1 (``grid_mixture_25``, variance
  1/64, weights ``z^2``), d = 8, two random measurements (``MatrixOperator``, sigma_y = 0.05).

A third part measures where the paper's explicit Euler step breaks: the stiffness number
``2 t dt ||A||^2 / sigma_y^2`` against divergence, on a 2-D Gaussian whose exact posterior is known.

    python benchmarks/posterior_fidelity.py            # ~7 CPU-minutes, most of it the SW2 scoring
    python benchmarks/posterior_fidelity.py --quick    # ~30 CPU-seconds, small sets (a smoke test)

Writes ``benchmarks/results/posterior_fidelity-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch

from invdiff.io import atomic_open, atomic_write_json
from invdiff.metrics_distributions import sliced_wasserstein
from invdiff.operators.inpainting import Inpainting
from invdiff.operators.matrix import MatrixOperator
from invdiff.priors.analytic import GaussianMixturePrior, GaussianPrior, grid_mixture_25
from invdiff.problem import InverseProblem, simulate
from invdiff.registry import get_sampler, list_samplers
from invdiff.samplers.smc import sample_smc

log = logging.getLogger("benchmarks.posterior_fidelity")
F64 = torch.float64
SIGMA_Y = 0.05
NUM_PROJECTIONS = 128
BASELINES = {"reddiff": "RED-Diff", "dps": "DPS", "diffpir": "DiffPIR"}


# ---- the oracles ---------------------------------------------------------------------------------------------
def two_mode_case(seed: int):
    """Two modes +-m in a 4 x 4 image, m = 1.0 on the 2 unobserved pixels and 0.05 on the 14 observed ones."""
    observed = torch.ones(4, 4, dtype=torch.bool)
    observed[1, 2] = observed[3, 0] = False
    mode = torch.where(observed, 0.05, 1.0).to(F64)
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.5], dtype=F64), torch.stack([mode, -mode])[:, None],
                                 torch.tensor(0.1, dtype=F64))
    operator = Inpainting(observed)
    generator = torch.Generator().manual_seed(seed)
    return prior, simulate(operator, prior.sample(1, generator), SIGMA_Y, generator)


def grid25_case(seed: int):
    """The MCGdiff 25-mode grid at spacing 1 (variance 1/64, weights z^2), d = 8, two random measurements."""
    generator = torch.Generator().manual_seed(seed)
    prior = grid_mixture_25(scale=1.0, var=1 / 64, d=8, shape=(1, 2, 4), generator=generator)
    operator = MatrixOperator(torch.randn(2, 8, generator=generator, dtype=F64) / math.sqrt(8), in_shape=(1, 2, 4))
    return prior, simulate(operator, prior.sample(1, generator), SIGMA_Y, generator)


CASES = {"two_mode": two_mode_case, "grid25": grid25_case}


def repeated(problem: InverseProblem, copies: int) -> InverseProblem:
    """``copies`` identical copies of a one-measurement problem, as one batch."""
    y = problem.y.expand(copies, *problem.y.shape[1:]).contiguous()
    return InverseProblem(problem.operator, y, problem.sigma_y)


# ---- scoring ------------------------------------------------------------------------------------------------
def score(samples: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None, seed: int) -> float:
    return float(sliced_wasserstein(samples, reference, x_weights=weights, num_projections=NUM_PROJECTIONS,
                                    generator=torch.Generator().manual_seed(seed)))


def summary(values: list[float]) -> dict:
    values_t = torch.tensor(values, dtype=F64)
    sd = float(values_t.std()) if len(values) > 1 else 0.0
    return {"mean": float(values_t.mean()), "sd": sd, "runs": values}


def run_case(name: str, sizes: list[int], repeats: int, reference_size: int, smc_variants: dict,
             baseline_settings: dict, seed: int) -> dict:
    prior, problem = CASES[name](seed)
    posterior = prior.posterior(problem)
    reference = posterior.sample(reference_size, torch.Generator().manual_seed(seed + 1))
    projection_seed = seed + 2
    rows: dict[str, dict] = {}

    floor = {}
    for n in sizes:
        sets = posterior.sample(n * repeats, torch.Generator().manual_seed(seed + 3 + n))
        floor[n] = summary([score(sets[r * n:(r + 1) * n], reference, None, projection_seed) for r in range(repeats)])
    rows["exact samples (floor)"] = {"by_size": floor}

    for label, hyper in smc_variants.items():
        by_size, timing = {}, {}
        for n in sizes:
            start = time.perf_counter()
            generators = [torch.Generator().manual_seed(seed + 1000 * r + n) for r in range(repeats)]
            result = sample_smc(repeated(problem, repeats), prior, num_particles=n, generator=generators, **hyper)
            timing[n] = time.perf_counter() - start
            by_size[n] = summary([score(result.samples[:, r], reference, result.weights[:, r], projection_seed)
                                  for r in range(repeats)])
            by_size[n]["final_ess"] = result.diagnostics["ess"][-1].mean().item()
            by_size[n]["resampling_steps"] = float(result.diagnostics["resampled"].double().sum(0).mean())
            log.info("%s / %s / N=%d: SW2 %.4f (floor %.4f), %.1f s", name, label, n, by_size[n]["mean"],
                     floor[n]["mean"], timing[n])
        rows[label] = {"by_size": by_size, "hyperparameters": hyper, "seconds": timing,
                       "nfe": result.diagnostics["nfe"]}

    available = set(list_samplers())
    skipped = []
    for key, label in BASELINES.items():
        if key not in available:
            skipped.append(key)
            log.warning("sampler %r is not registered: skipped", key)
            continue
        hyper = baseline_settings.get(key, {})
        chains = max(sizes)
        start = time.perf_counter()
        result = get_sampler(key).factory(repeated(problem, chains), prior,
                                          generator=torch.Generator().manual_seed(seed + 7), **hyper)
        seconds = time.perf_counter() - start
        # the chains are independent: disjoint subsets of them are independent runs of size n
        by_size = {n: summary([score(result.x[r * n:(r + 1) * n], reference, None, projection_seed)
                               for r in range(min(repeats, chains // n))]) for n in sizes}
        rows[f"{label} (defaults{', ' + str(hyper) if hyper else ''})"] = {
            "by_size": by_size, "hyperparameters": hyper, "seconds": seconds, "nfe": result.diagnostics.get("nfe")}
        log.info("%s / %s: SW2 at N=%d %.4f, %.1f s", name, label, chains, by_size[chains]["mean"], seconds)

    point_mass = posterior.mean.unsqueeze(0).expand(max(sizes), *posterior.mean.shape)
    rows["posterior mean (point mass)"] = {"by_size": {max(sizes): summary([score(point_mass, reference, None,
                                                                                  projection_seed)])}}
    return {"posterior_weights_top": sorted(posterior.weights.tolist(), reverse=True)[:5],
            "num_components": len(posterior.weights), "rows": rows, "skipped": skipped}


# ---- where explicit Euler breaks ------------------------------------------------------------------------------
def stiffness_sweep(sigma_maxes: list[float], sigma_ys: list[float], steps: int, particles: int) -> list[dict]:
    """Paper (fixed likelihood) vs tempered SDE on a 2-D Gaussian with a zero-mean isotropic prior (Stage I exact
    at any T): the largest stiffness number over the run against divergence and the error of the weighted mean."""
    prior = GaussianPrior(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64) * 0.8)
    operator = MatrixOperator(torch.tensor([[1.0, 0.4]], dtype=F64), in_shape=prior.event_shape)
    out = []
    for sigma_y in sigma_ys:
        problem = InverseProblem(operator, torch.tensor([[0.7]], dtype=F64), sigma_y)
        posterior = prior.posterior(problem)
        for sigma_max in sigma_maxes:
            for proposal, stable in (("euler", False), ("euler", True), ("conditional", False), ("conditional", True)):
                result = sample_smc(problem, prior, num_particles=particles, steps=steps, sigma_max=sigma_max,
                                    stable_likelihood=stable, proposal=proposal,
                                    generator=torch.Generator().manual_seed(0))
                particles_ok = result.diagnostics["finite_particles"] / particles
                error = (result.x.reshape(-1) - posterior.mean.reshape(-1)).abs().max().item()
                # diverged: off by more than 100 posterior standard deviations (or not a number at all)
                diverged = not error < 100 * posterior.std.max().item()
                stiffness = result.diagnostics["stiffness"]
                unstable = (stiffness > 2).nonzero().flatten().tolist()
                out.append({"sigma_y": sigma_y, "sigma_max": sigma_max, "steps": steps,
                            "likelihood": "tempered" if stable else "paper", "proposal": proposal,
                            "max_stiffness": float(stiffness.max()), "unstable_steps": len(unstable),
                            "first_unstable_sigma": (result.diagnostics["sigmas"][unstable[0]] if unstable else None),
                            "finite_fraction": particles_ok,
                            "mean_error": None if diverged else error,
                            "min_ess": float(result.diagnostics["ess"].min())})
                log.info("stiffness: sigma_y %.3g sigma_max %.3g %s %s: max %.3g, finite %.2f, error %s",
                         sigma_y, sigma_max, proposal, out[-1]["likelihood"], out[-1]["max_stiffness"], particles_ok,
                         out[-1]["mean_error"])
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['mean']:.4f} ± {entry['sd']:.4f}" if entry["sd"] else f"{entry['mean']:.4f}"


def markdown(report: dict) -> str:
    sizes = report["sizes"]
    lines = [f"# Posterior fidelity on exact Gaussian-mixture posteriors ({report['date']})", "",
             f"SW2 to {report['reference_size']} exact posterior samples ({NUM_PROJECTIONS} directions), mean ± sd "
             f"over {report['repeats']} runs; lower is better, the floor is an independent exact set of the same "
             f"size. Command: `{report['command']}` ({report['seconds']:.0f} s wall, "
             f"{report['cpu_seconds']:.0f} s CPU, torch {report['torch']}, {report['threads']} threads).", ""]
    for name, case in report["cases"].items():
        weights = ", ".join(f"{w:.3f}" for w in case["posterior_weights_top"])
        lines += [f"## {name}: {case['num_components']} posterior components, largest weights {weights}", "",
                  "| sampler | " + " | ".join(f"N = {n}" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for label, row in case["rows"].items():
            # int keys in memory, str keys once the report has been through JSON (the Markdown can be rebuilt from it)
            cells = [_cell(row["by_size"].get(n, row["by_size"].get(str(n)))) for n in sizes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if case.get("skipped"):
            lines.append(f"\nNot registered when this ran (skipped): {', '.join(case['skipped'])}.")
        lines.append("")
    lines += ["SMC rows use N weighted particles per run; RED-Diff / DPS / DiffPIR rows use N independent chains "
              "(one output each). The point mass at the exact posterior mean is what a perfect MMSE estimator "
              "would score.", "",
              "## Where the paper's explicit Euler step breaks", "",
              "2-D Gaussian (prior N(0, 0.8 I), A = [1, 0.4]), SDE variant, "
              f"{report['stiffness'][0]['steps']} Karras steps; stiffness = max over steps of "
              "2 t dt a_t^2 ||A||^2 / s_t^2 (explicit Euler on the likelihood drift is unstable above 2; the conditional "
              "proposal has no explicit step and records 0).", "",
              "| sigma_y | sigma_max | proposal | likelihood | max stiffness | steps > 2 | max error of the mean | "
              "min ESS |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report["stiffness"]:
        error = "diverged (> 100 posterior std)" if row["mean_error"] is None else f"{row['mean_error']:.3f}"
        lines.append(f"| {row['sigma_y']} | {row['sigma_max']} | {row.get('proposal', 'euler')} | "
                     f"{row['likelihood']} | {row['max_stiffness']:.3g} | "
                     f"{row['unstable_steps']} | {error} | {row['min_ess']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--reference-size", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100, help="SMC steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sets and short runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--markdown-from", type=Path, metavar="JSON",
                        help="only rewrite the Markdown report of an existing JSON report (no sampling)")
    args = parser.parse_args(argv)
    if args.markdown_from:
        report = json.loads(args.markdown_from.read_text())
        with atomic_open(args.markdown_from.with_suffix(".md")) as handle:
            handle.write(markdown(report))
        return report
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = [16, 64] if args.quick else [16, 64, 256, 1024]
    repeats = 2 if args.quick else args.repeats
    reference_size = 2000 if args.quick else args.reference_size
    steps = 20 if args.quick else args.steps
    smc_variants = {f"SMC sde ({steps} steps)": {"steps": steps, "variant": "sde"},
                    f"SMC ode ({steps} steps)": {"steps": steps, "variant": "ode"},
                    f"SMC sde, conditional proposal ({steps} steps)": {"steps": steps, "variant": "sde",
                                                                       "proposal": "conditional"}}
    baseline_settings = {}
    if args.quick:
        baseline_settings = {"dps": {"steps": 100}, "reddiff": {"steps": 30}, "diffpir": {"steps": 30}}
    start, cpu_start = time.perf_counter(), time.process_time()
    report = {"date": datetime.date.today().isoformat(), "sizes": sizes, "repeats": repeats,
              "reference_size": reference_size, "sigma_y": SIGMA_Y,
              "command": "python benchmarks/posterior_fidelity.py" + (" --quick" if args.quick else ""),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "cases": {}}
    for name in CASES:
        report["cases"][name] = run_case(name, sizes, repeats, reference_size, smc_variants, baseline_settings,
                                         args.seed)
    report["stiffness"] = stiffness_sweep(sigma_maxes=[0.5, 1.0, 2.0, 4.0, 20.0], sigma_ys=[0.8, 0.1],
                                          steps=40 if args.quick else 120, particles=200 if args.quick else 2000)
    report["seconds"] = time.perf_counter() - start
    report["cpu_seconds"] = time.process_time() - cpu_start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"posterior_fidelity-{report['date']}{'-quick' if args.quick else ''}"
    atomic_write_json(stem.with_suffix(".json"), report)
    with atomic_open(stem.with_suffix(".md")) as handle:
        handle.write(markdown(report))
    log.info("wrote %s.json and .md", stem)
    return report


if __name__ == "__main__":
    main()
