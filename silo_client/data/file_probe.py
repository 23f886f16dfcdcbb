"""Cheap looks at a file before (or after) pydicom reads it: bounded work per file.

:func:`dicom_prefix` decides from the first bytes whether a file can be DICOM at all (a
'DICM' marker after the 128-byte preamble, or a first element of a DICOM group where a
preamble-less export starts), so a multi-gigabyte non-DICOM file costs one small read instead
of a forced parse of every byte. :func:`truncation` walks the top-level element headers of
a file (seeking past values, never reading them) to tell a half-copied export from a file
that simply lacks an element.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

__all__ = ["PREFIX_BYTES", "dicom_prefix", "truncation"]

#: Bytes read to classify a file: preamble, marker and the first element header.
PREFIX_BYTES = 140
_MARKER_AT = 128
# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_MAX_ELEMENTS = 100_000  # bounds the header walk of a hostile file
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def dicom_prefix(path: Path) -> str:
    """'dicm' (preamble + marker), 'raw' (no preamble, but starts like a DICOM dataset) or
    'no' (cannot be DICOM). Reads at most :data:`PREFIX_BYTES` bytes."""
    with open(path, "rb") as fh:
        head = fh.read(PREFIX_BYTES)
    if head[_MARKER_AT : _MARKER_AT + 4] == b"DICM":
        return "dicm"
    if len(head) < 8:
        return "no"
    for order in ("<", ">"):
        group, element = struct.unpack(f"{order}HH", head[:4])
        # A dataset starts with its lowest group: file meta (0002), identification (0008),
        # or, in a stripped export, the first group that survived (even, below pixel data).
        if group in (0x0002, 0x0008) or (
            group % 2 == 0 and 0x0008 < group <= 0x0028 and element != 0
        ):
            return "raw"
    return "no"


def truncation(path: str | os.PathLike[str] | None) -> str | None:
    """'truncated ...' when the file ends inside an element (a half-copied export), else None.

    Walks the top-level elements from the start of the dataset, reading only their headers;
    a value or header that runs past the end of the file is truncation. Sequences and
    encapsulated pixel data of undefined length are walked item by item.
    """
    if path is None or not isinstance(path, (str, os.PathLike)):
        return None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            return _walk_headers(fh, size)
    except OSError:
        return None


def _walk_headers(fh: BinaryIO, size: int) -> str | None:
    head = fh.read(_MARKER_AT + 4)
    start = _MARKER_AT + 4 if head[_MARKER_AT:] == b"DICM" else 0
    fh.seek(start)
    first = fh.read(6)
    # the dataset's encoding; the file meta group (0002) is always explicit VR little endian
    explicit, little = len(first) == 6 and first[4:6].isalpha() and first[4:6].isupper(), True
    fh.seek(start)
    for _ in range(_MAX_ELEMENTS):
        at = fh.tell()
        if at == size:
            return None
        header = fh.read(8)
        if len(header) < 8:
            return _truncated(at, size, "inside an element header")
        group = struct.unpack("<H", header[:2])[0]
        meta = group == 0x0002
        order = "<" if meta or little else ">"
        group, element = struct.unpack(f"{order}HH", header[:4])
        if group == 0xFFFE:  # item / delimiter of a sequence or of encapsulated pixel data
            length = struct.unpack(f"{order}I", header[4:8])[0]
            if element == 0xE000 and length != _UNDEFINED:
                if at + 8 + length > size:
                    return _truncated(at, size, f"inside an item of {length} bytes")
                fh.seek(at + 8 + length)
            continue
        if meta or explicit:
            if header[4:6] in _LONG_VRS:
                more = fh.read(4)
                if len(more) < 4:
                    return _truncated(at, size, "inside an element header")
                length, value_at = struct.unpack(f"{order}I", more)[0], at + 12
            else:
                length, value_at = struct.unpack(f"{order}H", header[6:8])[0], at + 8
        else:
            length, value_at = struct.unpack(f"{order}I", header[4:8])[0], at + 8
        if length == _UNDEFINED:  # a sequence or encapsulated pixel data: walk its items
            fh.seek(value_at)
            continue
        if value_at + length > size:
            what = "pixel data" if (group, element) == (0x7FE0, 0x0010) else "element"
            return _truncated(
                at, size,
                f"inside the {what} ({group:04X},{element:04X}) of {length} bytes",
                value_at + length - size,
            )  # fmt: skip
        if (group, element) == (0x0002, 0x0010):
            syntax = fh.read(length).rstrip(b"\0 ").decode("ascii", "replace")
            if syntax == _DEFLATED:
                return None  # a deflated dataset cannot be walked header by header
            explicit, little = syntax != _IMPLICIT, syntax != _BIG_ENDIAN
        fh.seek(value_at + length)
    return None


def _truncated(at: int, size: int, where: str, missing: int | None = None) -> str:
    short = f", {missing} bytes missing" if missing else ""
    return (
        f"truncated file (it ends at byte {size} {where} that starts at byte {at}{short}); "
        "a half-copied export: copy it again"
    )
