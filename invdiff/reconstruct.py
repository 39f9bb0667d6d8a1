"""Reconstruct a fastMRI scan slice by slice with any registered solver, and write a submission file.

The pipeline per slice (DESIGN.md, "Data and normalisation"):
  1. k-space ``(coils, H, W)``; a test-set file keeps its own mask, otherwise fastMRI's mask function seeded
     by the file name undersamples it retrospectively (the same mask for every slice, as fastMRI does);
  2. the operator: ``SenseMRI`` with ESPIRiT maps from the auto-calibration lines (multi-coil) or
     ``CartesianMRI`` (single-coil), on the full acquired grid (readout oversampling included);
  3. normalisation: ``y`` and ``sigma_y`` are divided by ``scale`` = 99.5th percentile of the zero-filled
     magnitude, so solvers and priors see images of magnitude ~1; the result is multiplied back;
  4. ``sigma_y`` is estimated from the k-space periphery (Rayleigh median of the outer readout rows);
  5. multi-coil: the solver's image is set to zero outside the coil-map support (``sum_c |S_c|^2 > 0``), where
     ``A`` is blind and a generative prior would otherwise paint structure no measurement can refute;
  6. the complex image is centre-cropped to the header's recon size and its magnitude is the output, as
     fastMRI's targets are made.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import invdiff
from invdiff import metrics
from invdiff.config import parse_overrides
from invdiff.datasets.fastmri import center_crop, estimate_coil_maps, read_scan, write_reconstruction
from invdiff.operators.base import restrict_to_support
from invdiff.operators.fft import complex_to_real, real_to_complex
from invdiff.operators.masks import make_mask
from invdiff.operators.mri import CartesianMRI, SenseMRI
from invdiff.normalisation import normalise
from invdiff.problem import InverseProblem
from invdiff.registry import get_sampler

log = logging.getLogger(__name__)

# fastMRI's standard (acceleration, centre fraction) pairs; other accelerations keep 0.32 / acceleration.
STANDARD_CENTER_FRACTIONS = {4: 0.08, 8: 0.04}
NORMALISATION_PERCENTILE = 99.5
# ESPIRiT's smallest kernel (3) needs a calibration region wider than itself.
MIN_CALIBRATION_LINES = 4


def default_center_fraction(acceleration: int) -> float:
    return STANDARD_CENTER_FRACTIONS.get(acceleration, 0.32 / acceleration)


def parse_slices(text: str | None, num_slices: int) -> range:
    """``"a:b"`` (python semantics, negative allowed) or ``"k"`` -> a non-empty range of slice indices."""
    if text is None:
        return range(num_slices)
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            chosen = range(num_slices)[slice(int(start) if start else None, int(stop) if stop else None)]
        else:
            index = int(text)
            chosen = range(num_slices)[index:index + 1 if index != -1 else None]
    except ValueError:
        raise ValueError(f"--slices: expected 'a:b' or an index, got {text!r}") from None
    if len(chosen) == 0:
        raise ValueError(f"--slices {text!r} selects no slice of the {num_slices} in the scan")
    return chosen


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def estimate_noise_sigma(kspace: np.ndarray, mask: np.ndarray, edge_fraction: float = 1 / 16) -> float:
    """Per-component noise std of complex k-space from its periphery.

    Uses the outer ``edge_fraction`` of readout rows in the sampled columns, where the object's signal is
    negligible: for complex Gaussian noise of per-component std ``s``, ``|z|`` is Rayleigh with median
    ``s sqrt(2 ln 2)``. The median is robust to the little signal left there.
    """
    rows = max(1, int(round(kspace.shape[-2] * edge_fraction)))
    periphery = np.concatenate([kspace[..., :rows, :], kspace[..., -rows:, :]], axis=-2)[..., mask]
    return float(np.median(np.abs(periphery)) / math.sqrt(2 * math.log(2)))


@dataclass
class SliceProblem:
    """One slice ready for a solver: the normalised problem and what is needed to undo the normalisation."""

    problem: InverseProblem
    scale: float
    sigma_kspace: float
    zero_filled: np.ndarray          # magnitude, cropped to the recon size, original units


def build_slice_problem(kspace: np.ndarray, mask: np.ndarray, recon_size: tuple[int, int], *,
                        device: torch.device, coil_maps: np.ndarray | None = None,
                        min_relative_sigma: float = 1e-4) -> SliceProblem:
    """k-space ``(coils, H, W)`` complex64 and a column mask ``(W,)`` -> a normalised :class:`SliceProblem`."""
    mask_t = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    k = torch.from_numpy(np.ascontiguousarray(kspace)).to(device)
    k = torch.where(mask_t, k, torch.zeros((), dtype=k.dtype, device=device))    # exact zeros, never -0.0
    if kspace.shape[0] == 1 and coil_maps is None:
        operator = CartesianMRI(mask=mask_t, img_size=tuple(kspace.shape[-2:]))
        y = complex_to_real(k[None, 0])                                      # (1, 2, H, W)
    else:
        maps = torch.from_numpy(coil_maps).to(device)[None]
        operator = SenseMRI(mask=mask_t, coil_maps=maps)
        y = complex_to_real(k[None])                                         # (1, 2, C, H, W)
    sigma_kspace = estimate_noise_sigma(np.where(mask, kspace, 0), mask)
    # A noiseless (synthetic) scan would give sigma 0; keep the likelihood finite and say so.
    sigma_floor = min_relative_sigma * float(np.abs(kspace).max())
    if sigma_kspace < sigma_floor:
        log.info("k-space noise estimate %.3g is below the floor %.3g; using the floor", sigma_kspace, sigma_floor)
        sigma_kspace = sigma_floor
    # Same rule as the priors' training data: the 99.5th-percentile magnitude of the zero-filled image is 1.
    problem, scale = normalise(InverseProblem(operator, y, sigma_kspace), percentile=NORMALISATION_PERCENTILE)
    zero_filled = real_to_complex(operator.A_adjoint(y))[0]
    cropped = center_crop(zero_filled, recon_size).abs().cpu().numpy()
    return SliceProblem(problem, scale, sigma_kspace, cropped)


@dataclass
class ReconstructionRequest:
    scan: str
    solver: str
    out: str
    acceleration: int = 4
    center_fraction: float | None = None
    mask_kind: str = "random"
    slices: str | None = None
    device: str = "auto"
    seed: int = 0
    png: bool = False
    prior: str | None = None
    overrides: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class ReconstructionReport:
    out: Path
    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray | None
    metrics: dict | None
    zero_filled_metrics: dict | None
    seconds: float
    figure: Path | None = None

    def summary_lines(self) -> list[str]:
        lines = [f"wrote {self.out} ({self.reconstruction.shape[0]} slices, {self.seconds:.1f} s)"]
        if self.metrics is not None:
            for label, values in (("zero-filled", self.zero_filled_metrics), ("reconstruction", self.metrics)):
                lines.append(f"{label:>15}: NMSE {values['nmse']:.4f}  PSNR {values['psnr']:.2f} dB  "
                             f"SSIM {values['ssim']:.4f}")
            lines.append(f"metrics protocol: {metrics.PROTOCOL}")
        else:
            lines.append("no target in the file: metrics not computed")
        if self.figure is not None:
            lines.append(f"wrote {self.figure}")
        return lines


def _scan_mask(scan, request: ReconstructionRequest, width: int, height: int) -> tuple[np.ndarray, dict]:
    """The file's own test-set mask, or fastMRI's retrospective mask seeded by the file name."""
    if scan.mask is not None:
        info = {"mask_source": "file", "acceleration": scan.acceleration}
        return np.asarray(scan.mask, dtype=bool), info
    center_fraction = request.center_fraction or default_center_fraction(request.acceleration)
    padding = scan.header.padding if scan.header is not None else None
    mask = make_mask(request.mask_kind, shape=(height, width), acceleration=request.acceleration,
                     center_fraction=center_fraction, seed=Path(request.scan).name, padding=padding)
    info = {"mask_source": f"fastMRI {request.mask_kind} mask seeded by file name",
            "acceleration": request.acceleration, "center_fraction": center_fraction}
    return mask.numpy().astype(bool), info


def _calibration_width(mask: np.ndarray) -> int:
    """Width of the contiguous sampled block around the centre column (the auto-calibration region)."""
    centre = len(mask) // 2
    left = right = centre
    while left > 0 and mask[left - 1]:
        left -= 1
    while right < len(mask) - 1 and mask[right + 1]:
        right += 1
    return right - left + 1 if mask[centre] else 0


def reconstruct_scan(request: ReconstructionRequest) -> ReconstructionReport:
    """Run ``request.solver`` on the chosen slices of ``request.scan``; nothing is written."""
    start = time.perf_counter()
    device = resolve_device(request.device)
    entry = get_sampler(request.solver)
    sampler = entry.factory
    overrides = parse_overrides(sampler, list(request.overrides), request.solver)
    prior = None
    if entry.metadata.get("kind") != "classical":
        from invdiff.priors.loading import load_prior
        prior = load_prior(request.prior or "brain-mri-complex", device=device)
    with read_scan(request.scan) as scan:
        chosen = parse_slices(request.slices, scan.num_slices)
        first = scan.kspace(chosen[0])
        mask, mask_info = _scan_mask(scan, request, first.shape[-1], first.shape[-2])
        calibration = _calibration_width(mask)
        if scan.is_multicoil and calibration < MIN_CALIBRATION_LINES:
            raise ValueError(f"{request.scan}: the mask has {calibration} contiguous centre lines; ESPIRiT "
                             f"needs at least {MIN_CALIBRATION_LINES} (raise --center-fraction)")
        recon_size = scan.recon_size
        outputs, zero_filled, targets = [], [], []
        scales, sigmas = [], []
        nfe = 0
        iterator = chosen
        if request.progress:
            from tqdm.auto import tqdm
            iterator = tqdm(chosen, desc=f"{request.solver} {Path(request.scan).name}", unit="slice",
                            disable=None)
        for index in iterator:
            kspace = scan.kspace(index)
            maps = None
            if scan.is_multicoil:
                maps = estimate_coil_maps(np.where(mask, kspace, 0), calib_width=min(24, calibration),
                                          cache_key=(str(request.scan), index, calibration))
            item = build_slice_problem(kspace, mask, recon_size, device=device, coil_maps=maps)
            generator = torch.Generator(device=device).manual_seed(request.seed * 1_000_003 + index)
            result = sampler(item.problem.to(device), prior, generator=generator, **overrides)
            nfe += int(result.diagnostics.get("nfe", 0))
            # Outside the coil-map support A is blind: the image is defined as zero there (ESPIRiT convention).
            x = restrict_to_support(item.problem.operator, result.x.detach())
            image = real_to_complex(x.to(torch.float32))[0] * item.scale
            outputs.append(center_crop(image, recon_size).abs().cpu().numpy())
            zero_filled.append(item.zero_filled)
            scales.append(item.scale)
            sigmas.append(item.sigma_kspace)
            target = scan.target(index)
            targets.append(target)
    reconstruction = np.stack(outputs).astype(np.float32)
    zero_filled_volume = np.stack(zero_filled).astype(np.float32)
    target_volume = None if any(t is None for t in targets) else np.stack(targets).astype(np.float32)
    scores = zf_scores = None
    if target_volume is not None:
        scores = metrics.evaluate(target_volume, reconstruction)
        zf_scores = metrics.evaluate(target_volume, zero_filled_volume)
    report = ReconstructionReport(Path(request.out), reconstruction, zero_filled_volume, target_volume, scores,
                                  zf_scores, time.perf_counter() - start)
    report.attrs = {
        "solver": request.solver, "hyperparameters": json.dumps(overrides, sort_keys=True), "seed": request.seed,
        "slices": f"{chosen.start}:{chosen.stop}", "device": str(device), "nfe": nfe,
        "normalisation": f"y / p{NORMALISATION_PERCENTILE} of zero-filled magnitude",
        "scales": json.dumps(scales), "sigma_kspace_estimates": json.dumps(sigmas),
        "noise_estimate": "Rayleigh median of the outer 1/16 readout rows in sampled columns",
        "invdiff_version": invdiff.__version__, **mask_info,
    }
    if prior is not None:
        report.attrs["prior"] = getattr(prior, "name", request.prior or "brain-mri-complex")
        report.attrs["prior_sha256"] = getattr(prior, "sha256", "")
    if scores is not None:
        report.attrs.update({f"metric_{k}": v for k, v in scores.items() if k != "protocol"})
        report.attrs["metrics_protocol"] = metrics.PROTOCOL
    return report


def reconstruct_scan_to_file(request: ReconstructionRequest) -> ReconstructionReport:
    """:func:`reconstruct_scan`, then the submission file (and figure) written atomically."""
    out = Path(request.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    report = reconstruct_scan(request)
    write_reconstruction(out, report.reconstruction, attrs=report.attrs)
    if request.png:
        from invdiff.plotting import save_reconstruction_figure
        figure = out.with_suffix(".png")
        save_reconstruction_figure(figure, target=report.target, zero_filled=report.zero_filled,
                                   reconstruction=report.reconstruction, title=f"{request.solver} on {Path(request.scan).name}")
        report.figure = figure
    return report
