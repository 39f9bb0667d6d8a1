"""One command for a machine with a GPU: the CUDA checks and timings that CPU-only CI cannot make.

    bash benchmarks/gpu_check.sh                  # on a CUDA machine: < 8 min on one GPU
    bash benchmarks/gpu_check.sh --cpu-smoke      # the same steps on the CPU, tiny: checks this script itself

Steps (each with its own time limit; a failed or timed-out step is recorded and the next one runs):

1. ``contract``: the CUDA tests (``tests/test_operator_contract.py tests/test_training.py -k cuda``: every
   registered operator on CUDA against its CPU result; a training run moving from CPU to CUDA under bf16);
2. ``main-job``: the README main job on CUDA (``invdiff reconstruct data/brain_t1_multicoil.h5 --solver reddiff
   --accel 4``), its PSNR / SSIM line kept;
3. ``speed``: ``python -m benchmarks.run --device cuda --network-dtype bfloat16`` (bf16 around the network), which
   writes its own ``benchmarks/results/<date>-cuda*.json/.md``;
4. ``batch``: ``invdiff batch`` with a diffusion solver (RED-Diff, 100 steps) over the shipped multi-coil scans,
   plainly and under ``torchrun --nproc_per_node=<GPUs>`` (NCCL), slices per second of each, and whether the two
   runs' outputs are byte-identical (not required across launches on GPUs: recorded, not asserted);
5. ``train``: ``invdiff train-prior --device cuda --bf16`` for 300 steps of the brain recipe (64 px, batch 32),
   seconds per step kept (the CPU's, one thread, batch 8, is ~0.75 s).

Writes ``benchmarks/results/gpu_check-<date>-<device>.json`` and ``.md`` (atomically): per step the command, exit
status, wall seconds and the lines worth keeping; the GPU, torch and CUDA versions.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from benchmarks.reports import write_json_and_markdown  # noqa: E402

BUDGET_S = 8 * 60
BATCH_SCANS = ("brain_t1_multicoil.h5", "brain_multislice_multicoil.h5")
KEEP = re.compile(r"(PSNR|passed|failed|skipped|error|slices computed|batch plan|wrote .*\.(json|md)|mean of|s/step)",
                  re.I)


def run_step(name: str, argv: list[str], timeout: float, env: dict) -> dict:
    """Run ``argv``; its exit status, wall seconds and the output lines worth keeping."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status = "timeout"
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    lines = [line.strip() for line in output.splitlines() if KEEP.search(line)]
    record = {"name": name, "command": " ".join(argv), "status": status, "seconds": round(seconds, 2),
              "lines": lines[-20:]}
    if status != 0:
        record["tail"] = output.splitlines()[-30:]
    print(f"[gpu_check] {name}: status {status}, {seconds:.1f} s", flush=True)
    for line in lines[-6:]:
        print(f"    {line}", flush=True)
    return record


def rate(record: dict) -> float | None:
    """Slices per second of the compute phase, from invdiff batch's closing line."""
    for line in record.get("lines", []):
        found = re.search(r"(\d+) slices computed in ([\d.]+) s", line)
        if found and float(found.group(2)) > 0:
            return int(found.group(1)) / float(found.group(2))
    return None


def same_outputs(a: Path, b: Path, names) -> bool | None:
    try:
        return all(hashlib.sha256((a / n).read_bytes()).digest() == hashlib.sha256((b / n).read_bytes()).digest()
                   for n in names)
    except FileNotFoundError:
        return None


def device_or_none(smoke: bool, script: str) -> str | None:
    """"cpu" for a smoke run, "cuda" where there is a GPU, else None after saying there is nothing to do."""
    import torch

    if smoke:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    print(f"[{script}] no CUDA device here: nothing to do (use --cpu-smoke to exercise the script)")
    return None


def smoke_out(out: Path, smoke: bool, script: str) -> Path:
    """A smoke run is no measurement: unless told otherwise, its report goes to a fresh temporary folder."""
    return Path(tempfile.mkdtemp(prefix=f"{script}-smoke-")) if smoke and out == RESULTS else out


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device, "host_cpus": os.cpu_count()}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every step on the CPU with tiny settings (checks the script, times nothing useful)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--steps", type=int, default=100, help="diffusion steps of the main job and batch")
    args = parser.parse_args(argv)

    import torch

    smoke = args.cpu_smoke
    device = device_or_none(smoke, "gpu_check")
    if device is None:
        return 0
    steps = 2 if smoke else args.steps
    gpus = 0 if smoke else torch.cuda.device_count()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    started = time.perf_counter()
    left = lambda: max(30.0, BUDGET_S - (time.perf_counter() - started))  # noqa: E731
    steps_done, batch_summary = [], {}
    args.out = smoke_out(args.out, smoke, "gpu_check")
    try:
        steps_done.append(run_step("contract", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                "tests/test_operator_contract.py", "tests/test_training.py",
                                                "-k", "cuda"],
                                   min(90, left()), env))
        main_job = [py, "-m", "invdiff.cli", "reconstruct", "data/brain_t1_multicoil.h5", "--solver", "reddiff",
                    "--accel", "4", "--out", str(work / "brain_t1_reddiff.h5"), "--device", device, "--steps",
                    str(steps), "--no-progress"]
        steps_done.append(run_step("main-job", main_job, min(120, left()), env))
        speed = [py, "-m", "benchmarks.run", "--device", device, "--out", str(args.out)]
        speed += ["--quick"] if smoke else ["--network-dtype", "bfloat16"]
        steps_done.append(run_step("speed", speed, min(240, left()), env))
        scans = work / "scans"
        scans.mkdir()
        if smoke:
            import numpy as np

            from invdiff.datasets.synthetic import write_fake_fastmri
            names = ["a.h5", "b.h5"]
            for i, name in enumerate(names):
                image = np.zeros((2, 32, 32))
                image[:, 8:24, 8 + i:24] = 1.0
                write_fake_fastmri(scans / name, image, num_coils=4, seed=i)
        else:
            names = list(BATCH_SCANS)
            for name in names:
                shutil.copy(REPO / "data" / name, scans / name)
        batch = ["batch", str(scans), "--solver", "reddiff", "--steps", str(steps), "--no-progress"]
        batch += ["--accel", "2", "--center-fraction", "0.3"] if smoke else []      # 32 columns: a wider centre
        plain = run_step("batch-1-process", [py, "-m", "invdiff.cli", *batch, "--out", str(work / "b1"),
                                             "--device", device], min(150, left()), env)
        steps_done.append(plain)
        nproc = max(gpus, 1) if not smoke else 2
        ranked = run_step(f"batch-torchrun-{nproc}", [py, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}", "-m", "invdiff.cli", *batch,
                                                      "--out", str(work / "bn"), "--device", "auto" if not smoke
                                                      else "cpu"], min(150, left()), env)
        steps_done.append(ranked)
        batch_summary = {"scans": names, "steps": steps, "ranks": nproc, "slices_per_s_1_process": rate(plain),
                         f"slices_per_s_{nproc}_ranks": rate(ranked),
                         "outputs_byte_identical": same_outputs(work / "b1", work / "bn", names)}
        train = [py, "-m", "invdiff.priors.train", "--data", "mni-brain-scales", "--channels", "2", "--attention",
                 "--spacing-conditioning", "--out", str(work / "train"), "--device", device, "--log-every", "50"]
        train += (["--size", "16", "--batch", "2", "--steps", "2", "--base-channels", "8", "--channel-mults", "1,2"]
                  if smoke else ["--size", "64", "--batch", "32", "--steps", "300", "--bf16"])
        steps_done.append(run_step("train", train, min(150, left()), env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "cpu-smoke" if smoke else "cuda", "environment": environment(device),
              "total_seconds": round(time.perf_counter() - started, 1), "steps": steps_done,
              "batch": batch_summary}
    stem = f"gpu_check-{datetime.date.today().isoformat()}-{'cpu-smoke' if smoke else 'cuda'}"
    write_json_and_markdown(args.out, stem, report, markdown(report))
    print(f"[gpu_check] wrote {args.out / stem}.json and .md ({report['total_seconds']} s)")
    return 0 if all(step["status"] == 0 for step in steps_done) else 1


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check, {report['date']} ({report['mode']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, {', '.join(env.get('gpus', [])) or 'no GPU'}; "
             f"total {report['total_seconds']} s", "", "| step | status | seconds | kept lines |",
             "|---|---|---|---|"]
    for step in report["steps"]:
        kept = "<br>".join(step["lines"][-4:]).replace("|", "/")
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']} | {kept} |")
    lines += ["", "batch: " + json.dumps(report["batch"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
