"""Figures: reconstruction panels with error maps and comparison grids (matplotlib, Agg, written atomically)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from invdiff.io import atomic_path  # noqa: E402


def _middle(volume: np.ndarray | None) -> np.ndarray | None:
    return None if volume is None else volume[len(volume) // 2]


def save_image_grid(path, panels: list[tuple[str, np.ndarray]], *, errors_against: np.ndarray | None = None,
                    title: str = "", vmax: float | None = None) -> Path:
    """One row of magnitude images (shared grey scale, one colour bar) and, given a reference, a row of |error|
    maps (shared colour scale and bar, so solvers compare at a glance); the reference's own panel gets no error map.
    """
    columns = len(panels)
    rows = 2 if errors_against is not None else 1
    fig, axes = plt.subplots(rows, columns, figsize=(2.7 * columns + 0.6, 2.9 * rows), squeeze=False,
                             constrained_layout=True)
    vmax = vmax if vmax is not None else max(float(np.percentile(img, 99.5)) for _, img in panels)
    error_max = None
    if errors_against is not None:
        others = [img for _, img in panels if img is not errors_against]
        error_max = max((float(np.percentile(np.abs(img - errors_against), 99.5)) for img in others), default=1.0)
        error_max = error_max or 1.0
    shown = error = None
    for col, (label, image) in enumerate(panels):
        shown = axes[0, col].imshow(image, cmap="gray", vmin=0, vmax=vmax)
        axes[0, col].set_title(label, fontsize=9)
        if errors_against is not None:
            if image is errors_against:
                axes[1, col].text(0.5, 0.5, "reference", ha="center", va="center", fontsize=8,
                                  transform=axes[1, col].transAxes)
            else:
                error = axes[1, col].imshow(np.abs(image - errors_against), cmap="inferno", vmin=0, vmax=error_max)
                axes[1, col].set_title(f"|error| {label}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes[0]), shrink=0.8, label="magnitude")
    if error is not None:
        fig.colorbar(error, ax=list(axes[1]), shrink=0.8, label="|error|")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def save_reconstruction_figure(path, *, target: np.ndarray | None, zero_filled: np.ndarray,
                               reconstruction: np.ndarray, title: str = "") -> Path:
    """Middle slice: target, zero-filled, reconstruction, and their error maps against the target."""
    panels = [("zero-filled", _middle(zero_filled)), ("reconstruction", _middle(reconstruction))]
    reference = _middle(target)
    if reference is not None:
        panels.insert(0, ("target", reference))
    return save_image_grid(path, panels, errors_against=reference, title=title)


def save_comparison_grid(path, target: np.ndarray, rows, *, baseline: str, title: str = "") -> Path:
    """Middle image of a comparison: the target and each solver that ran (baseline first) on one grey scale, and
    below them |reconstruction - target| on one shared colour scale.

    target: (images, H, W); rows: ``(solver, reconstruction (images, H, W), psnr, ssim)`` tuples. The error scale
    is the 99.5th percentile of the *baseline's* error (zero-filled, FBP, A^+ y): a shared, robust reference, so a
    diverged solver saturates its own map instead of darkening every other one.
    """
    middle = len(target) // 2
    reference_target = target[middle]
    images = [np.nan_to_num(recon[middle], nan=0.0, posinf=0.0, neginf=0.0) for _, recon, _, _ in rows]
    vmax = float(np.percentile(reference_target, 99.5)) or 1.0
    baseline_image = next((image for (solver, *_), image in zip(rows, images) if solver == baseline), None)
    reference = baseline_image if baseline_image is not None else (images[0] if images else reference_target)
    error_max = float(np.percentile(np.abs(reference - reference_target), 99.5)) or 1.0
    columns = len(images) + 1
    fig, axes = plt.subplots(2, columns, figsize=(2.4 * columns, 5.2), squeeze=False)
    axes[0, 0].imshow(reference_target, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("target", fontsize=9)
    axes[1, 0].text(0.5, 0.5, f"|error| scale\n0 to {error_max:.3g}\n(p99.5 of {baseline})", ha="center",
                    va="center", fontsize=8, transform=axes[1, 0].transAxes)
    for column, ((solver, _, psnr, ssim), image) in enumerate(zip(rows, images), start=1):
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=vmax)
        psnr_text = "n/a" if psnr is None else f"{psnr:.2f}"
        ssim_text = "n/a" if ssim is None else f"{ssim:.3f}"
        axes[0, column].set_title(f"{solver}\n{psnr_text} dB, SSIM {ssim_text}", fontsize=8)
        axes[1, column].imshow(np.abs(image - reference_target), cmap="inferno", vmin=0, vmax=error_max)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
