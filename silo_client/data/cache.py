"""On-disk cache of preprocessed local datasets.

A cache entry is keyed by (dataset version, preprocessing hash):

* the dataset version hashes the sorted relative paths, sizes and ``mtime_ns`` of every file
  under the DICOM folder plus the *content* of ``labels.csv``, so adding, removing, touching
  or rewriting a file, or editing a label, gives a new version without decoding any DICOM;
* the preprocessing hash is supplied by the caller (see
  :meth:`silo_client.data.preprocessing.Preprocessing.fingerprint`).

An entry is one ``.pt`` file (``torch.save`` of a dict of tensors and plain lists), written
atomically (:func:`fedsilo_base.atomic_files.atomic_file`, mode 0600). A corrupt or foreign
entry is ignored with a :class:`CacheWarning` and rebuilt; the cache never makes a build fail.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from fedsilo_base.atomic_files import PRIVATE, atomic_file

__all__ = [
    "CACHE_FORMAT",
    "CacheWarning",
    "cache_path",
    "dataset_version",
    "load_entry",
    "save_entry",
]

#: Bumped when the layout of a cache entry changes; part of every key.
CACHE_FORMAT = "fedsilo-data-cache-1"


class CacheWarning(UserWarning):
    """A cache entry could not be read or written; the dataset is (re)built without it."""


def dataset_version(dicom_dir: Path, labels_csv: Path | None) -> str:
    """Hex digest identifying the files under ``dicom_dir`` and the labels file's content.

    Uses relative path, size and ``mtime_ns`` of every regular file (sorted), and the bytes of
    ``labels_csv`` (or a marker when it is absent). Reads no DICOM.
    """
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    entries = []
    for path in dicom_dir.rglob("*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            entries.append((path.relative_to(dicom_dir).as_posix(), st.st_size, st.st_mtime_ns))
    for rel, size, mtime in sorted(entries):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    h.update(b"labels:")
    if labels_csv is not None and labels_csv.is_file():
        h.update(hashlib.sha256(labels_csv.read_bytes()).digest())
    else:
        h.update(b"<none>")
    return h.hexdigest()


def cache_path(cache_dir: Path, version: str, preprocessing_hash: str) -> Path:
    """Path of the cache entry for a dataset version and a preprocessing hash."""
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{version}\0{preprocessing_hash}".encode()).hexdigest()
    return Path(cache_dir) / f"dataset-{key[:40]}.pt"


def load_entry(path: Path, required: dict[str, type]) -> dict[str, Any] | None:
    """Load a cache entry, or ``None`` if absent or unusable (warns when unusable).

    ``required`` maps each key the entry must have to its type; anything else (truncated
    file, pickle error, missing key, wrong type) counts as corrupt.
    """
    if not path.is_file():
        return None
    import torch  # here, not at the top: dataset_version serves torch-free callers (plan_fit)

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise ValueError("not a fedsilo data cache entry")
        for key, typ in required.items():
            if not isinstance(payload.get(key), typ):
                raise ValueError(f"entry has no valid {key!r}")
    except Exception as exc:  # any failure to read means "rebuild"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"ignoring corrupt data cache file {path} ({reason}); rebuilding it from the DICOM",
            CacheWarning,
            stacklevel=3,
        )
        return None
    return payload


def save_entry(path: Path, payload: dict[str, Any]) -> bool:
    """Write ``payload`` atomically to ``path``; returns False (with a warning) on failure."""
    import torch

    path = Path(path)
    try:
        with atomic_file(path, mode=PRIVATE) as fh:
            torch.save({**payload, "format": CACHE_FORMAT}, fh)
        return True
    except OSError as exc:
        warnings.warn(
            f"could not write data cache file {path} ({exc.strerror or exc}); "
            "continuing without cache — check that the cache folder is writable",
            CacheWarning,
            stacklevel=3,
        )
        return False
