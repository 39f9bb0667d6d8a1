"""APS, its two ablations and the masked-diffusion baseline against the exact token posterior of a discrete oracle.

Oracle: :class:`invdiff.priors.tokens_oracle.DiscreteOracle` (a pairwise-coupled joint on a tiny token grid,
random codebook, fixed linear decoder), random dense measurements ``y = A x + n`` of an exact prior draw. Each
sampler is run ``--runs`` times on the same ``y`` (one batch, one generator); the histogram of the returned
token configurations is compared with the exact posterior ``p(z | y)`` (enumerated) by total variation
``TV = sum |p - q| / 2``, next to the floor (TV of the same number of exact posterior draws) and the prior
(unconditional masked-diffusion draws). Also reported: ``MAP`` the share of runs returning the posterior's
most probable configuration (exact draws: its posterior probability), ``mass`` the mean posterior probability of
the returned configurations (exact draws: ``sum p^2``), and ``loglik`` the mean ``log p(y | z)`` of the returns.

    python benchmarks/anchored_oracle.py              # ~2 min on one busy core
    python benchmarks/anchored_oracle.py --quick      # seconds
    python benchmarks/anchored_oracle.py --sweep      # APS settings, one run per case (APS is deterministic)

Writes ``benchmarks/results/anchored_oracle-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):                  # `python benchmarks/anchored_oracle.py` as well as `python -m ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reports import write_json_and_markdown  # noqa: E402
from invdiff.operators.matrix import MatrixOperator  # noqa: E402
from invdiff.priors.tokens_oracle import DiscreteOracle, total_variation  # noqa: E402
from invdiff.problem import InverseProblem  # noqa: E402
from invdiff.samplers.anchored import sample_aps, sample_masked_diffusion  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (function, keyword arguments); APS rows use the signature's defaults (the paper's 15 x 100 steps, L1)
METHODS = {
    "prior (unconditional)": (sample_masked_diffusion, {"reweighting": "none", "steps": 16}),
    "masked-diffusion, plug-in": (sample_masked_diffusion, {"steps": 16, "reweighting": "exact"}),
    "masked-diffusion, 16 likelihood samples": (sample_masked_diffusion, {"steps": 16, "reweighting": "exact",
                                                                          "likelihood_samples": 16}),
    "masked-diffusion, linear reweighting": (sample_masked_diffusion, {"steps": 16, "reweighting": "linear"}),
    "aps": (sample_aps, {}),
    "aps, no quantized expectation": (sample_aps, {"quantized_expectation": False}),
    "aps, prior-confidence remasking": (sample_aps, {"remasking": "prior"}),
    "aps, gaussian loss + KL to P (ours)": (sample_aps, {"loss": "gaussian", "prior_weight": 1.0}),
    "aps, MaskGIT confidence noise 1": (sample_aps, {"confidence_noise": 1.0}),
}


def make_case(seed: int, grid, num_codes: int, measurements: int, sigma_y: float):
    """An oracle, a measurement of one exact prior draw, and the exact posterior (all from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    oracle = DiscreteOracle.random(grid=grid, num_codes=num_codes, generator=generator)
    d = math.prod(oracle.image_shape)
    matrix = torch.randn(measurements, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    operator = MatrixOperator(matrix, in_shape=oracle.image_shape)
    truth = oracle.sample(1, generator)
    y = operator.A(oracle.decode_ids(truth))
    y = y + sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype)
    problem = InverseProblem(operator, y, sigma_y)
    return oracle, problem, oracle.posterior(problem)[0], oracle.log_likelihood(problem)[0]


def scores(oracle, posterior, log_lik, ids) -> dict:
    histogram = oracle.histogram(ids)
    index = oracle.config_index(ids)
    return {"tv": total_variation(histogram, posterior), "map": float(histogram[posterior.argmax()]),
            "mass": float(posterior[index].mean()), "loglik": float(log_lik[index].mean())}


def run_case(seed, grid, num_codes, measurements, sigma_y, runs) -> dict:
    oracle, problem, posterior, log_lik = make_case(seed, grid, num_codes, measurements, sigma_y)
    batch = InverseProblem(problem.operator, problem.y.repeat(runs, 1), sigma_y)
    exact = oracle.configurations[torch.multinomial(posterior, runs, replacement=True,
                                                     generator=torch.Generator().manual_seed(seed + 1000))]
    floor = scores(oracle, posterior, log_lik, exact)
    floor.update(map=float(posterior.max()), mass=float((posterior ** 2).sum()))
    rows = {"exact posterior draws (floor)": floor}
    for name, (function, kwargs) in METHODS.items():
        start = time.perf_counter()
        result = function(batch, oracle, generator=torch.Generator().manual_seed(seed), **kwargs)
        rows[name] = scores(oracle, posterior, log_lik, result.diagnostics["tokens"])
        rows[name]["seconds"] = time.perf_counter() - start
        rows[name]["nfe"] = result.diagnostics["nfe"]
    prior_tv = total_variation(oracle.prior_probabilities(), posterior)
    return {"seed": seed, "grid": list(grid), "num_codes": num_codes, "measurements": measurements,
            "sigma_y": sigma_y, "runs": runs, "posterior_max": float(posterior.max()),
            "tv_prior_to_posterior": prior_tv, "rows": rows}


SWEEP = ({}, {"steps": 1}, {"steps": 3}, {"lr": 0.03}, {"lr": 0.3}, {"lr": 1.0}, {"inner_steps": 300},
         {"loss": "gaussian"}, {"loss": "gaussian", "prior_weight": 1.0}, {"remasking": "prior"},
         {"quantized_expectation": False},
         {"encoder_anchor": 10.0}, {"encoder_anchor": 10.0, "steps": 1})                 # the MRI settings row (ours)


def sweep(cases) -> list[dict]:
    """APS with one setting changed from the signature's defaults, one run per case (deterministic without
    confidence noise; the no-quantized-expectation row is one random draw per case): posterior mass of the
    returned configuration (1 - TV), posterior-mode hits, log-likelihood."""
    data = [make_case(*case) for case in cases]
    rows = []
    for change in SWEEP:
        mass, log_liks, hits = [], [], 0
        for oracle, problem, posterior, log_lik in data:
            result = sample_aps(problem, oracle, generator=torch.Generator().manual_seed(0), **change)
            index = oracle.config_index(result.diagnostics["tokens"])[0]
            mass.append(float(posterior[index]))
            log_liks.append(float(log_lik[index]))
            hits += int(index == posterior.argmax())
        rows.append({"change": change, "mass": sum(mass) / len(mass), "map_hits": hits, "cases": len(data),
                     "loglik": sum(log_liks) / len(log_liks)})
    return rows


def sweep_markdown(rows: list[dict], command: str) -> str:
    lines = [f"# APS settings on the exact discrete oracle", "", f"`{command}`: each row changes one argument of "
             "`sample_aps` from its defaults (15 x 100 steps, lr 0.1, L1 loss, anchored remasking); one run per "
             "case on the 12 cases of the main table.", "",
             "| change | posterior mass of the return (1 - TV) | posterior mode hits | mean log p(y given z) |",
             "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['change'] or 'defaults'} | {row['mass']:.3f} | {row['map_hits']}/{row['cases']} | "
                     f"{row['loglik']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [f"# APS on the exact discrete oracle ({report['date']})", "",
             f"`{report['command']}`; {report['runs']} runs per sampler and case; torch {report['torch']}.", "",
             "TV: total variation between the runs' token histogram and the exact posterior (mean over cases, "
             "then each case). MAP: share of runs returning the posterior mode. mass: mean posterior probability "
             "of the returns. loglik: mean log p(y | z) of the returns.", ""]
    names = list(report["cases"][0]["rows"])
    header = "| sampler | mean TV | " + " | ".join(
        f"TV s{c['seed']} {c['grid'][0]}x{c['grid'][1]} K{c['num_codes']} sy{c['sigma_y']}" for c in report["cases"]) \
        + " | mean MAP | mean mass | mean loglik |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name in names:
        values = [c["rows"][name] for c in report["cases"]]
        mean = {k: sum(v[k] for v in values) / len(values) for k in ("tv", "map", "mass", "loglik")}
        lines.append(f"| {name} | {mean['tv']:.3f} | " + " | ".join(f"{v['tv']:.3f}" for v in values)
                     + f" | {mean['map']:.2f} | {mean['mass']:.3f} | {mean['loglik']:.1f} |")
    lines += ["", "Cases: " + "; ".join(f"seed {c['seed']}: posterior max {c['posterior_max']:.2f}, TV(prior, "
                                         f"posterior) {c['tv_prior_to_posterior']:.2f}" for c in report["cases"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small cases, 300 runs")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--sweep", action="store_true", help="APS settings, one run per case")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/anchored_oracle-DATE)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        cases, runs = [(0, (2, 2), 4, 6, 0.3), (1, (2, 2), 4, 6, 0.3)], 300
    else:
        runs = args.runs
        cases = [(seed, (2, 2), 4, 6, sigma) for seed in range(4) for sigma in (0.2, 0.5)]
        cases += [(seed, (2, 3), 4, 8, 0.3) for seed in range(2)] + [(seed, (2, 2), 8, 6, 0.3) for seed in range(2)]
    date = datetime.date.today().isoformat()
    if args.sweep:
        rows = sweep(cases)
        stem = Path(args.out) if args.out else RESULTS / f"anchored_oracle-{date}-sweep"
        text = sweep_markdown(rows, "python benchmarks/anchored_oracle.py --sweep")
        write_json_and_markdown(stem.parent, stem.with_suffix("").name, rows, text)
        print(text)
        return 0
    report = {"date": date, "command": "python benchmarks/anchored_oracle.py" + (" --quick" if args.quick else ""),
              "runs": runs, "torch": torch.__version__, "machine": platform.machine(),
              "cases": [run_case(*case, runs) for case in cases]}
    stem = Path(args.out) if args.out else RESULTS / f"anchored_oracle-{date}{'-quick' if args.quick else ''}"
    text = markdown(report)
    write_json_and_markdown(stem.parent, stem.with_suffix("").name, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
