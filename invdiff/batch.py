"""``invdiff batch``: reconstruct every fastMRI file of a folder, plainly or under ``torchrun``, resumably.

The job is a list of (file, slice) items; each item goes through :func:`invdiff.reconstruct.reconstruct_slices` on
that one slice (the task layer, the settings table and the seed rule ``seed * 1000003 + slice``) and a volume is
put together by :func:`invdiff.reconstruct.assemble_report`, so a volume made here is bit for bit the volume
``invdiff reconstruct`` makes, attrs included, whatever the number of ranks. Launched by
``torchrun --nproc_per_node=N`` (torch.distributed: NCCL on GPUs, gloo on CPU, multi-node through torchrun's own
rendezvous), rank ``r`` takes the ``r``-th contiguous share of the items; launched plainly it takes them all.

What is on disk in ``--out`` (every file written atomically: it appears complete or not at all):

* ``<input file name>``: the fastMRI submission file of each volume (``reconstruction`` float32 ``(slices, H, W)``,
  attrs as ``invdiff reconstruct`` writes them, plus ``input_sha256`` and ``batch_key``);
* ``manifest.json``: the effective settings and their sha256, and per volume the sha256 of its input and output,
  slices, metrics and seconds; a ``checksum`` over the rest, so an edited manifest is refused, not trusted;
* ``metrics.csv``: the summary table (fastMRI protocol per volume) where the inputs have targets;
* ``.batch/`` while a job runs or after one was killed: ``partial/<name>-<key>/slice_NNNN.npz`` (one file per
  finished slice: a killed rank loses at most the slice it was on), ``records/<name>.json`` (a volume finished
  by this job, merged into the manifest at the end or by the next start) and ``claims/`` (which rank assembles a
  volume). It is removed when every volume is done.

A volume is done when the manifest (or a record) lists it with the key of this job (sha256 of the settings and of
the input) and its output still has the recorded sha256; a restarted job skips it. Anything else already in
``--out`` under an input's name is refused (exit 2) unless ``--overwrite``. Inputs are checked, hashed and counted
before any work (sharded over the ranks): a malformed file stops the job with one line and nothing written.

    $ torchrun --standalone --nproc_per_node=2 -m invdiff.cli batch scans/ --solver cg-sense --out recon/
"""
from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from invdiff.errors import InputError
from invdiff.io import atomic_open, atomic_path, atomic_write_json, jsonable

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "invdiff-batch-manifest/1"
METRICS_NAME = "metrics.csv"
STATE_DIR = ".batch"
INPUT_SUFFIXES = (".h5", ".hdf5")
# A collective waits for the slowest rank's whole share; a dead rank is torchrun's to notice, not a timeout's.
COLLECTIVE_TIMEOUT = timedelta(hours=12)
# The temporary names of invdiff.io.atomic_path: .{stem}.{8 hex}.tmp{suffix}; a killed writer leaves one behind.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]*)?$")


# ---- ranks ----------------------------------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place in the job: ``rank`` of ``world``; ``distributed`` when launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's contiguous share of ``items`` (sizes differ by at most one; the same on every rank)."""
        count = len(items)
        return list(items[self.rank * count // self.world:(self.rank + 1) * count // self.world])

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (all ranks must call it)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (all ranks must call it)."""
        if not self.distributed:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_ranks(device_name: str) -> tuple[Ranks, str]:
    """The process group torchrun asked for (NCCL when this rank runs on a GPU, gloo otherwise) and the device
    name of this rank: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun when CUDA is present."""
    if not launched_by_torchrun():
        return Ranks(), device_name
    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), True)
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device_name = f"cuda:{ranks.local_rank}"
    on_gpu = device_name.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(torch.device(device_name))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=COLLECTIVE_TIMEOUT)
    log.debug("rank %d of %d (local %d) on %s, backend %s", ranks.rank, ranks.world, ranks.local_rank, device_name,
              dist.get_backend())
    return ranks, device_name


# ---- the plan -------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """One input file: its name (also the output's), sha256, slice count and the job key (settings + input)."""

    name: str
    path: str
    input_sha256: str
    num_slices: int
    key: str = ""

    @property
    def state_name(self) -> str:
        return f"{self.name}-{self.key[:16]}"


@dataclass
class Plan:
    settings: dict
    settings_sha256: str
    volumes: list[Volume]
    pending: list[str]                      # names of the volumes this job (re)makes
    work: list[tuple[str, int]]             # (volume name, slice) items still to compute
    slices_done: int                        # slices already done at the start (finished volumes and partials)
    manifest: dict = field(default_factory=dict)

    def volume(self, name: str) -> Volume:
        return next(v for v in self.volumes if v.name == name)

    @property
    def total_slices(self) -> int:
        return sum(v.num_slices for v in self.volumes)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(jsonable(value), sort_keys=True).encode()).hexdigest()


def input_files(folder: Path) -> list[Path]:
    """The fastMRI files of ``folder`` (``*.h5`` / ``*.hdf5``, not hidden, not recursive), sorted by name."""
    if not folder.exists():
        raise InputError(f"INPUT_DIR {folder}: expected a folder of fastMRI .h5 files, found no such path")
    if not folder.is_dir():
        raise InputError(f"INPUT_DIR {folder}: expected a folder of fastMRI .h5 files, found a file")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in INPUT_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise InputError(f"INPUT_DIR {folder}: expected fastMRI files (*.h5), found none")
    return files


def check_out_dir(out: Path, input_dir: Path) -> None:
    """``--out``: a folder (made if missing, inside an existing one) that is not the input folder."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: expected a folder for the outputs and the manifest, found a file")
    if not out.exists() and not out.parent.is_dir():
        raise InputError(f"--out {out}: expected a folder inside an existing one, found no folder {out.parent}")
    if out.exists() and out.resolve() == input_dir.resolve():
        raise InputError(f"--out {out}: expected a folder other than INPUT_DIR (outputs take the inputs' names)")
    writable = out if out.exists() else out.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: expected a folder this user can write in, found {writable} read-only")


def inspect_input(path: Path, args) -> dict:
    """What the plan needs of one input: name, sha256, slice count; the file is checked now (structure, every
    slice finite, the mask's calibration lines), so a malformed input stops the job before any work."""
    from invdiff.datasets.fastmri import read_scan
    from invdiff.tasks import scan as scan_tasks

    with read_scan(path, check_finite=True) as scan:
        mask, _ = scan_tasks.scan_mask(scan, acceleration=args.accel, center_fraction=args.center_fraction,
                                       mask_kind=args.mask)
        scan_tasks.check_calibration(scan, mask)
        num_slices = scan.num_slices
    return {"name": path.name, "path": str(path), "input_sha256": sha256_file(path), "num_slices": num_slices}


def effective_settings(args, values: dict, prior, device) -> dict:
    """Everything that decides the outputs' values; its sha256 is part of every volume's key."""
    import invdiff
    from invdiff.compare import prior_record

    return jsonable({
        "solver": args.solver, "hyperparameters": values, "acceleration": args.accel,
        "center_fraction": args.center_fraction, "mask": args.mask, "seed": args.seed, "steps": args.steps,
        "prior": None if prior is None else prior_record(prior), "device_type": device.type,
        "invdiff_version": invdiff.__version__})


# ---- the manifest ---------------------------------------------------------------------------------------
def manifest_checksum(manifest: dict) -> str:
    return sha256_json({k: v for k, v in manifest.items() if k != "checksum"})


def read_manifest(path: Path, *, overwrite: bool) -> dict | None:
    """The manifest of an earlier run in ``--out``, checked (format, checksum); None when there is none. A
    truncated or edited one is bad input, or with ``overwrite`` ignored (its volumes are redone)."""
    if not path.exists():
        return None
    problem = None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = (f"{path}: JSON: expected a batch manifest ({MANIFEST_FORMAT}), found unreadable JSON "
                   f"({str(err).splitlines()[0]}; truncated?)")
    else:
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            problem = f"{path}: key 'format': expected {MANIFEST_FORMAT!r}, found {found!r}"
        elif manifest.get("checksum") != manifest_checksum(manifest):
            problem = (f"{path}: key 'checksum': expected {manifest_checksum(manifest)} (sha256 of the rest of the "
                       f"manifest), found {manifest.get('checksum')!r}: the manifest was edited")
        elif not isinstance(manifest.get("volumes"), dict):
            problem = f"{path}: key 'volumes': expected an object of volume records, found {manifest.get('volumes')!r}"
    if problem is None:
        return manifest
    if overwrite:
        log.warning("%s; --overwrite: ignoring it, its volumes are redone", problem)
        return None
    raise InputError(f"{problem}; pass --overwrite to ignore it and redo its volumes")


def write_manifest(path: Path, plan: Plan, volumes: dict) -> dict:
    manifest = {"format": MANIFEST_FORMAT, "settings": plan.settings, "settings_sha256": plan.settings_sha256,
                "volumes": dict(sorted(volumes.items())), "summary": summary(volumes)}
    manifest["checksum"] = manifest_checksum(manifest)
    atomic_write_json(path, manifest)
    return manifest


def summary(volumes: dict) -> dict:
    """Means over the volumes with metrics (fastMRI protocol per volume)."""
    scored = [v for v in volumes.values() if v.get("metrics")]
    means = {}
    for group in ("metrics", "zero_filled_metrics"):
        for key in ("nmse", "psnr", "ssim"):
            values = [v[group][key] for v in scored if v.get(group)]
            if values:
                means[f"{group}_{key}" if group != "metrics" else key] = float(np.mean(values))
    return {"volumes": len(volumes), "scored": len(scored), "mean": means}


def _output_key(path: Path) -> str | None:
    """``batch_key`` of an output file, or None when it is unreadable or has none."""
    import h5py
    try:
        with h5py.File(path, "r") as h5:
            value = h5.attrs.get("batch_key")
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _vouch(volume: Volume, out: Path, entry: dict | None, manifest_path: Path, overwrite: bool) -> dict | None:
    """The record of ``volume`` when its output is this job's and intact; None when it must be (re)made; bad input
    when something else sits under its name and ``overwrite`` is not given."""
    if not out.exists():
        return None
    if out.is_dir():
        raise InputError(f"{out}: expected the output file of input {volume.name}, found a folder")
    if entry is not None and entry.get("key") == volume.key:
        actual = sha256_file(out)
        if actual == entry.get("output_sha256"):
            return entry
        reason = (f"sha256: expected {entry.get('output_sha256')} (recorded in {manifest_path.name}), found {actual}: "
                  f"the output changed after it was written")
    elif entry is not None:
        reason = ("key: expected this job's settings and input "
                  f"({volume.key[:16]}...), found another run's ({str(entry.get('key'))[:16]}...): a changed input or "
                  f"other settings")
    elif _output_key(out) == volume.key:        # written by a run killed before it could record it
        return {"key": volume.key, "input_sha256": volume.input_sha256, "output_sha256": sha256_file(out),
                "slices": volume.num_slices, "metrics": None, "zero_filled_metrics": None, "seconds": None,
                "note": "adopted from its batch_key attr (recorded after a kill)"}
    else:
        reason = f"manifest: expected no file or one {manifest_path.name} lists, found a file it does not list"
    if overwrite:
        log.warning("%s: %s; --overwrite: redoing it", out, reason)
        return None
    raise InputError(f"{out}: {reason}; pass --overwrite to replace it")


# ---- state on disk --------------------------------------------------------------------------------------
class State:
    """The ``.batch`` folder of a job in ``out``: partial slices, finished-volume records and assembly claims."""

    def __init__(self, out: Path):
        self.out = out
        self.root = out / STATE_DIR
        self.partial = self.root / "partial"
        self.records = self.root / "records"
        self.claims = self.root / "claims"

    def make(self) -> None:
        for folder in (self.partial, self.records, self.claims):
            folder.mkdir(parents=True, exist_ok=True)

    def slice_path(self, volume: Volume, index: int) -> Path:
        return self.partial / volume.state_name / f"slice_{index:04d}.npz"

    def slices_present(self, volume: Volume) -> set[int]:
        folder = self.partial / volume.state_name
        if not folder.is_dir():
            return set()
        return {int(p.stem.split("_")[1]) for p in folder.glob("slice_*.npz")}

    def record_path(self, volume: Volume) -> Path:
        return self.records / f"{volume.name}.json"

    def claim(self, volume: Volume) -> bool:
        """True for the one rank that gets to assemble ``volume`` in this job (an O_EXCL file)."""
        try:
            fd = os.open(self.claims / f"{volume.state_name}.claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def lock(self):
        """An exclusive lock on the job's folder for rank 0's lifetime (a second job on the same --out is refused);
        the kernel drops it when the process dies, SIGKILL included."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / "lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise InputError(f"--out {self.out}: expected no other batch job writing there, found one holding "
                             f"{self.root / 'lock'}") from None
        return handle

    def clean(self, keep: set[str]) -> int:
        """Remove what killed writers left (temporary files, claims) and partial slices of other jobs' keys."""
        removed = 0
        for folder in (self.out, self.root, self.records, *self.partial.glob("*")):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.is_file() and _TEMPORARY.match(path.name):
                    path.unlink()
                    removed += 1
        for claim in self.claims.glob("*.claim"):
            claim.unlink()
        for folder in self.partial.glob("*"):
            if folder.name not in keep:
                shutil.rmtree(folder)
                removed += 1
        return removed


def plan_job(args, ranks: Ranks, settings: dict, state: State, lock_holder: list) -> Plan:
    """Check and hash the inputs (a share per rank), then on rank 0 read the manifest and decide what is done;
    every rank gets the same plan or the same one-line error."""
    input_dir, out = Path(args.input_dir), Path(args.out)
    files = input_files(input_dir)
    check_out_dir(out, input_dir)
    mine = []
    for path in files[ranks.rank::ranks.world]:
        try:
            mine.append(inspect_input(path, args))
        except InputError as err:
            mine.append({"name": path.name, "error": str(err)})
    inspected = {item["name"]: item for items in ranks.gather(mine) for item in items}
    settings_sha256 = sha256_json(settings)
    answer: Plan | str
    if ranks.is_main:
        try:
            errors = [inspected[p.name]["error"] for p in files if "error" in inspected[p.name]]
            if errors:
                raise InputError(errors[0] + (f" (and {len(errors) - 1} more bad inputs)" if len(errors) > 1 else ""))
            volumes = []
            for p in files:
                item = dict(inspected[p.name])
                item["key"] = sha256_json({"settings": settings_sha256, "input": item["input_sha256"]})
                volumes.append(Volume(**item))
            answer = _plan_on_main(args, settings, settings_sha256, volumes, state, lock_holder)
        except InputError as err:
            answer = str(err)
    else:
        answer = None
    answer = ranks.broadcast(answer)
    if isinstance(answer, str):
        raise InputError(answer)
    return answer


def _plan_on_main(args, settings, settings_sha256, volumes, state: State, lock_holder: list) -> Plan:
    out = state.out
    manifest_path = out / MANIFEST_NAME
    if out.exists():
        manifest = read_manifest(manifest_path, overwrite=args.overwrite) or {}
    else:
        manifest = {}
    entries = dict(manifest.get("volumes", {}))
    for record in (sorted(state.records.glob("*.json")) if state.records.is_dir() else []):
        try:                                # a record of a killed run: newer than the manifest it never reached
            data = json.loads(record.read_text(encoding="utf-8"))
            entries[data["name"]] = data
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            log.warning("%s: unreadable record of a killed run; its volume is checked against its output", record)
    done, pending = {}, []
    for volume in volumes:
        entry = _vouch(volume, out / volume.name, entries.get(volume.name), manifest_path, args.overwrite)
        if entry is not None:
            done[volume.name] = {**entry, "name": volume.name}
        else:
            pending.append(volume)
    out.mkdir(exist_ok=True)
    lock_holder.append(state.lock())
    state.make()
    removed = state.clean({v.state_name for v in pending})
    plan = Plan(settings, settings_sha256, volumes, [v.name for v in pending], [], 0)
    kept = {name: entry for name, entry in entries.items() if name not in {v.name for v in volumes}}
    plan.manifest = write_manifest(manifest_path, plan, {**kept, **done})
    for record in state.records.glob("*.json"):
        record.unlink()                     # now in the manifest
    partial = 0
    for volume in pending:
        present = state.slices_present(volume)
        partial += len(present)
        plan.work += [(volume.name, index) for index in range(volume.num_slices) if index not in present]
    plan.slices_done = sum(v.num_slices for v in volumes if v.name in done) + partial
    log.info("batch plan: %d volumes (%d slices); %d done before, %d to make; %d of their slices kept from a "
             "killed run, %d to compute%s", len(volumes), plan.total_slices, len(done), len(pending), partial,
             len(plan.work), f"; removed {removed} leftovers of killed writers" if removed else "")
    return plan


# ---- the work ---------------------------------------------------------------------------------------------
def volume_run(volume: Volume, args, *, prior, overrides: dict, device: str):
    """The :class:`invdiff.reconstruct.ScanRun` of a whole volume, as ``invdiff reconstruct`` would prepare it."""
    from invdiff.reconstruct import ReconstructionRequest, prepare_run

    request = ReconstructionRequest(
        scan=volume.path, solver=args.solver, out=volume.name, acceleration=args.accel,
        center_fraction=args.center_fraction, mask_kind=args.mask, slices=None, device=device, seed=args.seed,
        prior=prior, overrides=overrides, steps=args.steps, progress=False)
    return prepare_run(request)


def reconstruct_slice(run, index: int):
    """One item of the work list: slice ``index`` of ``run``'s volume (a :class:`invdiff.reconstruct.SliceResult`)."""
    from invdiff.reconstruct import reconstruct_slices

    return next(iter(reconstruct_slices(run, [index])))


# The fields of a SliceResult that are arrays; the rest go into one JSON string of the slice file.
_SLICE_ARRAYS = ("image", "zero_filled", "target", "mask")


def save_slice(path: Path, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = dataclasses.asdict(result)
    arrays = {key: np.asarray(fields.pop(key)) for key in _SLICE_ARRAYS if fields[key] is not None}
    for key in _SLICE_ARRAYS:
        fields.pop(key, None)
    arrays["fields"] = np.array(json.dumps(jsonable(fields), sort_keys=True))
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_slice(path: Path):
    from invdiff.reconstruct import SliceResult

    with np.load(path) as data:
        if "fields" not in data.files:
            raise InputError(f"{path}: a finished slice written by another invdiff version; remove {path.parent} "
                             f"(or the whole .batch folder) to recompute it")
        fields = json.loads(str(data["fields"]))
        arrays = {key: data[key] for key in _SLICE_ARRAYS if key in data.files}
    return SliceResult(**fields, **{key: arrays.get(key) for key in _SLICE_ARRAYS})


def assemble(volume: Volume, run, state: State, out: Path) -> dict:
    """Stack ``volume``'s slices through :func:`invdiff.reconstruct.assemble_report` (the same arrays and attrs as
    ``invdiff reconstruct``), write its output atomically, then its record; returns the record."""
    from invdiff.datasets.submission import write_reconstruction
    from invdiff.reconstruct import assemble_report

    results = [load_slice(state.slice_path(volume, index)) for index in range(volume.num_slices)]
    seconds = float(sum(r.seconds for r in results))
    report = assemble_report(run, results, seconds)
    attrs = {**report.attrs, "input_sha256": volume.input_sha256, "batch_key": volume.key}
    path = out / volume.name
    write_reconstruction(path, report.reconstruction, attrs=attrs, mask=report.mask)
    strip = lambda s: None if s is None else {k: float(v) for k, v in s.items() if k != "protocol"}  # noqa: E731
    record = {"name": volume.name, "key": volume.key, "input_sha256": volume.input_sha256,
              "output_sha256": sha256_file(path), "slices": volume.num_slices, "metrics": strip(report.metrics),
              "zero_filled_metrics": strip(report.zero_filled_metrics), "seconds": seconds}
    atomic_write_json(state.record_path(volume), record)
    shutil.rmtree(state.partial / volume.state_name, ignore_errors=True)
    return record


class Progress:
    """One bar over the whole work list, on rank 0 only; it counts finished slices of every rank from the disk."""

    def __init__(self, plan: Plan, state: State, enabled: bool, description: str):
        self.plan, self.state, self._bar, self._last = plan, state, None, 0.0
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=plan.total_slices, initial=plan.slices_done, desc=description, unit="slice")

    def update(self, force: bool = False) -> None:
        if self._bar is None or (not force and time.monotonic() - self._last < 1.0):
            return
        self._last = time.monotonic()
        done = sum(v.num_slices for v in self.plan.volumes if v.name not in self.plan.pending)
        for name in self.plan.pending:
            volume = self.plan.volume(name)
            finished = self.state.record_path(volume).exists()
            done += volume.num_slices if finished else len(self.state.slices_present(volume))
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.n = self.plan.total_slices
            self._bar.close()


class _OncePerMessage(logging.Filter):
    """Each distinct warning once: the task layer warns about a file's mask at every slice it poses."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def run_batch(args) -> int:
    """``invdiff batch``: see the module docstring. Returns the exit status (0); bad input raises InputError."""
    from invdiff import settings as settings_table
    from invdiff.compare import resolve_prior
    from invdiff.registry import check_solver_names, needs_prior
    from invdiff.settings import parse_set
    from invdiff.tasks import resolve_device

    args.overwrite = bool(getattr(args, "overwrite", False))
    solver = check_solver_names([args.solver], flag="--solver")[0]
    args.solver = solver
    overrides = parse_set(args.set, solver=solver).get(solver, {})
    values = settings_table.effective(solver, "mri", overrides, steps=args.steps)
    ranks, device_name = init_ranks(args.device)
    lock_holder: list = []
    once, task_log = _OncePerMessage(), logging.getLogger("invdiff.tasks.scan")
    task_log.addFilter(once)
    try:
        device = resolve_device(device_name)
        prior = resolve_prior(args.prior, device) if needs_prior(solver) else None
        out = Path(args.out)
        state = State(out)
        plan = plan_job(args, ranks, effective_settings(args, values, prior, device), state, lock_holder)
        start = time.perf_counter()
        progress = Progress(plan, state, ranks.is_main and not args.no_progress, f"batch {solver}")
        mine = ranks.share(plan.work)
        runs: dict = {}

        def run_of(volume: Volume):                 # prepared once per volume this rank touches
            if volume.name not in runs:
                runs[volume.name] = volume_run(volume, args, prior=prior, overrides=overrides, device=str(device))
            return runs[volume.name]

        for position, (name, index) in enumerate(mine):
            volume = plan.volume(name)
            save_slice(state.slice_path(volume, index), reconstruct_slice(run_of(volume), index))
            progress.update()
            last_of_volume = position + 1 == len(mine) or mine[position + 1][0] != name
            if last_of_volume and len(state.slices_present(volume)) == volume.num_slices and state.claim(volume):
                assemble(volume, run_of(volume), state, out)
        ranks.barrier()
        # Volumes whose slices were all done before this start, or finished by two ranks at the same moment.
        for position, name in enumerate(plan.pending):
            volume = plan.volume(name)
            if position % ranks.world == ranks.rank and not state.record_path(volume).exists() and state.claim(volume):
                missing = set(range(volume.num_slices)) - state.slices_present(volume)
                if missing:
                    raise RuntimeError(f"{volume.name}: slices {sorted(missing)} were not computed by any rank")
                assemble(volume, run_of(volume), state, out)
        ranks.barrier()
        progress.close()
        if ranks.is_main:
            finish(plan, state, time.perf_counter() - start, ranks.world)
        ranks.barrier()
    finally:
        task_log.removeFilter(once)
        for handle in lock_holder:
            handle.close()
        if ranks.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def finish(plan: Plan, state: State, seconds: float, world: int) -> None:
    """Rank 0 after every rank is done: the manifest with this job's records, metrics.csv, the summary table in
    the log; the state folder goes."""
    volumes = dict(plan.manifest.get("volumes", {}))
    for name in plan.pending:
        path = state.record_path(plan.volume(name))
        volumes[name] = json.loads(path.read_text(encoding="utf-8"))
    manifest_path = state.out / MANIFEST_NAME
    write_manifest(manifest_path, plan, volumes)
    rows = [volumes[v.name] for v in plan.volumes]
    write_metrics_csv(state.out / METRICS_NAME, rows)
    shutil.rmtree(state.root, ignore_errors=True)
    computed = len(plan.work)
    log.info("batch done: %d volumes in %s (%d made now, %d slices computed in %.1f s on %d rank%s, %.2f slices/s)",
             len(rows), state.out, len(plan.pending), computed, seconds, world, "s" if world != 1 else "",
             computed / seconds if seconds > 0 else float("nan"))
    for line in summary_table(rows):
        log.info("%s", line)


def summary_table(rows: list[dict]) -> list[str]:
    """A fixed-width table of the volumes' metrics (fastMRI protocol per volume); a mean row when several."""
    header = f"{'volume':<32} {'slices':>6} {'NMSE':>8} {'PSNR':>7} {'SSIM':>7} {'ZF PSNR':>8}"
    lines = [header, "-" * len(header)]
    fmt = lambda value, spec: "n/a" if value is None else format(value, spec)  # noqa: E731
    for row in rows:
        m, z = row.get("metrics") or {}, row.get("zero_filled_metrics") or {}
        lines.append(f"{row['name'][:32]:<32} {row.get('slices', 0):>6} {fmt(m.get('nmse'), '.4f'):>8} "
                     f"{fmt(m.get('psnr'), '.2f'):>7} {fmt(m.get('ssim'), '.4f'):>7} {fmt(z.get('psnr'), '.2f'):>8}")
    scored = [row for row in rows if row.get("metrics")]
    if len(scored) > 1:
        mean = lambda group, key: float(np.mean([r[group][key] for r in scored]))  # noqa: E731
        lines.append(f"{'mean of ' + str(len(scored)):<32} {'':>6} {mean('metrics', 'nmse'):>8.4f} "
                     f"{mean('metrics', 'psnr'):>7.2f} {mean('metrics', 'ssim'):>7.4f} "
                     f"{mean('zero_filled_metrics', 'psnr'):>8.2f}")
    if not scored:
        lines.append("no targets in the inputs (test-set files): metrics not computed")
    return lines


def write_metrics_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["volume", "slices", "NMSE", "PSNR", "SSIM", "zero_filled_NMSE", "zero_filled_PSNR",
                     "zero_filled_SSIM", "seconds"])
    for row in rows:
        m, z = row.get("metrics") or {}, row.get("zero_filled_metrics") or {}
        writer.writerow([row["name"], row.get("slices"), m.get("nmse"), m.get("psnr"), m.get("ssim"), z.get("nmse"),
                         z.get("psnr"), z.get("ssim"), row.get("seconds")])
    with atomic_open(path, "w") as handle:
        handle.write(buffer.getvalue())
    return path


__all__ = ["run_batch", "Ranks", "Plan", "Volume", "State", "init_ranks", "plan_job", "assemble",
           "read_manifest", "summary_table", "MANIFEST_NAME", "MANIFEST_FORMAT"]
