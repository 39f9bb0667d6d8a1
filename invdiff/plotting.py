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
    """One row of magnitude images (shared grey scale) and, given a reference, a row of |error| maps
    (shared colour scale, so solvers compare at a glance)."""
    columns = len(panels)
    rows = 2 if errors_against is not None else 1
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    vmax = vmax if vmax is not None else max(float(np.percentile(img, 99.5)) for _, img in panels)
    error_max = None
    if errors_against is not None:
        error_max = max(float(np.percentile(np.abs(img - errors_against), 99.5)) for _, img in panels) or 1.0
    for col, (label, image) in enumerate(panels):
        axes[0, col].imshow(image, cmap="gray", vmin=0, vmax=vmax)
        axes[0, col].set_title(label, fontsize=9)
        if errors_against is not None:
            axes[1, col].imshow(np.abs(image - errors_against), cmap="inferno", vmin=0, vmax=error_max)
            axes[1, col].set_title(f"|error| {label}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
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
