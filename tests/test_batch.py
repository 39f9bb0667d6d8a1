"""``invdiff batch``: the (file, slice) work list over torchrun ranks, resumable after a SIGKILL, bit for bit.

What is checked: a volume made by batch is the volume ``invdiff reconstruct`` makes (same arrays, same attrs plus
``input_sha256`` / ``batch_key``); a ``torchrun --nproc_per_node=2`` job (gloo, CPU) killed with SIGKILL mid-way and
restarted leaves every volume exactly once, byte-identical to a single-process run with the same seed, the volumes
finished before the kill untouched, only the killed slices recomputed, and no partial or temporary file.
"""
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from invdiff.batch import MANIFEST_NAME, Ranks, manifest_checksum
from invdiff.cli import main
from invdiff.datasets.synthetic import write_fake_fastmri

SOLVER_ARGS = ["--solver", "cg-sense", "--accel", "2", "--center-fraction", "0.3", "--seed", "3", "--no-progress"]
PLAN = re.compile(r"batch plan: (\d+) volumes \((\d+) slices\); (\d+) done before, (\d+) to make; (\d+) of their "
                  r"slices kept from a killed run, (\d+) to compute(?:; removed (\d+) leftovers)?")

# Run by torchrun in place of `-m invdiff.cli`: each rank runs STALL_AFTER slices, then blocks inside its next one
# (after saying so with a marker file) until the test kills the whole job with SIGKILL.
STALLING_WORKER = """
import os, sys, time, pathlib
import invdiff.batch as batch
stall_after = int(os.environ["INVDIFF_TEST_STALL_AFTER"])
markers = pathlib.Path(os.environ["INVDIFF_TEST_MARKERS"])
original, calls = batch.reconstruct_slice, [0]
def stalling(*args, **kwargs):
    if calls[0] == stall_after:
        tmp = markers / (".rank" + os.environ["RANK"])
        tmp.write_text(str(os.getpid()))
        tmp.rename(markers / ("rank" + os.environ["RANK"]))
        time.sleep(600)
    calls[0] += 1
    return original(*args, **kwargs)
batch.reconstruct_slice = stalling
from invdiff.cli import main
sys.exit(main())
"""


def _inputs(folder: Path, files: int = 4, slices: int = 2, test_set: bool = False) -> Path:
    folder.mkdir()
    for i in range(files):
        image = np.zeros((slices, 24, 16))
        image[:, 6:18, 4 + i % 3:12] = 1.0
        write_fake_fastmri(folder / f"file{i}.h5", image, num_coils=2, seed=i, noise_level=0.01, test_set=test_set,
                           acceleration=2, center_fraction=0.3)
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(log_text: str) -> tuple[int, ...]:
    found = PLAN.search(log_text)
    assert found, log_text[-3000:]
    return tuple(int(g or 0) for g in found.groups())


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(nproc: int, *argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]


def _assert_complete(out: Path, names: list[str]) -> dict:
    """Every volume exactly once, the manifest's sha256 of each, nothing partial or temporary left."""
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST_NAME, "metrics.csv"])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["volumes"]) == sorted(names)
    for name in names:
        assert manifest["volumes"][name]["output_sha256"] == _sha(out / name)
        with h5py.File(out / name, "r") as h5:
            assert h5.attrs["input_sha256"] == manifest["volumes"][name]["input_sha256"]
    return manifest


def test_share_covers_every_item_once_in_contiguous_blocks():
    items = list(range(11))
    for world in (1, 2, 3, 4, 16):
        shares = [Ranks(rank, world).share(items) for rank in range(world)]
        assert sum(shares, []) == items                                    # once each, in order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1          # balanced


def _assert_same_as_reconstruct(inputs: Path, out: Path, names: list[str], args: list[str], tmp_path: Path) -> None:
    """Each batch output holds what `invdiff reconstruct` writes for the file: the same datasets with the same
    values, the same attrs, plus ``input_sha256`` and ``batch_key``."""
    for name in names:
        single = tmp_path / f"single-{name}"
        assert main(["reconstruct", str(inputs / name), "--out", str(single), *args]) == 0
        with h5py.File(single, "r") as a, h5py.File(out / name, "r") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert np.array_equal(a[key][()], b[key][()]), key
            attrs = {k: v for k, v in b.attrs.items() if k not in ("input_sha256", "batch_key")}
            assert sorted(attrs) == sorted(a.attrs)
            for key in a.attrs:
                assert np.array_equal(a.attrs[key], attrs[key]), key


def test_active_solver_volume_is_the_reconstruct_volume(tmp_path):
    """ADS chooses its own columns per slice: batch keeps each slice's mask (dataset 'mask', (W,) when the slices
    agree, else (slices, W)) and the per-slice sampled_columns / acquisition_order attrs, as reconstruct does."""
    inputs = _inputs(tmp_path / "in", files=2, slices=2)
    args = ["--solver", "ads", "--set", "budget=8", "--set", "particles=2", "--steps", "4", "--accel", "2",
            "--center-fraction", "0.3", "--no-progress"]
    out = tmp_path / "out"
    assert main(["batch", str(inputs), "--out", str(out), *args]) == 0
    _assert_complete(out, ["file0.h5", "file1.h5"])
    _assert_same_as_reconstruct(inputs, out, ["file0.h5", "file1.h5"], args, tmp_path)
    with h5py.File(out / "file0.h5", "r") as h5:
        assert len(json.loads(h5.attrs["acquisition_order"])) == 2


def test_batch_volume_is_the_reconstruct_volume_and_a_rerun_skips_it(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    inputs = _inputs(tmp_path / "in", files=2, slices=3)
    out = tmp_path / "out"
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 0
    manifest = _assert_complete(out, ["file0.h5", "file1.h5"])
    assert manifest["summary"]["scored"] == 2 and manifest["settings"]["seed"] == 3
    _assert_same_as_reconstruct(inputs, out, ["file0.h5", "file1.h5"], SOLVER_ARGS, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 0
    assert _plan(caplog.text)[2:6] == (2, 0, 0, 0)                        # 2 done before, nothing to compute
    assert all(before[n] == (out / n).stat().st_mtime_ns for n in ("file0.h5", "file1.h5"))
    caplog.clear()
    other_seed = [a if a != "3" else "4" for a in SOLVER_ARGS]              # another run's outputs are kept
    assert main(["batch", str(inputs), "--out", str(out), *other_seed]) == 2
    assert all(before[n] == (out / n).stat().st_mtime_ns for n in ("file0.h5", "file1.h5"))


def test_lost_manifest_adopts_outputs_by_key_and_overwrite_replaces_foreign_ones(tmp_path, caplog):
    """A kill between an output and its record (here: the manifest deleted) does not redo the volume: its
    ``batch_key`` attr vouches for it. A foreign file under an input's name is refused, then replaced with
    ``--overwrite``; an edited manifest is ignored with ``--overwrite`` and its volumes redone, byte-identical."""
    caplog.set_level(logging.INFO)
    inputs = _inputs(tmp_path / "in", files=2, slices=1)
    out = tmp_path / "out"
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 0
    first = {name: (out / name).read_bytes() for name in ("file0.h5", "file1.h5")}
    (out / MANIFEST_NAME).unlink()
    caplog.clear()
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 0
    assert _plan(caplog.text)[2:6] == (2, 0, 0, 0)
    _assert_complete(out, ["file0.h5", "file1.h5"])

    (out / "file1.h5").write_bytes(b"someone else's file")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["volumes"]["file1.h5"]
    manifest["checksum"] = manifest_checksum(manifest)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 2
    assert (out / "file1.h5").read_bytes() == b"someone else's file"
    caplog.clear()
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS, "--overwrite"]) == 0
    assert _plan(caplog.text)[2:6] == (1, 1, 0, 1)
    assert (out / "file1.h5").read_bytes() == first["file1.h5"]

    (out / MANIFEST_NAME).write_text((out / MANIFEST_NAME).read_text().replace('"seed": 3', '"seed": 4'))
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 2
    caplog.clear()
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS, "--overwrite"]) == 0
    assert _plan(caplog.text)[2:6] == (2, 0, 0, 0)          # adopted by key: the edit changed no output
    assert {name: (out / name).read_bytes() for name in first} == first
    _assert_complete(out, ["file0.h5", "file1.h5"])


def test_test_set_files_without_targets(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    inputs = _inputs(tmp_path / "in", files=2, slices=1, test_set=True)
    out = tmp_path / "out"
    assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 0
    manifest = _assert_complete(out, ["file0.h5", "file1.h5"])
    assert manifest["summary"]["scored"] == 0 and "metrics not computed" in caplog.text


def _kill_and_restart(tmp_path: Path, restart_ranks: int) -> dict:
    """A 2-rank torchrun job over 4 volumes x 2 slices, each rank SIGKILLed inside its 4th slice, then restarted
    with ``restart_ranks`` ranks (1: plainly in this process; 2: torchrun again). Returns what was measured."""
    inputs = _inputs(tmp_path / "in")
    names = [f"file{i}.h5" for i in range(4)]
    reference = tmp_path / "single"
    assert main(["batch", str(inputs), "--out", str(reference), *SOLVER_ARGS]) == 0
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    worker = tmp_path / "stalling_worker.py"
    worker.write_text(STALLING_WORKER)
    env = {**_env(), "INVDIFF_TEST_STALL_AFTER": "3", "INVDIFF_TEST_MARKERS": str(markers)}
    log_path = tmp_path / "killed.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        job = subprocess.Popen(_torchrun(2, str(worker), "batch", str(inputs), "--out", str(out), *SOLVER_ARGS),
                               env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while len(list(markers.glob("rank*"))) < 2:
                assert job.poll() is None, f"the job ended before the kill:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            # torchrun starts each rank in a session of its own: kill the ranks (mid-slice), then torchrun.
            for marker in markers.glob("rank*"):
                _kill(int(marker.read_text()))
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    killed_seconds = time.perf_counter() - start
    _wait_for_unlock(out / ".batch" / "lock")
    assert job.returncode == -signal.SIGKILL
    # Rank 0 had finished file0 (slices 0, 1) and file1 slice 0; rank 1 file2 and file3 slice 0.
    done_before = sorted(p.name for p in out.glob("*.h5"))
    assert done_before == ["file0.h5", "file2.h5"]
    partial = sorted(p.relative_to(out).as_posix() for p in out.glob(".batch/partial/*/*.npz"))
    assert len(partial) == 2 and all(p.endswith("slice_0000.npz") for p in partial), partial
    stamps = {name: (out / name).stat().st_mtime_ns for name in done_before}
    # What a kill inside an atomic write leaves: hidden temporary files; the restart must clear them.
    (out / ".file1.0123abcd.tmp.h5").write_bytes(b"half")
    next(out.glob(".batch/partial/*")).joinpath(".slice_0001.89abcdef.tmp.npz").write_bytes(b"half")

    start = time.perf_counter()
    if restart_ranks == 1:
        log_text = _restart_in_process(inputs, out)
    else:
        run = subprocess.run(_torchrun(2, "-m", "invdiff.cli", "batch", str(inputs), "--out", str(out),
                                       *SOLVER_ARGS), env=_env(), capture_output=True, text=True, timeout=300)
        log_text = run.stdout + run.stderr
        assert run.returncode == 0, log_text[-3000:]
    restart_seconds = time.perf_counter() - start
    volumes, slices, done, to_make, kept, to_compute, removed = _plan(log_text)
    assert (volumes, slices, done, to_make, kept, to_compute, removed) == (4, 8, 2, 2, 2, 2, 2), log_text[-2000:]
    manifest = _assert_complete(out, names)
    expected = json.loads((reference / MANIFEST_NAME).read_text())
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name     # bit for bit
        assert manifest["volumes"][name]["output_sha256"] == expected["volumes"][name]["output_sha256"]
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items()), "redone, not skipped"
    assert manifest["settings_sha256"] == expected["settings_sha256"]
    return {"done_before_kill": len(done_before), "slices_kept": kept, "slices_recomputed": to_compute,
            "killed_run_s": killed_seconds, "restart_s": restart_seconds}


def _kill(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it has exited (gone, or a zombie: its files, and its lock, are closed)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(500):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def _wait_for_unlock(path: Path, timeout: float = 30.0) -> None:
    """Until no process holds rank 0's lock: a killed process's threads can outlive the signal by a moment."""
    import fcntl

    deadline = time.monotonic() + timeout
    with open(path) as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{path} still locked {timeout} s after the kill"
                time.sleep(0.05)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return


def _restart_in_process(inputs: Path, out: Path) -> str:
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("invdiff")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert main(["batch", str(inputs), "--out", str(out), *SOLVER_ARGS]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return "\n".join(records)


def test_torchrun_two_ranks_killed_and_restarted(tmp_path):
    """Killed under torchrun (2 ranks, gloo), restarted plainly: the manifest and partial slices carry over to a
    different number of ranks."""
    numbers = _kill_and_restart(tmp_path, restart_ranks=1)
    print(f"kill/restart: {numbers}")


@pytest.mark.slow
def test_torchrun_two_ranks_killed_and_restarted_under_torchrun(tmp_path):
    numbers = _kill_and_restart(tmp_path, restart_ranks=2)
    print(f"kill/restart (torchrun restart): {numbers}")


@pytest.mark.slow
def test_throughput_one_and_two_ranks(tmp_path):
    """Slices per second of the compute phase with 1 and 2 ranks in one run (CPU, gloo); the outputs agree."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        image = np.zeros((4, 64, 48))
        image[:, 16:48, 10 + i:38] = 1.0
        write_fake_fastmri(inputs / f"file{i}.h5", image, num_coils=4, seed=i, noise_level=0.01)
    rates, outs = {}, {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"out{nproc}"
        run = subprocess.run(_torchrun(nproc, "-m", "invdiff.cli", "batch", str(inputs), "--out", str(outs[nproc]),
                                       *SOLVER_ARGS), env=_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        found = re.search(r"(\d+) slices computed in ([\d.]+) s on (\d+) rank", run.stderr)
        rates[nproc] = int(found.group(1)) / float(found.group(2))
    for i in range(6):
        assert (outs[1] / f"file{i}.h5").read_bytes() == (outs[2] / f"file{i}.h5").read_bytes()
    print(f"throughput: 1 rank {rates[1]:.2f} slices/s, 2 ranks {rates[2]:.2f} slices/s, "
          f"ratio {rates[2] / rates[1]:.2f} (cores: {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")


@pytest.mark.slow
def test_diffusion_solver_two_ranks_bit_identical_to_one_process(tmp_path):
    """RED-Diff over the shipped prior (2 steps): the seed rule makes every slice's noise its own, so 2 ranks under
    torchrun write the same bytes as one process."""
    inputs = _inputs(tmp_path / "in", files=2, slices=2)
    args = ["--solver", "reddiff", "--steps", "2", "--accel", "2", "--center-fraction", "0.3", "--no-progress"]
    assert main(["batch", str(inputs), "--out", str(tmp_path / "one"), *args]) == 0
    run = subprocess.run(_torchrun(2, "-m", "invdiff.cli", "batch", str(inputs), "--out", str(tmp_path / "two"),
                                   *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("file0.h5", "file1.h5"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    manifest = _assert_complete(tmp_path / "two", ["file0.h5", "file1.h5"])
    assert manifest["settings"]["prior"]["sha256"]
