"""Synthetic data in real formats: fake fastMRI files from any image, and CT phantoms.

:func:`write_fake_fastmri` simulates a Cartesian acquisition of a known image and writes it exactly as
fastMRI stores scans (see :mod:`invdiff.datasets.fastmri`):

    x = |image| e^{i phi}            smooth random phase phi (unless the image is already complex)
    x_enc = pad_H(x)                 readout oversampled: the image fills the centre of an (o H_r, W) grid
    k_c = F(S_c x_enc) + n_c         S_c birdcage coil maps (sum_c |S_c|^2 = 1), F centred orthonormal DFT,
                                     n_c complex Gaussian, real and imaginary parts each N(0, noise_level^2)
    k = 0 outside [left, right)      columns never acquired (the header's encoding limits)
    target = sqrt(sum_c |crop(F^H k_c)|^2)   fastMRI's reference image of the *written* k-space

so reading the file back and recomputing the reference image reproduces ``reconstruction_rss`` exactly.
Single-coil files (``multicoil=False``) have ``k = F x_enc + n`` and ``reconstruction_esc``.

    >>> scan = write_fake_fastmri("fake.h5", image, num_coils=8, noise_level=1e-3, seed=0)
    >>> scan.coil_maps.shape        # (8, 2 H_r, W_r), the true maps, for tests
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import h5py
import numpy as np
import torch

from invdiff.datasets.fastmri import reference_image
from invdiff.datasets.ismrmrd import ISMRMRD_NAMESPACE
from invdiff.io import atomic_path
from invdiff.operators.fft import fft2c

log = logging.getLogger(__name__)

__all__ = ["SyntheticScan", "write_fake_fastmri", "ismrmrd_header_xml", "smooth_random_phase", "ct_phantom",
           "CT_PHANTOM_KINDS"]

RandomSource = Union[int, np.random.RandomState, np.random.Generator]


@dataclass
class SyntheticScan:
    """What :func:`write_fake_fastmri` wrote, plus the ground truth it was simulated from.

    image: complex64 ``(slices, H_r, W_r)`` noiseless complex image; coil_maps: complex64
    ``(coils, H, W)`` true maps on the encoded grid (None single-coil); target: float32 ``(slices, H_r, W_r)``
    as written (None for test-set files); mask: bool ``(W,)`` for test-set files.
    """

    path: Path
    image: np.ndarray
    coil_maps: np.ndarray | None
    target: np.ndarray | None
    mask: np.ndarray | None
    noise_level: float
    padding: tuple[int, int]


def write_fake_fastmri(path: str | os.PathLike, image_or_volume, *, num_coils: int = 8, multicoil: bool = True,
                       readout_oversampling: int = 2, noise_level: float = 0.0, seed: RandomSource = 0,
                       acquisition: str = "AXT1", patient_id: str | None = None, test_set: bool = False,
                       acceleration: int = 4, center_fraction: float | None = None, mask_kind: str = "random",
                       kspace_padding: tuple[int, int] = (0, 0), phase_amplitude: float = np.pi,
                       coil_maps: np.ndarray | None = None, voxel_size_mm: Sequence[float] = (1.0, 1.0, 3.0),
                       extra_attrs: dict | None = None) -> SyntheticScan:
    """Simulate a scan of ``image_or_volume`` and write it as a fastMRI h5 file (atomically).

    image_or_volume: real ``(H_r, W_r)`` / ``(slices, H_r, W_r)`` magnitudes (a smooth random phase of
    peak ``phase_amplitude`` is added) or complex images (used as they are); the recon size is
    ``(H_r, W_r)`` and k-space is ``(slices, coils, readout_oversampling * H_r, W_r)`` complex64.
    ``noise_level``: std of the real and of the imaginary part of each k-space noise sample.
    ``seed``: an int, ``np.random.RandomState`` or ``np.random.Generator`` (phase, then noise).
    ``kspace_padding=(l, r)``: the first ``l`` and last ``r`` columns are never acquired (zero), and the
    header's ``kspace_encoding_step_1`` says so. ``test_set=True`` writes fastMRI's test format: k-space
    undersampled by ``invdiff.operators.masks.make_mask(mask_kind, ...)`` seeded by the file name, plus
    ``mask``, ``acceleration``, ``num_low_frequency`` and no target.
    ``coil_maps``: complex ``(coils, H, W)`` on the encoded grid instead of ``sigpy.mri.birdcage_maps``.
    ``extra_attrs``: more file attrs (e.g. provenance); values must be h5-storable.
    """
    rng = _random_state(seed)
    volume = _check_volume(image_or_volume)
    slices, recon_h, recon_w = volume.shape
    if int(readout_oversampling) != readout_oversampling or readout_oversampling < 1:
        raise ValueError(f"readout_oversampling must be an integer >= 1, got {readout_oversampling!r}")
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")
    height, width = int(readout_oversampling) * recon_h, recon_w
    left, right = _check_padding(kspace_padding, width)

    image = volume if np.iscomplexobj(volume) else volume * np.exp(1j * smooth_random_phase(volume.shape, rng,
                                                                                             phase_amplitude))
    image = image.astype(np.complex64)
    encoded = np.zeros((slices, height, width), dtype=np.complex64)
    top = (height - recon_h) // 2        # the same offset center_crop uses, so crop(x_enc) == x
    encoded[:, top:top + recon_h] = image

    maps = None
    if multicoil:
        maps = _coil_maps(coil_maps, num_coils, height, width)
        kspace = _fft2c(maps[None] * encoded[:, None])                      # (slices, coils, H, W)
    else:
        kspace = _fft2c(encoded)                                              # (slices, H, W)
    if noise_level > 0:
        noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
        kspace = kspace + noise_level * noise
    kspace = kspace.astype(np.complex64)
    kspace[..., :left] = 0
    kspace[..., right:] = 0

    name = Path(path).name
    attrs = {"acquisition": acquisition,
             "patient_id": patient_id or hashlib.sha256(f"invdiff-synthetic:{name}".encode()).hexdigest()}
    target = mask = None
    if test_set:
        mask, num_low = _test_mask(name, mask_kind, (height, width), acceleration, center_fraction, (left, right))
        kspace = np.where(mask, kspace, np.complex64(0))       # exactly zero where not sampled, never -0.0
        attrs.update(acceleration=int(acceleration), num_low_frequency=int(num_low))
    else:
        per_slice = kspace if multicoil else kspace[:, None]
        target = reference_image(per_slice, (recon_h, recon_w))
        attrs.update(max=float(target.max()), norm=float(np.linalg.norm(target)))
    attrs.update(extra_attrs or {})

    header = ismrmrd_header_xml(encoded_size=(height, width, 1), recon_size=(recon_h, recon_w, 1),
                                padding=(left, right), num_slices=slices, num_coils=maps.shape[0] if multicoil else 1,
                                voxel_size_mm=voxel_size_mm, readout_oversampling=int(readout_oversampling),
                                protocol=acquisition)
    _write_h5(Path(path), kspace, header, target, "reconstruction_rss" if multicoil else "reconstruction_esc",
              mask, attrs)
    log.info("wrote synthetic %s scan %s: kspace %s", "multi-coil" if multicoil else "single-coil", path,
             kspace.shape)
    return SyntheticScan(path=Path(path), image=image, coil_maps=maps, target=target, mask=mask,
                         noise_level=float(noise_level), padding=(left, right))


def ismrmrd_header_xml(*, encoded_size: Sequence[int], recon_size: Sequence[int], padding: tuple[int, int],
                       num_slices: int = 1, num_coils: int = 1, voxel_size_mm: Sequence[float] = (1.0, 1.0, 3.0),
                       readout_oversampling: int = 2, protocol: str = "AXT1",
                       field_strength_t: float = 3.0) -> bytes:
    """A minimal valid ISMRMRD header (UTF-8 XML) for a Cartesian 2-D multi-slice acquisition.

    ``encoded_size`` / ``recon_size``: ``(x, y, z)`` = (readout, phase, 1). ``padding=(left, right)``:
    acquired columns ``[left, right)``, written as ``kspace_encoding_step_1`` ``maximum = right - left - 1``
    and ``center = y // 2 - left`` (the inverse of fastMRI's padding formula).
    """
    (ex, ey, ez), (rx, ry, rz) = (tuple(int(v) for v in encoded_size), tuple(int(v) for v in recon_size))
    left, right = padding
    dy, dx, dz = (float(v) for v in voxel_size_mm)
    recon_fov = (rx * dy, ry * dx, dz)
    # The encoded field of view is larger along the oversampled readout only.
    encoded_fov = (recon_fov[0] * ex / rx, recon_fov[1] * ey / ry, dz)
    center = ey // 2 - left

    def size(x, y, z):
        return f"<matrixSize><x>{x}</x><y>{y}</y><z>{z}</z></matrixSize>"

    def fov(v):
        return f"<fieldOfView_mm><x>{v[0]:g}</x><y>{v[1]:g}</y><z>{v[2]:g}</z></fieldOfView_mm>"

    def limit(name, lo, hi, mid):
        return f"<{name}><minimum>{lo}</minimum><maximum>{hi}</maximum><center>{mid}</center></{name}>"

    xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<ismrmrdHeader xmlns="{ISMRMRD_NAMESPACE}">'
        f"<measurementInformation><patientPosition>HFS</patientPosition>"
        f"<protocolName>{_xml_text(protocol)}</protocolName></measurementInformation>"
        f"<acquisitionSystemInformation><systemVendor>invdiff synthetic</systemVendor>"
        f"<systemFieldStrength_T>{field_strength_t:g}</systemFieldStrength_T>"
        f"<receiverChannels>{int(num_coils)}</receiverChannels></acquisitionSystemInformation>"
        f"<experimentalConditions><H1resonanceFrequency_Hz>{round(42.577478e6 * field_strength_t)}"
        f"</H1resonanceFrequency_Hz></experimentalConditions>"
        "<encoding>"
        f"<encodedSpace>{size(ex, ey, ez)}{fov(encoded_fov)}</encodedSpace>"
        f"<reconSpace>{size(rx, ry, rz)}{fov(recon_fov)}</reconSpace>"
        "<encodingLimits>"
        f"{limit('kspace_encoding_step_1', 0, right - left - 1, center)}"
        f"{limit('kspace_encoding_step_2', 0, 0, 0)}"
        f"{limit('slice', 0, int(num_slices) - 1, int(num_slices) // 2)}"
        "</encodingLimits>"
        "<trajectory>cartesian</trajectory>"
        "</encoding>"
        f"<userParameters><userParameterLong><name>readout_oversampling</name>"
        f"<value>{int(readout_oversampling)}</value></userParameterLong></userParameters>"
        "</ismrmrdHeader>\n"
    )
    return xml.encode("utf-8")


def smooth_random_phase(shape: Sequence[int], rng: RandomSource, amplitude: float = np.pi,
                        max_frequency: int = 2) -> np.ndarray:
    """Smooth random phase maps float64 ``(slices, H, W)`` with ``max |phi| = amplitude`` per slice.

    ``phi = sum_{f} a_f cos(2 pi (f_y y / H + f_x x / W) + b_f)`` over the spatial frequencies
    ``0 <= f_y <= max_frequency``, ``|f_x| <= max_frequency``, ``a_f ~ N(0, 1)``, ``b_f ~ U[0, 2 pi)``.
    """
    rng = _random_state(rng)
    slices, height, width = (int(s) for s in shape)
    freqs = [(fy, fx) for fy in range(max_frequency + 1) for fx in range(-max_frequency, max_frequency + 1)
             if (fy, fx) != (0, 0)]
    weights = rng.standard_normal((slices, len(freqs)))
    offsets = rng.uniform(0.0, 2 * np.pi, size=(slices, len(freqs)))
    y = np.arange(height)[:, None] / height
    x = np.arange(width)[None, :] / width
    phase = np.zeros((slices, height, width))
    for j, (fy, fx) in enumerate(freqs):
        wave = 2 * np.pi * (fy * y + fx * x)
        phase += weights[:, j, None, None] * np.cos(wave[None] + offsets[:, j, None, None])
    peak = np.abs(phase).reshape(slices, -1).max(axis=1)
    return phase * (amplitude / np.maximum(peak, 1e-12))[:, None, None]


# ---- CT phantoms ----------------------------------------------------------------------------------------

CT_PHANTOM_KINDS = ("shepp_logan", "ellipses", "thorax", "resolution")


def ct_phantom(kind: str, size: int = 256, rng: RandomSource = 0, supersample: int = 4) -> np.ndarray:
    """A CT attenuation phantom float32 ``(size, size)`` in ``[0, 1]``, zero outside the inscribed circle.

    ``"shepp_logan"``: scikit-image's modified Shepp-Logan, resized with anti-aliasing; ``"ellipses"``:
    a random body ellipse holding random ellipses; ``"thorax"``: body, lungs with nodules, spine, heart,
    ribs; ``"resolution"``: bar groups 1-4 px wide and low-contrast discs (a QA phantom). Random kinds
    draw from ``rng``; shapes are rasterised at ``supersample`` x resolution and box-averaged.
    """
    if kind not in CT_PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {CT_PHANTOM_KINDS}, got {kind!r}")
    if kind == "shepp_logan":
        from skimage.data import shepp_logan_phantom
        from skimage.transform import resize
        image = resize(shepp_logan_phantom(), (size, size), order=1, anti_aliasing=True, mode="constant")
    else:
        canvas = _Canvas(size, supersample)
        {"ellipses": _draw_ellipses, "thorax": _draw_thorax, "resolution": _draw_resolution}[kind](
            canvas, _random_state(rng))
        image = canvas.image.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    yy, xx = (np.mgrid[:size, :size] - (size - 1) / 2) / (size / 2)
    image = np.where(xx ** 2 + yy ** 2 <= 0.98 ** 2, image, 0.0)   # radon(circle=True) needs a zero rim
    return np.clip(image, 0.0, 1.0).astype(np.float32)


class _Canvas:
    """A square image on ``[-1, 1]^2`` (x right, y down) that ellipses and rectangles are painted into."""

    def __init__(self, size: int, supersample: int):
        n = size * supersample
        self.pixel = 2 / size                     # one output pixel in canvas units
        coords = (np.arange(n) + 0.5) / n * 2 - 1
        self.y, self.x = np.meshgrid(coords, coords, indexing="ij")
        self.image = np.zeros((n, n))

    def ellipse(self, cx, cy, a, b, angle_deg=0.0):
        t = np.deg2rad(angle_deg)
        u = (self.x - cx) * np.cos(t) + (self.y - cy) * np.sin(t)
        v = -(self.x - cx) * np.sin(t) + (self.y - cy) * np.cos(t)
        return (u / a) ** 2 + (v / b) ** 2 <= 1

    def rectangle(self, x0, y0, x1, y1):
        return (self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)

    def paint(self, region, value):
        self.image[region] = value


def _draw_ellipses(canvas: _Canvas, rng) -> None:
    a, b = rng.uniform(0.6, 0.85), rng.uniform(0.5, 0.8)
    body = canvas.ellipse(0, 0, a, b, rng.uniform(-20, 20))
    canvas.paint(body, rng.uniform(0.2, 0.35))
    for _ in range(_randint(rng, 5, 11)):
        region = canvas.ellipse(rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.5, 0.5) * b, rng.uniform(0.03, 0.25),
                                rng.uniform(0.03, 0.25), rng.uniform(0, 180))
        canvas.paint(region & body, rng.uniform(0.0, 1.0))


def _draw_thorax(canvas: _Canvas, rng) -> None:
    body = canvas.ellipse(0, 0.02, 0.88, 0.62)
    canvas.paint(body, 0.28)
    for side in (-1, 1):                                       # ribs: bright arcs under the skin
        for k in range(5):
            angle = side * (25 + 26 * k) + rng.uniform(-4, 4)
            cx, cy = 0.8 * np.sin(np.deg2rad(angle)), 0.02 - 0.55 * np.cos(np.deg2rad(angle))
            canvas.paint(canvas.ellipse(cx, cy, 0.045, 0.025, -angle) & body, 0.75)
    lungs = []
    for side in (-1, 1):
        lung = canvas.ellipse(side * rng.uniform(0.38, 0.45), rng.uniform(-0.05, 0.05), rng.uniform(0.28, 0.34),
                              rng.uniform(0.4, 0.47), side * rng.uniform(-12, -4))
        canvas.paint(lung, 0.04)
        lungs.append(lung)
    canvas.paint(canvas.ellipse(rng.uniform(0.05, 0.15), 0.05, 0.24, 0.2, 25), 0.33)   # heart
    canvas.paint(canvas.ellipse(0, 0.45, 0.09, 0.08), 0.85)                            # vertebral body
    canvas.paint(canvas.ellipse(0, 0.45, 0.04, 0.035), 0.3)                            # spinal canal
    canvas.paint(canvas.ellipse(-0.1, 0.3, 0.06, 0.06), 0.4)                           # aorta
    for _ in range(6):                                                                 # nodules
        side = rng.choice([-1, 1])
        nodule = canvas.ellipse(side * rng.uniform(0.3, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(0.01, 0.04),
                                rng.uniform(0.01, 0.04))
        canvas.paint(nodule & (lungs[0] | lungs[1]), rng.uniform(0.2, 0.35))


def _draw_resolution(canvas: _Canvas, rng) -> None:
    disc = canvas.ellipse(0, 0, 0.85, 0.85)
    canvas.paint(disc, 0.2)
    for group, width_px in enumerate((1, 2, 3, 4)):  # bar groups: 5 bars, gaps equal to the bar width
        bar_width = width_px * canvas.pixel
        x0 = -0.65 + 0.32 * group
        for bar in range(5):
            left = x0 + 2 * bar * bar_width
            canvas.paint(canvas.rectangle(left, -0.55, left + bar_width, -0.2), 0.9)
    for i, radius in enumerate((0.02, 0.035, 0.05, 0.07, 0.1)):       # low-contrast discs
        contrast = 0.02 + 0.02 * i + rng.uniform(0, 0.01)
        canvas.paint(canvas.ellipse(-0.55 + 0.27 * i, 0.3, radius, radius), 0.2 + contrast)
    canvas.paint(canvas.ellipse(0, 0.65, 0.08, 0.08), 1.0)            # a dense insert
    canvas.paint(canvas.ellipse(0.45, 0.62, 0.07, 0.07), 0.0)         # an air hole


# ---- helpers --------------------------------------------------------------------------------------------

def _randint(rng, low: int, high: int) -> int:
    """An int in ``[low, high)`` from a RandomState or a Generator."""
    return int(rng.randint(low, high) if isinstance(rng, np.random.RandomState) else rng.integers(low, high))


def _random_state(seed: RandomSource):
    if isinstance(seed, (np.random.RandomState, np.random.Generator)):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.RandomState(int(seed))
    raise ValueError(f"seed must be an int, np.random.RandomState or np.random.Generator, got {seed!r}")


def _check_volume(image_or_volume) -> np.ndarray:
    volume = image_or_volume.detach().cpu().numpy() if hasattr(image_or_volume, "detach") else image_or_volume
    volume = np.asarray(volume)
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"image_or_volume must be (H, W) or (slices, H, W), got shape {volume.shape}")
    if not np.issubdtype(volume.dtype, np.number) or not np.isfinite(volume).all():
        raise ValueError(f"image_or_volume must hold finite numbers, got dtype {volume.dtype} with NaN/Inf "
                         f"or non-numeric values")
    return volume if np.iscomplexobj(volume) else volume.astype(np.float64)


def _check_padding(padding, width: int) -> tuple[int, int]:
    left, right = (int(p) for p in padding)
    if left < 0 or right < 0 or left + right >= width:
        raise ValueError(f"kspace_padding must be two non-negative column counts leaving some of W={width} "
                         f"columns, got {tuple(padding)}")
    return left, width - right


def _coil_maps(coil_maps, num_coils: int, height: int, width: int) -> np.ndarray:
    if coil_maps is None:
        import sigpy.mri
        # Birdcage coils on a ring of radius 1.5 (grid-normalised units), normalised so sum_c |S_c|^2 = 1.
        return sigpy.mri.birdcage_maps((int(num_coils), height, width), dtype=np.complex64)
    maps = np.asarray(coil_maps)
    if maps.ndim != 3 or maps.shape[1:] != (height, width) or not np.iscomplexobj(maps):
        raise ValueError(f"coil_maps must be complex (coils, {height}, {width}) on the encoded grid, "
                         f"got {maps.dtype} {maps.shape}")
    return maps.astype(np.complex64)


def _fft2c(image: np.ndarray) -> np.ndarray:
    return fft2c(torch.from_numpy(np.ascontiguousarray(image))).numpy()


def _test_mask(name: str, kind: str, shape: tuple[int, int], acceleration, center_fraction, padding):
    from invdiff.operators.masks import make_mask, num_low_frequencies

    center_fraction = 0.32 / acceleration if center_fraction is None else center_fraction   # 0.08 at 4x, 0.04 at 8x
    mask = make_mask(kind, shape=shape, acceleration=acceleration, center_fraction=center_fraction, seed=name,
                     padding=padding).numpy().astype(bool)
    if mask.ndim != 1:
        raise ValueError(f"test-set files store a column mask (W,); mask_kind {kind!r} gives shape {mask.shape}")
    return mask, num_low_frequencies(shape[1], center_fraction)


def _xml_text(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _write_h5(path: Path, kspace: np.ndarray, header: bytes, target: np.ndarray | None, target_key: str,
              mask: np.ndarray | None, attrs: dict) -> None:
    # track_times=False and a fixed write order make the file a pure function of its contents, so the
    # shipped samples regenerate bit for bit.
    options = dict(compression="gzip", compression_opts=6, shuffle=True, track_times=False)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("ismrmrd_header", data=np.bytes_(header), track_times=False)
            h5.create_dataset("kspace", data=kspace, chunks=(1,) + kspace.shape[1:], **options)
            if target is not None:
                h5.create_dataset(target_key, data=target, chunks=(1,) + target.shape[1:], **options)
            if mask is not None:
                h5.create_dataset("mask", data=mask, track_times=False)
            for key in sorted(attrs):
                value = attrs[key]
                h5.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
