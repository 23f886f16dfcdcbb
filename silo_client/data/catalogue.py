"""The silo's data catalogue: one SQLite file in the silo home, never sent anywhere.

It records, per registered dataset, every file an ingest looked at (``status`` ``ok`` or
``skipped`` with a precise ``reason``) with the study/series/instance hierarchy, modality,
dimensions, spacing, transfer syntax, photometric interpretation, and the label resolved from
the dataset's labels file through its key tag. Patient IDs and accession numbers are stored
only as salted digests (enough to match a labels file and to group a patient's images).

Writes happen in transactions: an interrupted ingest leaves the batches it committed, and the
next ``add`` continues from there (files whose path, size and mtime are already recorded are
not read again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from silo_client.errors import DataError

__all__ = [
    "CATALOGUE_FILE",
    "KEY_TAGS",
    "Catalogue",
    "DatasetRecord",
    "FileRecord",
    "key_digest",
]

CATALOGUE_FILE = "catalogue.sqlite"
SCHEMA_VERSION = "2"
"""Version 2 added ``file.warnings`` (what pydicom warned about the file) and reads colour
images: a version 1 catalogue is migrated when opened (see :meth:`Catalogue._migrate`)."""

#: Tags a labels file may be keyed by, and the catalogue column each one is matched against.
KEY_TAGS: dict[str, str] = {
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_uid",
    "AccessionNumber": "accession_digest",
    "PatientID": "patient_digest",
}
_DIGEST_KEYS = ("AccessionNumber", "PatientID")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dataset (
    name TEXT PRIMARY KEY,
    source_kind TEXT NOT NULL,          -- dicom-dir | dicomweb | dimse
    source TEXT NOT NULL,               -- folder, or PACS URL / host:port (no credentials)
    files_root TEXT NOT NULL,           -- folder the file paths are relative to
    labels_csv TEXT,
    label_column TEXT NOT NULL DEFAULT 'label',
    key_tag TEXT NOT NULL DEFAULT 'StudyInstanceUID',
    query TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'ingesting',   -- ingesting | complete
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS study (
    dataset TEXT NOT NULL, study_uid TEXT NOT NULL,
    PRIMARY KEY (dataset, study_uid)
);
CREATE TABLE IF NOT EXISTS series (
    dataset TEXT NOT NULL, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, modality TEXT,
    PRIMARY KEY (dataset, series_uid)
);
CREATE TABLE IF NOT EXISTS file (
    dataset TEXT NOT NULL,
    path TEXT NOT NULL,                 -- relative to dataset.files_root (POSIX)
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,               -- ok | skipped
    reason TEXT,
    study_uid TEXT, series_uid TEXT, sop_uid TEXT, sop_class TEXT,
    modality TEXT, rows INTEGER, columns INTEGER, frames INTEGER,
    spacing_row REAL, spacing_col REAL, slice_thickness REAL,
    transfer_syntax TEXT, photometric TEXT, bits_stored INTEGER,
    accession_digest TEXT, patient_digest TEXT, patient_group TEXT,
    ingested REAL NOT NULL,
    warnings TEXT,                      -- what pydicom warned about while reading it
    PRIMARY KEY (dataset, path)
);
CREATE INDEX IF NOT EXISTS file_sop ON file (dataset, sop_uid);
-- instances a PACS listed for the dataset's query but did not deliver (the newest pull's)
CREATE TABLE IF NOT EXISTS undelivered (
    dataset TEXT NOT NULL, sop_uid TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (dataset, sop_uid)
);
CREATE TABLE IF NOT EXISTS label (
    dataset TEXT NOT NULL, key_value TEXT NOT NULL, label INTEGER NOT NULL, line INTEGER NOT NULL,
    PRIMARY KEY (dataset, key_value)
);
"""


def key_digest(tag: str, value: str) -> str:
    """Salted digest of an identifying key value (PatientID, AccessionNumber) for matching."""
    return hashlib.sha256(f"fedsilo-key\0{tag}\0{value.strip()}".encode()).hexdigest()[:32]


def label_key(tag: str, value: str) -> str:
    """How a labels-file value of key ``tag`` is stored (UIDs as they are, IDs as digests)."""
    return key_digest(tag, value) if tag in _DIGEST_KEYS else value.strip()


@dataclass
class DatasetRecord:
    """One registered dataset (where its files come from and how labels are matched)."""

    name: str
    source_kind: str
    source: str
    files_root: str
    labels_csv: str | None
    label_column: str
    key_tag: str
    query: str
    state: str
    created: float
    updated: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return asdict(self)


@dataclass
class FileRecord:
    """What an ingest found in one file: ``ok`` with its metadata, or ``skipped`` with a reason."""

    path: str
    size: int
    mtime_ns: int
    status: str
    reason: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class: str | None = None
    modality: str | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int | None = None
    spacing_row: float | None = None
    spacing_col: float | None = None
    slice_thickness: float | None = None
    transfer_syntax: str | None = None
    photometric: str | None = None
    bits_stored: int | None = None
    accession_digest: str | None = None
    patient_digest: str | None = None
    patient_group: str | None = None
    warnings: str | None = None


_FILE_COLUMNS = [f for f in FileRecord.__dataclass_fields__]


class Catalogue:
    """The SQLite catalogue of a silo home (``<home>/catalogue.sqlite``)."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the catalogue at ``path``."""
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise DataError(
                f"data catalogue {self.path} cannot be opened ({exc}); restore it from a backup "
                "or move it away and register the datasets again"
            ) from None

    def _migrate(self) -> None:
        """Bring a catalogue written by an older fedsilo to :data:`SCHEMA_VERSION`, in one
        transaction.

        1 -> 2: add ``file.warnings``; files skipped as colour (unsupported photometric
        interpretation) or as undecodable are marked changed (mtime -1) so the next
        ``silo data add`` reads them again, while ``show`` still accounts for them.
        """
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        stored = str(row[0]) if row else SCHEMA_VERSION
        if not stored.isdigit() or int(stored) > int(SCHEMA_VERSION):
            raise DataError(
                f"data catalogue {self.path} has schema version {stored}, newer than this "
                f"fedsilo reads ({SCHEMA_VERSION}); upgrade fedsilo on this silo"
            )
        if stored == SCHEMA_VERSION:
            return
        with self.transaction() as db:
            columns = {r[1] for r in db.execute("PRAGMA table_info(file)").fetchall()}
            if "warnings" not in columns:
                db.execute("ALTER TABLE file ADD COLUMN warnings TEXT")
            db.execute(
                "UPDATE file SET mtime_ns = -1 WHERE status = 'skipped' AND ("
                "reason LIKE 'unsupported PhotometricInterpretation%' "
                "OR reason LIKE 'pixel data%cannot be decoded%')"
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))

    @classmethod
    def of_home(cls, home_root: Path) -> Catalogue:
        """The catalogue of the silo home at ``home_root``."""
        return cls(Path(home_root) / CATALOGUE_FILE)

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside is committed together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---------------------------------------------------------------------------- datasets

    def dataset(self, name: str) -> DatasetRecord | None:
        """The dataset record, or None when ``name`` is not registered."""
        row = self.db.execute("SELECT * FROM dataset WHERE name = ?", (name,)).fetchone()
        return DatasetRecord(**dict(row)) if row else None

    def require(self, name: str) -> DatasetRecord:
        """The dataset record; DataError naming the registered ones when absent."""
        record = self.dataset(name)
        if record is None:
            known = ", ".join(d.name for d in self.datasets()) or "none"
            raise DataError(
                f"no dataset named '{name}' in the catalogue {self.path} (registered: {known}); "
                f"register it with 'silo data add {name} --dicom-dir PATH'"
            )
        return record

    def datasets(self) -> list[DatasetRecord]:
        """All registered datasets, by name."""
        rows = self.db.execute("SELECT * FROM dataset ORDER BY name").fetchall()
        return [DatasetRecord(**dict(r)) for r in rows]

    def upsert_dataset(self, record: DatasetRecord) -> None:
        """Create or update a dataset record."""
        values = record.to_dict()
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c not in ("name", "created"))
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO dataset ({cols}) VALUES ({marks}) "
                f"ON CONFLICT(name) DO UPDATE SET {updates}",
                tuple(values.values()),
            )

    def set_state(self, name: str, state: str) -> None:
        """Mark a dataset ``ingesting`` or ``complete``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE dataset SET state = ?, updated = ? WHERE name = ?",
                (state, time.time(), name),
            )

    def remove(self, name: str) -> int:
        """Forget a dataset and everything recorded about it; returns its number of files."""
        with self.transaction() as db:
            n = db.execute("SELECT COUNT(*) FROM file WHERE dataset = ?", (name,)).fetchone()[0]
            for table in ("file", "label", "series", "study", "undelivered"):
                db.execute(f"DELETE FROM {table} WHERE dataset = ?", (name,))
            db.execute("DELETE FROM dataset WHERE name = ?", (name,))
        return int(n)

    # ---------------------------------------------------------------------------- files

    def known_files(self, name: str) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every file already recorded for ``name``."""
        rows = self.db.execute(
            "SELECT path, size, mtime_ns FROM file WHERE dataset = ?", (name,)
        ).fetchall()
        return {r["path"]: (int(r["size"]), int(r["mtime_ns"])) for r in rows}

    def ok_sops(self, name: str) -> dict[str, str]:
        """SOPInstanceUID -> path of the dataset's usable files."""
        rows = self.db.execute(
            "SELECT sop_uid, path FROM file WHERE dataset = ? AND status = 'ok'", (name,)
        ).fetchall()
        return {r["sop_uid"]: r["path"] for r in rows if r["sop_uid"]}

    def record_files(self, name: str, records: Iterable[FileRecord]) -> None:
        """Insert or replace file records (and their study/series) in one transaction."""
        now = time.time()
        rows = [(name, *(getattr(r, c) for c in _FILE_COLUMNS), now) for r in records]
        if not rows:
            return
        cols = ", ".join(["dataset", *_FILE_COLUMNS, "ingested"])
        marks = ", ".join("?" for _ in range(len(_FILE_COLUMNS) + 2))
        with self.transaction() as db:
            db.executemany(f"INSERT OR REPLACE INTO file ({cols}) VALUES ({marks})", rows)
            ok = [r for r in records if r.status == "ok" and r.study_uid]
            db.executemany(
                "INSERT OR IGNORE INTO study VALUES (?, ?)", [(name, r.study_uid) for r in ok]
            )
            db.executemany(
                "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?)",
                [(name, r.series_uid or "", r.study_uid, r.modality) for r in ok],
            )

    def record_undelivered(self, name: str, items: Iterable[tuple[str, str]]) -> None:
        """Replace the (SOPInstanceUID, reason) of instances the newest pull did not get."""
        with self.transaction() as db:
            db.execute("DELETE FROM undelivered WHERE dataset = ?", (name,))
            db.executemany(
                "INSERT OR REPLACE INTO undelivered VALUES (?, ?, ?)",
                [(name, sop, reason) for sop, reason in items],
            )

    def undelivered(self, name: str) -> list[tuple[str, str]]:
        """(SOPInstanceUID, reason) of instances the PACS listed but did not deliver."""
        rows = self.db.execute(
            "SELECT sop_uid, reason FROM undelivered WHERE dataset = ? ORDER BY sop_uid", (name,)
        ).fetchall()
        return [(r["sop_uid"], r["reason"]) for r in rows]

    def forget_files(self, name: str, paths: Iterable[str]) -> None:
        """Drop the records of files that are gone from the source."""
        with self.transaction() as db:
            db.executemany(
                "DELETE FROM file WHERE dataset = ? AND path = ?", [(name, p) for p in paths]
            )

    def set_labels(self, name: str, labels: dict[str, tuple[int, int]]) -> None:
        """Replace the dataset's labels: stored key -> (label, line of the labels file)."""
        with self.transaction() as db:
            db.execute("DELETE FROM label WHERE dataset = ?", (name,))
            db.executemany(
                "INSERT INTO label VALUES (?, ?, ?, ?)",
                [(name, k, lab, line) for k, (lab, line) in labels.items()],
            )

    def _label_join(self, record: DatasetRecord) -> str:
        column = KEY_TAGS[record.key_tag]
        return f"LEFT JOIN label l ON l.dataset = f.dataset AND l.key_value = f.{column}"

    def usable(self, name: str) -> list[sqlite3.Row]:
        """Rows of the dataset's ok files with their label (NULL when none), in path order."""
        record = self.require(name)
        return self.db.execute(
            f"SELECT f.*, l.label AS label FROM file f {self._label_join(record)} "
            "WHERE f.dataset = ? AND f.status = 'ok' ORDER BY f.path",
            (name,),
        ).fetchall()

    def skipped(self, name: str) -> list[tuple[str, str]]:
        """(path, reason) of every skipped file."""
        rows = self.db.execute(
            "SELECT path, reason FROM file WHERE dataset = ? AND status = 'skipped' ORDER BY path",
            (name,),
        ).fetchall()
        return [(r["path"], r["reason"] or "") for r in rows]

    def photometric_counts(self, name: str) -> dict[str, int]:
        """PhotometricInterpretation -> number of the dataset's usable files."""
        rows = self.db.execute(
            "SELECT photometric, COUNT(*) FROM file WHERE dataset = ? AND status = 'ok' "
            "GROUP BY photometric",
            (name,),
        ).fetchall()
        return {str(r[0] or "MONOCHROME2"): int(r[1]) for r in rows}

    def warned(self, name: str) -> list[tuple[str, str]]:
        """(path, warnings) of every file pydicom warned about while it was read."""
        rows = self.db.execute(
            "SELECT path, warnings FROM file WHERE dataset = ? AND warnings IS NOT NULL "
            "ORDER BY path",
            (name,),
        ).fetchall()
        return [(r["path"], r["warnings"]) for r in rows]

    def unmatched_labels(self, name: str) -> list[int]:
        """Line numbers of labels-file rows that match no usable file."""
        record = self.require(name)
        column = KEY_TAGS[record.key_tag]
        rows = self.db.execute(
            "SELECT l.line FROM label l WHERE l.dataset = ? AND NOT EXISTS ("
            f"SELECT 1 FROM file f WHERE f.dataset = l.dataset AND f.{column} = l.key_value "
            "AND f.status = 'ok') ORDER BY l.line",
            (name,),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def version(self, name: str) -> str:
        """Digest of the dataset's usable files and labels: changes when either changes."""
        h = hashlib.sha256(b"fedsilo-catalogue-version-1")
        for row in self.usable(name):
            h.update(
                json.dumps(
                    [row["path"], row["size"], row["mtime_ns"], row["label"], row["frames"]]
                ).encode()
            )
        return h.hexdigest()

    def summary(self, name: str) -> dict[str, Any]:
        """Counts per status, modality and label, sizes, skip reasons: what ``show`` prints."""
        record = self.require(name)
        db = self.db
        counts = dict(
            db.execute(
                "SELECT status, COUNT(*) FROM file WHERE dataset = ? GROUP BY status", (name,)
            ).fetchall()
        )
        size = db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM file WHERE dataset = ? AND status = 'ok'", (name,)
        ).fetchone()[0]
        usable = self.usable(name)
        per_modality: dict[str, int] = {}
        per_label: dict[str, int] = {}
        per_syntax: dict[str, int] = {}
        per_photometric: dict[str, int] = {}
        dims: dict[str, int] = {}
        frames = 0
        for row in usable:
            per_modality[row["modality"] or "?"] = per_modality.get(row["modality"] or "?", 0) + 1
            key = "unlabelled" if row["label"] is None else str(row["label"])
            per_label[key] = per_label.get(key, 0) + 1
            ts = row["transfer_syntax"] or "?"
            per_syntax[ts] = per_syntax.get(ts, 0) + 1
            pi = row["photometric"] or "?"
            per_photometric[pi] = per_photometric.get(pi, 0) + 1
            d = f"{row['rows']}x{row['columns']}"
            dims[d] = dims.get(d, 0) + 1
            frames += int(row["frames"] or 1)
        reasons: dict[str, int] = {}
        for _, reason in self.skipped(name):
            category = reason_category(reason)
            reasons[category] = reasons.get(category, 0) + 1
        n_studies = db.execute(
            "SELECT COUNT(DISTINCT study_uid) FROM file WHERE dataset = ? AND status = 'ok'",
            (name,),
        ).fetchone()[0]
        n_series = db.execute(
            "SELECT COUNT(DISTINCT series_uid) FROM file WHERE dataset = ? AND status = 'ok'",
            (name,),
        ).fetchone()[0]
        return {
            "name": name,
            "source_kind": record.source_kind,
            "source": record.source,
            "state": record.state,
            "key_tag": record.key_tag,
            "labels_csv": record.labels_csv,
            "files": int(counts.get("ok", 0)) + int(counts.get("skipped", 0)),
            "ok": int(counts.get("ok", 0)),
            "skipped": int(counts.get("skipped", 0)),
            "studies": int(n_studies),
            "series": int(n_series),
            "frames": frames,
            "bytes": int(size),
            "modalities": dict(sorted(per_modality.items())),
            "labels": dict(sorted(per_label.items())),
            "transfer_syntaxes": dict(sorted(per_syntax.items())),
            "photometric": dict(sorted(per_photometric.items())),
            "files_with_warnings": len(self.warned(name)),
            "dimensions": dict(sorted(dims.items())),
            "skip_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "unmatched_label_lines": self.unmatched_labels(name),
            "undelivered": len(self.undelivered(name)),
        }


def reason_category(reason: str) -> str:
    """Group skip reasons for a summary: drop per-file details in parentheses and UIDs."""
    if reason.startswith("non-image SOP class"):
        return reason  # names the class and what it is; the same for every such file
    if reason.startswith("pixel data in ") and " cannot be decoded" in reason:
        # the syntax name has parentheses of its own: "JPEG Baseline (Process 1)"
        head, _, rest = reason.partition(" cannot be decoded")
        missing = ": codec missing" if rest.startswith(": codec missing") else ""
        return f"{head} cannot be decoded{missing}"
    head = reason.split(" (")[0]
    if head.startswith("duplicate of "):
        return "duplicate SOPInstanceUID"
    return head
