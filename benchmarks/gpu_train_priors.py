"""One command for a GPU loan: train the brain and CT priors at GPU scale, then measure them against the shipped ones.

    bash benchmarks/gpu_payload.sh                     # here, once: wheels and data files the GPU machine lacks
    bash benchmarks/gpu_train_priors.sh --out DIR      # there: <= 9 min (--budget-seconds) on one GPU; carry .gpu
    bash benchmarks/gpu_train_priors.sh --cpu-smoke    # here: every step tiny on the CPU (checks the script)

Why: the open prior issues (a brain prior >= 2 dB over L1-wavelet at 4x; a CT prior >= 3 dB over the best classical
method on real CT) are limited by how many images a 3.5 M-parameter network sees: 128 k (brain) and 96 k (CT) in
7 and 6 CPU-hours. A GPU trains the same architecture (same size on disk, so it can ship under the 40 MB cap) on
several times that in minutes, if the CPU keeps it fed: the data sources draw in worker processes
(``--data-workers``, the per-step stream), split between the two runs by their measured cost per image.

Steps, each with its own time limit (a failed step is recorded and the next one runs):

1. ``calibrate``: both recipes train side by side for ``--calibrate-minutes``; their seconds per step set
   ``--steps`` (and the cosine's length) so that the real runs end their schedules inside ``--minutes``;
2. ``train``: both runs side by side (``--device cuda --bf16``, batch ``--batch``), capped by ``--max-minutes``,
   exported to ``--out`` as ``brain-mri-gpu`` and ``ct-phantom-anatomy-gpu`` (safetensors + JSON with the
   commands). The brain run is the resolution-aware recipe from scratch; the CT run continues the shipped CT prior
   (``--init``, same architecture): on the CPU that beat the anatomical source trained from scratch on real CT;
3. ``brain-eval``: ``invdiff compare`` on the shipped T1 and EPI multislice samples at 4x and 8x: RED-Diff with
   the new and the shipped prior, L1-wavelet and TV (same masks, maps, seeds);
4. ``ct-tune``: RED-Diff with the new CT prior on eight fresh ``ct-anatomy`` phantoms (seeds 5000-5007, 30
   parallel views; never used for training) over a small (lam, sigma_max) grid, the shipped prior at its row;
5. ``ct-real``: if ``.gpu/files/realct128.h5`` exists (real CT slices, never used to train or tune), every CT
   task with the tuned new prior, the shipped prior, TV and L1-wavelet.

Writes ``gpu_train_priors-<date>-<mode>.json`` and ``.md`` (atomically) into ``--out`` after every step, so a
command killed at the device's limit still leaves what it measured: commands, exit statuses, seconds, steps and
images trained, and the PSNR / SSIM tables. ``--budget-seconds`` (default 540, under the device tool's 600 s) bounds
the whole: each step's limit is cut to what is left, and a step with under 20 s left is skipped and recorded so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_check import RESULTS, device_or_none, environment, run_step, smoke_out  # noqa: E402
from benchmarks.reports import write_json_and_markdown  # noqa: E402

PAYLOAD = REPO / ".gpu"
REAL_CT = PAYLOAD / "files" / "realct128.h5"
MRI_SCANS = ("brain_t1_multicoil.h5", "brain_multislice_multicoil.h5")
CT_TUNING_SEEDS = "5000-5007"
CT_GRID = ((1e3, 1.0), (3e3, 1.0), (1e3, 0.3), (3e3, 0.3))      # (lam, sigma_max) for the new CT prior


SHIPPED_CT = "ct-phantom-anatomy"
SHIPPED_CT_PRIOR = REPO / "invdiff" / "priors" / "weights" / f"{SHIPPED_CT}.json"


def recipes(batch: int) -> dict[str, dict]:
    """The CPU recipes (their JSONs' commands), batch raised for the GPU. Brain: ``brain-mri-scales`` from scratch.
    CT: the shipped ``ct-phantom-anatomy`` trained on (warm start, ``init``; its architecture and sigma_data),
    the recipe that made it, since the same source from scratch lost on real CT on the CPU.

    ``cost``: CPU seconds per training image of the source on one core (CPU runs' loss.jsonl, data_sec_per_step /
    batch: 3 ms brain, 13.5 ms CT), used to split the data workers between the runs."""
    schedule = ["--size", "64", "--batch", str(batch), "--lr-schedule", "cosine", "--lr-floor", "0.1", "--seed", "0"]
    return {
        "brain": {"name": "brain-mri-gpu", "cost": 0.003, "init": None,
                  "args": ["--data", "mni-brain-scales", "--channels", "2", "--default-spacing-mm", "1.0", *schedule,
                           "--lr", "2e-4", "--warmup-steps", "500", "--attention", "--spacing-conditioning"]},
        "ct": {"name": f"{SHIPPED_CT}-gpu", "cost": 0.0135, "init": str(SHIPPED_CT_PRIOR),
               "args": ["--data", "ct-anatomy", "--channels", "1", "--sigma-data", "0.5", *schedule,
                        "--lr", "1e-4", "--warmup-steps", "100"]},
    }


def split_workers(total: int, costs: dict[str, float]) -> dict[str, int]:
    """Workers per run in proportion to its source's cost per image (each run at least one)."""
    whole = sum(costs.values())
    shares = {k: max(1, int(round(total * c / whole))) for k, c in costs.items()}
    while sum(shares.values()) > total and max(shares.values()) > 1:
        largest = max(shares, key=shares.get)
        shares[largest] -= 1
    return shares


def seconds_per_step(run_dir: Path) -> float | None:
    """Mean of the last two logged records' seconds per step (the first includes start-up)."""
    try:
        records = [json.loads(line) for line in (run_dir / "loss.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return None
    tail = records[-2:] if len(records) > 2 else records[-1:]
    return sum(r["sec_per_step"] for r in tail) / len(tail) if tail else None


def train_side_by_side(commands: dict[str, list[str]], timeout: float, env: dict, log_dir: Path) -> dict[str, dict]:
    """Start every command at once; wait for all (killed at ``timeout``); exit status and seconds of each."""
    started = time.perf_counter()
    procs = {}
    for key, argv in commands.items():
        log = open(log_dir / f"{key}.log", "w")
        procs[key] = (subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    out = {}
    for key, (proc, log) in procs.items():
        try:
            status = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = "timeout"
        log.close()
        tail = (log_dir / f"{key}.log").read_text(errors="replace").splitlines()[-8:]
        out[key] = {"command": " ".join(commands[key]), "status": status,
                    "seconds": round(time.perf_counter() - started, 1), "tail": tail}
        print(f"[gpu_train_priors] {key}: status {status}", flush=True)
    return out


def rows_of(compare_json: Path) -> list[dict]:
    try:
        rows = json.loads(compare_json.read_text())["rows"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return []
    return [{k: r.get(k) for k in ("solver", "task", "psnr", "ssim", "hyperparameters")} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="report and exported priors (on the device machine: $OUT)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time of the side-by-side runs")
    parser.add_argument("--calibrate-minutes", type=float, default=0.75)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0,
                        help="data workers in all (default: the machine's cores less two, one per training process)")
    parser.add_argument("--priors", default="brain,ct",
                        help="which to train: brain, ct or both (one alone gets every data worker)")
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--budget-seconds", type=float, default=540.0,
                        help="the whole command's time (calibration + --minutes of training + evaluations)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every step on the CPU, tiny (checks the script; measures nothing)")
    args = parser.parse_args(argv)

    smoke = args.cpu_smoke
    device = device_or_none(smoke, "gpu_train_priors")
    if device is None:
        return 0
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if (PAYLOAD / "files").is_dir():
        env.setdefault("INVDIFF_TRAINING_FILES", str(PAYLOAD / "files"))
    work = Path(tempfile.mkdtemp(prefix="gpu_train_priors-"))
    args.out = smoke_out(args.out, smoke, "gpu_train_priors")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    left = lambda: args.budget_seconds - (time.perf_counter() - started)  # noqa: E731
    if 60 * (args.calibrate_minutes + 1.15 * args.minutes) + 60 > args.budget_seconds:
        parser.error(f"--minutes {args.minutes} and --calibrate-minutes {args.calibrate_minutes} leave no time for "
                     f"the evaluations inside --budget-seconds {args.budget_seconds:g}")
    batch = 2 if smoke else args.batch
    wanted = [p.strip() for p in args.priors.split(",") if p.strip()]
    unknown = set(wanted) - set(recipes(batch))
    if not wanted or unknown:
        parser.error(f"--priors: expected brain and / or ct, got {args.priors!r}")
    plan = {k: r for k, r in recipes(batch).items() if k in wanted}
    workers = split_workers(args.workers or max(2, (os.cpu_count() or 4) - 2), {k: r["cost"] for k, r in plan.items()})
    if smoke:
        workers = {k: 1 for k in plan}
    tiny = ["--size", "16", "--base-channels", "8", "--channel-mults", "1,2"] if smoke else []
    hardware = ["--device", device, "--no-progress", "--threads", "1"] + ([] if smoke else ["--bf16"])

    def train_argv(key: str, run: Path, extra: list[str]) -> list[str]:
        # the smoke run's tiny network cannot take the shipped weights: it trains the same recipe from scratch
        init = ["--init", plan[key]["init"]] if plan[key]["init"] and not smoke else []
        return [py, "-m", "invdiff.priors.train", *plan[key]["args"], *init, *tiny, *hardware,
                "--data-workers", str(workers[key]), "--out", str(run), *extra]

    # 0. the brain source's files must all be there: without the real MR volumes it would train on less, quietly
    if "brain" in plan:
        check = ("from invdiff.datasets import training as T; T.mni_template_volumes(); "
                 "found = {n for *_, n in T.real_mr_slices()}; "
                 "missing = [r for _, r, *_ in T.REAL_MR_VOLUMES if r.split('/')[-1] not in found]; "
                 "assert not missing, f'real MR volumes missing: {missing} (run benchmarks/gpu_payload.sh)'")
        preflight = run_step("brain-data-preflight", [py, "-c", check], 120, env)
        if preflight["status"] != 0:
            print("[gpu_train_priors] the brain source's data files are missing; nothing trained", flush=True)
            return 2
    # 1. calibration: the speed of each run while the other runs beside it
    calibrate = {k: train_argv(k, work / f"calibrate-{k}", ["--steps", "3" if smoke else "100000", "--log-every",
                                                             "1" if smoke else "20", "--max-minutes",
                                                             str(args.calibrate_minutes)]) for k in plan}
    calibration = train_side_by_side(calibrate, 60 * args.calibrate_minutes + 60, env, work)
    speeds = {k: seconds_per_step(work / f"calibrate-{k}") for k in plan}
    train_seconds = 60 * args.minutes
    steps = {k: (3 if smoke else max(600, int(0.95 * train_seconds / speeds[k]))) if speeds[k] else None
             for k in plan}
    # 2. the real runs
    runs = {k: train_argv(k, work / plan[k]["name"], ["--steps", str(steps[k]), "--lr-decay-steps", str(steps[k]),
                                                      "--max-minutes", str(args.minutes * 1.15),
                                                      "--checkpoint-every-minutes", "1",
                                                      "--export", plan[k]["name"], "--export-dir", str(args.out)])
            for k in plan if steps[k]}
    exported = {k: args.out / f"{plan[k]['name']}.json" for k in plan}
    for path in exported.values():             # an export left by an earlier run must not pass for this one's
        for stale in (path, path.with_suffix(".safetensors")):
            stale.unlink(missing_ok=True)
    training = train_side_by_side(runs, min(60 * args.minutes * 1.15 + 60, left()), env, work)
    trained = {}
    for k, path in exported.items():
        if path.is_file() and training.get(k, {}).get("status") == 0:
            meta = json.loads(path.read_text())
            trained[k] = {"steps": meta["steps"], "images": meta["steps"] * meta["batch"],
                          "wall_seconds": meta["wall_seconds"], "final_loss": meta["final_loss"]}

    # 3-5. evaluation (the shipped prior evaluated in the same run, for a comparison on one device); the report is
    # rewritten after every step
    steps_done, tables = [], {"brain": [], "ct_tune": [], "ct_real": []}
    report = {"mode": "cpu-smoke" if smoke else "cuda", "environment": environment(device), "workers": workers,
              "calibration": calibration, "seconds_per_step": speeds, "planned_steps": steps, "training": training,
              "trained": trained, "ct_chosen": None, "real_ct": REAL_CT.is_file(), "steps": steps_done,
              "tables": tables, "budget_seconds": args.budget_seconds}
    stem = f"gpu_train_priors-{datetime.date.today().isoformat()}-{report['mode']}"

    def save() -> None:
        report.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      total_seconds=round(time.perf_counter() - started, 1))
        write_json_and_markdown(args.out, stem, report, markdown(report))

    def step(name: str, argv: list[str], limit: float) -> bool:
        """Run one evaluation step inside the budget; False when it was skipped or failed."""
        if left() < 20:
            steps_done.append({"name": name, "command": " ".join(argv), "status": "skipped: budget spent",
                               "seconds": 0.0, "lines": []})
        else:
            steps_done.append(run_step(name, argv, min(limit, left()), env))
        save()
        return steps_done[-1]["status"] == 0

    save()
    eval_steps = "2" if smoke else str(args.eval_steps)
    cli = [py, "-m", "invdiff.cli", "compare"]
    scans = MRI_SCANS[:1] if smoke else MRI_SCANS
    smoke_slices = ["--slices", "0:1"] if smoke else []
    if "brain" in trained:
        for scan in scans:
            for label, prior, solvers in (("new", str(exported["brain"]), "reddiff,l1-wavelet,tv"),
                                          ("shipped", "brain-mri-complex", "reddiff")):
                out = work / f"brain-{label}-{scan}"
                if step(f"brain-eval-{label}-{scan}", [
                        *cli, str(REPO / "data" / scan), "--solvers", solvers, "--accel", "4,8", "--steps", eval_steps,
                        "--prior", prior, "--device", device, "--no-progress", *smoke_slices, "--out", str(out)], 300):
                    tables["brain"] += [dict(r, scan=scan, prior=label) for r in rows_of(out / "compare.json")]
    compare_ct = [py, str(REPO / "recipes" / "compare_ct.py"), "--steps", eval_steps, "--device", device,
                  "--threads", "1", "--size", "32" if smoke else "128"]
    if "ct" in trained:
        tuning = work / "ct_tuning.h5"
        step("ct-tuning-set", [py, "-m", "invdiff.datasets.ct_anatomy", "--write", str(tuning), "--seeds",
                               "5000-5001" if smoke else CT_TUNING_SEEDS, "--size", "32" if smoke else "128"], 120)
        phantoms = "0,1" if smoke else "0,1,2,3,4,5,6,7"
        tuned = ["--data", str(tuning), "--phantoms", phantoms, "--views", "30", "--geometries", "parallel"]
        best = None
        for lam, sigma_max in CT_GRID[:1] if smoke else CT_GRID:
            out = work / f"ct-tune-{lam:g}-{sigma_max:g}"
            if step(f"ct-tune-lam{lam:g}-smax{sigma_max:g}", [
                    *compare_ct, *tuned, "--solvers", "reddiff", "--prior", str(exported["ct"]), "--set",
                    f"reddiff:lam={lam:g}", "--set", f"reddiff:sigma_max={sigma_max:g}", "--out", str(out)], 150):
                rows = [dict(r, lam=lam, sigma_max=sigma_max, prior="new") for r in rows_of(out / "compare.json")
                        if r["solver"] == "reddiff"]
                tables["ct_tune"] += rows
                if rows and (best is None or rows[0]["psnr"] > best[0]):
                    best = (rows[0]["psnr"], lam, sigma_max)
        out = work / "ct-tune-shipped"
        if step("ct-tune-shipped", [*compare_ct, *tuned, "--solvers", "reddiff,tv", "--prior", SHIPPED_CT,
                                    "--out", str(out)], 150):
            tables["ct_tune"] += [dict(r, prior="shipped") for r in rows_of(out / "compare.json")]
        chosen = report["ct_chosen"] = None if best is None else {"lam": best[1], "sigma_max": best[2]}
        if chosen and REAL_CT.is_file():
            for label, prior, solvers, extra in (
                    ("new", str(exported["ct"]), "reddiff", ["--set", f"reddiff:lam={chosen['lam']:g}", "--set",
                                                             f"reddiff:sigma_max={chosen['sigma_max']:g}"]),
                    ("shipped", SHIPPED_CT, "reddiff,tv,l1-wavelet", [])):
                out = work / f"ct-real-{label}"
                if step(f"ct-real-{label}", [*compare_ct, "--data", str(REAL_CT), "--phantoms", "0,1,2", "--solvers",
                                             solvers, "--prior", prior, *extra, "--out", str(out)], 240):
                    tables["ct_real"] += [dict(r, prior=label) for r in rows_of(out / "compare.json")]
    save()
    print(f"[gpu_train_priors] wrote {args.out / stem}.json and .md ({report['total_seconds']} s)", flush=True)
    ok = all(t["status"] == 0 for t in training.values()) and all(s["status"] == 0 for s in steps_done)
    return 0 if ok and len(trained) == len(plan) else 1


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_train_priors, {report['date']} ({report['mode']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, {', '.join(env.get('gpus', [])) or 'no GPU'}; "
             f"total {report['total_seconds']} s; data workers {report['workers']}", "",
             "| prior | s/step (calibration) | steps | images | wall s | final loss |", "|---|---:|---:|---:|---:|---:|"]
    for key, done in report["trained"].items():
        speed = report["seconds_per_step"].get(key)
        lines.append(f"| {key} | {speed and round(speed, 4)} | {done['steps']} | {done['images']} | "
                     f"{done['wall_seconds']} | {done['final_loss'] and round(done['final_loss'], 4)} |")
    lines += ["", "## Brain (PSNR dB / SSIM, mean over the scan's slices)", "", "| scan | task | prior | solver | PSNR | SSIM |",
              "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['scan']} | {r['task']} | {r['prior']} | {r['solver']} | {r['psnr']:.2f} | {r['ssim']:.3f} |"
              for r in report["tables"]["brain"]]
    lines += ["", f"## CT tuning set (ct-anatomy seeds {CT_TUNING_SEEDS}, 30 parallel views); chosen "
              f"{report['ct_chosen']}", "", "| prior | solver | lam | sigma_max | PSNR | SSIM |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['prior']} | {r['solver']} | {r.get('lam', '')} | {r.get('sigma_max', '')} | {r['psnr']:.2f} | "
              f"{r['ssim']:.3f} |" for r in report["tables"]["ct_tune"]]
    lines += ["", f"## Real CT (final check only; present: {report['real_ct']})", "",
              "| task | prior | solver | PSNR | SSIM |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['prior']} | {r['solver']} | {r['psnr']:.2f} | {r['ssim']:.3f} |"
              for r in report["tables"]["ct_real"]]
    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {k} (train) | {t['status']} | {t['seconds']} |" for k, t in report["training"].items()]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in report["steps"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
