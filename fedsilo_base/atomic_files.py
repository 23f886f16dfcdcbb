"""Atomic file writes: readers see the old file or the new one, never half of one.

The strictest behaviour of the copies this replaces, kept for every caller:

* the temporary file lives in the destination's folder (or a staging folder on the same file
  system), so the final ``os.replace`` is a rename, never a copy;
* its mode is set on the open descriptor *before* any byte is written, so a private key is never
  readable by others, not even while it is being written (``mkstemp`` creates it 0600);
* the data is flushed and ``fsync``-ed before the rename, and the folder is ``fsync``-ed after
  it, so a power cut leaves the old or the new file, not an empty one;
* on any failure the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PRIVATE = 0o600
PUBLIC = 0o644


def fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: Path | str, *, mode: int, staging_dir: Path | None = None
) -> Iterator[BinaryIO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path`` atomically.

    ``mode`` is explicit on purpose (:data:`PRIVATE` for keys and silo state, :data:`PUBLIC`
    for certificates and exchanged files). ``staging_dir`` keeps half-written files out of a
    folder that others scan; it must be on the same file system as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = staging_dir if staging_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path | str, *, mode: int) -> Iterator[Path]:
    """A temporary path for writers that want a file name (``savefig``, ``save_file``, ...).

    The caller writes the whole file at the yielded path; on a clean exit it gets ``mode``, is
    ``fsync``-ed and replaces ``path`` (then the folder is ``fsync``-ed), as in
    :func:`atomic_file`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, mode)  # a writer may have replaced the file rather than written into it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomic(
    path: Path | str, data: bytes, *, mode: int, staging_dir: Path | None = None
) -> None:
    """Write ``data`` to ``path`` atomically with file mode ``mode`` (see :func:`atomic_file`)."""
    with atomic_file(path, mode=mode, staging_dir=staging_dir) as handle:
        handle.write(data)
