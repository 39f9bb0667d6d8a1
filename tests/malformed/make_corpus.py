"""The malformed-input corpus: every case writes its own bad input into a folder and says what must happen.

Nothing here is a hand-edited binary: each input is a good one (a fake fastMRI file, a tiny exported prior, a
finished batch folder) made by invdiff's own writers, then broken in one stated way. A case is either an
``invdiff`` command line (it must exit 2 with one line on stderr) or a Python call (it must raise ``raises``), and
its one line must contain every string in ``fragments``: the file, the key, what was expected, what was found.
The test (``tests/test_malformed_corpus.py``) also checks that the case's folder is exactly as it was before:
no output, no temporary file, no folder created, no existing file changed.

    $ python tests/malformed/make_corpus.py /tmp/corpus        # write every case's inputs, list the cases
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from invdiff.errors import InputError


@dataclass
class Case:
    name: str
    layer: str                                   # h5 | cli | checkpoint | batch | operator
    what: str                                    # the malformation, in words
    argv: list[str] | None = None                # an invdiff command line: exit 2 expected
    call: Callable[[], Any] | None = None        # or a Python call: ``raises`` expected
    raises: type = InputError
    fragments: tuple[str, ...] = ()              # strings the one-line message must contain
    bug: str | None = None                       # a known bug in a file the corpus does not own: strict xfail
    skip: str | None = None                      # why the case cannot run here (e.g. root ignores permissions)
    after: Callable[[], str | None] | None = None  # an extra check after the run; returns a complaint or None
    status: int = 2                              # 0: a documented fallback, the fragments are in a WARNING
    extra: dict = field(default_factory=dict)


BUILDERS: dict[str, tuple[str, Callable[[Path], Case]]] = {}


def case(layer: str):
    def register(builder: Callable[[Path], Case]):
        BUILDERS[builder.__name__] = (layer, builder)
        return builder
    return register


def build(name: str, folder: Path) -> Case:
    layer, builder = BUILDERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    made = builder(folder)
    made.name, made.layer = name, layer
    return made


# ---- good inputs, then one thing broken ------------------------------------------------------------------
RECONSTRUCT = ["--solver", "zero-filled", "--accel", "2", "--center-fraction", "0.3", "--no-progress"]
BATCH = ["--solver", "cg-sense", "--accel", "2", "--center-fraction", "0.3", "--no-progress"]


def good_scan(path: Path, slices: int = 1, **kwargs) -> Path:
    from invdiff.datasets.synthetic import write_fake_fastmri

    image = np.zeros((slices, 24, 16))
    image[:, 6:18, 4:12] = 1.0
    kwargs.setdefault("num_coils", 2)
    write_fake_fastmri(path, image, seed=0, **kwargs)
    return path


def rewrite(path: Path, key: str, value=None) -> Path:
    """``path`` with dataset ``key`` deleted and, if ``value`` is given, written again as ``value``."""
    with h5py.File(path, "a") as h5:
        del h5[key]
        if value is not None:
            h5.create_dataset(key, data=value)
    return path


def reconstruct_case(folder: Path, scan: Path, what: str, *fragments: str, extra_args=(), **kwargs) -> Case:
    out = folder / "out"
    out.mkdir(exist_ok=True)
    argv = ["reconstruct", str(scan), *RECONSTRUCT, *extra_args, "--out", str(out / "r.h5")]
    return Case("", "", what, argv=argv, fragments=fragments, **kwargs)


def inputs_folder(folder: Path, count: int = 2) -> Path:
    inputs = folder / "in"
    inputs.mkdir()
    for i in range(count):
        good_scan(inputs / f"file{i}.h5", slices=2)
    return inputs


def batch_argv(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", str(inputs), "--out", str(out), *BATCH, *extra]


def finished_batch(folder: Path) -> tuple[Path, Path]:
    """A folder of two inputs and a batch ``out`` folder in which both are done (manifest, outputs)."""
    from invdiff.cli import main

    inputs, out = inputs_folder(folder), folder / "out"
    status = main(batch_argv(inputs, out))
    assert status == 0, "the good batch run that a case starts from failed"
    return inputs, out


def tiny_prior(folder: Path, name: str = "p") -> tuple[Path, Path]:
    """An exported prior (JSON + safetensors) with a tiny 2-channel EDMUNet, as ``export_prior`` lays it out."""
    import torch
    from safetensors.torch import save_file

    from invdiff.priors.unet import EDMUNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(channels=2, base_channels=8, channel_mults=(1, 2), embedding_dim=16, groups=4)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in EDMUNet(config).state_dict().items()}, str(weights))
    meta = {"name": name, "format": "invdiff-prior", "architecture": "EDMUNet", "unet": config.to_dict(),
            "channels": 2, "steps": 0, "sha256": sha256(weights)}
    meta_path = folder / f"{name}.json"
    meta_path.write_text(json.dumps(meta))
    return meta_path, weights


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prior_case(folder: Path, weights: Path, what: str, *fragments: str, **kwargs) -> Case:
    return reconstruct_case(folder, good_scan(folder / "scan.h5"), what, *fragments,
                            extra_args=("--solver", "reddiff", "--steps", "2", "--prior", str(weights)), **kwargs)


# ---- the h5 reader, through `invdiff reconstruct` --------------------------------------------------------
@case("h5")
def h5_empty_file(folder):
    scan = folder / "empty.h5"
    scan.write_bytes(b"")
    return reconstruct_case(folder, scan, "a zero-byte .h5", "empty.h5", "HDF5", "an empty file")


@case("h5")
def h5_truncated(folder):
    scan = good_scan(folder / "cut.h5")
    data = scan.read_bytes()
    scan.write_bytes(data[:len(data) // 2])
    return reconstruct_case(folder, scan, "the first half of a good file", "cut.h5", "truncated",
                            f"{len(data)} bytes", f"found {len(data) // 2} bytes")


@case("h5")
def h5_random_bytes(folder):
    scan = folder / "noise.h5"
    scan.write_bytes(np.random.RandomState(3).bytes(4096))
    return reconstruct_case(folder, scan, "4 KiB of random bytes", "noise.h5", "HDF5", "first bytes")


@case("h5")
def h5_kspace_int16(folder):
    scan = good_scan(folder / "int.h5")
    with h5py.File(scan, "r") as h5:
        shape = h5["kspace"].shape
    rewrite(scan, "kspace", np.ones(shape, np.int16))
    return reconstruct_case(folder, scan, "k-space stored as int16", "int.h5", "'kspace'", "complex64", "int16")


@case("h5")
def h5_kspace_zero_coils(folder):
    scan = rewrite(good_scan(folder / "nocoil.h5"), "kspace", np.zeros((1, 0, 48, 16), np.complex64))
    return reconstruct_case(folder, scan, "k-space with 0 coils", "nocoil.h5", "'kspace'", "(1, 0, 48, 16)")


@case("h5")
def h5_kspace_inf(folder):
    scan = good_scan(folder / "inf.h5")
    with h5py.File(scan, "a") as h5:
        k = h5["kspace"][()]
        k[0, 1, 3, 5] = np.inf
        h5["kspace"][...] = k
    return reconstruct_case(folder, scan, "one Inf in k-space", "inf.h5", "'kspace'", "slice 0", "finite",
                            "1 NaN/Inf")


@case("h5")
def h5_kspace_zero_in_sampled_columns(folder):
    scan = good_scan(folder / "zeros.h5")
    with h5py.File(scan, "a") as h5:
        h5["kspace"][...] = 0
    return reconstruct_case(folder, scan, "all-zero k-space", "zeros.h5", "'kspace'", "measured data", "all zeros")


@case("h5")
def h5_target_int32(folder):
    scan = good_scan(folder / "target.h5")
    with h5py.File(scan, "r") as h5:
        shape = h5["reconstruction_rss"].shape
    rewrite(scan, "reconstruction_rss", np.zeros(shape, np.int32))
    return reconstruct_case(folder, scan, "an int32 target", "target.h5", "'reconstruction_rss'", "float32", "int32")


@case("h5")
def h5_target_wrong_slices(folder):
    scan = rewrite(good_scan(folder / "slices.h5"), "reconstruction_rss", np.zeros((3, 24, 16), np.float32))
    return reconstruct_case(folder, scan, "a target with 3 slices for 1", "slices.h5", "'reconstruction_rss'",
                            "(1, H_r, W_r)", "(3, 24, 16)")


@case("h5")
def h5_mask_all_zero(folder):
    scan = good_scan(folder / "nomask.h5", test_set=True, acceleration=2, center_fraction=0.3)
    rewrite(scan, "mask", np.zeros(16, bool))
    return reconstruct_case(folder, scan, "a test-set file whose mask samples nothing", "nomask.h5", "mask",
                            "0 contiguous", "at least 4")


@case("h5")
def h5_mask_wrong_length(folder):
    scan = good_scan(folder / "masklen.h5", test_set=True, acceleration=2, center_fraction=0.3)
    rewrite(scan, "mask", np.ones(15, bool))
    return reconstruct_case(folder, scan, "a mask of 15 entries for 16 columns", "masklen.h5", "'mask'",
                            "(16,)", "(15,)")


# ---- ISMRMRD headers: a bad header is not fatal (the k-space grid stands in for it), but it must be said ------
def header_case(folder: Path, name: str, what: str, edit: Callable[[str], str], *fragments: str, **kwargs) -> Case:
    """A good scan whose header XML went through ``edit``; expected: exit 0, the output, and one WARNING line
    containing ``fragments`` (the documented fallback of invdiff.datasets.fastmri._scan_header)."""
    scan = good_scan(folder / name)
    with h5py.File(scan, "r") as h5:
        xml = bytes(h5["ismrmrd_header"][()]).decode()
    rewrite(scan, "ismrmrd_header", np.bytes_(edit(xml).encode()))
    made = reconstruct_case(folder, scan, what, name, *fragments, **kwargs)
    made.status = 0
    return made


def _replace_once(old: str, new: str) -> Callable[[str], str]:
    def edit(xml: str) -> str:
        assert xml.count(old) >= 1, f"{old!r} not in the header"
        return xml.replace(old, new, 1)
    return edit


@case("header")
def header_recon_size_absurd(folder):
    return header_case(folder, "recon.h5", "recon matrix 100000 x 100000", _replace_once(
        "<reconSpace><matrixSize><x>24</x><y>16</y>", "<reconSpace><matrixSize><x>100000</x><y>100000</y>"),
        "recon size", "(100000, 100000)", "exceeds the k-space grid")


@case("header")
def header_sizes_missing(folder):
    def edit(xml: str) -> str:
        start = xml.index("<encodedSpace><matrixSize>")
        stop = xml.index("</matrixSize>", start) + len("</matrixSize>")
        return xml[:start] + "<encodedSpace>" + xml[stop:]
    return header_case(folder, "nosize.h5", "no encoded matrix size", edit, "encodedSpace/matrixSize",
                       "missing element", "using the k-space shape")


@case("header")
def header_negative_size(folder):
    return header_case(folder, "negative.h5", "encoded matrix x = -48", _replace_once(
        "<encodedSpace><matrixSize><x>48</x>", "<encodedSpace><matrixSize><x>-48</x>"),
        "encodedSpace/matrixSize", "expected positive sizes", "using the k-space shape")


@case("header")
def header_encoding_limits_outside_the_grid(folder):
    return header_case(folder, "limits.h5", "kspace_encoding_step_1 maximum 4000 for 16 columns", _replace_once(
        "<kspace_encoding_step_1><minimum>0</minimum><maximum>15</maximum>",
        "<kspace_encoding_step_1><minimum>0</minimum><maximum>4000</maximum>"),
        "kspace_encoding_step_1", "maximum=4000", "W=16")


@case("header")
def header_field_of_view_absurd(folder):
    return header_case(folder, "fov.h5", "encoded field of view 1e9 mm", _replace_once(
        "<fieldOfView_mm><x>48</x><y>16</y>", "<fieldOfView_mm><x>1e9</x><y>1e9</y>"),
        "field of view", "1e+09")


# ---- the command line -------------------------------------------------------------------------------------
@case("cli")
def cli_out_is_a_folder(folder):
    scan = good_scan(folder / "scan.h5")
    (folder / "out").mkdir()
    (folder / "out" / "r.h5").mkdir()
    argv = ["reconstruct", str(scan), *RECONSTRUCT, "--overwrite", "--out", str(folder / "out" / "r.h5")]
    return Case("", "", "--out names an existing folder (with --overwrite)", argv=argv,
                fragments=("r.h5", "folder"))


@case("cli")
def cli_out_read_only_folder(folder):
    scan = good_scan(folder / "scan.h5")
    out = folder / "out"
    out.mkdir()
    out.chmod(0o555)
    argv = ["reconstruct", str(scan), *RECONSTRUCT, "--out", str(out / "r.h5")]
    skip = "root ignores folder permissions" if os.geteuid() == 0 else None
    return Case("", "", "--out in a read-only folder", argv=argv, fragments=("r.h5", "read-only"), skip=skip)


@case("cli")
def cli_slices_out_of_range(folder):
    return reconstruct_case(folder, good_scan(folder / "scan.h5"), "--slices 5:9 of a 1-slice scan", "--slices",
                            "'5:9'", "of the 1 in the scan", extra_args=("--slices", "5:9"))


@case("cli")
def cli_center_fraction_above_one(folder):
    scan = good_scan(folder / "scan.h5")
    case_ = reconstruct_case(folder, scan, "--center-fraction 1.5", "--center-fraction", "(0, 1)", "1.5")
    case_.argv[case_.argv.index("0.3")] = "1.5"
    return case_


@case("cli")
def cli_set_wrong_type(folder):
    return reconstruct_case(folder, good_scan(folder / "scan.h5"), "--set max_iter=lots for cg-sense",
                            "max_iter", "int", "'lots'", extra_args=("--solver", "cg-sense", "--set", "max_iter=lots"))


# ---- the checkpoint loader, through --prior ---------------------------------------------------------------
class _RunsCode:
    """Pickled as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@case("checkpoint")
def checkpoint_pickle_with_code(folder):
    import torch

    marker = folder / "pwned"
    weights = folder / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, weights)
    made = prior_case(folder, weights, "a .pt whose pickle calls os.system", "evil.pt", "system")
    made.after = lambda: "the pickled code ran" if marker.exists() else None
    return made


@case("checkpoint")
def checkpoint_plain_pickle(folder):
    weights = folder / "net.pkl"
    weights.write_bytes(pickle.dumps({"w": [0.0]}))
    return prior_case(folder, weights, "an EDM-style .pkl snapshot", "net.pkl", "neither a shipped prior",
                      "<name>.json next to <name>.safetensors")


@case("checkpoint")
def checkpoint_safetensors_wrong_shape(folder):
    from safetensors.torch import load_file, save_file

    meta_path, weights = tiny_prior(folder)
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = state[key][:, :1].contiguous()
    save_file(state, str(weights))
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = sha256(weights)                 # consistent: only the shape is wrong
    meta_path.write_text(json.dumps(meta))
    expected = tuple(load_file(str(weights))[key].shape)
    return prior_case(folder, weights, "a safetensors tensor of the wrong shape", "p.safetensors", repr(key),
                      str(expected))


@case("checkpoint")
def checkpoint_safetensors_wrong_sha256(folder):
    meta_path, weights = tiny_prior(folder)
    meta = json.loads(meta_path.read_text())
    actual = meta["sha256"]
    meta["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    return prior_case(folder, weights, "metadata sha256 that does not match the weights", "p.safetensors", "sha256",
                      actual, "0" * 64)


@case("checkpoint")
def checkpoint_safetensors_missing_key(folder):
    from safetensors.torch import load_file, save_file

    meta_path, weights = tiny_prior(folder)
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights))
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = sha256(weights)
    meta_path.write_text(json.dumps(meta))
    return prior_case(folder, weights, "a safetensors file missing one tensor", "p.safetensors", "missing", dropped)


@case("checkpoint")
def checkpoint_metadata_not_json(folder):
    meta_path, weights = tiny_prior(folder)
    meta_path.write_text(meta_path.read_text()[:40])
    return prior_case(folder, weights, "prior metadata cut after 40 characters", "p.json", "JSON")


# ---- batch ------------------------------------------------------------------------------------------------
@case("batch")
def batch_input_folder_missing(folder):
    return Case("", "", "INPUT_DIR does not exist", argv=batch_argv(folder / "nowhere", folder / "out"),
                fragments=("nowhere", "expected a folder", "no such path"))


@case("batch")
def batch_input_folder_without_scans(folder):
    (folder / "in").mkdir()
    (folder / "in" / "notes.txt").write_text("no scans here\n")
    return Case("", "", "INPUT_DIR holds no .h5 file", argv=batch_argv(folder / "in", folder / "out"),
                fragments=("in", "*.h5", "found none"))


@case("batch")
def batch_truncated_input(folder):
    inputs = inputs_folder(folder)
    data = (inputs / "file1.h5").read_bytes()
    (inputs / "file1.h5").write_bytes(data[:len(data) // 3])
    return Case("", "", "one of two inputs truncated", argv=batch_argv(inputs, folder / "out"),
                fragments=("file1.h5", "truncated", f"{len(data)} bytes"))


@case("batch")
def batch_nan_in_a_later_slice(folder):
    inputs = inputs_folder(folder)
    with h5py.File(inputs / "file0.h5", "a") as h5:
        k = h5["kspace"][()]
        k[1, 0, 0, 0] = np.nan
        h5["kspace"][...] = k
    return Case("", "", "NaN in slice 1 of the first input", argv=batch_argv(inputs, folder / "out"),
                fragments=("file0.h5", "'kspace'", "slice 1", "finite", "1 NaN/Inf"))


@case("batch")
def batch_out_is_a_file(folder):
    inputs = inputs_folder(folder)
    (folder / "out").write_text("not a folder\n")
    return Case("", "", "--out is a file", argv=batch_argv(inputs, folder / "out"),
                fragments=("--out", "expected a folder", "found a file"))


@case("batch")
def batch_out_is_the_input_folder(folder):
    inputs = inputs_folder(folder)
    return Case("", "", "--out is INPUT_DIR", argv=batch_argv(inputs, inputs),
                fragments=("--out", "other than INPUT_DIR"))


@case("batch")
def batch_output_name_is_a_folder(folder):
    inputs = inputs_folder(folder)
    (folder / "out" / "file1.h5").mkdir(parents=True)
    return Case("", "", "a folder sits under an input's output name", argv=batch_argv(inputs, folder / "out"),
                fragments=("file1.h5", "expected the output file", "found a folder"))


@case("batch")
def batch_manifest_truncated(folder):
    inputs, out = finished_batch(folder)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    return Case("", "", "manifest.json cut after 200 characters", argv=batch_argv(inputs, out),
                fragments=("manifest.json", "JSON", "truncated", "--overwrite"))


@case("batch")
def batch_manifest_edited(folder):
    inputs, out = finished_batch(folder)
    manifest = out / "manifest.json"
    data = json.loads(manifest.read_text())
    data["volumes"]["file0.h5"]["output_sha256"] = "0" * 64          # hand edit; checksum left as it was
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True))
    return Case("", "", "manifest.json edited by hand", argv=batch_argv(inputs, out),
                fragments=("manifest.json", "'checksum'", "expected", "found", "edited"))


@case("batch")
def batch_output_changed_after_it_was_written(folder):
    inputs, out = finished_batch(folder)
    recorded = json.loads((out / "manifest.json").read_text())["volumes"]["file1.h5"]["output_sha256"]
    with open(out / "file1.h5", "ab") as handle:
        handle.write(b"\0")
    return Case("", "", "an output one byte longer than the manifest's", argv=batch_argv(inputs, out),
                fragments=("file1.h5", "sha256", recorded, sha256(out / "file1.h5"), "--overwrite"))


@case("batch")
def batch_foreign_output(folder):
    inputs = inputs_folder(folder)
    (folder / "out").mkdir()
    (folder / "out" / "file0.h5").write_bytes(b"precious results of another tool")
    return Case("", "", "a file the manifest does not list under an input's name", argv=batch_argv(inputs, folder / "out"),
                fragments=("file0.h5", "manifest", "does not list", "--overwrite"))


@case("batch")
def batch_outputs_of_other_settings(folder):
    inputs, out = finished_batch(folder)
    return Case("", "", "a finished folder rerun with another --seed", argv=batch_argv(inputs, out, "--seed", "7"),
                fragments=("file0.h5", "key", "another run's", "--overwrite"))


# ---- operators (the Python API: ValueError, of which InputError is a subclass) ---------------------------
@case("operator")
def operator_mask_wrong_length(folder):
    import torch

    from invdiff.operators.mri import CartesianMRI
    return Case("", "", "a 5-column mask for 6-column images", raises=ValueError,
                call=lambda: CartesianMRI(mask=torch.ones(5, dtype=torch.bool), img_size=(8, 6)),
                fragments=("mask", "(5,)", "(8, 6)"))


@case("operator")
def operator_mask_not_binary(folder):
    import torch

    from invdiff.operators.mri import CartesianMRI
    return Case("", "", "a mask holding 2", raises=ValueError,
                call=lambda: CartesianMRI(mask=torch.tensor([0, 1, 2, 1, 0, 1]), img_size=(8, 6)),
                fragments=("mask", "0 and 1"))


@case("operator")
def operator_mask_all_zero(folder):
    import torch

    from invdiff.operators.mri import CartesianMRI
    return Case("", "", "an all-zero mask (no measurement at all)", raises=ValueError,
                call=lambda: CartesianMRI(mask=torch.zeros(6, dtype=torch.bool), img_size=(8, 6)),
                fragments=("mask", "no column"))


@case("operator")
def operator_coil_maps_wrong_rank(folder):
    import torch

    from invdiff.operators.mri import SenseMRI
    return Case("", "", "coil maps (C, H, W) without the batch axis", raises=ValueError,
                call=lambda: SenseMRI(mask=torch.ones(6, dtype=torch.bool),
                                      coil_maps=torch.ones(2, 8, 6, dtype=torch.complex64)),
                fragments=("coil_maps", "(B|1, C, H, W)", "(2, 8, 6)"))


@case("operator")
def operator_coil_maps_nan(folder):
    import torch

    from invdiff.operators.mri import SenseMRI
    maps = torch.ones(1, 2, 8, 6, dtype=torch.complex64)
    maps[0, 1, 2, 3] = float("nan")
    return Case("", "", "a NaN in the coil maps", raises=ValueError,
                call=lambda: SenseMRI(mask=torch.ones(6, dtype=torch.bool), coil_maps=maps),
                fragments=("coil_maps", "NaN"))


@case("operator")
def operator_sinogram_nan(folder):
    import torch

    from invdiff.operators.ct import ParallelBeamCT
    from invdiff.problem import InverseProblem

    def pose():
        operator = ParallelBeamCT(img_size=16, angles=np.linspace(0, 180, 8, endpoint=False))
        y = operator.A(torch.ones(1, 1, 16, 16))
        y[0, 0, 2, 3] = float("nan")
        return InverseProblem(operator, y, 0.01)
    return Case("", "", "a NaN in a CT sinogram", raises=ValueError, call=pose, fragments=("y", "NaN"))


@case("operator")
def operator_ct_angles_inf(folder):
    from invdiff.operators.ct import ParallelBeamCT
    return Case("", "", "an infinite projection angle", raises=ValueError,
                call=lambda: ParallelBeamCT(img_size=16, angles=[0.0, float("inf")]),
                fragments=("angles", "finite", "inf"))


def main(argv: list[str]) -> int:
    """Write every case's inputs under ``argv[0]`` (one folder per case) and a cases.json describing them."""
    root = Path(argv[0])
    listing = []
    for name in BUILDERS:
        made = build(name, root / name)
        listing.append({"name": name, "layer": made.layer, "what": made.what, "argv": made.argv,
                        "fragments": list(made.fragments), "bug": made.bug, "skip": made.skip})
    (root / "cases.json").write_text(json.dumps(listing, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
