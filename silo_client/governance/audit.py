"""The silo's audit log: append-only, hash-chained JSON lines in ``<home>/audit.jsonl``.

Each line is one JSON object with ``seq`` (0, 1, 2, ...), ``time`` (UTC), ``event``, the event's
fields, ``prev`` (the previous entry's hash, 64 zeros for the first) and ``hash``: SHA-256 of the
canonical JSON of every other field. Editing a line breaks its hash; removing or reordering lines
breaks ``seq`` and ``prev``. (Dropping lines at the *end* cannot be detected from the file alone:
``export`` prints the head hash so the hospital's security monitoring can keep it elsewhere.)

Writing: under an exclusive lock, one ``write`` of one complete line to a file opened O_APPEND,
then fsync. A crash mid-write can leave only a torn *last* line (no newline); the next append
cuts that fragment off (it was never acknowledged) and records an ``audit-torn-write`` entry, so
earlier entries are never touched.

Entries never hold values of data: events record kinds, sizes, hashes and reasons only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from silo_client.errors import SiloError

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64


class AuditError(SiloError):
    """The audit log cannot be written or read."""


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify``: ok, entries checked, the head hash, and the first problem."""

    ok: bool
    entries: int
    head: str
    problem: str = ""


class AuditLog:
    """One silo's audit log."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of_home(cls, root: Path) -> AuditLog:
        """The audit log of the silo home at ``root``."""
        return cls(Path(root) / AUDIT_FILE)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry (locked, one write, fsync); returns the entry as written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            torn = self._cut_torn_tail(fd)
            seq, prev = self._tail(fd)
            written = []
            if torn:
                written.append(self._write(fd, seq, prev, "audit-torn-write", {"bytes": torn}))
                seq, prev = seq + 1, written[-1]["hash"]
            written.append(self._write(fd, seq, prev, event, fields))
            return written[-1]
        finally:
            os.close(fd)

    @staticmethod
    def _write(fd: int, seq: int, prev: str, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        reserved = {"seq", "time", "event", "prev", "hash"} & set(fields)
        if reserved:
            raise AuditError(f"audit fields {sorted(reserved)} are reserved")
        entry = {"seq": seq, "time": _now(), "event": event, **fields, "prev": prev}
        entry["hash"] = _digest(entry)
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode()
        os.write(fd, line)
        os.fsync(fd)
        return entry

    @staticmethod
    def _cut_torn_tail(fd: int) -> int:
        """Drop a last line without newline (a crash mid-write); returns the bytes dropped."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        if os.pread(fd, 1, size - 1) == b"\n":
            return 0
        start = max(0, size - (1 << 20))
        chunk = os.pread(fd, size - start, start)
        cut = start + chunk.rfind(b"\n") + 1 if b"\n" in chunk else start
        os.ftruncate(fd, cut)
        os.fsync(fd)
        return size - cut

    @staticmethod
    def _tail(fd: int) -> tuple[int, str]:
        """The next seq and the last entry's hash."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS
        step = 4096
        start = max(0, size - step)
        while True:
            chunk = os.pread(fd, size - start, start)
            lines = chunk.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                break
            start = max(0, start - step)
            step *= 2
        try:
            last = json.loads(lines[-1])
            return int(last["seq"]) + 1, str(last["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(
                "the audit log's last entry is damaged; run 'silo audit verify'"
            ) from None

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every complete entry, in order (a torn last line is skipped)."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    return
                try:
                    yield json.loads(raw)
                except ValueError:
                    yield {"event": "<unreadable line>", "raw": raw[:200].decode(errors="replace")}

    def verify(self) -> VerifyResult:
        """Check every line's hash, sequence number and link to the previous line."""
        prev, count = GENESIS, 0
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return VerifyResult(True, 0, GENESIS)
        with handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    return VerifyResult(
                        False, count, prev, f"line {number}: incomplete (torn write)"
                    )
                try:
                    entry = json.loads(raw)
                    if not isinstance(entry, dict):
                        raise ValueError
                except ValueError:
                    return VerifyResult(False, count, prev, f"line {number}: not a JSON object")
                if entry.get("seq") != count:
                    return VerifyResult(
                        False,
                        count,
                        prev,
                        f"line {number}: sequence {entry.get('seq')} where {count} was expected "
                        "(a line was removed or lines were reordered)",
                    )
                if entry.get("prev") != prev:
                    return VerifyResult(
                        False, count, prev, f"line {number}: does not link to the line before"
                    )
                if entry.get("hash") != _digest(entry):
                    return VerifyResult(
                        False, count, prev, f"line {number}: content does not match its hash"
                    )
                prev, count = entry["hash"], count + 1
        return VerifyResult(True, count, prev)


def audit(root: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one entry to the audit log of the silo home at ``root``."""
    return AuditLog.of_home(root).append(event, **fields)
