"""Are the shipped priors worth using? Denoising PSNR of their one-step denoiser next to tuned TV and wavelets.

For every held-out image ``x`` in [0, 1] and every ``sigma`` in 0.05, 0.1, 0.2, 0.5, the noisy image is
``y = x + sigma n`` with ``n ~ N(0, I)`` from a ``torch.Generator`` seeded by the image name and sigma, and

- the prior's estimate is its Tweedie mean ``D(y, sigma) = E[x | y]`` (one network evaluation: the prior as
  an MMSE denoiser, EDM Eq. 2-3), on the scale the prior was trained on;
- TV is scikit-image's ``denoise_tv_chambolle`` with the weight that maximises PSNR against ``x`` (a
  log-spaced coarse-then-fine grid search), iterated to a tight tolerance (:data:`TV_OPTIONS`);
- wavelets are scikit-image's ``denoise_wavelet`` (soft thresholds, ``rescale_sigma=True``) with the best
  ``method`` (BayesShrink or VisuShrink), ``wavelet`` (db1, db2, sym4) and threshold ``sigma`` parameter
  (a multiple of the true sigma, same grid search) against ``x``.

The baselines are thus oracle-tuned per image and sigma; the prior is not tuned at all. Every estimate is
clipped to [0, 1] (the known range of the images) before ``PSNR = 10 log10(1 / MSE)`` over the whole image.

Held-out images (never used in training; ``invdiff.datasets.training`` refuses to read them):

- brain (complex prior, normalised by ``s = percentile_99.5(|x|)``): dipy's real T1 slice
  ``t1_coronal_slice.npy`` and a real EPI slice of another contrast (nibabel's ``example4d.nii.gz``, frame 0,
  middle axial slice 12). ``x' = x / s`` is the real channel with a zero imaginary channel; independent noise
  of ``sigma' = sigma / s`` goes into *both* channels (the real-channel noise is the baselines' noise, the
  imaginary one is synthetic), so the input has exactly the law the prior was trained on. The estimate is
  ``s`` times the real channel of ``D``: the image is real, so the real part of the posterior mean is the
  posterior mean of the image, while the modulus would add the positive bias of the residual imaginary
  part. The modulus is recorded in the JSON too.
- CT (fixed scale, images fed as they are): 8 fresh procedural phantoms from ``CTPhantomSource`` rendered at
  128 x 128 with seeds ``2**62 + k``. Training draws every phantom seed with ``torch.randint(0, 2**62)``,
  so these seeds lie outside anything training can have used; plus scikit-image's Shepp-Logan phantom
  resized to 256 x 256.

    python -m benchmarks.prior_denoising                            # shipped priors; writes
                                                                    #   benchmarks/results/prior_denoising-<date>-cpu.{json,md}
    python -m benchmarks.prior_denoising --brain /tmp/priors/brain-mri-complex --ct /tmp/priors/ct-phantom-anatomy
    python -m benchmarks.prior_denoising --quick --out /tmp/bench   # 3 phantoms, coarser grids

Old vs new (issue 15 / 21): ``--prior-only`` skips the (slow, prior-independent) baseline tuning;
``--whole-head`` adds the one-step relative error ``||D(x + sigma n, sigma) - x|| / ||x||`` at sigma 0.5, 1, 2, 5
(prior scale) on whole-head views of the held-out brain images (each slice padded square and area-shrunk to
64 px, so the pixel spacing is its own times side / 64); ``--ct-source`` picks the CT test phantoms: fresh anatomical
ones (``ct-anatomy``, the default since the shipped CT prior was fine-tuned on them; seeds 2**62 + k, at 2 mm,
128 px) or the ellipse-style ``ct-phantoms`` of the former prior; ``--real-ct DIR`` adds real CT
slices (``*.npy`` in HU, resized to 128 px; ``DIR/spacing.json`` maps a stem to its mm / pixel), never used in
training or tuning. A spacing-conditioned prior is called at each image's spacing (``prior.at_spacing``).

    python -m benchmarks.prior_denoising --brain runs/export/brain.json --ct runs/export/ct.json --prior-only \
        --whole-head --real-ct runs/realct --out runs/eval/new
    python -m benchmarks.prior_denoising --brain skip --real-ct runs/realct    # the README's CT row (2026-12-06)
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

if __package__ in (None, ""):                  # `python benchmarks/prior_denoising.py` as well as `python -m ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("benchmarks.prior_denoising")

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parent.parent / "data" / "figures"
SIGMAS = (0.05, 0.1, 0.2, 0.5)
HEADLINE_MIN_SIGMA = 0.1          # the issue: the prior must beat both baselines at every sigma >= 0.1
# CTPhantomSource.batch draws each training phantom's seed with torch.randint(0, 2**62, ...): seeds from
# 2**62 upwards can never have been seen in training (torch.Generator.manual_seed takes up to 2**64 - 1).
CT_TRAINING_SEED_BOUND = 2 ** 62
CT_PHANTOM_SIZE = 128
SHEPP_LOGAN_SIZE = 256
EPI_SLICE = 12                    # middle of the 24 axial slices of example4d.nii.gz
# scikit-image's default stopping rule (eps=2e-4, 200 iterations) stops Chambolle's iteration early enough
# to make PSNR jump by ~2 dB between neighbouring weights; at eps=1e-6 the curve is smooth and within ~0.05 dB
# of a 10x tighter tolerance.
TV_OPTIONS = {"eps": 1e-6, "max_num_iter": 5000}
WAVELETS = ("db1", "db2", "sym4")
WAVELET_METHODS = ("BayesShrink", "VisuShrink")


@dataclass
class HeldOutImage:
    """A clean held-out image, float64 (H, W) in [0, 1], with where it came from."""

    name: str
    image: np.ndarray
    source: str
    spacing_mm: float | None = None      # pixel spacing, passed to spacing-conditioned priors


@dataclass
class GridSearch:
    """Tuning budget: ``coarse`` log-spaced points over [low, high], then ``fine`` points between the best
    coarse point's neighbours."""

    coarse: int = 13
    fine: int = 9


# ------------------------------------------------------------------------------------------ test images
def unit_range(image: np.ndarray) -> np.ndarray:
    """``x / max(x)`` as float64, for a non-negative image with a positive maximum."""
    image = np.asarray(image, dtype=np.float64)
    if image.min() < 0 or image.max() <= 0:
        raise ValueError(f"unit_range: expected a non-negative image with a positive maximum, got range "
                         f"[{image.min()}, {image.max()}]")
    return image / image.max()


def brain_test_images() -> list[HeldOutImage]:
    """The real T1 slice of dipy (256 x 256) and the real EPI slice of nibabel (96 x 128), each scaled by its max."""
    import dipy
    import nibabel

    t1_path = Path(dipy.__file__).parent / "data" / "files" / "t1_coronal_slice.npy"
    epi_path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    for path in (t1_path, epi_path):
        if not path.is_file():
            raise ValueError(f"held-out test image {path} not found; expected it inside the installed wheel")
    t1 = np.load(t1_path)
    frame = np.asarray(nibabel.load(str(epi_path)).dataobj[..., 0], dtype=np.float64)     # (x=128, y=96, z=24)
    # Radiological display as in data/make_samples.py: rows anterior -> posterior, columns right -> left.
    epi = frame[:, :, EPI_SLICE].T[::-1]
    # Spacings: the T1 slice is 1 mm (data/README.md), the EPI 2 x 1.97 mm in plane.
    return [HeldOutImage("brain T1 (dipy)", unit_range(t1), f"dipy {t1_path.name}", 1.0),
            HeldOutImage("brain EPI (nibabel)", unit_range(epi),
                         f"nibabel {epi_path.name}, frame 0, axial slice {EPI_SLICE}", 2.0)]


def ct_anatomy_test_images(count: int, size: int = CT_PHANTOM_SIZE, spacing_mm: float = 2.0) -> list[HeldOutImage]:
    """``count`` fresh anatomical phantoms (head, thorax, abdomen, spine in turn) at ``spacing_mm``, seeds 2**62 + k."""
    from invdiff.datasets.ct_anatomy import ANATOMIES, render_phantom

    images = []
    for k, seed in enumerate(held_out_ct_seeds(count)):
        anatomy = ANATOMIES[k % len(ANATOMIES)]
        image, _ = render_phantom(torch.Generator().manual_seed(seed), size, anatomy=anatomy, spacing_mm=spacing_mm)
        images.append(HeldOutImage(f"CT {anatomy} 2**62+{k}", image.double().numpy(),
                                   f"ct_anatomy.render_phantom(seed {seed}, {size} px, {spacing_mm} mm)", spacing_mm))
    return images


def real_ct_images(folder: Path, size: int = CT_PHANTOM_SIZE) -> list[HeldOutImage]:
    """Real CT slices ``folder/*.npy`` (HU) area-resized to ``size`` (square-padded with air), on (HU + 1000) / 2000."""
    import json

    spacing = json.loads((folder / "spacing.json").read_text()) if (folder / "spacing.json").is_file() else {}
    images = []
    for path in sorted(folder.glob("*.npy")):
        hu = np.load(path).astype(np.float64)
        side = max(hu.shape)
        square = np.full((side, side), -1000.0)
        top, left = (side - hu.shape[0]) // 2, (side - hu.shape[1]) // 2
        square[top:top + hu.shape[0], left:left + hu.shape[1]] = hu
        x = torch.from_numpy(np.clip((square + 1000) / 2000, 0, 1))[None, None]
        small = torch.nn.functional.interpolate(x, size=(size, size), mode="area")[0, 0].numpy()
        own = spacing.get(path.stem)
        images.append(HeldOutImage(f"real CT {path.stem}", small, f"{path} resized {side} -> {size}",
                                   None if own is None else own * side / size))
    return images


def whole_head_views(tests: list[HeldOutImage], size: int = 64) -> list[HeldOutImage]:
    """Each image padded square with zeros and area-shrunk to ``size``: a whole-head view, spacing scaled to match."""
    views = []
    for test in tests:
        side = max(test.image.shape)
        square = np.zeros((side, side))
        top, left = (side - test.image.shape[0]) // 2, (side - test.image.shape[1]) // 2
        square[top:top + test.image.shape[0], left:left + test.image.shape[1]] = test.image
        small = torch.nn.functional.interpolate(torch.from_numpy(square)[None, None], size=(size, size),
                                                mode="area")[0, 0].numpy()
        spacing = None if test.spacing_mm is None else test.spacing_mm * side / size
        views.append(HeldOutImage(f"{test.name} whole head {size} px", small, test.source, spacing))
    return views


WHOLE_HEAD_SIGMAS = (0.5, 1.0, 2.0, 5.0)


@torch.no_grad()
def whole_head_errors(prior, views: list[HeldOutImage], *, complex_prior: bool, sigmas=WHOLE_HEAD_SIGMAS,
                      draws: int = 8) -> list[dict]:
    """One-step relative error ``||D(x + sigma n, sigma) - x|| / ||x||`` on the prior's scale (brain: x / s, zero
    imaginary part), mean over ``draws`` noise draws per sigma, for each view."""
    rows = []
    for view in views:
        denoiser = prior.at_spacing(view.spacing_mm) if hasattr(prior, "at_spacing") else prior
        scale = reference_scale_of(view.image) if complex_prior else 1.0
        x = torch.from_numpy(view.image / scale)[None]
        if complex_prior:
            x = torch.cat([x, torch.zeros_like(x)])
        x = x[None].to(prior.dtype)                                          # (1, C, H, W)
        for sigma in sigmas:
            generator = torch.Generator().manual_seed(noise_seed(view.name, sigma))
            noise = torch.randn((draws,) + tuple(x.shape[1:]), generator=generator, dtype=torch.float64)
            y = x + sigma * noise.to(prior.dtype)
            estimate = denoiser(y, torch.full((draws,), float(sigma), dtype=prior.dtype))
            errors = (estimate - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
            rows.append({"image": view.name, "sigma": sigma, "spacing_mm": view.spacing_mm,
                         "relative_error": float(errors.mean()), "relative_error_std": float(errors.std())})
            log.info("%s sigma %.1f: relative error %.3f", view.name, sigma, rows[-1]["relative_error"])
    return rows


def held_out_ct_seeds(count: int) -> list[int]:
    """``count`` phantom seeds that training cannot have drawn: ``2**62 + k``, k = 0 .. count - 1."""
    return [CT_TRAINING_SEED_BOUND + k for k in range(count)]


def ct_test_images(count: int) -> list[HeldOutImage]:
    """``count`` fresh procedural phantoms (128 x 128) and scikit-image's Shepp-Logan (256 x 256), in [0, 1]."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    from invdiff.datasets.training import CTPhantomSource

    source = CTPhantomSource(channels=1, size=CT_PHANTOM_SIZE, batch=1)
    images = [HeldOutImage(f"CT phantom 2**62+{k}", source.phantom(seed)[0].double().numpy(),
                        f"CTPhantomSource(size={CT_PHANTOM_SIZE}).phantom({seed})")
              for k, seed in enumerate(held_out_ct_seeds(count))]
    shepp = resize(shepp_logan_phantom(), (SHEPP_LOGAN_SIZE, SHEPP_LOGAN_SIZE), anti_aliasing=True)
    images.append(HeldOutImage("Shepp-Logan (skimage)", np.clip(shepp, 0.0, 1.0),
                            f"skimage.data.shepp_logan_phantom() resized to {SHEPP_LOGAN_SIZE}"))
    return images


# ------------------------------------------------------------------------------------------- noise, PSNR
def noise_seed(image_name: str, sigma: float) -> int:
    """A stable seed per (image, sigma), so every method and every run sees the same noise."""
    return zlib.crc32(f"{image_name}|{sigma:.6g}".encode())


def draw_noise(shape: tuple[int, ...], image_name: str, sigma: float, channels: int = 1) -> np.ndarray:
    """``channels`` independent N(0, I) images, float64 (channels, H, W); channel 0 is the same whatever ``channels``."""
    generator = torch.Generator().manual_seed(noise_seed(image_name, sigma))
    # One draw per channel: a single (channels, H, W) draw would change channel 0 with ``channels``.
    return torch.stack([torch.randn(shape, generator=generator, dtype=torch.float64)
                        for _ in range(channels)]).numpy()


def psnr01(clean: np.ndarray, estimate: np.ndarray) -> float:
    """``10 log10(1 / mean((clean - clip(estimate, 0, 1))^2))`` in dB, for images on [0, 1]."""
    mse = float(np.mean((clean - np.clip(estimate, 0.0, 1.0)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------ grid search
def log_grid_search(score: Callable[[float], float], low: float, high: float,
                    budget: GridSearch) -> tuple[float, float, bool]:
    """Maximise ``score(t)`` over ``t`` in [low, high]: a coarse log grid, then a fine log grid between the
    best coarse point's neighbours. Returns ``(best_t, best_score, at_edge)``; ``at_edge`` says the best
    point is ``low`` or ``high`` (the range may be too narrow)."""
    if not 0 < low < high:
        raise ValueError(f"log_grid_search needs 0 < low < high, got low={low}, high={high}")
    coarse = np.geomspace(low, high, budget.coarse)
    scores = [score(float(t)) for t in coarse]
    best = int(np.argmax(scores))
    fine = np.geomspace(coarse[max(best - 1, 0)], coarse[min(best + 1, len(coarse) - 1)], budget.fine)
    candidates = list(zip(coarse, scores)) + [(t, score(float(t))) for t in fine]
    best_t, best_score = max(candidates, key=lambda pair: pair[1])
    at_edge = bool(np.isclose(best_t, low) or np.isclose(best_t, high))
    return float(best_t), float(best_score), at_edge


def best_tv(clean: np.ndarray, noisy: np.ndarray, sigma: float, budget: GridSearch) -> dict:
    """``denoise_tv_chambolle`` with the PSNR-best ``weight`` in [sigma / 20, 4 sigma]."""
    from skimage.restoration import denoise_tv_chambolle

    weight, value, at_edge = log_grid_search(
        lambda w: psnr01(clean, denoise_tv_chambolle(noisy, weight=w, **TV_OPTIONS)), sigma / 20, 4 * sigma,
        budget)
    return {"psnr": value, "weight": weight, "at_grid_edge": at_edge}


def best_wavelet(clean: np.ndarray, noisy: np.ndarray, sigma: float, budget: GridSearch,
                 wavelets=WAVELETS, methods=WAVELET_METHODS) -> dict:
    """``denoise_wavelet`` (soft, rescale_sigma) with the PSNR-best method, wavelet and threshold sigma in
    [sigma / 8, 4 sigma]."""
    from skimage.restoration import denoise_wavelet

    best = None
    for method in methods:
        for wavelet in wavelets:
            def score(threshold_sigma: float) -> float:
                estimate = denoise_wavelet(noisy, sigma=threshold_sigma, method=method, wavelet=wavelet,
                                           mode="soft", rescale_sigma=True)
                return psnr01(clean, estimate)

            threshold_sigma, value, at_edge = log_grid_search(score, sigma / 8, 4 * sigma, budget)
            if best is None or value > best["psnr"]:
                best = {"psnr": value, "method": method, "wavelet": wavelet,
                        "sigma_param": threshold_sigma, "sigma_param_over_sigma": threshold_sigma / sigma,
                        "at_grid_edge": at_edge}
    return best


# --------------------------------------------------------------------------------------- prior as denoiser
@torch.no_grad()
def prior_denoise(prior, noisy: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """One Tweedie step per image: (B, C, H, W) float64 noisy inputs on the prior's scale, (B,) sigmas ->
    ``D(y, sigma)`` (B, C, H, W) float64."""
    x = torch.from_numpy(np.ascontiguousarray(noisy)).to(prior.dtype)
    sigma = torch.as_tensor(sigmas, dtype=prior.dtype)
    return prior(x, sigma).double().numpy()


def brain_prior_inputs(clean: np.ndarray, noise: np.ndarray, sigmas, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Complex-prior inputs for a real image: ``((x + sigma n_re) / s, sigma n_im / s)`` per sigma ->
    (B, 2, H, W) float64, and the prior-scale sigmas ``sigma / s`` (B,). noise: (B, 2, H, W)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    per = sigmas[:, None, None]
    inputs = np.stack([clean[None] + per * noise[:, 0], per * noise[:, 1]], axis=1) / scale
    return inputs, sigmas / scale


def reference_scale_of(image: np.ndarray) -> float:
    """The brain prior's normalisation: the 99.5th percentile of the whole slice's magnitude."""
    from invdiff.normalisation import reference_scale

    return float(reference_scale(torch.from_numpy(np.abs(image))))


# --------------------------------------------------------------------------------------------- benchmark
def evaluate_image(prior, test: HeldOutImage, *, complex_prior: bool, budget: GridSearch,
                   sigmas=SIGMAS, baselines: bool = True) -> dict:
    """Every sigma for one image: prior (real channel and modulus for the complex prior), best TV, best wavelet
    (``baselines=False``: the prior only)."""
    if hasattr(prior, "at_spacing"):
        prior = prior.at_spacing(test.spacing_mm)
    clean = test.image
    channels = 2 if complex_prior else 1
    noise = np.stack([draw_noise(clean.shape, test.name, s, channels) for s in sigmas])    # (B, C, H, W)
    scale = reference_scale_of(clean) if complex_prior else 1.0
    start = time.perf_counter()
    if complex_prior:
        inputs, prior_sigmas = brain_prior_inputs(clean, noise, sigmas, scale)
        denoised = prior_denoise(prior, inputs, prior_sigmas) * scale
        estimates, moduli = denoised[:, 0], np.linalg.norm(denoised, axis=1)
    else:
        inputs = clean[None, None] + np.asarray(sigmas)[:, None, None, None] * noise
        estimates, moduli = prior_denoise(prior, inputs, np.asarray(sigmas, dtype=np.float64))[:, 0], None
    prior_seconds = time.perf_counter() - start
    rows = []
    for i, sigma in enumerate(sigmas):
        noisy = clean + sigma * noise[i, 0]           # the baselines see the real channel's noise
        row = {"sigma": sigma, "noisy_psnr": psnr01(clean, noisy), "prior_psnr": psnr01(clean, estimates[i])}
        if moduli is not None:
            row["prior_modulus_psnr"] = psnr01(clean, moduli[i])
            row["prior_sigma"] = sigma / scale
        if baselines:
            start = time.perf_counter()
            tv = best_tv(clean, noisy, sigma, budget)
            wavelet = best_wavelet(clean, noisy, sigma, budget)
            row.update(tv=tv, wavelet=wavelet, baseline_tuning_seconds=time.perf_counter() - start)
            row["margin_db"] = row["prior_psnr"] - max(tv["psnr"], wavelet["psnr"])
            row["prior_beats_both"] = row["margin_db"] > 0
            log.info("%s sigma %.2f: prior %.2f dB, TV %.2f dB, wavelet %.2f dB", test.name, sigma,
                     row["prior_psnr"], tv["psnr"], wavelet["psnr"])
        else:
            log.info("%s sigma %.2f: prior %.2f dB", test.name, sigma, row["prior_psnr"])
        rows.append(row)
    return {"image": test.name, "source": test.source, "shape": list(clean.shape), "reference_scale": scale,
            "spacing_mm": test.spacing_mm, "prior_seconds_all_sigmas": prior_seconds, "results": rows}


def prior_summary(prior_path: str, prior, images: list[dict]) -> dict:
    from invdiff.priors.loading import trained_steps

    meta = getattr(prior, "metadata", {})
    rows = [r for image in images for r in image["results"]
            if r["sigma"] >= HEADLINE_MIN_SIGMA - 1e-12 and "prior_beats_both" in r]
    return {"prior": prior_path, "name": meta.get("name"), "steps": trained_steps(meta),
            "sha256": meta.get("sha256"), "parameters": meta.get("parameters"),
            "training_wall_seconds": meta.get("total_wall_seconds", meta.get("wall_seconds")), "normalisation": meta.get("normalisation"),
            "images": images,
            "beats_both_at_every_sigma_ge_0.1": all(r["prior_beats_both"] for r in rows),
            "wins_at_sigma_ge_0.1": f"{sum(r['prior_beats_both'] for r in rows)}/{len(rows)}"}


def save_examples(path: Path, prior_name: str, tests: list[HeldOutImage], prior, *, complex_prior: bool,
                  sigma: float = 0.2) -> None:
    """A figure: clean, noisy, prior, best TV and best wavelet estimate for each image at one sigma."""
    base_prior = prior
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.restoration import denoise_tv_chambolle, denoise_wavelet

    from invdiff.io import atomic_path

    fig, axes = plt.subplots(len(tests), 5, figsize=(10, 2.1 * len(tests)), squeeze=False)
    for row, test in zip(axes, tests):
        clean = test.image
        prior = base_prior.at_spacing(test.spacing_mm) if hasattr(base_prior, "at_spacing") else base_prior
        noise = draw_noise(clean.shape, test.name, sigma, 2 if complex_prior else 1)[None]
        if complex_prior:
            scale = reference_scale_of(clean)
            inputs, prior_sigma = brain_prior_inputs(clean, noise, [sigma], scale)
            estimate = prior_denoise(prior, inputs, prior_sigma)[0, 0] * scale
        else:
            estimate = prior_denoise(prior, clean[None, None] + sigma * noise, np.array([sigma]))[0, 0]
        noisy = clean + sigma * noise[0, 0]
        tv = best_tv(clean, noisy, sigma, GridSearch(9, 5))
        wav = best_wavelet(clean, noisy, sigma, GridSearch(9, 5))
        tv_image = denoise_tv_chambolle(noisy, weight=tv["weight"], **TV_OPTIONS)
        wav_image = denoise_wavelet(noisy, sigma=wav["sigma_param"], method=wav["method"], wavelet=wav["wavelet"],
                                    mode="soft", rescale_sigma=True)
        panels = [("clean", clean), (f"noisy {psnr01(clean, noisy):.1f}", noisy),
                  (f"prior {psnr01(clean, estimate):.1f}", estimate), (f"TV {tv['psnr']:.1f}", tv_image),
                  (f"wavelet {wav['psnr']:.1f}", wav_image)]
        for ax, (title, image) in zip(row, panels):
            ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[0].set_ylabel(test.name, fontsize=7)
    fig.suptitle(f"{prior_name}: sigma = {sigma} (PSNR dB, images in [0, 1])", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def run(brain: str | None, ct: str | None, *, quick: bool, figures: Path | None, baselines: bool = True,
        whole_head: bool = False, ct_source: str = "ct-anatomy", real_ct: Path | None = None) -> dict:
    from invdiff.priors.loading import load_prior

    budget = GridSearch(7, 5) if quick else GridSearch()
    report = {"benchmark": "prior_denoising", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": "cpu", "torch_threads": torch.get_num_threads(), "quick": quick,
              "sigmas": list(SIGMAS), "torch": torch.__version__, "platform": platform.platform(),
              "protocol": {
                  "noise": "y = x + sigma n, n ~ N(0, I) float64 from torch.Generator seeded by crc32('<image>|<sigma>')",
                  "prior": "one Tweedie step D(y, sigma); brain: real channel of D on the 99.5th-percentile scale, "
                           "independent synthetic noise in the imaginary channel",
                  "tv": f"skimage denoise_tv_chambolle ({TV_OPTIONS}), weight tuned on a log grid in "
                        f"[sigma/20, 4 sigma] ({budget.coarse} coarse + {budget.fine} fine points)",
                  "wavelet": f"skimage denoise_wavelet (soft, rescale_sigma=True), tuned: method {WAVELET_METHODS}, "
                             f"wavelet {WAVELETS}, threshold sigma on a log grid in [sigma/8, 4 sigma]",
                  "psnr": "10 log10(1 / MSE) over the whole image, every estimate clipped to [0, 1]",
                  "ct_seeds": "2**62 + k; training draws phantom seeds from [0, 2**62)"},
              "priors": {}}
    report["protocol"]["baselines"] = "tuned per image and sigma" if baselines else "skipped (--prior-only)"
    report["protocol"]["ct_source"] = ct_source
    plans = []
    if brain:
        plans.append(("brain", brain, brain_test_images, True))
    if ct:
        count = 4 if quick else 8

        def make_ct():
            images = ct_anatomy_test_images(count) if ct_source == "ct-anatomy" else ct_test_images(count)
            return images + (real_ct_images(real_ct) if real_ct else [])

        plans.append(("ct", ct, make_ct, False))
    for key, path, make_images, complex_prior in plans:
        start = time.perf_counter()
        prior = load_prior(path)
        tests = make_images()
        images = [evaluate_image(prior, t, complex_prior=complex_prior, budget=budget, baselines=baselines)
                  for t in tests]
        report["priors"][key] = prior_summary(path, prior, images)
        if whole_head and key == "brain":
            report["priors"][key]["whole_head"] = whole_head_errors(prior, whole_head_views(tests), complex_prior=True)
        report["priors"][key]["seconds"] = time.perf_counter() - start
        if figures is not None:
            name = getattr(prior, "name", key)
            save_examples(figures / f"{name}-denoising.png", name, tests[:4] if key == "ct" else tests, prior,
                          complex_prior=complex_prior)
    return report


def markdown(report: dict) -> str:
    lines = [f"# Prior denoising benchmark ({report['date']}, {report['device']}, "
             f"{report['torch_threads']} thread{'s' if report['torch_threads'] > 1 else ''}"
             f"{', quick' if report['quick'] else ''})", ""]
    lines += [f"- {key}: {value}" for key, value in report["protocol"].items()]
    for key, entry in report["priors"].items():
        lines += ["", f"## {entry['name'] or key} ({entry['prior']}, step {entry['steps']}, "
                      f"{entry['parameters']} parameters, sha256 {str(entry['sha256'])[:12]})", "",
                  (f"Prior beats both baselines at every sigma >= {HEADLINE_MIN_SIGMA} on every image: "
                   f"**{'yes' if entry['beats_both_at_every_sigma_ge_0.1'] else 'no'}** "
                   f"({entry['wins_at_sigma_ge_0.1']} image-sigma pairs)." if entry["wins_at_sigma_ge_0.1"] != "0/0"
                   else "Baselines skipped (--prior-only).") + f" Runtime {entry['seconds']:.0f} s.", ""]
        if entry.get("whole_head"):
            lines += ["One-step relative error ||D(x + sigma n) - x|| / ||x|| on whole-head views (prior scale, mean "
                      "of 8 draws):", "", "| view | spacing mm | sigma | relative error |", "|---|---:|---:|---:|"]
            lines += [f"| {r['image']} | {r['spacing_mm']:.2f} | {r['sigma']} | {r['relative_error']:.4f} |"
                      for r in entry["whole_head"]]
            lines.append("")
        modulus = key == "brain"
        if not entry["images"] or "tv" not in entry["images"][0]["results"][0]:
            lines.append("| image | spacing mm | sigma | noisy | prior D |" + (" prior modulus |" if modulus else ""))
            lines.append("|---|---:|---:|---:|---:|" + ("---:|" if modulus else ""))
            for image in entry["images"]:
                for r in image["results"]:
                    spacing = "-" if image.get("spacing_mm") is None else f"{image['spacing_mm']:.2f}"
                    lines.append(f"| {image['image']} | {spacing} | {r['sigma']} | {r['noisy_psnr']:.2f} | "
                                 f"{r['prior_psnr']:.2f} |" + (f" {r['prior_modulus_psnr']:.2f} |" if modulus else ""))
            continue
        lines.append("| image | sigma | noisy | prior D | " + ("prior modulus | " if modulus else "")
                     + "best TV (weight) | best wavelet (method, wavelet, sigma param / sigma) | prior - best | beats both |")
        lines.append("|---|---:|---:|---:|" + ("---:|" if modulus else "") + "---:|---:|---:|:---:|")
        for image in entry["images"]:
            for r in image["results"]:
                tv, wav = r["tv"], r["wavelet"]
                edge = lambda d: "*" if d["at_grid_edge"] else ""  # noqa: E731
                lines.append(
                    f"| {image['image']} | {r['sigma']} | {r['noisy_psnr']:.2f} | {r['prior_psnr']:.2f} | "
                    + (f"{r['prior_modulus_psnr']:.2f} | " if modulus else "")
                    + f"{tv['psnr']:.2f} ({tv['weight']:.3g}{edge(tv)}) | "
                    f"{wav['psnr']:.2f} ({wav['method']}, {wav['wavelet']}, {wav['sigma_param_over_sigma']:.2g}"
                    f"{edge(wav)}) | {r['margin_db']:+.2f} | {'yes' if r['prior_beats_both'] else 'no'} |")
    lines += ["", "PSNR in dB. `*`: the tuned parameter sits at the edge of its search range."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    from benchmarks.reports import write_json_and_markdown

    stem = f"prior_denoising-{report['date'][:10]}-cpu"
    json_path = write_json_and_markdown(out, stem, report, markdown(report))
    return json_path, out / f"{stem}.md"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brain", default="brain-mri-complex",
                        help="complex brain prior: shipped name or exported path ('skip' to leave out)")
    parser.add_argument("--ct", default="ct-phantom-anatomy", help="CT prior: shipped name or exported path ('skip')")
    parser.add_argument("--quick", action="store_true", help="4 CT phantoms instead of 8, coarser tuning grids")
    parser.add_argument("--prior-only", action="store_true", help="skip the TV / wavelet tuning (old vs new runs)")
    parser.add_argument("--whole-head", action="store_true",
                        help="also the one-step relative error at sigma 0.5-5 on whole-head views of the brain images")
    parser.add_argument("--ct-source", choices=("ct-phantoms", "ct-anatomy"), default="ct-anatomy",
                        help="which procedural phantoms the CT prior is tested on (fresh seeds 2**62 + k)")
    parser.add_argument("--real-ct", type=Path, default=None, help="folder of real CT slices (*.npy, HU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown reports")
    parser.add_argument("--figures", type=Path, default=FIGURES,
                        help="folder for <prior>-denoising.png example figures ('none' to skip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = run(None if args.brain == "skip" else args.brain, None if args.ct == "skip" else args.ct,
                 quick=args.quick, figures=None if str(args.figures) == "none" else args.figures,
                 baselines=not args.prior_only, whole_head=args.whole_head, ct_source=args.ct_source,
                 real_ct=args.real_ct)
    report["seconds"] = time.perf_counter() - start
    json_path, md_path = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
