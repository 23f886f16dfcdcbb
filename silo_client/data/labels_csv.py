"""The one reader of a labels CSV (``KEY,label`` with a header), for every place that takes one.

The folder loader (:func:`read_study_labels`, keyed by StudyInstanceUID) and the
catalogue ingest (:mod:`silo_client.data.ingest`, keyed by any of the catalogue's key tags,
identifying IDs stored as digests) read the same format and check the same things; each passes
how a cell becomes a stored key and the wording its users see (:class:`LabelFileWording`).
Every error is one line naming the file and the line.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from silo_client.errors import DataError

__all__ = ["LabelFileWording", "load_labels", "read_label_csv", "read_study_labels"]


@dataclass(frozen=True)
class LabelFileWording:
    """What a call site tells its users in the label-file errors that differ between sites."""

    #: how to make the file, after "labels file X does not exist; "
    create: str
    #: how to fix a header without the key or label column, after the columns found
    fix_header: str
    #: what a label must look like, after "COLUMN 'x' is not an integer"
    label_form: str
    #: what one row stands for, in "keep one row per ..."
    row_unit: str
    #: whether a duplicate may be named by its value (a UID may, a PatientID may not)
    name_duplicates: bool


def read_label_csv(
    csv_path: Path,
    *,
    key_column: str,
    label_column: str,
    key: Callable[[str], str],
    wording: LabelFileWording,
) -> dict[str, tuple[int, int]]:
    """Read a labels CSV into {``key(cell)``: (label, line)}.

    Raises DataError naming the file (and line) for: a missing or unreadable file, an empty
    file, a missing column, a short row, an empty key, a non-integer or negative label, and a
    key labelled twice. Blank rows are ignored.
    """
    csv_path = Path(csv_path)
    first_line = f"'{key_column},{label_column}'"
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} does not exist; {wording.create}")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"labels file {csv_path} is not UTF-8 text; save it as UTF-8 CSV") from None
    except OSError as exc:
        raise DataError(
            f"labels file {csv_path} cannot be read ({exc.strerror or exc}); check permissions"
        ) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"labels file {csv_path} is empty; its first line must be {first_line}")
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in (key_column, label_column) if c not in header]
    if missing:
        raise DataError(
            f"labels file {csv_path} line 1: missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(header) or 'none'}); {wording.fix_header}"
        )
    i_key, i_label = header.index(key_column), header.index(label_column)
    out: dict[str, tuple[int, int]] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"labels file {csv_path} line {lineno}"
        if len(row) <= max(i_key, i_label):
            raise DataError(
                f"{where}: expected {len(header)} columns, got {len(row)}; each row needs a "
                f"{key_column} and a {label_column}"
            )
        value, raw = row[i_key].strip(), row[i_label].strip()
        if not value:
            raise DataError(f"{where}: empty {key_column}")
        try:
            label = int(raw)
        except ValueError:
            raise DataError(
                f"{where}: {label_column} {raw!r} is not an integer {wording.label_form}"
            ) from None
        if label < 0:
            raise DataError(
                f"{where}: label {label} is negative; labels are class indices 0, 1, ..."
            )
        stored = key(value)
        if stored in out:
            which = f"{key_column} {value}" if wording.name_duplicates else f"this {key_column}"
            raise DataError(
                f"{where}: {which} is already labelled on line {out[stored][1]}; keep one row "
                f"per {wording.row_unit}"
            )
        out[stored] = (label, lineno)
    return out


# --------------------------------------------------------------------------------------------
# A plain dataset folder's labels.csv: one row per study

_LABEL_COLUMNS = ("StudyInstanceUID", "label")

_LABEL_WORDING = LabelFileWording(
    create="create it with a header 'StudyInstanceUID,label' and one row per study",
    fix_header="the header must be 'StudyInstanceUID,label'",
    label_form="(use 0 = no lesion, 1 = lesion)",
    row_unit="study",
    name_duplicates=True,
)


def read_study_labels(csv_path: Path) -> dict[str, tuple[int, int]]:
    """A dataset folder's ``labels.csv`` as StudyInstanceUID -> (label, line number)."""
    return read_label_csv(
        csv_path, key_column=_LABEL_COLUMNS[0], label_column=_LABEL_COLUMNS[1],
        key=str.strip, wording=_LABEL_WORDING,
    )  # fmt: skip


def load_labels(csv_path: Path) -> dict[str, int]:
    """Read ``labels.csv`` (columns ``StudyInstanceUID,label``) into {StudyInstanceUID: label}.

    Raises DataError naming the file and line for: missing file, missing column, a short row,
    an empty UID, a non-integer or negative label, a duplicated StudyInstanceUID.
    """
    return {uid: label for uid, (label, _) in read_study_labels(Path(csv_path)).items()}
