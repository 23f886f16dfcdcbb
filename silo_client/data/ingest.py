"""Register a dataset in the silo's catalogue: look at every file once, record what it is.

An ingest walks a folder (or the folder a PACS pull wrote into), reads each file it has not
recorded yet (same path, size and mtime means already recorded), decodes its pixels to be sure
they can be used, and records it as ``ok`` with its metadata or ``skipped`` with a precise
reason. Batches are committed as they go, so an interrupted ingest resumes where it stopped.

A registered dataset gets a managed folder ``<home>/datasets/<name>/`` holding a marker file
(:data:`MARKER_FILE`) and, for PACS pulls, the retrieved files under ``dicom/``; the silo's
``silo.json`` maps the name to that folder, so ``SiloHome.dataset_folder(name)`` and the
training loader (:func:`silo_client.data.dataset_builder.build_dataset`) find it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import UID

from silo_client.data.catalogue import (
    KEY_TAGS,
    Catalogue,
    DatasetRecord,
    FileRecord,
    key_digest,
    label_key,
    reason_category,
)
from silo_client.data.dicom_read import (
    GRAYSCALE,
    DecodedPixels,
    LibraryMessages,
    decode_pixels,
    photometric_of,
    read_dicom,
)
from silo_client.data.file_probe import truncation
from silo_client.data.labels_csv import LabelFileWording, read_label_csv
from silo_client.errors import DataError

__all__ = [
    "INGEST_LOG",
    "MARKER_FILE",
    "IngestLog",
    "IngestSummary",
    "PullResult",
    "ingest_folder",
    "inspect_file",
    "load_frames",
    "managed_folder",
    "read_label_table",
    "register_dataset",
]

log = logging.getLogger(__name__)

MARKER_FILE = "fedsilo-dataset.json"
INGEST_LOG = "ingest.log"
"""Appended to in a dataset's managed folder: each ingest's skipped files and library warnings."""
_BATCH = 256
_COMMIT_S = 1.0  # at most this much reading is lost to an interrupt

# Words in a SOP class name -> what the object is, for precise skip reasons.
_NON_IMAGE_KINDS: tuple[tuple[str, str], ...] = (
    ("SR Storage", "a structured report (SR)"),
    ("Presentation State", "a presentation state"),
    ("RT Plan", "an RT plan"),
    ("RT Ion Plan", "an RT ion plan"),
    ("RT Structure Set", "an RT structure set"),
    ("RT Dose", "an RT dose grid"),
    ("Key Object Selection", "a key object selection (KOS)"),
    ("Segmentation", "a segmentation object"),
    ("Encapsulated PDF", "an encapsulated PDF"),
    ("Raw Data", "raw data"),
    ("Waveform", "a waveform"),
    ("Registration", "a spatial registration"),
)


def managed_folder(home_root: Path, name: str) -> Path:
    """The folder a registered dataset's marker (and pulled files) live in."""
    return Path(home_root) / "datasets" / name


# ------------------------------------------------------------------------------------ files


def _one_line(exc: BaseException, limit: int = 400) -> str:
    # All of the message on one line: pydicom puts a decoder's real cause (which plugin is
    # missing, what the codec said) on the lines after its first.
    text = " ".join(str(exc).split())
    msg = text or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _num(ds: DicomDataset, keyword: str, index: int = 0) -> float | None:
    """A numeric tag's value (``index`` of a multi-value), None when absent or not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or (
            hasattr(value, "__getitem__") and not isinstance(value, str)
        ):
            value = value[index]
        out = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if math.isfinite(out) else None


def _functional(ds: DicomDataset, sequence: str, keyword: str, index: int = 0) -> float | None:
    """A value from the shared functional groups of an enhanced multi-frame object."""
    try:
        item = ds.SharedFunctionalGroupsSequence[0][sequence][0]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    return _num(item, keyword, index)


def _rescale(ds: DicomDataset) -> tuple[float, float]:
    slope = _num(ds, "RescaleSlope")
    intercept = _num(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        slope = _functional(ds, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, "PixelValueTransformationSequence", "RescaleIntercept")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _non_image_reason(ds: DicomDataset) -> str | None:
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if not sop_class:
        return None
    name = UID(sop_class).name
    if name == sop_class or "Image" in name:
        return None
    kind = next((what for word, what in _NON_IMAGE_KINDS if word in name), "not an image")
    return f"non-image SOP class '{name}' ({sop_class}): {kind}, no image to train on"


def _examine(ds: DicomDataset) -> tuple[DecodedPixels | None, str | None]:
    """Validate an image object and decode its frames (grayscale ``[F, H, W]`` stored values,
    colour ``[F, H, W, 3]`` RGB)."""
    reason = _non_image_reason(ds)
    if reason:
        return None, reason
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            return None, f"unsupported {other[0]} (only integer PixelData is used)"
        return None, "no pixel data (tag (7FE0,0010) PixelData is absent)"
    if not str(ds.get("StudyInstanceUID", "") or "").strip():
        return None, "no StudyInstanceUID (needed to match labels and group studies)"
    photometric, reason = photometric_of(ds)
    if photometric is None:
        return None, reason
    if photometric in GRAYSCALE:
        slope, _ = _rescale(ds)
        if slope == 0:
            return None, "invalid RescaleSlope 0"
    return decode_pixels(ds)


def _read(path: Path) -> tuple[DicomDataset | None, str | None]:
    return read_dicom(path)


def _truncated_or(path: Path, reason: str | None) -> str | None:
    """A half-copied export says so: pixel data that is absent or cannot be decoded because
    the file ends early is 'truncated file ...', not a missing tag or a codec error."""
    if reason and (reason.startswith("no pixel data") or "cannot be decoded" in reason):
        return truncation(path) or reason
    return reason


def inspect_file(path: Path, rel: str, size: int, mtime_ns: int) -> FileRecord:
    """Read and decode one file; an ``ok`` record with metadata, or ``skipped`` with why.

    What pydicom warns about while doing so goes into the record's ``warnings``.
    """
    with LibraryMessages() as messages:
        record = _inspect(path, rel, size, mtime_ns)
    record.warnings = messages.text()
    return record


def _inspect(path: Path, rel: str, size: int, mtime_ns: int) -> FileRecord:
    ds, reason = _read(path)
    if ds is None:
        return FileRecord(rel, size, mtime_ns, "skipped", reason)
    try:
        decoded, reason = _examine(ds)
        if decoded is None:
            return FileRecord(rel, size, mtime_ns, "skipped", _truncated_or(path, reason))
        stack = decoded.frames
        study = str(ds.StudyInstanceUID).strip()
        patient = str(ds.get("PatientID", "") or "").strip()
        accession = str(ds.get("AccessionNumber", "") or "").strip()
        group_src = f"patient:{patient}" if patient else f"study:{study}"
        spacing_row = _num(ds, "PixelSpacing", 0) or _num(ds, "ImagerPixelSpacing", 0)
        spacing_col = _num(ds, "PixelSpacing", 1) or _num(ds, "ImagerPixelSpacing", 1)
        if spacing_row is None:
            spacing_row = _functional(ds, "PixelMeasuresSequence", "PixelSpacing", 0)
            spacing_col = _functional(ds, "PixelMeasuresSequence", "PixelSpacing", 1)
        thickness = _num(ds, "SliceThickness")
        if thickness is None:
            thickness = _functional(ds, "PixelMeasuresSequence", "SliceThickness")
        syntax = ds.file_meta.get("TransferSyntaxUID")
        return FileRecord(
            path=rel,
            size=size,
            mtime_ns=mtime_ns,
            status="ok",
            study_uid=study,
            series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip() or f"{study}.?",
            sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip() or None,
            sop_class=str(ds.get("SOPClassUID", "") or "") or None,
            modality=str(ds.get("Modality", "") or "").strip() or None,
            rows=int(stack.shape[1]),
            columns=int(stack.shape[2]),
            frames=int(stack.shape[0]),
            spacing_row=spacing_row,
            spacing_col=spacing_col,
            slice_thickness=thickness,
            transfer_syntax=str(syntax) if syntax else None,
            photometric=decoded.photometric,
            bits_stored=int(ds.get("BitsStored", 0) or 0) or None,
            accession_digest=key_digest("AccessionNumber", accession) if accession else None,
            patient_digest=key_digest("PatientID", patient) if patient else None,
            patient_group=hashlib.sha256(f"fedsilo-group\0{group_src}".encode()).hexdigest()[:16],
        )
    except Exception as exc:  # malformed element values, odd VRs, ...
        return FileRecord(rel, size, mtime_ns, "skipped", f"unreadable DICOM ({_one_line(exc)})")


def load_frames(path: Path) -> tuple[np.ndarray, tuple[float, float], str]:
    """Decode a catalogued image: (frames, window as [lower, upper], photometric).

    Grayscale frames are ``[F, H, W]`` float64 after the modality LUT with the file's window
    (else min/max); colour frames are ``[F, H, W, 3]`` RGB with the window ``[0, full scale]``.
    Raises DataError when the file no longer decodes. pydicom's warnings are not printed (the
    ingest recorded them).
    """
    with LibraryMessages():
        ds, reason = _read(path)
        if ds is None:
            raise DataError(f"{path}: {reason}")
        decoded, reason = _examine(ds)
    if decoded is None:
        raise DataError(f"{path}: {reason}")
    if decoded.colour:
        return decoded.frames.astype(np.float64), (0.0, decoded.full_scale), decoded.photometric
    slope, intercept = _rescale(ds)
    pixels = decoded.frames.astype(np.float64) * slope + intercept
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: pixel values are not finite after RescaleSlope/Intercept")
    center = _num(ds, "WindowCenter")
    width = _num(ds, "WindowWidth")
    if center is not None and width is not None and width > 0:
        window = (center - width / 2.0, center + width / 2.0)
    else:
        window = (float(pixels.min()), float(pixels.max()))
    return pixels, window, decoded.photometric


# ------------------------------------------------------------------------------------ labels


def read_label_table(
    csv_path: Path, key_tag: str = "StudyInstanceUID", label_column: str = "label"
) -> dict[str, tuple[int, int]]:
    """Read a labels CSV into {stored key: (label, line)} (IDs are stored as digests).

    Raises DataError naming the file and line for: missing file, missing column, short row,
    empty key, non-integer or negative label, a key labelled twice.
    """
    if key_tag not in KEY_TAGS:
        raise DataError(f"--key {key_tag} is not supported; use one of {', '.join(KEY_TAGS)}")
    wording = LabelFileWording(
        create=f"pass a CSV with columns '{key_tag},{label_column}'",
        fix_header="pass --key/--label-column to name them",
        label_form="class index (use 0, 1, ...)",
        row_unit="key",
        name_duplicates=False,  # a PatientID or accession number is not echoed
    )
    return read_label_csv(
        csv_path, key_column=key_tag, label_column=label_column,
        key=lambda value: label_key(key_tag, value), wording=wording,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ ingest


@dataclass
class IngestSummary:
    """What one ``add`` did: files looked at, new ok/skipped, unchanged, gone, reasons."""

    name: str
    files: int = 0
    new_ok: int = 0
    new_skipped: int = 0
    unchanged: int = 0
    removed: int = 0
    warned: int = 0
    pulled: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    catalogue: dict[str, Any] = field(default_factory=dict)
    undelivered: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Newly ingested files per second."""
        n = self.new_ok + self.new_skipped
        return n / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return {
            "name": self.name,
            "files": self.files,
            "new_ok": self.new_ok,
            "new_skipped": self.new_skipped,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "new_with_warnings": self.warned,
            "pulled": self.pulled,
            "seconds": round(self.seconds, 3),
            "files_per_second": round(self.rate, 1),
            "new_skip_reasons": self.reasons,
            "undelivered": [{"sop_uid": s, "reason": r} for s, r in self.undelivered],
            "catalogue": self.catalogue,
        }


@dataclass
class PullResult:
    """What a PACS pull did: instances written, the instances the PACS listed for the query
    but did not deliver as (SOPInstanceUID, why), and how many the query selects."""

    written: int
    undelivered: list[tuple[str, str]] = field(default_factory=list)
    listed: int = 0


@dataclass(frozen=True)
class WalkEntry:
    """One thing found under an ingested folder: a regular file to read, or something that
    cannot be read (a dangling symlink, a symlink loop, an unreadable folder) with ``reason``.

    ``rel`` is the path relative to the root as the catalogue stores it (:func:`stored_path`);
    ``size``/``mtime_ns`` come from the file (or, for what cannot be followed, the link or
    folder itself), so a re-run sees an unchanged entry as unchanged.
    """

    path: Path
    rel: str
    size: int
    mtime_ns: int
    reason: str | None = None


def stored_path(rel: str) -> str:
    """How a relative path is stored in the catalogue (SQLite text is UTF-8).

    A file name that is not valid UTF-8 reaches Python surrogate-escaped (os.fsdecode); such
    a name is stored with its undecodable bytes written as ``\\xNN``, so the file is recorded
    (and shown to the operator) instead of crashing the batch.
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _entry(path: Path, root: Path, st: os.stat_result, reason: str | None = None) -> WalkEntry:
    rel = stored_path(path.relative_to(root).as_posix())
    return WalkEntry(path, rel, st.st_size, st.st_mtime_ns, reason)


def _link_reason(path: Path, exc: OSError) -> str:
    import errno

    if exc.errno == errno.ELOOP:
        return "symbolic link loop (the link resolves to itself); fix or remove the link"
    if exc.errno == errno.ENOENT:
        target = os.readlink(path) if path.is_symlink() else "?"
        return (f"dangling symbolic link (its target {stored_path(target)} does not exist); "
                "fix or remove the link")  # fmt: skip
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _walk(root: Path) -> Iterator[WalkEntry]:
    """Everything under ``root`` (sorted by relative path), skipping our marker: regular files,
    and, with a reason, what cannot be read, so nothing under the folder goes unaccounted for.

    Folder symlinks are followed (exports often link series folders) but a folder already
    visited on this walk (a symlink loop or a second link to it) is recorded, not entered again.
    """
    entries: list[WalkEntry] = []
    root_st = root.stat()
    visited = {(root_st.st_dev, root_st.st_ino)}

    def unreadable(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root
        try:
            st = where.lstat()
        except OSError:
            return
        why = err.strerror or type(err).__name__
        entries.append(_entry(where, root, st, f"folder cannot be read ({why}); its files are "
                                                "not looked at: fix its permissions"))  # fmt: skip

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        keep = []
        for dname in sorted(dirnames):
            sub = here / dname
            try:
                st = sub.stat()
            except OSError as exc:  # a link to a folder that is gone or loops
                entries.append(_entry(sub, root, sub.lstat(), _link_reason(sub, exc)))
                continue
            if (st.st_dev, st.st_ino) in visited:
                entries.append(_entry(sub, root, sub.lstat(), (
                    "symbolic link to a folder already looked at on this walk (a loop or a "
                    "second link to it); its files are counted once")))  # fmt: skip
                continue
            visited.add((st.st_dev, st.st_ino))
            keep.append(dname)
        dirnames[:] = keep
        for fname in filenames:
            path = here / fname
            if path == root / MARKER_FILE:
                continue
            try:
                st = path.stat()
            except OSError as exc:
                try:
                    entries.append(_entry(path, root, path.lstat(), _link_reason(path, exc)))
                except OSError:
                    pass  # removed while we looked: nothing to account for
                continue
            if not stat.S_ISREG(st.st_mode):
                what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
                entries.append(_entry(path, root, path.lstat(), f"{what}; not read"))
                continue
            entries.append(_entry(path, root, st))
    entries.sort(key=lambda e: e.rel)
    yield from entries


class IngestLog:
    """The silo-local ingest log of one dataset: per ingest, every new skip and every library
    warning with the file it came from (paths stay in the hospital, like the catalogue)."""

    def __init__(self, path: Path | None) -> None:
        """Append to ``path`` (nothing is written when it is None)."""
        self.path = path
        self._lines: list[str] = []

    def add(self, what: str, rel: str, text: str) -> None:
        """One line: ``<what> <path>: <text>``."""
        if self.path is not None:
            self._lines.append(f"{what} {rel}: {text}")

    def write(self, header: str, footer: str) -> None:
        """Append this ingest's lines between a header and a footer line, with timestamps."""
        if self.path is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = [f"{stamp} {header}", *(f"{stamp}   {ln}" for ln in self._lines),
                 f"{stamp} {footer}"]  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write("\n".join(lines) + "\n")
        self._lines = []


def ingest_folder(
    catalogue: Catalogue,
    name: str,
    root: Path,
    progress: Callable[[int, int], None] | None = None,
    log: IngestLog | None = None,
) -> IngestSummary:
    """Record every file under ``root`` not yet recorded (or changed) for dataset ``name``.

    Commits every few hundred files or every second, whichever comes first, and what was
    read when an error or an interrupt stops the ingest: a re-run loses nothing and does not
    read again a file recorded with the same size and mtime. Records of files that vanished
    are dropped. ``progress(done, total)`` is called as files are processed. New skips and
    pydicom's warnings go to ``log``.
    """
    started = time.perf_counter()
    log = log if log is not None else IngestLog(None)
    summary = IngestSummary(name=name)
    known = catalogue.known_files(name)
    sops = catalogue.ok_sops(name)
    files = list(_walk(root))
    summary.files = len(files)
    present = {e.rel for e in files}
    gone = [p for p in known if p not in present]
    if gone:
        catalogue.forget_files(name, gone)
        summary.removed = len(gone)
        gone_set = set(gone)
        sops = {s: p for s, p in sops.items() if p not in gone_set}
    batch: list[FileRecord] = []
    last_commit = time.monotonic()
    if progress is not None:
        progress(0, len(files))
    try:
        for done, entry in enumerate(files, start=1):
            if known.get(entry.rel) == (entry.size, entry.mtime_ns):
                summary.unchanged += 1
            else:
                record = _record(entry, sops)
                if record.status == "ok":
                    summary.new_ok += 1
                else:
                    summary.new_skipped += 1
                    key = reason_category(record.reason or "")
                    summary.reasons[key] = summary.reasons.get(key, 0) + 1
                    log.add("skipped", entry.rel, record.reason or "")
                if record.warnings:
                    summary.warned += 1
                    log.add("warning", entry.rel, record.warnings)
                batch.append(record)
                if len(batch) >= _BATCH or time.monotonic() - last_commit >= _COMMIT_S:
                    catalogue.record_files(name, batch)
                    batch, last_commit = [], time.monotonic()
            if progress is not None:
                progress(done, len(files))
    finally:  # an error or Ctrl-C keeps what was already read
        catalogue.record_files(name, batch)
    summary.seconds = time.perf_counter() - started
    return summary


def _record(entry: WalkEntry, sops: dict[str, str]) -> FileRecord:
    """The record of one walked entry (``sops``: SOPInstanceUID -> first path, updated)."""
    rel, size, mtime = entry.rel, entry.size, entry.mtime_ns
    if entry.reason is not None:
        return FileRecord(rel, size, mtime, "skipped", entry.reason)
    record = inspect_file(entry.path, rel, size, mtime)
    if record.status == "ok" and stored_path(str(entry.path)) != str(entry.path):
        return FileRecord(rel, size, mtime, "skipped", (
            "file name is not valid UTF-8 (undecodable bytes shown as \\xNN); a DICOM image, "
            "rename the file (or its folder) to UTF-8 to use it"))  # fmt: skip
    if record.status == "ok" and record.sop_uid:
        first = sops.get(record.sop_uid)
        if first is not None and first != rel:
            return FileRecord(rel, size, mtime, "skipped",
                              f"duplicate of {first} (same SOPInstanceUID)")  # fmt: skip
        sops[record.sop_uid] = rel
    return record


def _write_marker(folder: Path, catalogue: Catalogue, name: str) -> None:
    from fedsilo_base.atomic_files import write_atomic

    payload = {"kind": "fedsilo-catalogued-dataset", "name": name,
               "catalogue": str(catalogue.path.resolve())}  # fmt: skip
    write_atomic(folder / MARKER_FILE, json.dumps(payload, indent=2).encode(), mode=0o644)


def register_dataset(
    home: Any,
    name: str,
    *,
    source_kind: str,
    source: str,
    files_root: Path,
    labels_csv: Path | None = None,
    label_column: str = "label",
    key_tag: str = "StudyInstanceUID",
    query: str = "",
    progress: Callable[[int, int], None] | None = None,
    pull: Callable[[Catalogue], PullResult | int] | None = None,
) -> IngestSummary:
    """Register (or refresh) dataset ``name`` of silo home ``home`` and ingest what is new.

    Validates the labels file first (errors before any file is read), records the dataset,
    runs ``pull`` (a PACS retrieval into ``files_root``) if given, ingests the folder, and
    maps ``name`` to its managed folder in ``silo.json``. Instances the PACS listed but did
    not deliver are recorded with the reason (``summary.undelivered``); what arrived is used.
    A pull that fails (PACS gone, credentials refused) keeps the files it wrote and the
    dataset (state ``ingesting``): run the same command again to resume, or remove it.
    """
    _check_name(name)
    if key_tag not in KEY_TAGS:
        raise DataError(f"--key {key_tag} is not supported; use one of {', '.join(KEY_TAGS)}")
    labels = read_label_table(labels_csv, key_tag, label_column) if labels_csv else None
    files_root = Path(files_root).expanduser().resolve()
    if source_kind == "dicom-dir" and not files_root.is_dir():
        raise DataError(
            f"DICOM folder {files_root} does not exist; pass the folder with the DICOM files"
        )
    folder = managed_folder(home.root, name)
    folder.mkdir(parents=True, exist_ok=True)
    with Catalogue.of_home(home.root) as catalogue:
        old = catalogue.dataset(name)
        if old is not None and (old.source_kind, old.source) != (source_kind, source):
            raise DataError(
                f"dataset '{name}' is already registered from {old.source_kind} {old.source}; "
                f"pick another name or run 'silo data remove {name}' first"
            )
        now = time.time()
        catalogue.upsert_dataset(
            DatasetRecord(
                name=name, source_kind=source_kind, source=source, files_root=str(files_root),
                labels_csv=str(Path(labels_csv).resolve()) if labels_csv else None,
                label_column=label_column, key_tag=key_tag, query=query, state="ingesting",
                created=old.created if old else now, updated=now,
            )
        )  # fmt: skip
        if labels is not None:
            catalogue.set_labels(name, labels)
        result = _run_pull(pull, catalogue, name, files_root, first=old is None)
        files_root.mkdir(parents=True, exist_ok=True)
        log = IngestLog(folder / INGEST_LOG)
        header = f"ingest of '{name}' from {source_kind} {source}"
        try:
            summary = ingest_folder(catalogue, name, files_root, progress, log)
        except BaseException:
            log.write(header, "stopped before the end (an error or an interrupt); the next "
                      "'silo data add' continues")  # fmt: skip
            raise
        log.write(
            header,
            f"done: {summary.files} files, {summary.new_ok} new ok, {summary.new_skipped} new "
            f"skipped, {summary.warned} with warnings, {summary.unchanged} unchanged",
        )
        summary.pulled = result.written
        summary.undelivered = result.undelivered
        if pull is not None:
            catalogue.record_undelivered(name, result.undelivered)
        catalogue.set_state(name, "complete")
        summary.catalogue = catalogue.summary(name)
        _write_marker(folder, catalogue, name)
    home.datasets[name] = str(folder)
    home.save()
    return summary


def _files_in(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _run_pull(
    pull: Callable[[Catalogue], PullResult | int] | None,
    catalogue: Catalogue,
    name: str,
    files_root: Path,
    first: bool,
) -> PullResult:
    """Run the pull step; a failure says what was kept and how to resume or remove."""
    if pull is None:
        return PullResult(0)
    try:
        outcome = pull(catalogue)
    except DataError as exc:
        kept = _files_in(files_root)
        if first and not kept and not catalogue.known_files(name):
            catalogue.remove(name)  # a first pull that fetched nothing registers nothing
            raise
        raise DataError(
            f"{exc}; the dataset '{name}' keeps the {kept} file(s) retrieved so far (state "
            f"'ingesting'): run the same 'silo data add' again to resume, or "
            f"'silo data remove {name}'"
        ) from None
    result = outcome if isinstance(outcome, PullResult) else PullResult(int(outcome))
    if result.undelivered and not result.written and not _files_in(files_root):
        if first:
            catalogue.remove(name)
        sop, why = result.undelivered[0]
        raise DataError(
            f"the PACS listed {len(result.undelivered)} instance(s) for the query but delivered "
            f"none (e.g. {sop}: {why}); check the PACS's log"
        )
    return result


def _check_name(name: str) -> None:
    ok = name and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)
    if not ok or name.startswith("."):
        raise DataError(
            f"dataset name {name!r} is not allowed; use letters, digits, '-', '_' or '.' "
            "(at most 64, not starting with '.')"
        )


def remove_dataset(home: Any, name: str) -> int:
    """Forget dataset ``name`` (catalogue rows, managed folder, silo.json entry).

    The hospital's own DICOM folder is never touched; files a PACS pull wrote into the
    managed folder are deleted. Works on a half-registered dataset too (a pull that failed,
    or an entry only in ``silo.json``). Returns the number of catalogue file records dropped.
    """
    import shutil

    folder = managed_folder(home.root, name)
    with Catalogue.of_home(home.root) as catalogue:
        record = catalogue.dataset(name)
        if record is None and not folder.is_dir() and name not in home.datasets:
            catalogue.require(name)  # the one-line error naming the registered datasets
        n = catalogue.remove(name)
    if folder.is_dir():
        if record is not None and record.source_kind == "dicom-dir":
            (folder / MARKER_FILE).unlink(missing_ok=True)
            (folder / INGEST_LOG).unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                pass
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if name in home.datasets:
        del home.datasets[name]
        home.save()
    return n
