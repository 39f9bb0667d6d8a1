"""APS, its ablations and the masked-diffusion baseline on brain images, next to RED-Diff with the continuous prior.

Tasks (built by the task layer, as ``benchmarks/run.py`` builds its own): ``mri-4x`` (``data/brain_t1_multicoil.h5``,
8 coils, ESPIRiT, fastMRI random mask at 4x), ``sr-4x`` (the T1 slice's target, 4x bicubic, 1 % noise),
``inpainting-box`` (the centre half box missing) and ``inpainting-random`` (50 % of the pixels observed).
Solvers per task: the task's baseline (zero-filled / ``A^+ y``), ``reddiff`` on the continuous prior
(``brain-mri-complex``, the settings table's row), and on the token prior: ``aps`` (signature defaults: the
paper's 15 x 100 steps, L1 measurement loss: LPIPS cannot be had offline), ``aps`` without the quantized
expectation, ``aps`` with prior-confidence remasking, ``masked-diffusion`` (linear likelihood reweighting), and
our encoder-anchored variant (``encoder_anchor=10, steps=1``: the settings table's MRI row). The three paper rows start
from the signature, ``--steps`` / ``--inner-steps`` change only them; ``--rows`` picks rows by name.
Reported: PSNR / SSIM (fastMRI protocol on the task's output image), wall seconds, token-model calls (nfe) and
decoder passes; and the tokenizer's round-trip PSNR / SSIM on held-out real brain images (the T1 sample and the
multislice sample's slices), the ceiling of every token-prior row. ``--figure`` writes the anchors committed over APS's outer steps on the first task to
``data/figures/aps_anchors-<task>.png``.

    python benchmarks/anchored_images.py --token-prior invdiff/priors/weights/tokens-brain.safetensors
    python benchmarks/anchored_images.py --token-prior runs/tokens --tasks mri-4x --inner-steps 30
    python benchmarks/anchored_images.py --tiny --token-prior runs/tokens-tiny      # seconds: 32 px images
    python benchmarks/anchored_images.py --token-prior runs/tokens --size 96 --steps 8 --inner-steps 30   # CPU
    python benchmarks/anchored_images.py --token-prior tokens-brain --rows baseline "aps + encoder anchor (ours)"

On one CPU core an APS reconstruction at 384 x 192 costs ~1500 decoder forward/backward passes (tens of
minutes); on a GPU, seconds. Writes ``benchmarks/results/anchored_images-<date>[-tiny].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from invdiff import metrics  # noqa: E402
from invdiff.priors.tokens import load_token_prior  # noqa: E402
from invdiff.settings import hyperparameters  # noqa: E402
from invdiff.tasks import (Task, block_average, inpainting_task, scan_tasks, solve,  # noqa: E402
                           superres_task)

log = logging.getLogger("benchmarks.anchored_images")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = REPO / "data" / "figures"
TASKS = ("mri-4x", "sr-4x", "inpainting-box", "inpainting-random")
# row name -> (solver, prior kind, overrides over the settings table). The paper rows ("aps" and its two ablations)
# start from the signature (the paper's values), not from the settings table, whose MRI row is the anchored variant.
ROWS = {
    "baseline": (None, None, {}),
    "reddiff (continuous prior)": ("reddiff", "continuous", {}),
    "aps": ("aps", "tokens", {}),
    "aps, no quantized expectation": ("aps", "tokens", {"quantized_expectation": False}),
    "aps, prior-confidence remasking": ("aps", "tokens", {"remasking": "prior"}),
    "masked-diffusion": ("masked-diffusion", "tokens", {}),
    # ours, not the paper's: every tilt starts at the tokens of A^T y, all committed after one inner loop (beta and
    # the step count picked on the 96 px T1 copy: benchmarks/results/anchored_images-2026-12-05-cpu-2x-tokenizer.md)
    "aps + encoder anchor (ours)": ("aps", "tokens", {"encoder_anchor": 10.0, "steps": 1}),
}
PAPER_ROWS = ("aps", "aps, no quantized expectation", "aps, prior-confidence remasking")


def _t1_image(size: int | None) -> np.ndarray:
    with h5py.File(REPO / "data" / "brain_t1_multicoil.h5", "r") as h5:
        image = h5["reconstruction_rss"][0]
    return image if size is None else block_average(image, size)


def build_tasks(names, tiny: bool, workdir: Path, size: int | None = None) -> list[Task]:
    from invdiff.datasets.synthetic import write_fake_fastmri
    from invdiff.operators.inpainting import box_mask, random_pixel_mask

    image = _t1_image(32 if tiny else size)
    image = image[: image.shape[0] // 4 * 4, : image.shape[1] // 4 * 4]         # token grids need multiples of 4
    built = []
    for name in names:
        if name == "mri-4x":
            scan = REPO / "data" / "brain_t1_multicoil.h5"
            if tiny or size is not None:
                scan = workdir / "tiny_scan.h5"
                write_fake_fastmri(scan, image, num_coils=4, noise_level=0.01 * float(image.max()), seed=0)
            task = scan_tasks(scan, [4], center_fraction=0.17 if (tiny or size is not None) else None)[0]
        elif name == "sr-4x":
            task = superres_task(image, 4, name=name)
        elif name == "inpainting-box":
            task = inpainting_task(image, box_mask(image.shape), name=name)
        elif name == "inpainting-random":
            task = inpainting_task(image, random_pixel_mask(image.shape, 0.5, generator=0), name=name)
        else:
            raise SystemExit(f"--tasks: unknown task {name!r}; expected some of {', '.join(TASKS)}")
        task.name = name
        built.append(task)
    return built


def continuous_prior(args, task: Task):
    if args.tiny:
        from invdiff.priors.analytic import smooth_gaussian_prior
        return smooth_gaussian_prior(task.in_shape)
    from invdiff.compare import resolve_prior
    return resolve_prior(args.continuous_prior, torch.device("cpu"))


class AnchorRecorder:
    """APS callback keeping, per outer step, the committed mask and the current image (first batch element)."""

    def __init__(self):
        self.steps = []

    def __call__(self, step, total, state):
        self.steps.append({"step": step, "masked": state["masked"][0].clone(), "x": state["x"][:1].clone()})


def anchor_figure(recorder: AnchorRecorder, task: Task, grid, path: Path) -> Path:
    """Rows: the image after each outer step (masked tokens at the prior's expectation) and the committed
    positions (white: committed, the newest in red)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = recorder.steps[:: max(1, len(recorder.steps) // 6)][:6] + recorder.steps[-1:]
    fig, axes = plt.subplots(2, len(shown), figsize=(2.2 * len(shown), 4.6), squeeze=False)
    previous = torch.ones_like(shown[0]["masked"])
    for column, record in enumerate(shown):
        image = task.images[0].to_image(record["x"])
        axes[0, column].imshow(image, cmap="gray")
        committed = (~record["masked"]).reshape(grid).float().numpy()
        newest = (previous & ~record["masked"]).reshape(grid).numpy()
        rgb = np.stack([committed, committed * (1 - newest), committed * (1 - newest)], axis=-1)
        axes[1, column].imshow(rgb, interpolation="nearest")
        axes[0, column].set_title(f"step {record['step'] + 1}", fontsize=8)
        previous = record["masked"]
        for row in range(2):
            axes[row, column].axis("off")
    fig.suptitle(f"APS anchors committed over the outer steps ({task.name})", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def tokenizer_round_trip(token_prior, tiny: bool) -> list[dict]:
    """PSNR / SSIM of ``Dec(Q(Enc(x)))`` on held-out real brain images (the T1 sample's target, and every slice of
    the multislice sample), each normalised by its 99.5th percentile and given zero phase, as the training data
    are: the ceiling any token-prior reconstruction can reach."""
    images = [("brain_t1 slice 0", _t1_image(32 if tiny else None))]
    with h5py.File(REPO / "data" / "brain_multislice_multicoil.h5", "r") as h5:
        images += [(f"brain_multislice slice {i}", v[32:64, 48:80] if tiny else v)
                   for i, v in enumerate(h5["reconstruction_rss"][:])]
    rows = []
    for name, image in images:
        image = np.asarray(image, dtype=np.float32)
        image = image[: image.shape[0] // 4 * 4, : image.shape[1] // 4 * 4]
        scale = float(np.percentile(image, 99.5))
        x = torch.from_numpy(image / scale)
        x = torch.stack([x, torch.zeros_like(x)])[None]
        with torch.no_grad():
            ids = token_prior.encode(x)
            decoded = token_prior.decode(token_prior.codebook[ids], token_prior.grid_for(x.shape))
        magnitude = decoded[0].norm(dim=0).numpy() * scale
        scores = metrics.evaluate(image[None], magnitude[None])
        rows.append({"image": name, "shape": list(image.shape), "psnr": scores["psnr"], "ssim": scores["ssim"],
                     "codes_used": int(ids.unique().numel())})
        log.info("tokenizer round trip %s: PSNR %.2f SSIM %.4f", name, scores["psnr"], scores["ssim"])
    return rows


def run(args) -> dict:
    token_prior = load_token_prior(args.token_prior)
    tokenizer_rows = tokenizer_round_trip(token_prior, args.tiny)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        tasks = build_tasks(args.tasks.split(","), args.tiny, Path(workdir), args.size)
        for index, task in enumerate(tasks):
            image = task.images[0]
            for name in args.rows:
                solver, kind, overrides = ROWS[name]
                solver = solver or task.baseline
                values = dict(hyperparameters(solver) if name in PAPER_ROWS else task.hyperparameters(solver))
                if name in PAPER_ROWS:                          # --steps / --inner-steps: the paper rows only
                    values.update({k: v for k, v in (("steps", args.steps), ("inner_steps", args.inner_steps))
                                   if v is not None})
                values.update(overrides)
                prior = token_prior if kind == "tokens" else continuous_prior(args, task) if kind else None
                recorder = AnchorRecorder() if (name == "aps" and index == 0 and args.figure) else None
                start = time.perf_counter()
                solution = solve(image, solver, prior, values, seed=args.seed, callback=recorder)
                seconds = time.perf_counter() - start
                scores = metrics.evaluate(image.target[None], solution.image[None])
                diagnostics = solution.result.diagnostics
                rows.append({"task": task.name, "row": name, "solver": solver, "psnr": scores["psnr"],
                             "ssim": scores["ssim"], "seconds": seconds, "nfe": int(diagnostics.get("nfe", 0)),
                             "decoder_calls": int(diagnostics.get("decoder_calls", 0)),
                             "hyperparameters": {k: v for k, v in values.items() if not callable(v)}})
                log.info("%s / %s: PSNR %.2f SSIM %.4f %.1f s", task.name, name, scores["psnr"], scores["ssim"],
                         seconds)
                if recorder is not None:
                    grid = token_prior.grid_for(task.in_shape)
                    out = Path(args.figure_dir) / f"aps_anchors-{task.name}{'-tiny' if args.tiny else ''}.png"
                    rows[-1]["figure"] = str(anchor_figure(recorder, task, grid, out))
    return {"date": datetime.date.today().isoformat(), "token_prior": str(args.token_prior), "size": args.size,
            "token_prior_metadata": getattr(token_prior, "metadata", {}), "tiny": args.tiny,
            "continuous_prior": "smooth_gaussian_prior (tiny)" if args.tiny else args.continuous_prior,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
            "tokenizer": tokenizer_rows}


def markdown(report: dict) -> str:
    lines = [f"# APS on brain images ({report['date']}{', tiny' if report['tiny'] else ''})", "",
             f"Token prior `{report['token_prior']}`; continuous prior for RED-Diff: {report['continuous_prior']}; "
             f"torch {report['torch']}, {report['threads']} thread(s); images "
             f"{'the T1 slice at full size' if not report.get('size') else str(report['size']) + ' px (block-averaged T1 slice)'}. "
             "APS uses the L1 measurement loss only "
             "(the paper's LPIPS term needs weights that cannot be had offline).", "",
             "| task | solver | PSNR | SSIM | seconds | nfe | decoder passes |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['task']} | {row['row']} ({row['solver']}) | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                     f"{row['seconds']:.1f} | {row['nfe']} | {row['decoder_calls']} |")
    lines += ["", "Tokenizer round trip Dec(Q(Enc(x))) on held-out real images (the ceiling of any token-prior "
              "reconstruction):", "", "| image | shape | PSNR | SSIM | codes used |", "|---|---|---|---|---|"]
    for row in report["tokenizer"]:
        lines.append(f"| {row['image']} | {row['shape'][0]} x {row['shape'][1]} | {row['psnr']:.2f} | "
                     f"{row['ssim']:.4f} | {row['codes_used']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--token-prior", required=True, help="exported token prior (.safetensors) or a run folder")
    parser.add_argument("--continuous-prior", default="brain-mri-complex", help="prior of the RED-Diff row")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help="row names, each quoted (default: all): " + "; ".join(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="outer steps of the paper rows (default: the paper's)")
    parser.add_argument("--inner-steps", type=int, default=None,
                        help="inner steps of the paper rows (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="32 px images and a synthetic 4-coil scan (smoke run)")
    parser.add_argument("--size", type=int, default=None,
                        help="block-average the T1 image to SIZE px (mri-4x then uses a synthetic 4-coil scan of it)")
    parser.add_argument("--figure", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--figure-dir", default=str(FIGURES))
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/anchored_images-DATE)")
    args = parser.parse_args(argv)
    args.rows = list(ROWS) if args.rows is None else args.rows
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(args)
    stem = Path(args.out) if args.out else RESULTS / f"anchored_images-{report['date']}{'-tiny' if args.tiny else ''}"
    from benchmarks.reports import write_json_and_markdown

    text = markdown(report)
    write_json_and_markdown(stem.parent, stem.with_suffix("").name, report, text, json_default=str)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
