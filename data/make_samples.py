"""Regenerate the sample scans in data/ bit for bit: ``python data/make_samples.py [--out FOLDER]``.

Sources are real images that ship inside pip wheels (no download): dipy's T1 coronal slice and the first
frame of nibabel's ``example4d.nii.gz`` brain volume; CT samples are phantoms. Every random draw uses a
fixed seed and h5 files carry no timestamps, so rerunning reproduces each file's sha256 (on the same
numpy / torch / h5py versions). Needs the ``data`` extra (dipy, nibabel). See data/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from invdiff.datasets.synthetic import ct_phantom, write_fake_fastmri
from invdiff.io import atomic_path

log = logging.getLogger("make_samples")

# Absolute scale of the simulated scans: fastMRI targets are tiny (~1e-4), so code that forgets to
# normalise fails on the samples as it would on real data.
IMAGE_MAX = 1e-4
# k-space noise: std of the real and of the imaginary part, 1 % of the image maximum.
NOISE_LEVEL = 1e-6
CT_ANGLES_DEG = np.arange(60) * 3.0          # 60 parallel-beam views over [0, 180)
CT_SIZE = 256
SAMPLE_FILES = ("brain_t1_multicoil.h5", "brain_multislice_multicoil.h5", "brain_singlecoil.h5", "ct_samples.h5")


def dipy_t1_slice() -> np.ndarray:
    """dipy's ``t1_coronal_slice.npy``: a skull-stripped T1 coronal slice, float64 (256, 256) in [0, 1]."""
    from dipy.data import get_fnames
    return np.load(get_fnames(name="t1_coronal_slice"))


def nibabel_example4d_slices(slices=range(10, 14)) -> np.ndarray:
    """Axial slices ``slices`` of frame 0 of nibabel's ``example4d.nii.gz`` (EPI, 2 mm).

    Returned float64 ``(len(slices), 96, 128)``: rows anterior -> posterior, columns patient right -> left
    (radiological display).
    """
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    frame = np.asarray(nibabel.load(path).dataobj[..., 0], dtype=np.float64)      # (x=128, y=96, z=24)
    # Voxel axes: i runs right -> left (affine x step -2 mm), j posterior -> anterior (+1.97 mm).
    return np.stack([frame[:, :, z].T[::-1] for z in slices])


def _scaled(image: np.ndarray) -> np.ndarray:
    return image * (IMAGE_MAX / image.max())


def _provenance(**fields) -> str:
    return json.dumps({"generator": "data/make_samples.py", **fields}, sort_keys=True)


def make_brain_t1_multicoil(out: Path, noise_level: float = NOISE_LEVEL) -> Path:
    """8 coils, one slice: dipy's T1 slice cropped to the 192 x 192 square around the brain (no resampling).

    ``noise_level=0``: the same scan without k-space noise (same seed, so the same phase), whose target is the
    noise-free reference of the shipped one (benchmarks/clean_reference.py)."""
    image = dipy_t1_slice()[10:202, 32:224]       # the brain occupies rows 46-166, columns 58-199 of 256
    path = out / "brain_t1_multicoil.h5"
    write_fake_fastmri(path, _scaled(image), num_coils=8, noise_level=noise_level, seed=1, acquisition="CORT1",
                       kspace_padding=(6, 6), voxel_size_mm=(1.0, 1.0, 1.0),
                       extra_attrs={"invdiff_provenance": _provenance(
                           source="dipy data/files/t1_coronal_slice.npy", licence="BSD-3-Clause (dipy)",
                           preprocessing="crop rows 10:202, columns 32:224; scaled to max 1e-4",
                           coils="sigpy.mri.birdcage_maps, 8 coils", noise_level=noise_level, seed=1)})
    return path


def _write_epi_multislice(path: Path, slices, *, seed: int, slices_label: str, noise_level: float = NOISE_LEVEL,
                          **provenance) -> Path:
    """8 coils, the given axial slices of nibabel's example4d brain at its native 96 x 128 grid."""
    write_fake_fastmri(path, _scaled(nibabel_example4d_slices(slices)), num_coils=8, noise_level=noise_level,
                       seed=seed, acquisition="AXEPI", kspace_padding=(4, 4), voxel_size_mm=(1.97, 2.0, 2.17),
                       extra_attrs={"invdiff_provenance": _provenance(
                           source=f"nibabel tests/data/example4d.nii.gz, frame 0, axial slices {slices_label}",
                           licence="MIT (nibabel)",
                           preprocessing="rows anterior->posterior, columns right->left; scaled to max 1e-4",
                           coils="sigpy.mri.birdcage_maps, 8 coils", noise_level=noise_level, seed=seed,
                           **provenance)})
    return path


def make_brain_multislice_multicoil(out: Path, noise_level: float = NOISE_LEVEL) -> Path:
    """8 coils, 4 contiguous axial slices (10-13) of nibabel's example4d brain at its native 96 x 128 grid."""
    return _write_epi_multislice(out / "brain_multislice_multicoil.h5", range(10, 14), seed=2, slices_label="10-13",
                                 noise_level=noise_level)


# Slices of the same EPI volume four or more slices (>= 8.7 mm) away from the sample's 10-13: a tuning set for
# settings that must not be picked on the reported slices (e.g. ADS's acquisition settings).
TUNING_SLICES = (5, 6, 17, 18)


def make_brain_multislice_tuning(out: Path) -> Path:
    """Like :func:`make_brain_multislice_multicoil` for :data:`TUNING_SLICES` (other coil-noise seed); not shipped."""
    return _write_epi_multislice(out / "brain_multislice_tuning.h5", TUNING_SLICES, seed=7,
                                 slices_label=str(list(TUNING_SLICES)),
                                 purpose="tuning set, kept apart from the sample's slices 10-13")


def make_brain_singlecoil(out: Path, noise_level: float = NOISE_LEVEL) -> Path:
    """Single coil (``reconstruction_esc``): dipy's T1 slice at its full 256 x 256 grid."""
    path = out / "brain_singlecoil.h5"
    write_fake_fastmri(path, _scaled(dipy_t1_slice()), multicoil=False, noise_level=noise_level, seed=3,
                       acquisition="CORT1", voxel_size_mm=(1.0, 1.0, 1.0),
                       extra_attrs={"invdiff_provenance": _provenance(
                           source="dipy data/files/t1_coronal_slice.npy", licence="BSD-3-Clause (dipy)",
                           preprocessing="scaled to max 1e-4", coils="single coil (emulated)",
                           noise_level=noise_level, seed=3)})
    return path


def make_ct_samples(out: Path) -> Path:
    """Shepp-Logan and four procedural phantoms (256 x 256) with 60-view parallel-beam sinograms."""
    from skimage import __version__ as skimage_version
    from skimage.transform import radon

    phantoms = [("shepp_logan", 0), ("ellipses", 11), ("ellipses", 12), ("thorax", 13), ("resolution", 14)]
    names = [f"{kind}" if kind != "ellipses" else f"ellipses_seed{seed}" for kind, seed in phantoms]
    images = np.stack([ct_phantom(kind, CT_SIZE, np.random.RandomState(seed)) for kind, seed in phantoms])
    sinograms = np.stack([radon(image.astype(np.float64), theta=CT_ANGLES_DEG, circle=True) for image in images])
    path = out / "ct_samples.h5"
    options = dict(compression="gzip", compression_opts=6, shuffle=True, track_times=False)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("images", data=images.astype(np.float32), chunks=(1, CT_SIZE, CT_SIZE), **options)
            h5.create_dataset("sinograms", data=sinograms.astype(np.float32),
                              chunks=(1,) + sinograms.shape[1:], **options)
            h5.create_dataset("angles_deg", data=CT_ANGLES_DEG, track_times=False)
            h5.attrs["names"] = json.dumps(names)
            h5.attrs["projector"] = (f"skimage.transform.radon (scikit-image {skimage_version}), parallel beam, "
                                     f"circle=True, {len(CT_ANGLES_DEG)} views at angles_deg, detector spacing "
                                     f"1 pixel, sinograms (detectors, views)")
            h5.attrs["invdiff_provenance"] = _provenance(
                source="skimage.data.shepp_logan_phantom (resized to 256) and invdiff.datasets.synthetic.ct_phantom",
                seeds=[seed for _, seed in phantoms], values="attenuation in [0, 1]")
    return path


def write_checksums(out: Path, files: list[Path]) -> Path:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files]
    path = out / "SHA256SUMS"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write into (default: data/ next to this script)")
    parser.add_argument("--tuning-set", action="store_true",
                        help="write only brain_multislice_tuning.h5 (EPI slices 5, 6, 17, 18; not shipped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.out.is_dir():
        parser.error(f"--out {args.out}: folder does not exist")
    log.info("numpy %s, torch %s, h5py %s (HDF5 %s)", np.__version__, metadata.version("torch"), h5py.__version__,
             h5py.version.hdf5_version)
    if args.tuning_set:
        log.info("wrote %s", make_brain_multislice_tuning(args.out))
        return 0
    files = [make_brain_t1_multicoil(args.out), make_brain_multislice_multicoil(args.out),
             make_brain_singlecoil(args.out), make_ct_samples(args.out)]
    write_checksums(args.out, files)
    for path in files:
        log.info("%-32s %8.2f MB", path.name, path.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
