"""CT projector speed and accuracy: invdiff's ParallelBeamCT next to deepinv's Tomography, on CPU.

For one image (default 256 x 256, 60 equispaced views over 180 degrees) and every projector, measures
the time of a forward plus an adjoint (median of ``--repeats`` after ``--warmup`` calls; the projectors
take turns within each repeat, so a busy machine slows them alike and the ratios stay fair), the
construction time, the adjoint gap ``|<Ax, y> - <x, A^T y>| / (|Ax| |y|)`` in float32, and the relative
L2 difference of ``A x`` from ``skimage.transform.radon(x, theta, circle=False)`` on the Shepp-Logan
phantom. deepinv runs with ``circle=False, normalize=False`` (same scale as ours and skimage's), once
with ``adjoint_via_backprop=True`` (exact adjoint by autograd) and once with ``False`` (filtered-style
analytic back-projection); the label says which one is deepinv's default.

    python -m benchmarks.ct_projector                 # 1 and all threads; writes benchmarks/results/ct_projector-<date>-cpu.{json,md}
    python -m benchmarks.ct_projector --size 64 --repeats 3 --out /tmp/bench   # a quick run
    python -m benchmarks.ct_projector --size 128 --angles 30 --batch 32        # the SMC sampler's CT solves (-batch32 report)
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):                  # `python benchmarks/ct_projector.py` as well as `python -m ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reports import write_json_and_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _phantom(size: int) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)


def _projectors(size: int, theta: np.ndarray) -> dict:
    """name -> (build function, forward, adjoint, sinogram -> (angles, detectors) numpy)."""
    from deepinv.physics import Tomography

    from invdiff.operators.ct import ParallelBeamCT

    default_backprop = inspect.signature(Tomography.__init__).parameters["adjoint_via_backprop"].default

    def ours():
        return ParallelBeamCT(size, theta)

    def deepinv(backprop: bool):
        return lambda: Tomography(angles=torch.tensor(theta, dtype=torch.float32), img_width=size, circle=False,
                                  adjoint_via_backprop=backprop, normalize=False)

    def label(backprop: bool) -> str:
        return f"deepinv Tomography (adjoint_via_backprop={backprop}{', default' if backprop == default_backprop else ''})"

    return {
        "invdiff ParallelBeamCT": (ours, lambda x: x[0, 0].numpy()),
        label(True): (deepinv(True), lambda y: y[0, 0].numpy().T),    # deepinv's sinogram is (detectors, angles)
        label(False): (deepinv(False), lambda y: y[0, 0].numpy().T),
    }


def _adjoint_gap(op, x: torch.Tensor, seed: int = 0) -> float:
    ax = op.A(x)
    y = torch.randn(ax.shape, generator=torch.Generator().manual_seed(seed), dtype=ax.dtype)
    return float(((ax * y).sum() - (x * op.A_adjoint(y)).sum()).abs() / (ax.norm() * y.norm()))


def run(size: int, num_angles: int, repeats: int, warmup: int, threads: list[int], batch: int = 1) -> dict:
    """One measurement per thread count, in this process, one after the other."""
    runs = [measure(size, num_angles, repeats, warmup, count, batch) for count in threads]
    return {
        "benchmark": "ct_projector",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu",
        "image_size": size, "num_angles": num_angles, "angles": "linspace(0, 180, num_angles, endpoint=False) deg",
        "repeats": repeats, "warmup": warmup, "dtype": "float32", "batch": batch,
        "torch": torch.__version__, "deepinv": _version("deepinv"), "skimage": _version("scikit-image"),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "runs": runs,
    }


def measure(size: int, num_angles: int, repeats: int, warmup: int, threads: int, batch: int = 1) -> dict:
    """Build every projector, check it against skimage, then time forward + adjoint interleaved on a batch
    of ``batch`` copies of the phantom."""
    from skimage.transform import radon

    torch.set_num_threads(threads)
    theta = np.linspace(0.0, 180.0, num_angles, endpoint=False)
    image = _phantom(size)
    x = torch.from_numpy(image).float()[None, None]
    reference = radon(image, theta=theta, circle=False).T
    noise = torch.randn((1, 1, size, size), generator=torch.Generator().manual_seed(1))
    timed = x.expand(batch, 1, size, size).contiguous()

    entries, operators = {}, {}
    for name, (build, to_numpy) in _projectors(size, theta).items():
        start = time.perf_counter()
        operators[name] = build()
        sinogram = to_numpy(operators[name].A(x))
        difference = (float(np.linalg.norm(sinogram - reference) / np.linalg.norm(reference))
                      if sinogram.shape == reference.shape else None)
        entries[name] = {"build_s": time.perf_counter() - start, "sinogram_shape": list(sinogram.shape),
                         "relative_l2_to_skimage_radon": difference,
                         "adjoint_gap_float32": _adjoint_gap(operators[name], noise), "times_s": []}

    def forward_and_adjoint(op):
        op.A_adjoint(op.A(timed))

    for _ in range(warmup):
        for op in operators.values():
            forward_and_adjoint(op)
    for _ in range(repeats):
        for name, op in operators.items():  # interleaved: contention hits every projector alike
            start = time.perf_counter()
            forward_and_adjoint(op)
            entries[name]["times_s"].append(time.perf_counter() - start)

    ours = statistics.median(entries["invdiff ParallelBeamCT"]["times_s"])
    for entry in entries.values():
        entry["median_forward_adjoint_s"] = statistics.median(entry["times_s"])
        entry["time_relative_to_invdiff"] = entry["median_forward_adjoint_s"] / ours
    return {"torch_threads": torch.get_num_threads(),
            # Other processes share the CPU; the load average says how much.
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "projectors": entries}


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def markdown(result: dict) -> str:
    lines = [
        f"# CT projector benchmark ({result['date']}, {result['device']})",
        "",
        f"{result['image_size']} x {result['image_size']} image, {result['num_angles']} views over 180 degrees, "
        f"batch {result['batch']}, {result['dtype']}, torch {result['torch']}, deepinv {result['deepinv']}, "
        f"{result['cpu_count']} CPUs; median of {result['repeats']} repeats after {result['warmup']} warm-up "
        f"calls, projectors interleaved within each repeat. Load: 1-minute load average when each run ended.",
        "",
        "| threads | load | projector | forward + adjoint (ms) | vs invdiff | build (s) | adjoint gap (fp32) "
        "| rel. L2 to skimage radon |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for name, entry in run["projectors"].items():
            difference = entry["relative_l2_to_skimage_radon"]
            lines.append(f"| {run['torch_threads']} | {run['load_average_1min']} | {name} | "
                         f"{1e3 * entry['median_forward_adjoint_s']:.1f} | "
                         f"{entry['time_relative_to_invdiff']:.2f}x | {entry['build_s']:.2f} | "
                         f"{entry['adjoint_gap_float32']:.1e} | "
                         f"{'shape differs' if difference is None else f'{difference:.2e}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--angles", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="images per timed call (the SMC sampler solves 2N at once)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()],
                        help="torch thread counts, one measurement each (default: 1 and all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown reports")
    args = parser.parse_args(argv)
    result = run(args.size, args.angles, args.repeats, args.warmup, sorted(set(args.threads)), args.batch)
    stem = f"ct_projector-{datetime.date.today().isoformat()}-cpu" + (f"-batch{args.batch}" if args.batch > 1 else "")
    table = markdown(result)
    write_json_and_markdown(args.out, stem, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
