"""Atomic file writing: a file appears under its final name complete, or not at all.

Every writer in invdiff (reconstruction h5 files, figures, CSV/JSON reports, cached coil maps) writes to a
hidden temporary file in the destination folder and renames it with :func:`os.replace`, which is atomic
on POSIX and Windows within one file system. A writer that raises removes its temporary file; a process
killed mid-write leaves at most a hidden ``.NAME.XXXXXXXX.tmp.EXT`` file, never a partial ``NAME.EXT``.

    >>> with atomic_path("out/figure.png") as tmp:     # tmp: out/.figure.1a2b3c4d.tmp.png
    ...     fig.savefig(tmp)                            # the extension is kept, so format inference works
    >>> with atomic_open("out/report.json", "w") as f:
    ...     json.dump(report, f)
"""
from __future__ import annotations

import json
import math
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "atomic_open", "atomic_write_json", "check_output_folder"]


def check_output_folder(path: str | os.PathLike) -> Path:
    """``Path(path)`` after checking that its folder exists and that ``path`` is not a folder itself."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: output folder {folder} does not exist; expected an existing folder "
                                f"(create it first)")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; expected a file name to write")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on any error delete it.

    The temporary name is ``.{stem}.{8 hex}.tmp{suffix}`` in the same folder (same file system, so the
    rename is atomic; same extension, so libraries that infer the format from it still work). It is
    created empty with the process umask's permissions; the writer may truncate or replace it.
    ``fsync``: flush the file and its folder to disk before returning, so a power cut cannot leave an
    empty file under the final name.
    """
    path = check_output_folder(path)
    tmp = _create_temporary(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{path}: the writer removed its temporary file {tmp.name}; nothing written")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a Ctrl-C during the write must not leave the temporary file behind either.
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_folder(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True, **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically (see :func:`atomic_path`); ``mode`` is ``"w"`` or ``"wb"``."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open: mode must be 'w', 'wt' or 'wb' (a fresh file), got {mode!r}")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, default=None) -> Path:
    """Write ``obj`` as JSON (sorted keys, trailing newline) atomically; returns the path. ``default`` as in
    :func:`json.dumps` (e.g. ``str`` for paths and dates)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=default) + "\n"   # serialise first: a TypeError writes nothing
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _create_temporary(path: Path) -> Path:
    # O_EXCL makes the name ours alone (two writers of the same output never share a temporary file);
    # mode 0o666 lets the umask decide the final permissions, unlike tempfile's private 0o600.
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: could not create a unique temporary file in {path.parent}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; folders cannot be opened this way on Windows, where it is skipped.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(value):
    """``value`` with numpy scalars, paths, torch devices / dtypes and non-finite floats (-> None) made JSON-safe,
    recursively; anything else becomes its ``repr``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:     # numpy scalars
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path) or type(value).__module__ == "torch":
        return str(value)
    return repr(value)
