"""Message schema, validation and a byte serialisation of the plain-data messages.

Every message is a flat ``dict`` whose values are ``str``, ``int``, ``bytes``, ``list[str]``,
``list[bytes]`` or a 1-D ``numpy.ndarray`` (so an adapter can map it onto Flower's
ConfigRecord / ArrayRecord). Every message carries ``protocol``, ``run_id``, ``round`` and
``stage``; replies also carry ``silo`` (the sender). See :data:`SCHEMAS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import MalformedMessage, ReplayDetected
from .keys import PROTOCOL

STAGES = ("advertise", "share", "mask", "consistency", "unmask")

HEADER = {"protocol": "str", "run_id": "str", "round": "int", "stage": "str"}

#: (stage, "request"|"reply") -> field -> type tag
SCHEMAS: dict[tuple[str, str], dict[str, str]] = {
    ("advertise", "request"): {"participants": "list[str]", "threshold": "int", "config": "str"},
    ("advertise", "reply"): {
        "silo": "str",
        "c_pk": "bytes",
        "s_pk": "bytes",
        "b_commit": "bytes",
        "context_hash": "bytes",
        "setup_digest": "bytes",
        "signature": "bytes",
    },
    ("share", "request"): {
        "peers": "list[str]",
        "c_pks": "list[bytes]",
        "s_pks": "list[bytes]",
        "b_commits": "list[bytes]",
        "context_hashes": "list[bytes]",
        "setup_digests": "list[bytes]",
        "signatures": "list[bytes]",
    },
    ("share", "reply"): {
        "silo": "str",
        "recipients": "list[str]",
        "ciphertexts": "list[bytes]",
        "commit_to": "list[str]",
        "share_commits": "list[bytes]",
        "commit_signatures": "list[bytes]",
    },
    ("mask", "request"): {
        "u2": "list[str]",
        "share_from": "list[str]",
        "ciphertexts": "list[bytes]",
        "share_commits": "list[bytes]",
        "commit_signatures": "list[bytes]",
    },
    ("mask", "reply"): {
        "silo": "str",
        "masked": "ndarray",
        "weight_commit": "bytes",
        "weight_proof": "bytes",
    },
    ("consistency", "request"): {"survivors": "list[str]"},
    ("consistency", "reply"): {"silo": "str", "signature": "bytes"},
    ("unmask", "request"): {
        "survivors": "list[str]",
        "dropped": "list[str]",
        "signers": "list[str]",
        "signatures": "list[bytes]",
    },
    ("unmask", "reply"): {
        "silo": "str",
        "b_owners": "list[str]",
        "b_shares": "list[bytes]",
        "sk_owners": "list[str]",
        "sk_shares": "list[bytes]",
    },
}

_PARALLEL = {
    ("share", "request"): (
        "peers",
        "c_pks",
        "s_pks",
        "b_commits",
        "context_hashes",
        "setup_digests",
        "signatures",
    ),
    ("share", "reply"): ("recipients", "ciphertexts"),
    ("mask", "request"): ("share_from", "ciphertexts", "share_commits", "commit_signatures"),
    ("unmask", "request"): ("signers", "signatures"),
}
_PAIRS = {
    ("unmask", "reply"): (("b_owners", "b_shares"), ("sk_owners", "sk_shares")),
    ("share", "reply"): (("commit_to", "share_commits"), ("commit_to", "commit_signatures")),
}


def _check_type(key: str, value: Any, tag: str) -> None:
    ok: bool
    if tag == "str":
        ok = isinstance(value, str)
    elif tag == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tag == "bytes":
        ok = isinstance(value, bytes)
    elif tag == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif tag == "list[bytes]":
        ok = isinstance(value, list) and all(isinstance(v, bytes) for v in value)
    elif tag == "ndarray":
        ok = isinstance(value, np.ndarray) and value.ndim == 1
    else:  # pragma: no cover - schema bug
        raise AssertionError(tag)
    if not ok:
        raise MalformedMessage(f"field {key!r} must be {tag}, got {type(value).__name__}")


def new_message(run_id: str, round_: int, stage: str, **fields: Any) -> dict[str, Any]:
    """Build a message with the common header."""
    return {"protocol": PROTOCOL, "run_id": run_id, "round": round_, "stage": stage, **fields}


def validate(
    msg: Any, stage: str, kind: str, *, run_id: str | None = None, round_: int | None = None
) -> dict[str, Any]:
    """Check fields and types of ``msg`` for (stage, kind); check its run/round/stage binding.

    Raises MalformedMessage (missing/extra/ill-typed fields, unequal parallel lists) or
    ReplayDetected (another run, round or stage). Returns ``msg``.
    """
    if not isinstance(msg, Mapping):
        raise MalformedMessage(f"{stage} {kind} must be a dict, got {type(msg).__name__}")
    schema = {**HEADER, **SCHEMAS[(stage, kind)]}
    missing = [k for k in schema if k not in msg]
    if missing:
        raise MalformedMessage(f"{stage} {kind} misses fields {missing}")
    extra = [k for k in msg if k not in schema]
    if extra:
        raise MalformedMessage(f"{stage} {kind} has unexpected fields {extra}")
    for key, tag in schema.items():
        _check_type(key, msg[key], tag)
    if msg["protocol"] != PROTOCOL:
        raise MalformedMessage(f"protocol {msg['protocol']!r} is not {PROTOCOL!r}")
    if run_id is not None and msg["run_id"] != run_id:
        raise ReplayDetected(f"message of run {msg['run_id']!r} received during run {run_id!r}")
    if round_ is not None and msg["round"] != round_:
        raise ReplayDetected(f"message of round {msg['round']} received during round {round_}")
    if msg["stage"] != stage:
        raise ReplayDetected(f"{msg['stage']!r} message received while expecting {stage!r}")
    names = _PARALLEL.get((stage, kind), ())
    if names and len({len(msg[k]) for k in names}) != 1:
        raise MalformedMessage(f"{stage} {kind}: lists {list(names)} differ in length")
    for a, b in _PAIRS.get((stage, kind), ()):
        if len(msg[a]) != len(msg[b]):
            raise MalformedMessage(f"{stage} {kind}: {a!r} and {b!r} differ in length")
    return dict(msg)


# ------------------------------------------------------------------------- serialisation
_MAGIC = b"FSA1"


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def pack(msg: Mapping[str, Any]) -> bytes:
    """Serialise a plain-data message to bytes (type-tagged, length-prefixed)."""
    out = [_MAGIC, _u32(len(msg))]
    for key, value in msg.items():
        k = key.encode()
        out += [_u32(len(k)), k]
        if isinstance(value, bool):
            raise MalformedMessage(f"field {key!r}: bool is not a message type")
        if isinstance(value, int):
            b = str(value).encode()
            out += [b"i", _u32(len(b)), b]
        elif isinstance(value, str):
            b = value.encode()
            out += [b"s", _u32(len(b)), b]
        elif isinstance(value, bytes | bytearray):
            out += [b"b", _u32(len(value)), bytes(value)]
        elif isinstance(value, list):
            tag = b"S" if all(isinstance(v, str) for v in value) else b"B"
            out += [tag, _u32(len(value))]
            for v in value:
                b = v.encode() if isinstance(v, str) else bytes(v)
                out += [_u32(len(b)), b]
        elif isinstance(value, np.ndarray):
            dt = value.dtype.str.encode()
            data = np.ascontiguousarray(value).tobytes()
            out += [b"a", _u32(len(dt)), dt, (len(data)).to_bytes(8, "big"), data]
        else:
            raise MalformedMessage(f"field {key!r}: {type(value).__name__} is not a message type")
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedMessage("truncated message")
        b = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return b

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")


def unpack(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`pack`; raises MalformedMessage on anything unexpected."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("packed message must be bytes")
    r = _Reader(bytes(data))
    if r.take(4) != _MAGIC:
        raise MalformedMessage("bad message magic")
    msg: dict[str, Any] = {}
    try:
        for _ in range(r.u32()):
            key = r.take(r.u32()).decode()
            tag = r.take(1)
            if tag == b"i":
                msg[key] = int(r.take(r.u32()).decode())
            elif tag == b"s":
                msg[key] = r.take(r.u32()).decode()
            elif tag == b"b":
                msg[key] = r.take(r.u32())
            elif tag in (b"S", b"B"):
                items = [r.take(r.u32()) for _ in range(r.u32())]
                msg[key] = [i.decode() for i in items] if tag == b"S" else items
            elif tag == b"a":
                dt = np.dtype(r.take(r.u32()).decode())
                if dt.kind not in "uif":
                    raise MalformedMessage(f"unsupported array dtype {dt}")
                n = int.from_bytes(r.take(8), "big")
                msg[key] = np.frombuffer(r.take(n), dtype=dt).copy()
            else:
                raise MalformedMessage(f"unknown type tag {tag!r}")
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        if isinstance(exc, MalformedMessage):
            raise
        raise MalformedMessage(f"undecodable message: {exc}") from None
    if r.pos != len(r.data):
        raise MalformedMessage("trailing bytes after message")
    return msg
