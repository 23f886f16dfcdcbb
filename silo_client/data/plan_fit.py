"""Do a dataset's images fit a plan's channels? Answered before any pixel is decoded, so a silo
refuses a plan it cannot train at the gate (``check_plan``) instead of failing in the middle of a
secure-aggregation round, where its refusal would look like a dropout. A catalogued dataset is
answered from its catalogue; a plain folder (``dicom/`` + ``labels.csv``) from its files'
headers, remembered per folder version (the gate keeps them in the silo home). Imports neither
torch nor MONAI."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

from silo_client.data.dicom_read import is_colour, misfit

__all__ = ["catalogue_fit_problem", "dataset_fit_problem", "folder_photometric_counts"]

_FIT_CACHE_FORMAT = "fedsilo-photometric-1"


def dataset_fit_problem(
    folder: Path, channels: int, to_grayscale: bool, cache_dir: Path | None = None
) -> str | None:
    """Why none of the images of the dataset in ``folder`` (catalogued or plain) fit the plan,
    or None when some do or when the folder cannot tell (the dataset builder then says why
    precisely). ``cache_dir`` keeps a plain folder's header counts between calls."""
    from silo_client.data.ingest import MARKER_FILE

    folder = Path(folder)
    if (folder / MARKER_FILE).is_file():
        return catalogue_fit_problem(folder, channels, to_grayscale)
    return _fit_problem(folder_photometric_counts(folder / "dicom", cache_dir), channels,
                        to_grayscale)  # fmt: skip


def catalogue_fit_problem(folder: Path, channels: int, to_grayscale: bool) -> str | None:
    """Why none of the usable images of the catalogued dataset in ``folder`` fit the plan, or
    None when some do (or when ``folder`` is not a catalogued dataset: see
    :func:`dataset_fit_problem`). The reason names no path and no count: it may leave the silo."""
    from silo_client.data.catalogue import Catalogue
    from silo_client.data.ingest import MARKER_FILE

    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
        db_path, name = Path(marker["catalogue"]), str(marker["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not catalogued, or damaged: the dataset builder says which precisely
    if not db_path.is_file():
        return None
    with Catalogue(db_path) as catalogue:
        counts = catalogue.photometric_counts(name)
    return _fit_problem(counts, channels, to_grayscale)


def folder_photometric_counts(dicom_dir: Path, cache_dir: Path | None = None) -> dict[str, int]:
    """PhotometricInterpretation -> number of DICOM images under ``dicom_dir``, from headers
    only (no pixel data read; unreadable and non-image files are left to the dataset builder).

    With ``cache_dir`` the counts are kept in a small JSON file keyed by the folder's version
    (every file's relative path, size and mtime: :func:`silo_client.data.cache.dataset_version`),
    so a plan checked at every stage of every round reads the headers once per change."""
    from silo_client.data.cache import dataset_version

    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        return {}
    cached = None
    if cache_dir is not None:
        version = dataset_version(dicom_dir, None)
        cached = Path(cache_dir) / f"photometric-{version[:40]}.json"
        try:
            payload = json.loads(cached.read_text())
            if payload.get("format") == _FIT_CACHE_FORMAT and isinstance(payload["counts"], dict):
                return {str(k): int(v) for k, v in payload["counts"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # absent or damaged: counted again below
    counts = _count_headers(dicom_dir)
    if cached is not None:
        from fedsilo_base.atomic_files import PRIVATE, write_atomic

        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps({"format": _FIT_CACHE_FORMAT, "counts": counts}).encode()
            write_atomic(cached, data, mode=PRIVATE)
            for stale in cached.parent.glob("photometric-*.json"):  # earlier folder versions
                if stale != cached:
                    stale.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only cache only costs reading the headers again
    return counts


def _count_headers(dicom_dir: Path) -> dict[str, int]:
    from pydicom import dcmread

    from silo_client.data.folder_scan import _iter_files

    counts: Counter[str] = Counter()
    with warnings.catch_warnings():  # odd headers are the builder's to report, not the gate's
        warnings.simplefilter("ignore")
        for path, _rel in _iter_files(dicom_dir):
            try:
                ds = dcmread(
                    path, stop_before_pixels=True,
                    specific_tags=["PhotometricInterpretation", "Rows"],
                )  # fmt: skip
            except Exception:  # not DICOM, truncated, ...: the builder says which
                continue
            if "Rows" not in ds:
                continue  # no image (a report, a structured document)
            photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
            counts[photometric or "MONOCHROME2"] += 1
    return dict(counts)


def _fit_problem(counts: dict[str, int], channels: int, to_grayscale: bool) -> str | None:
    """The refusal reason when no photometric kind in ``counts`` fits the plan, else None."""
    if not counts:
        return None  # nothing usable at all: the dataset builder says so precisely
    if any(misfit(p, channels, to_grayscale) is None for p in counts):
        return None
    kinds = sorted(counts)
    what = "colour" if all(is_colour(p) for p in kinds) else "grayscale"
    wants = (
        "colour images (preprocessing.channels: 3)"
        if channels == 3
        else ("grayscale images (preprocessing.channels: 1)")
    )
    return (
        f"none of this site's images fit the plan: they are {what} ({', '.join(kinds)}) and the "
        f"plan takes {wants}"
    )
