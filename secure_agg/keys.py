"""Long-term identity (Ed25519), the local roster, transcripts and key derivation.

Each silo holds its own :class:`Roster` (silo name -> Ed25519 public key) and trusts only
that copy: the server never vouches for a key. Round keys are X25519 and are signed by the
identity key over a :func:`transcript` that binds run, round, stage and silo name.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsilo_base import fingerprints
from fedsilo_base.atomic_files import PRIVATE, PUBLIC, write_atomic

from .errors import BadSignature, ConfigurationError, MalformedMessage, UnknownPeer

PROTOCOL = "fedsilo-secagg/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid silo name (letters, digits, ``._-``, <= 64 chars)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigurationError(f"invalid silo name {name!r}: use [A-Za-z0-9._-], <= 64 chars")
    return name


def _item(x: object) -> bytes:
    if isinstance(x, bytes | bytearray):
        b = b"b" + bytes(x)
    elif isinstance(x, str):
        b = b"s" + x.encode()
    elif isinstance(x, int):
        b = b"i" + str(x).encode()
    elif isinstance(x, list | tuple):
        b = b"l" + b"".join(_item(y) for y in x)
    else:
        raise TypeError(f"cannot put {type(x).__name__} in a transcript")
    return len(b).to_bytes(4, "big") + b


def transcript(label: str, run_id: str, round_: int, *fields: object) -> bytes:
    """Unambiguous (length-prefixed) encoding of a labelled, run- and round-bound tuple."""
    return _item([PROTOCOL, label, run_id, round_, *fields])


class IdentityKey:
    """A silo's long-term Ed25519 signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> IdentityKey:
        """Create a fresh random identity key."""
        return cls(Ed25519PrivateKey.generate())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as unencrypted PKCS#8 PEM, mode 0600, atomically."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(Path(path), pem, mode=PRIVATE)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IdentityKey:
        """Read a PEM key; refuse a file readable or writable by group or others."""
        p = Path(path)
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(f"{p} has mode {oct(mode)}; identity keys must be 0600")
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"{p} is not an Ed25519 private key")
        return cls(key)

    @property
    def public_bytes(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def fingerprint(self) -> str:
        """Short grouped hex of SHA-256(public key), to compare out of band."""
        return fingerprints.fingerprint(self.public_bytes)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self._key.sign(message)


class Roster(Mapping[str, bytes]):
    """The silo's own list of trusted peers: silo name -> raw Ed25519 public key."""

    def __init__(self, keys: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._raw: dict[str, bytes] = {}
        for name, pub in (keys or {}).items():
            self.add(name, pub)

    def add(self, name: str, public_bytes: bytes) -> None:
        """Trust ``public_bytes`` (raw 32-byte Ed25519 key) for silo ``name``."""
        check_name(name)
        if not isinstance(public_bytes, bytes | bytearray) or len(public_bytes) != 32:
            raise ConfigurationError(f"public key of {name!r} must be 32 raw bytes")
        self._keys[name] = Ed25519PublicKey.from_public_bytes(bytes(public_bytes))
        self._raw[name] = bytes(public_bytes)

    def __getitem__(self, name: str) -> bytes:
        return self._raw[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._raw))

    def __len__(self) -> int:
        return len(self._raw)

    def fingerprint(self, name: str) -> str:
        """Fingerprint of the key trusted for ``name``."""
        return fingerprints.fingerprint(self._raw[name])

    def verify(self, name: str, message: bytes, signature: bytes) -> None:
        """Raise UnknownPeer / BadSignature unless ``signature`` is ``name``'s over ``message``."""
        key = self._keys.get(name) if isinstance(name, str) else None
        if key is None:
            raise UnknownPeer(f"silo {name!r} is not in our roster", peer=str(name))
        if not isinstance(signature, bytes | bytearray) or len(signature) != 64:
            raise MalformedMessage(f"signature of {name!r} must be 64 bytes", peer=name)
        try:
            key.verify(bytes(signature), message)
        except InvalidSignature:
            raise BadSignature(
                f"signature of {name!r} does not verify under our roster key", peer=name
            ) from None

    def to_json(self) -> str:
        """JSON text: {"version": 1, "silos": {name: {"ed25519": b64, "fingerprint": ...}}}."""
        silos = {
            n: {
                "ed25519": base64.b64encode(self._raw[n]).decode(),
                "fingerprint": self.fingerprint(n),
            }
            for n in self
        }
        return json.dumps({"version": 1, "silos": silos}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Roster:
        """Parse :meth:`to_json` output; the fingerprints in the file are re-checked."""
        try:
            data = json.loads(text)
            silos = data["silos"]
            roster = cls()
            for name, entry in silos.items():
                raw = base64.b64decode(entry["ed25519"], validate=True)
                roster.add(name, raw)
                if "fingerprint" in entry and entry["fingerprint"] != fingerprints.fingerprint(raw):
                    raise ConfigurationError(f"fingerprint mismatch for {name!r} in roster")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"invalid roster file: {exc}") from exc
        if data.get("version") != 1:
            raise ConfigurationError("unsupported roster version")
        return roster

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the roster as JSON atomically (temp file + os.replace), mode 0644."""
        write_atomic(Path(path), self.to_json().encode(), mode=PUBLIC)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        """Read a roster written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())


# ----------------------------------------------------------------------------- round keys
def x25519_generate() -> tuple[bytearray, bytes]:
    """Return (private 32 bytes as a wipeable bytearray, public 32 bytes)."""
    sk = X25519PrivateKey.generate()
    raw = bytearray(
        sk.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw, pk


def x25519_public(private: bytes | bytearray) -> bytes:
    """Public key of a raw X25519 private key."""
    sk = X25519PrivateKey.from_private_bytes(bytes(private))
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pairwise_key(
    private: bytes | bytearray,
    peer_public: bytes,
    *,
    run_id: str,
    round_: int,
    purpose: str,
    name_a: str,
    name_b: str,
) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public)) bound to run, round, purpose and the pair."""
    try:
        shared = X25519PrivateKey.from_private_bytes(bytes(private)).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:
        raise BadSignature(f"unusable X25519 key from {name_b!r}: {exc}", peer=name_b) from None
    lo, hi = sorted((name_a, name_b))
    info = transcript("pairwise-" + purpose, run_id, round_, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def derive(seed: bytes | bytearray, label: str, run_id: str, round_: int, name: str) -> bytes:
    """HKDF-SHA256 of a local secret, bound to label, run, round and silo name (32 bytes)."""
    info = transcript(label, run_id, round_, name)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(seed))
