"""What have the shipped priors learned? 16 unconditional samples per prior as a PNG grid, to look at.

Each grid is EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1; ``2 steps - 1`` network
evaluations) from ``sigma_max`` to 0, started from ``sigma_max * N(0, I)`` drawn from a ``torch.Generator``
seeded with ``--seed``: the same command on the same weights gives the same picture. The complex brain prior
is shown as the modulus ``sqrt(re^2 + im^2)``; every grid shares one grey scale [0, 99.5th percentile].

    python -m benchmarks.prior_samples          # shipped priors -> data/figures/{brain-mri-complex,ct-phantom-anatomy}-samples.png
    python -m benchmarks.prior_samples --brain /tmp/priors/brain-mri-complex --ct /tmp/priors/ct-phantom-anatomy

Old vs new, side by side (same seeds, same noise): ``--versus OLD NEW [--spacings 3.75,1]`` writes
``<out>/<NEW name>-samples-vs-<OLD name>.png``, one row per spacing (mm / pixel; a spacing-conditioned prior is
sampled at it, an unconditioned one ignores it), the old prior's samples left, the new one's right.

    python -m benchmarks.prior_samples --versus brain-mri-complex runs/export/brain.json --spacings 3.75,1
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.prior_samples")

FIGURES = Path(__file__).resolve().parent.parent / "data" / "figures"


def sample_grid(prior_path: str, out: Path, *, n: int, size: int, steps: int, seed: int) -> dict:
    """Draw ``n`` samples of ``size x size`` from one prior and save ``out/<prior name>-samples.png``."""
    from invdiff.priors.loading import load_prior, trained_steps
    from invdiff.priors.unconditional import sample_unconditional, save_sample_grid

    prior = load_prior(prior_path)
    name = getattr(prior, "name", Path(prior_path).stem)
    start = time.perf_counter()
    samples = sample_unconditional(prior, n=n, size=size, steps=steps, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    steps_trained = trained_steps(prior.metadata)
    path = save_sample_grid(samples, out / f"{name}-samples.png",
                            title=f"{name} (step {steps_trained}): {n} samples, {size}x{size}, "
                                  f"{steps} Heun steps, seed {seed}")
    log.info("%s: %d samples in %.1f s -> %s", name, n, seconds, path)
    return {"prior": prior_path, "name": name, "training_steps": steps_trained, "path": str(path),
            "seconds": seconds, "range": [float(samples.min()), float(samples.max())]}


def versus_grid(old: str, new: str, out: Path, *, spacings: list[float], n: int, size: int, steps: int,
                seed: int) -> Path:
    """Samples of two priors at each spacing, same generator seed, as one figure (rows: spacings; old | new)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from invdiff.io import atomic_path
    from invdiff.priors.loading import load_prior, trained_steps
    from invdiff.priors.unconditional import default_sigma_max, sample_unconditional

    priors = [load_prior(old), load_prior(new)]
    if not any(prior.config.spacing_conditioning for prior in priors):
        spacings = spacings[:1]         # neither prior reads the spacing: every row would be the same samples
    cols = int(round(n ** 0.5))
    rows = -(-n // cols)
    fig, axes = plt.subplots(len(spacings), 2, figsize=(2 * 1.3 * cols, 1.3 * rows * len(spacings) + 0.6),
                             squeeze=False)
    for r, spacing in enumerate(spacings):
        for c, prior in enumerate(priors):
            start = time.perf_counter()
            samples = sample_unconditional(prior, n=n, size=size, steps=steps, spacing_mm=spacing,
                                           generator=torch.Generator().manual_seed(seed))
            log.info("%s at %.2f mm: %d samples in %.0f s", prior.name, spacing, n, time.perf_counter() - start)
            images = samples[:, 0] if samples.shape[1] == 1 else samples.norm(dim=1)
            vmax = float(torch.quantile(images.flatten(), 0.995)) or 1.0
            tiles = torch.zeros(rows * size, cols * size)
            for k, image in enumerate(images):
                tiles[(k // cols) * size:(k // cols + 1) * size, (k % cols) * size:(k % cols + 1) * size] = image
            ax = axes[r, c]
            ax.imshow(tiles.clamp(0, vmax).numpy(), cmap="gray", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            conditioned = prior.config.spacing_conditioning
            ax.set_title(f"{prior.name} (step {trained_steps(prior.metadata)}), "
                         f"{f'{spacing:g} mm' if conditioned else 'no spacing input'}, "
                         f"sigma_max {default_sigma_max(prior):.3g}", fontsize=7)
    fig.suptitle(f"{n} unconditional samples each, {size}x{size}, {steps} Heun steps, seed {seed}", fontsize=8)
    fig.tight_layout()
    path = out / f"{priors[1].name}-samples-vs-{priors[0].name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brain", default="brain-mri-complex", help="shipped name or exported path ('skip')")
    parser.add_argument("--ct", default="ct-phantom-anatomy", help="shipped name or exported path ('skip')")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="sample side in pixels (the training patch size)")
    parser.add_argument("--steps", type=int, default=40, help="Heun steps (2 steps - 1 network evaluations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for <prior name>-samples.png")
    parser.add_argument("--versus", nargs=2, metavar=("OLD", "NEW"), default=None,
                        help="two priors side by side instead (same seed), one row per --spacings value")
    parser.add_argument("--spacings", default="3.75,1", help="mm / pixel for --versus rows, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.versus:
        spacings = [float(v) for v in args.spacings.split(",")]
        path = versus_grid(*args.versus, args.out, spacings=spacings, n=args.n, size=args.size, steps=args.steps,
                           seed=args.seed)
        print(f"wrote {path}")
        return [{"path": str(path)}]
    results = [sample_grid(path, args.out, n=args.n, size=args.size, steps=args.steps, seed=args.seed)
               for path in (args.brain, args.ct) if path != "skip"]
    for r in results:
        print(f"{r['name']} (step {r['training_steps']}): {r['path']} in {r['seconds']:.0f} s, "
              f"values in [{r['range'][0]:.2f}, {r['range'][1]:.2f}]")
    return results


if __name__ == "__main__":
    main()
