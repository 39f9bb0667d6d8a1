"""Offline training data for the shipped priors: endless, seeded batches ``(B, C, size, size)`` float32.

A source is an object with ``batch(generator) -> (B, C, size, size)`` that draws *all* of its randomness
from the ``torch.Generator`` it is given, so a training run is reproduced (and resumed bit for bit) from
the generator's state alone. ``source.batches(generator)`` is the same thing as an infinite iterator.

Sources (``make_source(spec, channels=, size=, batch=)``):

- ``mni-brain``: slices of the MNI152 2009a template (T1 + grey/white-matter probability maps) that ship
  inside the nilearn wheel, in all three orientations; real T1 slices mixed with synthesised contrasts
  (T1-, T2-, PD-, FLAIR-, EPI-like and random intensities per tissue), synthetic skull and scalp, bias
  fields, lower resolution, flips, rotations, scalings and elastic warps. ``channels=2`` multiplies the
  magnitude by a smooth random phase and returns (real, imag).
- ``ct-phantoms``: procedural CT-like phantoms (body outline with a fat layer, lungs, organs, bones,
  small high-contrast details, smooth texture), attenuation mapped from [-1000, 1000] HU to [0, 1].
- ``folder:PATH``: PNG/JPEG/NPY images or NIfTI volumes (2-D slices) under PATH, random crops.
- ``fastmri:PATH``: fastMRI h5 files under PATH: ``reconstruction_rss`` / ``reconstruction_esc`` targets
  or, when absent, the RSS of the centred orthonormal inverse FFT of ``kspace``.

Normalisation (:data:`PERCENTILE_NORMALISATION`): MR images are divided by :func:`reference_scale`, the
99.5th percentile of the magnitude of the *whole slice* (background included), before cropping, so a
solver that divides a scan by ``reference_scale`` of its zero-filled / reference magnitude shows the prior
images on the scale it was trained on. CT phantoms are on a fixed scale (:data:`CT_NORMALISATION`).

The held-out test images (dipy's ``t1_coronal_slice.npy``, nibabel's ``example4d.nii.gz``) are never read.

The package files (MNI template, real MR volumes) are found inside the installed nilearn / dipy wheels, or, first,
in the folder ``$INVDIFF_TRAINING_FILES`` names (copies under the same file names; for machines where those
packages are not installed, e.g. a GPU machine fed by ``benchmarks/gpu_payload.sh``).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from invdiff.normalisation import reference_scale

log = logging.getLogger(__name__)

PERCENTILE_NORMALISATION = {
    "kind": "percentile", "q": 99.5,
    "description": "each full slice divided by the 99.5th percentile of its magnitude (background included) "
                   "before cropping; use invdiff.normalisation.reference_scale(magnitude, q=99.5)",
}
CT_NORMALISATION = {
    "kind": "fixed", "hu_range": [-1000.0, 1000.0],
    "description": "value = (HU + 1000) / 2000 clipped to [0, 1]: air 0, water 0.5, dense bone ~1",
}
HELD_OUT_FILES = ("t1_coronal_slice.npy", "example4d.nii.gz")
MNI_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


TRAINING_FILES_ENV = "INVDIFF_TRAINING_FILES"


def package_file(package: str, relative: str) -> Path | None:
    """A data file shipped inside ``package`` (``relative`` to its folder): the copy in ``$INVDIFF_TRAINING_FILES``
    when that folder holds one of the same name, else the installed package's; None when neither exists."""
    import importlib.util

    override = os.environ.get(TRAINING_FILES_ENV)
    if override:
        if not Path(override).is_dir():
            raise ValueError(f"${TRAINING_FILES_ENV}={override!r} is not a folder (it should hold copies of the "
                             f"package data files, e.g. {Path(relative).name})")
        copy = Path(override) / Path(relative).name
        if copy.is_file():
            return copy
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


def _check_not_held_out(path) -> None:
    if Path(path).name in HELD_OUT_FILES:
        raise ValueError(f"{path} is a held-out test image ({', '.join(HELD_OUT_FILES)}); never train on it")


class TrainingSource:
    """Base class: ``batch(generator)`` -> (B, C, size, size) float32; metadata for the exported prior."""

    name = "source"
    normalisation: dict = PERCENTILE_NORMALISATION
    nominal_spacing_mm: float = 1.0     # pixel spacing reported for every image when a source knows no better

    def __init__(self, *, channels: int, size: int, batch: int):
        if size < 8 or batch < 1:
            raise ValueError(f"{self.name}: need size >= 8 and batch >= 1, got size={size}, batch={batch}")
        self.channels, self.size, self.batch_size = channels, size, batch

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def batch_with_spacing(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch (B, C, size, size), spacing (B,) mm/pixel)``: the pixel spacing each image shows, for
        spacing-conditioned priors. Sources without per-image spacings report ``nominal_spacing_mm``."""
        x = self.batch(generator)
        return x, torch.full((x.shape[0],), float(self.nominal_spacing_mm))

    def batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        while True:
            yield self.batch(generator)

    def metadata(self) -> dict:
        return {"data": self.name, "channels": self.channels, "size": self.size, "normalisation": self.normalisation}


# ----------------------------------------------------------------------------------------------- helpers
def _uniform(generator, shape, low, high) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _smooth_field(generator, batch: int, size: tuple[int, int], nodes: int = 5) -> torch.Tensor:
    """Low-pass N(0, 1) random field (B, 1, H, W): a ``nodes x nodes`` Gaussian grid upsampled bicubically."""
    coarse = torch.randn(batch, 1, nodes, nodes, generator=generator)
    if min(size) <= 8 * nodes:
        return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)
    # Bicubic to a quarter of the size, then bilinear: indistinguishable for a field this smooth, 5x cheaper.
    quarter = F.interpolate(coarse, size=(size[0] // 4, size[1] // 4), mode="bicubic", align_corners=True)
    return F.interpolate(quarter, size=size, mode="bilinear", align_corners=True)


def _sample_field_at(coarse: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Evaluate a coarse field (B, 1, n, n) spanning [-1, 1]^2 at normalised points grid (B, h, w, 2) -> (B, 1, h, w)."""
    return F.grid_sample(coarse, grid, mode="bicubic", padding_mode="border", align_corners=True)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with one sigma (pixels), reflect-padded."""
    if sigma <= 0.05:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    x = F.conv2d(x, k[radius - pad_h:radius + pad_h + 1].view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    x = F.conv2d(x, k[radius - pad_w:radius + pad_w + 1].view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return x


def _complexify(magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) magnitude and phase -> (B, 2, H, W) (real, imag) = |x| (cos phi, sin phi)."""
    return torch.cat([magnitude * phase.cos(), magnitude * phase.sin()], dim=1)


def _smooth_phase(generator, grid: torch.Tensor) -> torch.Tensor:
    """A smooth random MR phase at normalised slice coordinates grid (B, h, w, 2) -> (B, 1, h, w).

    Constant + linear + quadratic terms (B0 offset, shim gradients) plus a low-pass random field
    (susceptibility), as seen in the phase of a coil-combined MR image.
    """
    b = grid.shape[0]
    x, y = grid[..., 0][:, None], grid[..., 1][:, None]
    c = torch.randn(b, 6, generator=generator)
    c0 = _uniform(generator, (b,), -math.pi, math.pi)
    amp = _uniform(generator, (b, 3), 0.0, 1.0) * torch.tensor([2.0, 1.0, 1.5])
    per = lambda v: v[:, None, None, None]  # noqa: E731
    phase = (per(c0) + per(amp[:, 0]) * (per(c[:, 0]) * x + per(c[:, 1]) * y)
             + per(amp[:, 1]) * (per(c[:, 2]) * x * x + per(c[:, 3]) * x * y + per(c[:, 4]) * y * y))
    coarse = torch.randn(b, 1, 6, 6, generator=generator)
    return phase + per(amp[:, 2]) * _sample_field_at(coarse, grid)


def _patch_grid(generator, centers: torch.Tensor, canvas: tuple[int, int], size: int,
                *, scale_range=(0.7, 1.5), max_rotation_deg: float = 15.0, elastic_px=3.0,
                flip: bool = True, zoom: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling grid (B, size, size, 2) in grid_sample's normalised coordinates (align_corners=False).

    Patch pixel (u, v) maps to canvas pixel ``center + R(theta) diag(f, 1) (u, v) / zoom + elastic(u, v)``: a
    random left-right flip ``f`` (never up-down: anatomy has a top and a bottom, and vertical flips leak into
    samples), rotation, log-uniform zoom and a smooth displacement of up to ``elastic_px`` canvas pixels.
    """
    b = centers.shape[0]
    h, w = canvas
    if zoom is None:
        zoom = torch.exp(_uniform(generator, (b,), math.log(scale_range[0]), math.log(scale_range[1])))
    aspect = torch.exp(_uniform(generator, (b,), -0.1, 0.1))
    theta = _uniform(generator, (b,), -1.0, 1.0) * math.radians(max_rotation_deg)
    flips = torch.where(torch.rand(b, 2, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(b, 2)
    flips[:, 1] = 1.0
    half = (size - 1) / 2
    r = torch.arange(size, dtype=torch.float32) - half
    v, u = torch.meshgrid(r, r, indexing="ij")                                   # (size, size)
    su = (flips[:, 0] * aspect / zoom)[:, None, None] * u
    sv = (flips[:, 1] / (aspect * zoom))[:, None, None] * v
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    px = centers[:, 1, None, None] + cos * su - sin * sv
    py = centers[:, 0, None, None] + sin * su + cos * sv
    amplitude = (torch.rand(b, generator=generator) * torch.as_tensor(elastic_px, dtype=torch.float32))[:, None, None]
    disp = torch.randn(b, 2, 4, 4, generator=generator)
    disp = F.interpolate(disp, size=(size, size), mode="bicubic", align_corners=True)
    px = px + amplitude * disp[:, 0]
    py = py + amplitude * disp[:, 1]
    return torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)


def _head_biased_centers(generator, weight_map: torch.Tensor, p_uniform: float = 0.1, cell: int = 4) -> torch.Tensor:
    """Crop centres (B, 2) (row, col) in canvas pixels: drawn from ``weight_map`` (B, H, W) >= 0, or uniform.

    The draw is over ``cell x cell`` blocks (average weight) with a uniform position inside the block: the
    same distribution at block resolution, at 1/cell^2 of the cost.
    """
    b, h, w = weight_map.shape
    coarse = F.avg_pool2d(weight_map[:, None], cell, ceil_mode=True)[:, 0]
    wc = coarse.shape[-1]
    weights = coarse.reshape(b, -1).clamp_min(0) + 1e-8
    uniform = torch.rand(b, generator=generator) < p_uniform
    weights = torch.where(uniform[:, None], torch.ones_like(weights), weights)
    index = torch.multinomial(weights, 1, generator=generator)[:, 0]
    offset = torch.rand(b, 2, generator=generator) * cell
    return torch.stack([index // wc, index % wc], dim=1).float() * cell + offset - 0.5


# ------------------------------------------------------------------------------------------- MNI brain
@functools.lru_cache(maxsize=1)
def mni_template_volumes() -> torch.Tensor:
    """(3, X, Y, Z) uint8 tensor: T1, GM, WM of the MNI152 2009a template in nilearn's wheel (cached per process)."""
    import nibabel

    volumes = []
    for kind in ("t1", "gm", "wm"):
        relative = "datasets/data/" + MNI_FILE.format(kind)
        path = package_file("nilearn", relative)
        if path is None:
            raise ValueError(f"MNI template file {Path(relative).name} not found; expected it inside the installed "
                             f"nilearn wheel (pip install nilearn) or in ${TRAINING_FILES_ENV} "
                             f"(now {os.environ.get(TRAINING_FILES_ENV, 'unset')!r})")
        _check_not_held_out(path)
        volumes.append(np.asarray(nibabel.load(str(path)).dataobj, dtype=np.uint8))
    log.info("loaded MNI152 template volumes %s from %s", volumes[0].shape, path.parent)
    return torch.from_numpy(np.stack(volumes))


DISTANCE_CAP = 30


def outside_distance(outside: np.ndarray) -> torch.Tensor:
    """2-D Euclidean distance (pixels, capped at DISTANCE_CAP) of each ``outside`` pixel to the nearest inside
    pixel, (h, w) bool -> (h, w) uint8. Used to draw a synthetic skull and scalp around the skull-stripped template.
    """
    from scipy.ndimage import distance_transform_edt

    if outside.all():
        return torch.full(outside.shape, DISTANCE_CAP, dtype=torch.uint8)
    dist = distance_transform_edt(outside)
    return torch.from_numpy(np.minimum(dist, DISTANCE_CAP).astype(np.uint8))


# Tissue intensity ranges (low, high) per contrast family: GM, WM, CSF, skull, scalp. Relative values
# follow the usual orderings (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF dark; EPI: T2*-weighted,
# fat suppressed). A "random" family draws every tissue in [0, 1], which includes inversions.
CONTRASTS = {
    "t1": ((0.45, 0.65), (0.75, 1.0), (0.03, 0.25), (0.0, 0.12), (0.5, 1.0)),
    "t2": ((0.45, 0.65), (0.28, 0.45), (0.8, 1.0), (0.0, 0.1), (0.3, 0.8)),
    "pd": ((0.7, 0.9), (0.55, 0.7), (0.65, 0.95), (0.0, 0.12), (0.5, 0.9)),
    "flair": ((0.6, 0.85), (0.4, 0.6), (0.0, 0.15), (0.0, 0.1), (0.3, 0.9)),
    "epi": ((0.5, 0.75), (0.35, 0.5), (0.7, 1.0), (0.0, 0.1), (0.05, 0.4)),
    "random": ((0.0, 1.0),) * 5,
}
CONTRAST_PROBS = {"t1": 0.15, "t2": 0.2, "pd": 0.1, "flair": 0.15, "epi": 0.15, "random": 0.25}


class MNIBrainSource(TrainingSource):
    """Slices of the MNI152 template with domain-randomised contrasts (see the module docstring)."""

    name = "mni-brain"
    canvas = 240

    def __init__(self, *, channels: int = 2, size: int = 64, batch: int = 16, real_t1_fraction: float = 0.25,
                 shell_probability: float = 0.7, whole_head_fraction: float = 0.0):
        super().__init__(channels=channels, size=size, batch=batch)
        if channels not in (1, 2):
            raise ValueError(f"mni-brain: channels must be 1 (magnitude) or 2 (real, imag), got {channels}")
        if not 0.0 <= whole_head_fraction <= 1.0:
            raise ValueError(f"mni-brain: whole-head fraction must be in [0, 1], got {whole_head_fraction}")
        self.real_t1_fraction = real_t1_fraction
        self.whole_head_fraction = whole_head_fraction
        self.shell_probability = shell_probability
        self.volumes = mni_template_volumes()
        self._distance_cache: dict[tuple[int, int], torch.Tensor] = {}   # (axis, index) -> (h, w) uint8
        self.slices = self._valid_slices(self.volumes[0])
        log.info("mni-brain: %d slices with brain (all three orientations)", len(self.slices))

    @staticmethod
    def _valid_slices(t1: torch.Tensor, min_brain_pixels: int = 1500) -> list[tuple[int, int]]:
        brain = t1 > 0
        slices = []
        for axis in range(3):
            counts = brain.sum(dim=[d for d in range(3) if d != axis])
            slices += [(axis, int(i)) for i in torch.nonzero(counts >= min_brain_pixels)[:, 0]]
        return slices

    def _slice_distance(self, axis: int, index: int) -> torch.Tensor:
        key = (axis, index)
        if key not in self._distance_cache:     # computed on first use: ~2 ms a slice, ~450 slices in all
            outside = (self.volumes[0].select(axis, index) == 0).numpy()
            self._distance_cache[key] = outside_distance(outside)
        return self._distance_cache[key]

    def _canvas_slices(self, generator) -> torch.Tensor:
        """(B, 4, canvas, canvas) float: T1, GM, WM in [0, 1] of random slices centred on a zero canvas, and
        the in-plane distance (pixels) outside the brain."""
        picks = torch.randint(len(self.slices), (self.batch_size,), generator=generator)
        out = torch.zeros(self.batch_size, 4, self.canvas, self.canvas)
        out[:, 3] = DISTANCE_CAP
        for i, pick in enumerate(picks.tolist()):
            axis, index = self.slices[pick]
            plane = self.volumes.select(axis + 1, index).float() / 255.0     # (3, h, w)
            h, w = plane.shape[-2:]
            top, left = (self.canvas - h) // 2, (self.canvas - w) // 2
            out[i, :3, top:top + h, left:left + w] = plane
            out[i, 3, top:top + h, left:left + w] = self._slice_distance(axis, index).float()
        return out

    def _tissue_intensities(self, generator) -> torch.Tensor:
        """(B, 5) random intensities for GM, WM, CSF, skull, scalp drawn from a random contrast family."""
        families = list(CONTRASTS)
        probs = torch.tensor([CONTRAST_PROBS[f] for f in families])
        choice = torch.multinomial(probs.expand(self.batch_size, -1), 1, generator=generator)[:, 0]
        u = torch.rand(self.batch_size, 5, generator=generator)
        ranges = torch.tensor([CONTRASTS[f] for f in families])                 # (F, 5, 2)
        low, high = ranges[choice, :, 0], ranges[choice, :, 1]
        return low + (high - low) * u

    def _synthesise(self, generator, maps: torch.Tensor) -> torch.Tensor:
        """Magnitude images (B, 1, H, W) from T1/GM/WM maps: real T1 or a random contrast, plus skull and scalp."""
        b = self.batch_size
        t1, gm, wm = maps[:, 0:1], maps[:, 1:2], maps[:, 2:3]
        brain = (t1 > 0).float()
        gm_wm = (gm + wm).clamp(max=1.0)
        csf = (brain - gm_wm).clamp(min=0.0)
        tissue = self._tissue_intensities(generator)
        per = lambda v: v[:, None, None, None]  # noqa: E731
        synthetic = per(tissue[:, 0]) * gm + per(tissue[:, 1]) * wm + per(tissue[:, 2]) * csf
        # Mild smooth within-tissue texture: a template is an average of 152 brains and is smoother than one.
        texture = 1 + per(_uniform(generator, (b,), 0.0, 0.15)) * _smooth_field(generator, b, t1.shape[-2:], 12)
        synthetic = synthetic * texture
        use_t1 = per(torch.rand(b, generator=generator) < self.real_t1_fraction)
        # In T1, scalp fat is about as bright as white matter (~0.9 of the template's range).
        tissue[:, 4] = torch.where(use_t1[:, 0, 0, 0], _uniform(generator, (b,), 0.45, 0.95),
                                   tissue[:, 4])
        image = torch.where(use_t1, t1, synthetic)
        # Synthetic head shell: skull (dark in most contrasts) then scalp, of random thicknesses.
        dist = maps[:, 3:4]
        skull_px = per(_uniform(generator, (b,), 2.0, 7.0))
        scalp_px = per(_uniform(generator, (b,), 2.0, 9.0))
        shell = per(torch.rand(b, generator=generator) < self.shell_probability).float()
        skull = ((dist > 0) & (dist <= skull_px)).float() * shell
        # Soft (logistic, ~1 px) edges for the scalp: a blur at a fraction of the cost of a convolution.
        scalp = torch.sigmoid((dist - skull_px) * 2) * torch.sigmoid((skull_px + scalp_px - dist) * 1.5) * shell
        image = image + per(tissue[:, 3]) * skull + per(tissue[:, 4]) * scalp * (1 - brain)
        return image

    def _degrade(self, generator, image: torch.Tensor) -> torch.Tensor:
        """Smooth multiplicative bias field exp(a g) and a random lower resolution (area down, bilinear up)."""
        b, _, h, w = image.shape
        strength = _uniform(generator, (b,), 0.0, 0.5)[:, None, None, None]
        image = image * torch.exp(strength * _smooth_field(generator, b, (h, w), 4))
        factors = torch.where(torch.rand(b, generator=generator) < 0.5,
                              _uniform(generator, (b,), 1.0, 2.5), torch.ones(b))
        out = []
        for i, factor in enumerate(factors.tolist()):
            img = image[i:i + 1]
            if factor > 1.05:
                low = F.interpolate(img, size=(int(h / factor), int(w / factor)), mode="area")
                img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
            out.append(img)
        return torch.cat(out).clamp_min(0.0)

    def metadata(self) -> dict:
        return dict(super().metadata(), whole_head_fraction=self.whole_head_fraction)

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        maps = self._canvas_slices(generator)
        magnitude = self._degrade(generator, self._synthesise(generator, maps))
        magnitude = magnitude / reference_scale(magnitude[:, 0])[:, None, None, None]   # before cropping
        centers = _head_biased_centers(generator, (magnitude[:, 0] > 0.05).float())
        grid = _patch_grid(generator, centers, (self.canvas, self.canvas), self.size)
        patch = F.grid_sample(magnitude, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.whole_head_fraction > 0:     # no extra draws otherwise: the patch-only stream stays as it was
            patch, grid = self._with_whole_heads(generator, magnitude, patch, grid)
        if self.channels == 1:
            return patch.contiguous()
        return _complexify(patch, _smooth_phase(generator, grid)).contiguous()


    def _with_whole_heads(self, generator, magnitude: torch.Tensor, patch: torch.Tensor, grid: torch.Tensor):
        """Replace a random ``whole_head_fraction`` of the patches by views of the whole canvas.

        A patch prior has a receptive field of a few centimetres: it learns tissue, never the layout of a
        head, so its unconditional samples are texture. Whole-head views (the 240 px canvas shrunk to the
        patch size, 1/4 scale at 64 px, with flips, rotations and stronger elastic warps, since the template
        is one brain) teach the same network the global anatomy at a coarse scale, while the patches keep the
        fine scale that reconstruction at scan resolution needs. The view is sampled from an area-pooled canvas (3x at
        64 px) so the minification does not alias (grid coordinates are normalised, so one grid fits both).
        """
        b = magnitude.shape[0]
        whole = torch.rand(b, generator=generator) < self.whole_head_fraction
        middle = (self.canvas - 1) / 2
        centers = middle + 6.0 * torch.randn(b, 2, generator=generator)
        fit = self.size / self.canvas                  # the zoom that shows the whole canvas
        head_grid = _patch_grid(generator, centers, (self.canvas, self.canvas), self.size,
                                scale_range=(0.8625 * fit, 1.0875 * fit), elastic_px=12.0)
        pooled = F.avg_pool2d(magnitude, max(1, round(0.77 / fit)))
        view = F.grid_sample(pooled, head_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        pick = whole[:, None, None, None]
        return torch.where(pick, view, patch), torch.where(pick, head_grid, grid)


# ---------------------------------------------------------------------------- brain at many pixel spacings
# Real MR volumes that registry packages carry and that are not evaluation images, with their in-plane pixel
# spacing (mm). Kept out: the held-out images (HELD_OUT_FILES) and nibabel's functional.nii / anatomical.nii,
# which come from the same nipy example subject and session as the held-out example4d.nii.gz EPI.
REAL_MR_VOLUMES = (
    # (package, path inside the package, in-plane spacing mm, slice range, description)
    ("dipy", "data/files/S0_10slices.nii.gz", 2.0, (0, 10), "b0 (T2-weighted spin-echo EPI) of a DWI scan, axial"),
    ("dipy", "data/files/aniso_vox.nii.gz", 4.0, (4, 22), "b0 EPI at 4 x 4 x 5 mm, axial"),
    # The header says 1 mm, but the brain spans ~70 pixels front to back (an adult brain is ~160 mm): ~2.2 mm.
    ("dipy", "data/files/test_piesno.nii.gz", 2.2, (2, 12), "noisy diffusion-weighted EPI, axial"),
)
RELATED_TO_HELD_OUT = ("functional.nii", "anatomical.nii")


def _check_trainable_real_mr(path) -> None:
    _check_not_held_out(path)
    if Path(path).name in RELATED_TO_HELD_OUT:
        raise ValueError(f"{path} shares its subject and session with a held-out test image; never train on it")


@functools.lru_cache(maxsize=1)
def real_mr_slices() -> tuple[tuple[torch.Tensor, float, str], ...]:
    """Axial slices ``(image (H, W) float32 in display orientation, spacing mm, file name)`` of REAL_MR_VOLUMES,
    each divided by :func:`reference_scale`; volumes whose package is missing are skipped with a warning."""
    import nibabel

    out = []
    for package, rel, spacing, (first, last), _ in REAL_MR_VOLUMES:
        path = package_file(package, rel)
        if path is None:
            log.warning("real MR volume %s/%s not found; training without it", package, rel)
            continue
        _check_trainable_real_mr(path)
        volume = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
        volume = volume[..., 0] if volume.ndim == 4 else volume
        for k in range(first, min(last, volume.shape[2])):
            image = torch.from_numpy(np.rot90(volume[:, :, k]).copy()).clamp_min(0)
            out.append((image / reference_scale(image), spacing, path.name))
    log.info("real MR: %d slices from %d volumes", len(out), len({name for *_, name in out}))
    return tuple(out)


class MNIScalesSource(MNIBrainSource):
    """Brain views at pixel spacings from ~1 mm patches to whole heads at 3-4 mm, with each image's spacing.

    The template (1 mm voxels) is shown in display orientation (anterior / superior up), so a view at spacing
    ``s`` samples the 240 mm canvas every ``s`` mm (area-pooled first when ``s > 1.3``, so nothing aliases).
    ``whole_head_fraction`` of the views are whole heads (``s`` log-uniform in [3, 4.2] mm, centred, central
    slices only: the middle half of the brain's extent along each axis, as for every view at >= 2 mm); the rest are log-uniform in
    [0.8, 3] mm, centred anywhere in the head, pulled to the middle as the field of view nears the head's size.
    Augmentations are mild so they do not leak into samples: left-right flips only, rotations up to 8 degrees,
    +-10 % aspect, elastic warps of at most 1.5 mm (4 mm for whole heads, where the template is one brain).
    ``real_fraction`` of the views come from real MR slices (REAL_MR_VOLUMES: EPI b0 and DWI, axial) at spacings
    at or above their own. ``noisy_fraction`` of the images get complex Gaussian noise of 0.5-3 % of the
    reference scale (noisy low-resolution scans), so the magnitude of a 1-channel image is Rician.
    """

    name = "mni-brain-scales"
    # At 64 px; for other sizes the upper spacings scale by 64 / size, so that a "whole head" is still a 192-269 mm
    # field of view (the 1 mm patch end stays at 0.8 mm).
    SPACING_RANGE = (0.8, 3.0)
    WHOLE_HEAD_RANGE = (3.0, 4.2)
    CENTRAL_FROM_MM = 2.0

    def __init__(self, *, channels: int = 2, size: int = 64, batch: int = 16, whole_head_fraction: float = 0.4,
                 real_fraction: float = 0.15, noisy_fraction: float = 0.25, real_t1_fraction: float = 0.2):
        super().__init__(channels=channels, size=size, batch=batch, real_t1_fraction=real_t1_fraction)
        self.whole_head_fraction, self.real_fraction, self.noisy_fraction = whole_head_fraction, real_fraction, \
            noisy_fraction
        self.central = self._central_indices(self.volumes[0])
        fov = 64 / self.size
        self.spacing_range = (self.SPACING_RANGE[0], self.SPACING_RANGE[1] * fov)
        self.whole_head_range = (self.WHOLE_HEAD_RANGE[0] * fov, self.WHOLE_HEAD_RANGE[1] * fov)
        self.central_from_mm = self.CENTRAL_FROM_MM * fov
        self.real = real_mr_slices() if real_fraction > 0 else ()

    def _central_indices(self, t1: torch.Tensor) -> list[int]:
        """Indices into ``self.slices`` in the middle half of the brain's extent along their axis."""
        keep = []
        for axis in range(3):
            indices = [i for a, i in self.slices if a == axis]
            lo, hi = min(indices), max(indices)
            keep += [n for n, (a, i) in enumerate(self.slices)
                     if a == axis and lo + 0.25 * (hi - lo) <= i <= hi - 0.25 * (hi - lo)]
        return keep

    def _canvas_slices(self, generator, central_only: torch.Tensor | None = None) -> torch.Tensor:
        picks = torch.randint(len(self.slices), (self.batch_size,), generator=generator)
        central = torch.randint(len(self.central), (self.batch_size,), generator=generator)
        if central_only is not None:
            picks = torch.where(central_only, torch.tensor(self.central)[central], picks)
        out = torch.zeros(self.batch_size, 4, self.canvas, self.canvas)
        out[:, 3] = DISTANCE_CAP
        for i, pick in enumerate(picks.tolist()):
            axis, index = self.slices[pick]
            plane = torch.rot90(self.volumes.select(axis + 1, index).float() / 255.0, 1, dims=(-2, -1))
            dist = torch.rot90(self._slice_distance(axis, index).float(), 1, dims=(-2, -1))
            h, w = plane.shape[-2:]
            top, left = (self.canvas - h) // 2, (self.canvas - w) // 2
            out[i, :3, top:top + h, left:left + w] = plane
            out[i, 3, top:top + h, left:left + w] = dist
        return out

    def _tissue_intensities(self, generator) -> torch.Tensor:
        families = list(CONTRASTS)
        probs = torch.tensor([SCALES_CONTRAST_PROBS[f] for f in families])
        choice = torch.multinomial(probs.expand(self.batch_size, -1), 1, generator=generator)[:, 0]
        u = torch.rand(self.batch_size, 5, generator=generator)
        ranges = torch.tensor([CONTRASTS[f] for f in families])
        low, high = ranges[choice, :, 0], ranges[choice, :, 1]
        return low + (high - low) * u

    def _spacings(self, generator, whole: torch.Tensor) -> torch.Tensor:
        lo, hi = self.spacing_range
        wlo, whi = self.whole_head_range
        part = torch.exp(_uniform(generator, (self.batch_size,), math.log(lo), math.log(hi)))
        head = torch.exp(_uniform(generator, (self.batch_size,), math.log(wlo), math.log(whi)))
        return torch.where(whole, head, part)

    def _views(self, generator, canvas_images: torch.Tensor, spacing: torch.Tensor, canvas_mm: float,
               weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, 1, size, size) of canvas images (B, 1, N, N) whose pixels are ``canvas_mm`` wide, at spacing
        (B,) mm; returns the views and their grids."""
        b, _, n, _ = canvas_images.shape
        zoom = canvas_mm / spacing                                          # output pixels per canvas pixel
        middle = (n - 1) / 2
        centers = _head_biased_centers(generator, weight)
        fov_fraction = (self.size * spacing / 180.0).clamp(max=1.0)         # a head is ~180 mm across
        centers = middle + (centers - middle) * (1 - fov_fraction)[:, None] + 3.0 * torch.randn(b, 2,
                                                                                                   generator=generator)
        elastic = torch.where(spacing >= self.whole_head_range[0], 4.0, 1.5) / canvas_mm
        grid = _patch_grid(generator, centers, (n, n), self.size, max_rotation_deg=8.0, elastic_px=elastic,
                           zoom=zoom)
        views = torch.empty(b, 1, self.size, self.size)
        pools = (0.77 / zoom).round().clamp(min=1).long()
        for k in pools.unique().tolist():                                    # area-pool before minifying
            idx = torch.nonzero(pools == k)[:, 0]
            source = F.avg_pool2d(canvas_images[idx], k) if k > 1 else canvas_images[idx]
            views[idx] = F.grid_sample(source, grid[idx], mode="bilinear", padding_mode="zeros", align_corners=False)
        return views, grid

    def _real_views(self, generator, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` views of real MR slices at spacings in [own spacing, 4.2] mm: (views, spacings, grids)."""
        picks = torch.randint(len(self.real), (count,), generator=generator).tolist()
        views, spacings, grids = [], [], []
        for pick in picks:
            image, own, _ = self.real[pick]
            n = int(math.ceil(240 / own))
            canvas = torch.zeros(1, 1, n, n)
            h, w = image.shape
            ch, cw = min(h, n), min(w, n)
            top, left = (n - ch) // 2, (n - cw) // 2
            canvas[0, 0, top:top + ch, left:left + cw] = image[(h - ch) // 2:(h - ch) // 2 + ch,
                                                               (w - cw) // 2:(w - cw) // 2 + cw]
            lo = max(own, self.spacing_range[0])
            spacing = torch.exp(_uniform(generator, (1,), math.log(lo), math.log(self.whole_head_range[1])))
            view, grid = self._views(generator, canvas, spacing, own, (canvas[:, 0] > 0.05).float())
            views.append(view)
            spacings.append(spacing)
            grids.append(grid)
        return torch.cat(views), torch.cat(spacings), torch.cat(grids)

    def batch_with_spacing(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size
        whole = torch.rand(b, generator=generator) < self.whole_head_fraction
        spacing = self._spacings(generator, whole)
        # Views that show most of a head (>= 2 mm: a 128 mm field of view at 64 px) use central slices only.
        maps = self._canvas_slices(generator, spacing >= self.central_from_mm)
        magnitude = self._degrade(generator, self._synthesise(generator, maps))
        magnitude = magnitude / reference_scale(magnitude[:, 0])[:, None, None, None]   # before cropping
        views, grid = self._views(generator, magnitude, spacing, 1.0, (magnitude[:, 0] > 0.05).float())
        real = torch.rand(b, generator=generator) < self.real_fraction
        if self.real and bool(real.any()):
            idx = torch.nonzero(real)[:, 0]
            views[idx], spacing[idx], grid[idx] = self._real_views(generator, len(idx))
        if self.channels == 2:
            image = _complexify(views, _smooth_phase(generator, grid))
        else:
            image = torch.cat([views, torch.zeros_like(views)], dim=1)
        noisy = (torch.rand(b, generator=generator) < self.noisy_fraction).float()
        level = noisy * _uniform(generator, (b,), 0.005, 0.03)
        image = image + level[:, None, None, None] * torch.randn(image.shape, generator=generator)
        if self.channels == 1:
            image = image.norm(dim=1, keepdim=True)
        return image.contiguous(), spacing

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        return self.batch_with_spacing(generator)[0]

    def metadata(self) -> dict:
        return dict(super().metadata(), real_fraction=self.real_fraction, noisy_fraction=self.noisy_fraction,
                    spacing_range_mm=[self.spacing_range[0], self.whole_head_range[1]],
                    real_volumes=[f"{p}/{r}" for p, r, *_ in REAL_MR_VOLUMES
                                  if Path(r).name in {name for *_, name in real_mr_slices()}])


# Fewer random-intensity images than the patch source (their inversions look like no scan), more EPI / T2.
SCALES_CONTRAST_PROBS = {"t1": 0.2, "t2": 0.2, "pd": 0.1, "flair": 0.15, "epi": 0.25, "random": 0.1}


# ------------------------------------------------------------------------------------------ CT phantoms
def _hu(value: float) -> float:
    """Map Hounsfield units to the [0, 1] training scale of :data:`CT_NORMALISATION`."""
    return min(max((value + 1000.0) / 2000.0, 0.0), 1.0)


class CTPhantomSource(TrainingSource):
    """Procedural CT-like phantoms, one ``torch.Generator`` seed per image, rendered only inside the crop.

    Each phantom lives on a field of view of ``N`` pixels (N uniform in [128, 256]); the shapes are
    analytic, so only the ``size x size`` crop (plus a blur margin) is rasterised.
    """

    name = "ct-phantoms"
    normalisation = CT_NORMALISATION

    def __init__(self, *, channels: int = 1, size: int = 64, batch: int = 16, fov_range=(128, 256)):
        super().__init__(channels=channels, size=size, batch=batch)
        if channels != 1:
            raise ValueError(f"ct-phantoms: channels must be 1, got {channels}")
        self.fov_range = fov_range

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2 ** 62, (self.batch_size,), generator=generator).tolist()
        return torch.stack([self.phantom(seed) for seed in seeds])

    def phantom(self, seed: int) -> torch.Tensor:
        """(1, size, size) float32 crop of the phantom with this seed."""
        g = torch.Generator().manual_seed(int(seed))
        rnd = lambda low, high: float(_uniform(g, (), low, high))  # noqa: E731
        fov = int(torch.randint(self.fov_range[0], self.fov_range[1] + 1, (), generator=g))
        margin = 3
        n = self.size + 2 * margin
        # Body: an ellipse filling most of the field of view; crop centred at a random point inside it.
        body_a, body_b = rnd(0.6, 0.95), rnd(0.45, 0.85)
        body_angle = rnd(-0.3, 0.3)
        radius, angle = math.sqrt(rnd(0, 1)) * 0.9, rnd(0, 2 * math.pi)
        cx, cy = radius * body_a * math.cos(angle), radius * body_b * math.sin(angle)
        if rnd(0, 1) < 0.1:
            cx, cy = rnd(-1, 1), rnd(-1, 1)
        step = 2.0 / fov
        r = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * step
        y, x = torch.meshgrid(cy + r, cx + r, indexing="ij")
        image = torch.zeros(n, n)

        def ellipse(x0, y0, a, b, theta):
            c, s = math.cos(theta), math.sin(theta)
            xr, yr = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
            return (xr / a) ** 2 + (yr / b) ** 2 <= 1

        def polygon(x0, y0, radius, sides):
            angles = torch.sort(_uniform(g, (sides,), 0, 2 * math.pi)).values
            radii = radius * _uniform(g, (sides,), 0.6, 1.0)
            px, py = x0 + radii * angles.cos(), y0 + radii * angles.sin()
            inside = torch.ones_like(x, dtype=torch.bool)
            for k in range(sides):    # convex hull of a star-shaped set: left of every edge, counter-clockwise
                ax, ay, bx, by = px[k], py[k], px[(k + 1) % sides], py[(k + 1) % sides]
                inside &= (bx - ax) * (y - ay) - (by - ay) * (x - ax) >= 0
            return inside

        additive = rnd(0, 1) < 0.25
        if additive:
            # Shepp-Logan-like: overlapping random ellipses whose intensities add up.
            for _ in range(int(rnd(5, 15))):
                mask = ellipse(rnd(-0.7, 0.7), rnd(-0.7, 0.7), rnd(0.03, 0.6), rnd(0.03, 0.6), rnd(0, math.pi))
                image = image + mask.float() * rnd(-0.3, 0.6)
            image = image.clamp(0.0, 1.0)
        else:
            body = ellipse(0, 0, body_a, body_b, body_angle)
            fat = rnd(0.02, 0.08)
            inner = ellipse(0, 0, body_a - fat, body_b - fat, body_angle)
            image[body] = _hu(rnd(-120, -80))
            image[inner] = _hu(rnd(20, 60))
            for _ in range(int(rnd(0, 3))):           # lungs / bowel gas: dark regions
                image[ellipse(rnd(-0.5, 0.5), rnd(-0.4, 0.4), rnd(0.1, 0.35), rnd(0.1, 0.4), rnd(0, math.pi))
                      & inner] = _hu(rnd(-900, -700))
            for _ in range(int(rnd(3, 10))):          # organs: small soft-tissue contrasts
                if rnd(0, 1) < 0.5:
                    mask = ellipse(rnd(-0.6, 0.6), rnd(-0.5, 0.5), rnd(0.05, 0.3), rnd(0.05, 0.3), rnd(0, math.pi))
                else:
                    mask = polygon(rnd(-0.6, 0.6), rnd(-0.5, 0.5), rnd(0.05, 0.3), int(rnd(3, 9)))
                image[mask & inner] = _hu(rnd(-50, 150))
            for _ in range(int(rnd(1, 6))):           # bones: cortical ring around marrow
                x0, y0, a, b, th = rnd(-0.6, 0.6), rnd(-0.6, 0.6), rnd(0.03, 0.12), rnd(0.03, 0.12), rnd(0, math.pi)
                image[ellipse(x0, y0, a, b, th) & inner] = _hu(rnd(700, 1000))
                t = rnd(0.3, 0.8)
                image[ellipse(x0, y0, a * t, b * t, th) & inner] = _hu(rnd(150, 400))
            for _ in range(int(rnd(0, 10))):          # small high-contrast details: calcifications, gas
                detail = ellipse(rnd(-0.7, 0.7), rnd(-0.7, 0.7), rnd(1, 3) * step, rnd(1, 3) * step, 0)
                image[detail & inner] = _hu(rnd(500, 1000)) if rnd(0, 1) < 0.7 else 0.0
            # Smooth texture inside the body (parenchyma), a few HU.
            coarse = torch.randn(1, 1, 8, 8, generator=g)
            grid = torch.stack([x, y], dim=-1)[None]
            texture = _sample_field_at(coarse, grid.clamp(-1, 1))[0, 0]
            image = torch.where(body, image + rnd(0.0, 15.0) / 2000.0 * texture, image)
        image = _gaussian_blur(image[None, None], rnd(0.3, 1.0))[0, :, margin:-margin, margin:-margin]
        return image.clamp(0.0, 1.0).float()


# ------------------------------------------------------------------------------ folders and fastMRI files
class _SliceFileSource(TrainingSource):
    """Random crops of 2-D slices listed in ``self.items`` (file, slice index); subclasses read one slice.

    Each slice is normalised by :func:`reference_scale` of its full magnitude before cropping. Crops are
    ``size x size`` (zero-padded when the slice is smaller), centred with probability 0.9 on a pixel whose
    magnitude exceeds 0.1 (the object, not the background), with random left-right flips (no up-down flips or
    transposes: they leak into samples).
    Real slices get a smooth random phase when ``channels == 2``; complex slices keep theirs.

    ``whole_slice_fraction`` of the images are instead whole-slice views: the full slice shrunk to ``size``
    (area-pooled first, so it does not alias) with a random zoom of 0.85-1.1 around the fit and a few pixels of
    jitter. ``batch_with_spacing`` reports each image's pixel spacing: the slice's own (``slice_spacing_mm``)
    for crops, times the shrink factor for whole-slice views.
    """

    def __init__(self, root, *, channels: int, size: int, batch: int, whole_slice_fraction: float = 0.0):
        super().__init__(channels=channels, size=size, batch=batch)
        if channels not in (1, 2):
            raise ValueError(f"{self.name}: channels must be 1 or 2, got {channels}")
        if not 0.0 <= whole_slice_fraction <= 1.0:
            raise ValueError(f"{self.name}: whole-slice fraction must be in [0, 1], got {whole_slice_fraction}")
        self.whole_slice_fraction = whole_slice_fraction
        self.root = Path(root)
        if not self.root.exists():
            raise ValueError(f"{self.name}: {self.root} does not exist")
        self.items: list[tuple[Path, int]] = self._index()
        if not self.items:
            raise ValueError(f"{self.name}: no usable images under {self.root}")
        log.info("%s: %d slices under %s", self.name, len(self.items), self.root)

    def _index(self) -> list[tuple[Path, int]]:
        raise NotImplementedError

    def read_slice(self, path: Path, index: int) -> np.ndarray:
        raise NotImplementedError

    def _files(self, suffixes: tuple[str, ...]) -> list[Path]:
        files = [self.root] if self.root.is_file() else sorted(p for p in self.root.rglob("*") if p.is_file())
        files = [p for p in files if p.name.lower().endswith(suffixes)]
        for p in files:
            _check_not_held_out(p)
        return files

    def metadata(self) -> dict:
        return dict(super().metadata(), root=str(self.root), slices=len(self.items),
                    whole_slice_fraction=self.whole_slice_fraction)

    def slice_spacing_mm(self, path: Path) -> float:
        """In-plane pixel spacing (mm) of the slices of ``path``; ``nominal_spacing_mm`` unless a subclass knows."""
        return float(self.nominal_spacing_mm)

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        return self.batch_with_spacing(generator)[0]

    def batch_with_spacing(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.items), (self.batch_size,), generator=generator).tolist()
        crops = [self._crop(generator, *self.items[i]) for i in picks]
        return torch.stack([c for c, _ in crops]), torch.tensor([s for _, s in crops], dtype=torch.float32)

    def _whole_view(self, generator, image: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The whole slice (C, H, W) shrunk to (C, size, size) with a random zoom; returns it and the shrink factor."""
        h, w = image.shape[-2:]
        zoom = float(_uniform(generator, (), 0.85, 1.1))
        step = max(h, w) / (self.size * zoom)                  # slice pixels per output pixel
        pool = max(1, round(0.77 * step))
        pooled = F.avg_pool2d(image[None], pool, ceil_mode=True) if pool > 1 else image[None]
        jitter = torch.randn(2, generator=generator) * 0.03
        r = (torch.arange(self.size, dtype=torch.float32) - (self.size - 1) / 2) * step
        gy = (2 * ((h - 1) / 2 + r) + 1) / h - 1 + jitter[0]
        gx = (2 * ((w - 1) / 2 + r) + 1) / w - 1 + jitter[1]
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        view = F.grid_sample(pooled, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        return view, step

    def _crop(self, generator, path: Path, index: int) -> tuple[torch.Tensor, float]:
        spacing = self.slice_spacing_mm(path)
        array = self.read_slice(path, index)
        image = torch.from_numpy(np.array(array, copy=True))
        image = torch.view_as_real(image.to(torch.complex64)).permute(2, 0, 1) if image.is_complex() \
            else image.float()[None]                                          # (1 or 2, H, W)
        magnitude = image.norm(dim=0, keepdim=True)
        scale = reference_scale(magnitude[0])
        image, magnitude = image / scale, magnitude / scale
        if self.whole_slice_fraction > 0 and torch.rand((), generator=generator) < self.whole_slice_fraction:
            patch, step = self._whole_view(generator, image)
            spacing *= step
            if torch.rand((), generator=generator) < 0.5:
                patch = patch.flip(-1)
            return self._channels(generator, patch, max(image.shape[-2:])), spacing
        pad = self.size // 2
        image = F.pad(image, (pad, pad, pad, pad))
        magnitude = F.pad(magnitude, (pad, pad, pad, pad))
        h, w = magnitude.shape[-2:]
        centers = _head_biased_centers(generator, (magnitude > 0.1).float(), cell=2)[0]
        top = int(centers[0].clamp(pad, h - pad - 1)) - pad
        left = int(centers[1].clamp(pad, w - pad - 1)) - pad
        patch = image[:, top:top + self.size, left:left + self.size]
        if torch.rand((), generator=generator) < 0.5:
            patch = patch.flip(-1)
        return self._channels(generator, patch, w), spacing

    def _channels(self, generator, patch: torch.Tensor, w: int) -> torch.Tensor:
        """(1 or 2, size, size) -> the source's channels: magnitude, or complex with a smooth random phase."""
        if self.channels == 1:
            return patch.norm(dim=0, keepdim=True) if patch.shape[0] == 2 else patch
        if patch.shape[0] == 2:
            return patch
        r = torch.linspace(-self.size / w, self.size / w, self.size)
        grid = torch.stack(torch.meshgrid(r, r, indexing="xy"), dim=-1)[None]
        return _complexify(patch[None], _smooth_phase(generator, grid))[0]


class FolderSource(_SliceFileSource):
    """PNG/JPEG images (grayscale), NPY arrays ((H, W) or (N, H, W), real or complex) and NIfTI volumes
    (slices along the last axis) under a folder."""

    name = "folder"
    IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
    SUFFIXES = IMAGE_SUFFIXES + (".npy", ".nii", ".nii.gz")

    def __init__(self, root, *, channels: int = 1, size: int = 64, batch: int = 16, whole_slice_fraction: float = 0.0):
        super().__init__(root, channels=channels, size=size, batch=batch, whole_slice_fraction=whole_slice_fraction)

    def _index(self) -> list[tuple[Path, int]]:
        items = []
        for path in self._files(self.SUFFIXES):
            count = self._slice_count(path)
            items += [(path, i) for i in range(count)]
        return items

    @staticmethod
    def _slice_count(path: Path) -> int:
        name = path.name.lower()
        if name.endswith(FolderSource.IMAGE_SUFFIXES):
            return 1
        if name.endswith(".npy"):
            shape = np.load(path, mmap_mode="r").shape
            if len(shape) not in (2, 3):
                raise ValueError(f"{path}: array of shape {shape}; expected (H, W) or (N, H, W)")
            return 1 if len(shape) == 2 else shape[0]
        import nibabel

        shape = nibabel.load(str(path)).shape
        if len(shape) not in (2, 3):
            raise ValueError(f"{path}: NIfTI of shape {shape}; expected a 2-D image or a 3-D volume")
        return 1 if len(shape) == 2 else shape[2]

    def read_slice(self, path: Path, index: int) -> np.ndarray:
        name = path.name.lower()
        if name.endswith(self.IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as img:
                return np.asarray(img.convert("F"), dtype=np.float32)
        if name.endswith(".npy"):
            array = np.load(path, mmap_mode="r")
            return np.array(array if array.ndim == 2 else array[index])
        return _read_nifti_slice(str(path), index)


@functools.lru_cache(maxsize=4)
def _nifti_volume(path: str) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(path).dataobj, dtype=np.float32)


def _read_nifti_slice(path: str, index: int) -> np.ndarray:
    volume = _nifti_volume(path)
    return volume if volume.ndim == 2 else volume[:, :, index]


class FastMRISource(_SliceFileSource):
    """Slices of fastMRI h5 files: the ``reconstruction_rss`` / ``reconstruction_esc`` target when present,
    else the RSS of the centred orthonormal inverse FFT of ``kspace``, cropped to the header's recon size."""

    name = "fastmri"
    TARGETS = ("reconstruction_rss", "reconstruction_esc")

    def __init__(self, root, *, channels: int = 1, size: int = 64, batch: int = 16, whole_slice_fraction: float = 0.0):
        self._spacings: dict[Path, float] = {}
        super().__init__(root, channels=channels, size=size, batch=batch, whole_slice_fraction=whole_slice_fraction)

    def _index(self) -> list[tuple[Path, int]]:
        """Every fastMRI file under the root; any other file is skipped with one warning line."""
        import h5py

        items = []
        for path in self._files(("",)):
            if not path.name.lower().endswith(".h5"):
                log.warning("%s: not an .h5 file; skipped (not fastMRI)", path)
                continue
            try:
                with h5py.File(path, "r") as f:
                    key = next((k for k in self.TARGETS if k in f), "kspace" if "kspace" in f else None)
                    if key is None:
                        log.warning("%s: no dataset %s; skipped (not fastMRI)", path, "/".join(self.TARGETS + ("kspace",)))
                        continue
                    if "mask" in f and key == "kspace":
                        log.warning("%s: undersampled test file without a target; skipped", path)
                        continue
                    count = f[key].shape[0] if f[key].ndim >= 3 else 0
                    if count == 0:
                        log.warning("%s: dataset %r of shape %s is not (slices, [coils,] H, W); skipped (not fastMRI)",
                                    path, key, f[key].shape)
                        continue
                    self._spacings[path] = _header_spacing_mm(_header_of(f), self.nominal_spacing_mm)
                    items += [(path, i) for i in range(count)]
            except OSError as err:
                log.warning("%s: not readable as HDF5 (%s); skipped (not fastMRI)", path, err)
        return items

    def slice_spacing_mm(self, path: Path) -> float:
        """reconSpace fieldOfView_mm / matrixSize of the file's ISMRMRD header (``nominal_spacing_mm`` if absent)."""
        return self._spacings.get(path, float(self.nominal_spacing_mm))

    def read_slice(self, path: Path, index: int) -> np.ndarray:
        import h5py

        with h5py.File(path, "r") as f:
            for key in self.TARGETS:
                if key in f:
                    return np.asarray(f[key][index], dtype=np.float32)
            kspace = np.asarray(f["kspace"][index])
            recon = _recon_size(_header_of(f), kspace.shape[-2:])
        coils = kspace if kspace.ndim == 3 else kspace[None]
        images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(coils, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
        images = _center_crop(images, recon)
        return np.sqrt((np.abs(images) ** 2).sum(axis=0)).astype(np.float32)


def _header_of(f):
    """The ISMRMRD XML of an open fastMRI file: the ``ismrmrd_header`` dataset (an attribute in some writers)."""
    if "ismrmrd_header" in f:
        return f["ismrmrd_header"][()]
    return f.attrs.get("ismrmrd_header")


def _header_spacing_mm(header, fallback: float) -> float:
    """Mean in-plane pixel spacing (mm) of an ISMRMRD header's reconSpace (field of view / matrix), or fallback."""
    if header is None:
        return float(fallback)
    from defusedxml import ElementTree

    ns = {"m": "http://www.ismrm.org/ISMRMRD"}
    try:
        root = ElementTree.fromstring(header.decode() if isinstance(header, bytes) else str(header))
        space = root.find("m:encoding/m:reconSpace", ns)
        fov, size = space.find("m:fieldOfView_mm", ns), space.find("m:matrixSize", ns)
        ratios = [float(fov.find(f"m:{a}", ns).text) / float(size.find(f"m:{a}", ns).text) for a in ("x", "y")]
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, ElementTree.ParseError):
        return float(fallback)
    return float(sum(ratios) / 2) if all(r > 0 for r in ratios) else float(fallback)


def _recon_size(header, fallback: tuple[int, int]) -> tuple[int, int]:
    """``encoding/reconSpace/matrixSize`` (x -> W, y -> H) of an ISMRMRD header, or ``fallback``."""
    if header is None:
        return tuple(fallback)
    from defusedxml import ElementTree

    ns = {"m": "http://www.ismrm.org/ISMRMRD"}
    root = ElementTree.fromstring(header.decode() if isinstance(header, bytes) else str(header))
    size = root.find("m:encoding/m:reconSpace/m:matrixSize", ns)
    if size is None:
        return tuple(fallback)
    return int(size.find("m:y", ns).text), int(size.find("m:x", ns).text)


def _center_crop(images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = images.shape[-2:]
    ch, cw = min(shape[0], h), min(shape[1], w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top:top + ch, left:left + cw]


# ------------------------------------------------------------------------------------------------ factory
def make_source(spec: str, *, channels: int, size: int, batch: int) -> TrainingSource:
    """Build a source from ``mni-brain``, ``ct-phantoms``, ``folder:PATH`` or ``fastmri:PATH``."""
    kind, _, arg = spec.partition(":")
    if kind == "mni-brain-scales" and not arg:
        return MNIScalesSource(channels=channels, size=size, batch=batch)
    if kind == "mni-brain":
        return MNIBrainSource(channels=channels, size=size, batch=batch, **_mni_options(spec, arg))
    if kind == "ct-phantoms" and not arg:
        return CTPhantomSource(channels=channels, size=size, batch=batch)
    if kind == "ct-anatomy" and arg in ("", "clean"):
        from invdiff.datasets.ct_anatomy import CTAnatomySource

        return CTAnatomySource(channels=channels, size=size, batch=batch, scanner=arg != "clean")
    if kind in ("folder", "fastmri") and arg:
        root, options = _file_source_options(spec, arg)
        cls = FolderSource if kind == "folder" else FastMRISource
        return cls(root, channels=channels, size=size, batch=batch, **options)
    raise ValueError(f"unknown training data {spec!r}; expected 'mni-brain[:whole-head=F]', 'mni-brain-scales', "
                     f"'ct-phantoms', 'ct-anatomy[:clean]', 'folder:PATH[:whole-slice=F]' or 'fastmri:PATH[:whole-slice=F]'")


def _file_source_options(spec: str, arg: str) -> tuple[str, dict]:
    """``PATH[:whole-slice=F]`` -> (PATH, options); PATH may itself contain ':'."""
    root, sep, tail = arg.rpartition(":")
    if not sep or not tail.startswith("whole-slice"):
        return arg, {}
    key, _, value = tail.partition("=")
    try:
        return root, {"whole_slice_fraction": float(value)}
    except ValueError:
        raise ValueError(f"training data {spec!r}: whole-slice expects a number in [0, 1], got {value!r}") from None


def normalisation_for(spec: str) -> dict:
    """The normalisation a prior trained on ``spec`` expects (CT sources: fixed HU scale; MR: percentile)."""
    return CT_NORMALISATION if spec.partition(":")[0] in ("ct-phantoms", "ct-anatomy") else PERCENTILE_NORMALISATION


def nominal_spacing_mm(spec: str) -> float:
    """The default pixel spacing (mm) of a spacing-conditioned prior trained on ``spec``: 1 mm for MR (the
    reconstruction regulariser's scale); 2 mm for ``ct-anatomy`` (a 256 mm field of view at 128 pixels)."""
    return 2.0 if spec.partition(":")[0] == "ct-anatomy" else 1.0


def _mni_options(spec: str, arg: str) -> dict:
    """``mni-brain`` options: ``whole-head=F`` (fraction of whole-head views, default 0)."""
    if not arg:
        return {}
    key, _, value = arg.partition("=")
    if key != "whole-head":
        raise ValueError(f"training data {spec!r}: unknown mni-brain option {key!r}; expected 'whole-head=F'")
    try:
        return {"whole_head_fraction": float(value)}
    except ValueError:
        raise ValueError(f"training data {spec!r}: whole-head expects a number in [0, 1], got {value!r}") from None
