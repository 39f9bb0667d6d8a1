"""Volumes as normalised problems: 3-D sparse-view / limited-angle CT and multi-slice multi-coil MRI.

The conventions of :mod:`invdiff.tasks.base`, one dimension up: a volume task holds one :class:`TaskImage` whose
problem's operator takes ``(1, C, D, H, W)`` (a volume operator from :mod:`invdiff.operators.volume`), whose
``target`` is the ``(D, H, W)`` float32 volume in the original units and whose ``to_image`` maps the solver output
to that ``(D, H, W)`` volume. ``spacing_mm`` is the in-plane spacing (what a 2-D prior is told);
``info["voxel_size_mm"]`` is the (z, y, x) voxel size NIfTI output needs.

* :func:`ct_volume_task` - a 3-D array on the CT prior's fixed scale ``(HU + 1000) / 2000``, every axial slice
  projected with the same angles (``views`` equispaced in [0, 180), or a wedge with ``wedge_degrees``); noise
  ``sigma_y = noise_fraction * RMS(A x)``; not rescaled (scale 1), as :func:`invdiff.tasks.ct_task`.
* :func:`mri_volume_task` - a complex (or magnitude) volume simulated as multi-coil k-space (3-D birdcage maps
  normalised to ``sum_c |S_c|^2 = 1``, a fastMRI random column mask per slice, or one for all), normalised by the
  99.5th percentile of the zero-filled magnitude volume (the priors' rule, one scale for the whole volume).
* :func:`fastmri_volume_task` - every slice of a multi-coil fastMRI file (ESPIRiT maps per slice, the file's mask or
  fastMRI's mask seeded by the file name, the same for every slice, as :func:`invdiff.tasks.scan_slice` does), one
  scale for the volume; output: the recon-size magnitude volume, zero outside the coil support.

Test volumes: :func:`shepp_logan_3d` and :func:`ct_phantom_3d` (procedural, seeded; the CT prior's HU style), and
:func:`example4d_first_frame` (nibabel's held-out EPI, never used in training).

    >>> task = ct_volume_task(ct_phantom_3d(32, seed=7), views=8)
    >>> solution = solve(task.images[0], "dds", prior, task.hyperparameters("dds"))
    >>> solution.image.shape                      # (32, 32, 32)
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
import torch

from invdiff.errors import InputError
from invdiff.problem import InverseProblem
from invdiff.tasks.base import Task, TaskImage, image_generator

log = logging.getLogger(__name__)

__all__ = ["ct_volume_task", "mri_volume_task", "fastmri_volume_task", "volume_output", "shepp_logan_3d",
           "ct_phantom_3d", "example4d_first_frame", "volume_planes", "plane_metrics", "write_nifti",
           "birdcage_maps_3d"]

PLANES = ("axial", "coronal", "sagittal")


# ---- output mappings -------------------------------------------------------------------------------------
def real_volume(x: torch.Tensor, *, scale: float) -> np.ndarray:
    """``x * scale`` of a (1, 1, D, H, W) real volume (CT): (D, H, W) float32."""
    return (x.detach().to(torch.float32)[0, 0] * scale).cpu().numpy().astype(np.float32)


def magnitude_volume(x: torch.Tensor, *, scale: float, crop: tuple[int, int] | None = None,
                     support: torch.Tensor | None = None) -> np.ndarray:
    """``|x| * scale`` of a (1, 2, D, H, W) complex volume, zero outside ``support`` ((1|B, 1, D, H, W) bool),
    each slice centre cropped to ``crop`` (fastMRI's targets): (D, h, w) float32."""
    from invdiff.operators.base import zero_outside

    x = zero_outside(x.detach(), support).to(torch.float32)
    volume = torch.sqrt(x[0, 0] ** 2 + x[0, 1] ** 2) * scale
    if crop is not None:
        height, width = volume.shape[-2:]
        top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
        volume = volume[:, top:top + crop[0], left:left + crop[1]]
    return volume.cpu().numpy().astype(np.float32)


def volume_output(task: Task, x: torch.Tensor) -> np.ndarray:
    """The (D, H, W) float32 volume in the task's original units from a solver's output ``x`` (1, C, D, H, W)
    (what ``invdiff reconstruct --3d`` writes to the h5 ``reconstruction`` key and to NIfTI)."""
    return task.images[0].to_image(x)


# ---- metrics by plane ------------------------------------------------------------------------------------
def volume_planes(volume: np.ndarray, plane: str) -> np.ndarray:
    """The (D, H, W) volume as a stack of 2-D images of ``plane``: axial (D, H, W), coronal (H, D, W), sagittal
    (W, D, H)."""
    if plane == "axial":
        return volume
    if plane == "coronal":
        return np.ascontiguousarray(volume.transpose(1, 0, 2))
    if plane == "sagittal":
        return np.ascontiguousarray(volume.transpose(2, 0, 1))
    raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")


def plane_metrics(target: np.ndarray, volume: np.ndarray, *, maxval: float | None = None) -> dict:
    """PSNR and SSIM of ``volume`` against ``target`` ((D, H, W)) in each plane, as DiffusionMBIR reports them: the
    mean over the 2-D images of the plane of each image's PSNR / SSIM, with one ``maxval`` for the volume (default
    the target's maximum). Images whose target is all zero (air around a head or a phantom) are left out: their
    PSNR is unbounded and would dominate the mean. Also ``volume_psnr`` (fastMRI's per-volume PSNR, plane
    independent) and the number of images scored per plane.
    Returns ``{"psnr": {plane: dB}, "ssim": {plane: value}, "images": {plane: n}, "volume_psnr": dB}``."""
    from invdiff.metrics import psnr, ssim

    target, volume = np.asarray(target, dtype=np.float64), np.asarray(volume, dtype=np.float64)
    maxval = float(target.max()) if maxval is None else float(maxval)
    out = {"psnr": {}, "ssim": {}, "images": {}, "volume_psnr": float(psnr(target, volume, maxval=maxval))}
    for plane in PLANES:
        gt, pred = volume_planes(target, plane), volume_planes(volume, plane)
        keep = gt.reshape(len(gt), -1).max(axis=1) > 0
        gt, pred = gt[keep], pred[keep]
        mse = ((gt - pred) ** 2).reshape(len(gt), -1).mean(axis=1)
        out["images"][plane] = int(keep.sum())
        out["psnr"][plane] = float(np.mean(10 * np.log10(maxval ** 2 / np.maximum(mse, 1e-30))))
        # SSIM's 7 x 7 window needs 7 x 7 images: a thin volume has no coronal / sagittal SSIM (NaN)
        out["ssim"][plane] = float(ssim(gt, pred, maxval=maxval)) if min(gt.shape[-2:]) >= 7 else float("nan")
    return out


def write_nifti(path: str | Path, volume: np.ndarray, voxel_size_mm) -> Path:
    """Write a (D, H, W) volume as NIfTI-1 with the voxel size (z, y, x) in mm: nibabel's axis order is (x, y, z),
    so the array is transposed to (W, H, D) and the affine is diag(x, y, z, 1). Atomic (temporary name, rename)."""
    import nibabel

    path = Path(path)
    dz, dy, dx = (float(v) for v in voxel_size_mm)
    image = nibabel.Nifti1Image(np.ascontiguousarray(np.asarray(volume, dtype=np.float32).transpose(2, 1, 0)),
                                np.diag([dx, dy, dz, 1.0]))
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    temporary = path.with_name(path.name[:-len(suffix)] + ".partial" + suffix)
    nibabel.save(image, str(temporary))
    temporary.replace(path)
    return path


# ---- test volumes ----------------------------------------------------------------------------------------
# Modified 3-D Shepp-Logan (Kak & Slaney's ellipsoids, Toft's modified intensities): value, semi-axes (a, b, c),
# centre (x0, y0, z0), rotation phi about z in degrees.
_SHEPP_LOGAN_3D = (
    (1.0, 0.69, 0.92, 0.81, 0.0, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.78, 0.0, -0.0184, 0.0, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.22, 0.0, 0.0, -18.0),
    (-0.2, 0.16, 0.41, 0.28, -0.22, 0.0, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.41, 0.0, 0.35, -0.15, 0.0),
    (0.1, 0.046, 0.046, 0.05, 0.0, 0.1, 0.25, 0.0),
    (0.1, 0.046, 0.046, 0.05, 0.0, -0.1, 0.25, 0.0),
    (0.1, 0.046, 0.023, 0.05, -0.08, -0.605, 0.0, 0.0),
    (0.1, 0.023, 0.023, 0.02, 0.0, -0.606, 0.0, 0.0),
    (0.1, 0.023, 0.046, 0.02, 0.06, -0.605, 0.0, 0.0),
)


def _grid(size: int, supersample: int, step: float, centre=(0.0, 0.0, 0.0)):
    n = size * supersample
    r = (np.arange(n) + 0.5) / supersample - size / 2
    z, y, x = np.meshgrid(centre[2] + r * step, centre[1] + r * step, centre[0] + r * step, indexing="ij")
    return z, y, x


def _ellipsoid(x, y, z, x0, y0, z0, a, b, c, phi_deg=0.0):
    t = math.radians(phi_deg)
    u = (x - x0) * math.cos(t) + (y - y0) * math.sin(t)
    v = -(x - x0) * math.sin(t) + (y - y0) * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 + ((z - z0) / c) ** 2 <= 1


def _box_average(volume: np.ndarray, size: int, supersample: int) -> np.ndarray:
    s = supersample
    return volume.reshape(size, s, size, s, size, s).mean(axis=(1, 3, 5))


def shepp_logan_3d(size: int, *, supersample: int = 2) -> np.ndarray:
    """The modified 3-D Shepp-Logan phantom (D, H, W) = (size,) * 3, float32 in [0, 1] (rows: y, down; z: slices)."""
    z, y, x = _grid(size, supersample, 2.0 / size)
    volume = np.zeros(z.shape)
    for value, a, b, c, x0, y0, z0, phi in _SHEPP_LOGAN_3D:
        volume += value * _ellipsoid(x, -y, z, x0, y0, z0, a, b, c, phi)
    return np.clip(_box_average(volume, size, supersample), 0, 1).astype(np.float32)


def _hu(value: float) -> float:
    return min(max((value + 1000.0) / 2000.0, 0.0), 1.0)


def ct_phantom_3d(size: int, *, seed: int, fov: float | None = None, supersample: int = 2) -> np.ndarray:
    """A procedural 3-D CT phantom (D, H, W) = (size,) * 3 on the CT prior's scale (HU + 1000) / 2000, float32.

    The body is an elliptic cylinder along z (fat layer, soft tissue), holding random ellipsoid organs, lungs /
    gas, bones (cortical shell around marrow, elongated along z) and small dense details: the 3-D analogue of the
    CT prior's 2-D training phantoms (:class:`invdiff.datasets.training.CTPhantomSource`), with the same HU ranges.
    ``fov``: the body's field of view in voxels (default ``max(128, 2 size)``, inside the prior's training range
    128-256); the volume is a ``size^3`` window around a random centre inside the body. ``seed``: a fresh integer
    (the prior was trained on 2-D phantoms from a torch generator; this uses numpy's ``default_rng(seed)``).
    """
    rng = np.random.default_rng(int(seed))
    rnd = rng.uniform
    fov = float(max(128, 2 * size) if fov is None else fov)
    step = 2.0 / fov
    body_a, body_b, body_phi = rnd(0.6, 0.95), rnd(0.45, 0.85), rnd(-15, 15)
    radius, angle = math.sqrt(rnd(0, 1)) * 0.5, rnd(0, 2 * math.pi)
    centre = (radius * body_a * math.cos(angle), radius * body_b * math.sin(angle), rnd(-0.3, 0.3))
    z, y, x = _grid(size, supersample, step, centre)
    volume = np.zeros(z.shape)
    big = 100.0
    body = _ellipsoid(x, y, z, 0, 0, 0, body_a, body_b, big, body_phi)
    fat = rnd(0.02, 0.08)
    inner = _ellipsoid(x, y, z, 0, 0, 0, body_a - fat, body_b - fat, big, body_phi)
    volume[body] = _hu(rnd(-120, -80))
    volume[inner] = _hu(rnd(20, 60))
    near = lambda scale: (rnd(-scale, scale) + centre[0], rnd(-scale, scale) + centre[1],  # noqa: E731
                          rnd(-scale, scale) + centre[2])
    window = size * step / 2                        # half the window's side in body units
    for _ in range(int(rnd(0, 3))):                 # lungs / bowel gas
        x0, y0, z0 = near(window)
        volume[_ellipsoid(x, y, z, x0, y0, z0, rnd(0.1, 0.3), rnd(0.1, 0.35), rnd(0.2, 0.6), rnd(0, 180)) & inner] = \
            _hu(rnd(-900, -700))
    for _ in range(int(rnd(4, 10))):                # organs
        x0, y0, z0 = near(window)
        volume[_ellipsoid(x, y, z, x0, y0, z0, rnd(0.05, 0.25), rnd(0.05, 0.25), rnd(0.05, 0.3), rnd(0, 180))
               & inner] = _hu(rnd(-50, 150))
    for _ in range(int(rnd(1, 5))):                 # bones: long along z, cortical shell around marrow
        x0, y0, z0 = near(window)
        a, b, c, phi = rnd(0.03, 0.1), rnd(0.03, 0.1), rnd(0.3, 1.0), rnd(0, 180)
        volume[_ellipsoid(x, y, z, x0, y0, z0, a, b, c, phi) & inner] = _hu(rnd(700, 1000))
        t = rnd(0.3, 0.8)
        volume[_ellipsoid(x, y, z, x0, y0, z0, a * t, b * t, c * t, phi) & inner] = _hu(rnd(150, 400))
    for _ in range(int(rnd(2, 10))):                # small dense details: calcifications
        x0, y0, z0 = near(window)
        r = rnd(1, 2.5) * step
        volume[_ellipsoid(x, y, z, x0, y0, z0, r, r, r) & inner] = _hu(rnd(500, 1000))
    return np.clip(_box_average(volume, size, supersample), 0, 1).astype(np.float32)


def example4d_first_frame() -> tuple[np.ndarray, tuple[float, float, float]]:
    """nibabel's ``example4d.nii.gz``, first frame, as an axial (D, H, W) = (24, 96, 128) float32 volume and its
    voxel size (z, y, x) = (2.2, 2, 2) mm. Held out: the training sources never read this file."""
    import os

    import nibabel
    from nibabel.testing import data_path

    image = nibabel.load(os.path.join(data_path, "example4d.nii.gz"))
    frame = np.asarray(image.dataobj[..., 0], dtype=np.float32)          # (x, y, z)
    zooms = image.header.get_zooms()
    return np.ascontiguousarray(frame.transpose(2, 1, 0)[:, ::-1]), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


# ---- CT ----------------------------------------------------------------------------------------------------
def ct_volume_task(volume: np.ndarray, views: int, *, wedge_degrees: float | None = None,
                   noise_fraction: float = 0.01, seed: int = 0, device="cpu", name: str | None = None,
                   voxel_size_mm=(1.0, 1.0, 1.0), index: int = 0) -> Task:
    """Parallel-beam CT of every axial slice of ``volume`` (D, H, H), on the CT prior's fixed scale.

    ``views`` angles equispaced in [0, 180) (sparse view), or in [0, wedge_degrees) (limited angle). ``y = A x +
    sigma_y n`` with ``sigma_y = noise_fraction * RMS(A x)`` over the volume, noise from the seed rule's generator
    of image ``index``. Not rescaled (scale 1). Baseline: FBP of every slice.
    """
    from invdiff.operators.volume import VolumeParallelBeamCT, limited_angles, sparse_view_angles

    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or volume.shape[1] != volume.shape[2]:
        raise InputError(f"a CT volume must be (D, H, H) with square slices, got shape {volume.shape}")
    if isinstance(views, bool) or int(views) != views or views < 1:
        raise InputError(f"views must be a positive integer, got {views!r}")
    device = torch.device(device)
    angles = sparse_view_angles(views) if wedge_degrees is None else limited_angles(wedge_degrees, views)
    operator = VolumeParallelBeamCT(volume.shape[-1], angles=angles, depth=volume.shape[0]).to(device)
    clean = operator.A(torch.from_numpy(volume)[None, None].to(device))
    sigma_y = noise_fraction * float(clean.pow(2).mean().sqrt())
    if not sigma_y > 0:
        raise InputError(f"the CT volume projects to an all-zero sinogram (noise_fraction {noise_fraction})")
    noise = torch.randn(clean.shape, generator=image_generator(seed, index, device), device=device, dtype=clean.dtype)
    problem = InverseProblem(operator, clean + sigma_y * noise, sigma_y)
    image = TaskImage(problem, volume, functools.partial(real_volume, scale=1.0), index=index,
                      spacing_mm=float(voxel_size_mm[1]),
                      info={"scale": 1.0, "sigma_y": sigma_y, "voxel_size_mm": list(map(float, voxel_size_mm))})
    geometry = "equispaced in [0, 180) degrees" if wedge_degrees is None else f"limited angle [0, {wedge_degrees})"
    info = {"views": int(views), "angles": geometry, "volume_shape": list(volume.shape),
            "noise": f"sigma_y = {noise_fraction} x RMS of the clean sinogram",
            "normalisation": "none: fixed CT scale (HU + 1000) / 2000 in [0, 1]",
            "voxel_size_mm": list(map(float, voxel_size_mm))}
    return Task(name or f"ct3d-{int(views)}", "ct", [image], baseline="fbp", info=info)


# ---- MRI ---------------------------------------------------------------------------------------------------
def birdcage_maps_3d(num_coils: int, shape: tuple[int, int, int]) -> np.ndarray:
    """3-D birdcage sensitivities (sigpy, coils on a ring, with their z dependence) normalised to ``sum_c |S_c|^2 =
    1``: complex64 (coils, D, H, W)."""
    import sigpy.mri

    maps = sigpy.mri.birdcage_maps((int(num_coils), *map(int, shape)))
    maps = maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))
    return maps.astype(np.complex64)


def _percentile_scale(operator, y: torch.Tensor, percentile: float) -> float:
    zero_filled = operator.A_adjoint(y)
    magnitude = torch.sqrt(zero_filled[:, 0] ** 2 + zero_filled[:, 1] ** 2)
    return float(torch.quantile(magnitude.reshape(-1).double().cpu(), percentile / 100))


def mri_volume_task(volume: np.ndarray, acceleration: int, *, num_coils: int = 8, center_fraction: float | None = None,
                    mask_per_slice: bool = True, noise_fraction: float = 0.01, phase_amplitude: float = 0.0,
                    seed: int = 0, device="cpu", name: str | None = None, voxel_size_mm=(1.0, 1.0, 1.0),
                    index: int = 0) -> Task:
    """Multi-coil multi-slice MRI of ``volume`` (D, H, W) (magnitude, or complex), simulated and normalised.

    ``y_{c,d} = M_d F S_{c,d} x_d + n``: 3-D birdcage maps (:func:`birdcage_maps_3d`), fastMRI random column masks
    (acceleration, centre fraction; a different mask per slice, seeded by the slice index, or one for all),
    complex Gaussian noise of std ``noise_fraction * max|x|`` per real entry. A magnitude volume gets a smooth
    random phase of peak ``phase_amplitude`` (0: real). Normalised by the 99.5th percentile of the zero-filled
    magnitude volume; the output mapping is the magnitude in the original units.
    """
    from invdiff.operators.fft import complex_to_real
    from invdiff.operators.masks import make_mask
    from invdiff.operators.volume import MultiSliceSenseMRI
    from invdiff.tasks.scan import NORMALISATION_PERCENTILE, default_center_fraction

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"an MRI volume must be (D, H, W), got shape {volume.shape}")
    depth, height, width = volume.shape
    device = torch.device(device)
    if not np.iscomplexobj(volume) and phase_amplitude > 0:
        from invdiff.datasets.synthetic import smooth_random_phase
        volume = volume * np.exp(1j * smooth_random_phase(volume.shape, np.random.RandomState(seed), phase_amplitude))
    image = torch.from_numpy(np.ascontiguousarray(volume.astype(np.complex64)))
    center_fraction = center_fraction or default_center_fraction(int(acceleration))
    masks = torch.stack([make_mask("random", shape=(height, width), acceleration=int(acceleration),
                                   center_fraction=center_fraction, seed=(int(seed), d if mask_per_slice else 0))
                         for d in range(depth)])
    maps = torch.from_numpy(birdcage_maps_3d(num_coils, (depth, height, width)))[None]
    operator = MultiSliceSenseMRI(masks, maps).to(device)
    clean = operator.A(complex_to_real(image[None]).to(device))
    sigma_y = noise_fraction * float(np.abs(volume).max())
    noise = torch.randn(clean.shape, generator=image_generator(seed, index, device), device=device, dtype=clean.dtype)
    y = torch.where(clean != 0, clean + sigma_y * noise, clean)            # exact zeros where not sampled stay zero
    scale = _percentile_scale(operator, y, NORMALISATION_PERCENTILE)
    problem = InverseProblem(operator, y / scale, sigma_y / scale)
    target = np.abs(volume).astype(np.float32)
    task_image = TaskImage(problem, target, functools.partial(magnitude_volume, scale=scale), index=index,
                           spacing_mm=float(voxel_size_mm[1]),
                           info={"scale": scale, "sigma_y": sigma_y, "sigma_y_normalised": sigma_y / scale,
                                 "voxel_size_mm": list(map(float, voxel_size_mm))})
    info = {"acceleration": int(acceleration), "center_fraction": center_fraction, "num_coils": int(num_coils),
            "mask": "fastMRI random column mask " + ("per slice" if mask_per_slice else "shared by all slices"),
            "sampled_fraction": float(masks.float().mean()), "volume_shape": list(volume.shape),
            "normalisation": "y / p99.5 of the zero-filled magnitude volume",
            "voxel_size_mm": list(map(float, voxel_size_mm))}
    return Task(name or f"mri3d-{int(acceleration)}x", "mri", [task_image], baseline="zero-filled", info=info)


def fastmri_volume_task(path: str | Path, *, acceleration: int = 4, center_fraction: float | None = None,
                        mask_kind: str = "random", slices: str | None = None, device="cpu") -> Task:
    """Every chosen slice of a multi-coil fastMRI file as one volume problem (:class:`MultiSliceSenseMRI`).

    Per slice exactly :func:`invdiff.tasks.scan_slice` (the file's own mask or fastMRI's seeded by the file name,
    ESPIRiT maps, k-space noise estimate); then one scale for the volume (the 99.5th percentile of the zero-filled
    magnitude volume) and one ``sigma_y`` (the largest slice estimate). The output mapping crops each slice to the
    recon size and zeroes voxels outside the coil support. Voxel size from the ISMRMRD header (in-plane: encoded
    field of view over matrix; z: the encoded field of view's z extent, 1 mm if absent).
    """
    from invdiff.datasets.fastmri import read_scan
    from invdiff.operators.volume import MultiSliceSenseMRI
    from invdiff.tasks.scan import NORMALISATION_PERCENTILE, parse_slices, scan_mask, scan_slice

    with read_scan(path) as scan:
        if not scan.is_multicoil:
            raise InputError(f"{path}: a volume task needs a multi-coil file (SENSE with ESPIRiT maps)")
        mask, mask_info = scan_mask(scan, acceleration=acceleration, center_fraction=center_fraction,
                                    mask_kind=mask_kind)
        chosen = list(parse_slices(slices, scan.num_slices))
        images = [scan_slice(scan, index, mask, device="cpu") for index in chosen]
        targets = [image.target for image in images]
        recon_size = scan.recon_size
        header = scan.header
    ys = torch.cat([image.problem.y * image.info["scale"] for image in images])          # (D, 2, C, H, W), file units
    maps = torch.cat([image.problem.operator.coil_maps for image in images])              # (D, C, H, W)
    sigma = max(image.info["sigma_kspace"] for image in images)
    operator = MultiSliceSenseMRI(torch.from_numpy(np.ascontiguousarray(mask)), maps.permute(1, 0, 2, 3)[None])
    operator = operator.to(torch.device(device))
    y = ys.permute(1, 2, 0, 3, 4)[None].to(torch.device(device))                          # (1, 2, C, D, H, W)
    scale = _percentile_scale(operator, y, NORMALISATION_PERCENTILE)
    problem = InverseProblem(operator, y / scale, sigma / scale)
    spacing = images[0].spacing_mm
    fov = getattr(header, "encoded_fov_mm", None)
    z_mm = float(fov[2]) if fov is not None and len(fov) > 2 and fov[2] > 0 else 1.0
    voxel = [z_mm, spacing or 1.0, spacing or 1.0]
    target = None if any(t is None for t in targets) else np.stack(targets).astype(np.float32)
    task_image = TaskImage(problem, target, functools.partial(magnitude_volume, scale=scale, crop=recon_size,
                                                              support=operator.image_support()),
                           index=0, spacing_mm=spacing,
                           info={"scale": scale, "sigma_kspace": sigma, "sigma_y_normalised": sigma / scale,
                                 "voxel_size_mm": voxel, "slices": chosen})
    info = {**mask_info, "scan": str(path), "slices": chosen, "voxel_size_mm": voxel,
            "normalisation": "y / p99.5 of the zero-filled magnitude volume (one scale per volume)"}
    return Task(f"{mask_info.get('acceleration', acceleration)}x-3d", "mri", [task_image], baseline="zero-filled",
                info=info)
