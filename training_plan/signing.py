"""Researcher signatures on training plans (Ed25519).

A signature covers the plan's canonical hash (``plan_hash``), prefixed with a domain tag so it
can never be replayed as a signature over anything else. It lives in a *detached* file next to the
plan, ``<plan>.yaml.sig``, a small JSON document::

    {"format": "fedsilo-plan-signature/1", "algorithm": "ed25519", "plan_hash": "...",
     "public_key": "<base64 raw 32 bytes>", "signature": "<base64 64 bytes>",
     "signed_at": "2026-01-01T00:00:00Z"}

Detached, because the hash is over the plan's meaning (canonical JSON), not its bytes: reformatting
the YAML keeps the signature valid, changing any value breaks it. If the plan names
``researcher.public_key``, the signature must be made with that key.

Keys: ``<name>.key`` (PEM PKCS#8, 0600) and ``<name>.pub`` (the base64 public key, one line).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsilo_base.atomic_files import PRIVATE, PUBLIC, write_atomic
from training_plan.errors import PlanError
from training_plan.hashing import plan_hash
from training_plan.schema import TrainingPlan

SIGNATURE_FORMAT = "fedsilo-plan-signature/1"
DOMAIN = b"fedsilo training plan v1\x00"


class PlanSignatureError(PlanError):
    """A plan signature is missing, malformed, made with another key, or does not verify."""


@dataclass(frozen=True)
class PlanSignature:
    """A detached signature over one plan hash."""

    plan_hash: str
    public_key: str
    signature: str
    signed_at: str

    def to_json(self) -> str:
        """The .sig file's content."""
        return json.dumps(
            {
                "format": SIGNATURE_FORMAT,
                "algorithm": "ed25519",
                "plan_hash": self.plan_hash,
                "public_key": self.public_key,
                "signature": self.signature,
                "signed_at": self.signed_at,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<signature>") -> PlanSignature:
        """Parse a .sig file; PlanSignatureError when it is not one."""
        try:
            data = json.loads(text)
            if data.get("format") != SIGNATURE_FORMAT or data.get("algorithm") != "ed25519":
                raise ValueError("unknown signature format")
            sig = cls(
                plan_hash=str(data["plan_hash"]),
                public_key=str(data["public_key"]),
                signature=str(data["signature"]),
                signed_at=str(data.get("signed_at", "")),
            )
            public_key_from_text(sig.public_key)
            if len(base64.b64decode(sig.signature, validate=True)) != 64:
                raise ValueError("signature is not 64 bytes")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanSignatureError(f"{source}: not a fedsilo plan signature ({exc})") from None
        return sig


def _message(digest: str) -> bytes:
    return DOMAIN + digest.encode("ascii")


def public_key_text(key: Ed25519PublicKey) -> str:
    """The base64 text of a raw 32-byte Ed25519 public key (what policies and plans list)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Parse a base64 Ed25519 public key; ValueError when it is not one."""
    raw = base64.b64decode(text.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(public_key: str) -> str:
    """A short, readable id of a public key (first 16 hex of its SHA-256)."""
    import hashlib

    return hashlib.sha256(base64.b64decode(public_key)).hexdigest()[:16]


def generate_keypair(stem: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``stem.key`` (PEM, 0600) and ``stem.pub`` (base64); returns both paths."""
    stem = Path(stem)
    key_path, pub_path = stem.with_suffix(".key"), stem.with_suffix(".pub")
    if key_path.exists() and not overwrite:
        raise PlanSignatureError(
            f"{key_path} exists; keep it, or pass --force to replace it (old signatures then "
            "no longer match your key)"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(key_path, pem, mode=PRIVATE)
    write_atomic(pub_path, (public_key_text(key.public_key()) + "\n").encode(), mode=PUBLIC)
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a researcher's PEM private key; PlanSignatureError when missing or not Ed25519."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PlanSignatureError(
            f"{path}: key file not found (make one with 'fedsilo plan keygen')"
        ) from None
    except (ValueError, TypeError, OSError) as exc:
        raise PlanSignatureError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PlanSignatureError(f"{path}: not an Ed25519 key")
    return key


def sign_plan(plan: TrainingPlan, key: Ed25519PrivateKey) -> PlanSignature:
    """Sign the plan's hash; refuses when the plan names another researcher key."""
    public = public_key_text(key.public_key())
    named = plan.researcher.public_key if plan.researcher else None
    if named is not None and named != public:
        raise PlanSignatureError(
            f"the plan names researcher key {fingerprint(named)}, this key is "
            f"{fingerprint(public)}; sign with the named key or fix researcher.public_key"
        )
    digest = plan_hash(plan)
    signature = key.sign(_message(digest))
    return PlanSignature(
        plan_hash=digest,
        public_key=public,
        signature=base64.b64encode(signature).decode(),
        signed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def verify_plan_signature(plan: TrainingPlan, sig: PlanSignature) -> str:
    """Check a signature against the plan; returns the signer's public key (base64).

    Raises PlanSignatureError when the signature is for another plan, made with a key other than
    the one the plan names, or does not verify.
    """
    digest = plan_hash(plan)
    if sig.plan_hash != digest:
        raise PlanSignatureError(
            f"the signature is for plan {sig.plan_hash[:12]}, this plan is {digest[:12]} "
            "(the plan was changed after signing)"
        )
    named = plan.researcher.public_key if plan.researcher else None
    if named is not None and named != sig.public_key:
        raise PlanSignatureError(
            f"signed with key {fingerprint(sig.public_key)}, the plan names {fingerprint(named)}"
        )
    try:
        key = public_key_from_text(sig.public_key)
        key.verify(base64.b64decode(sig.signature), _message(digest))
    except (InvalidSignature, ValueError):
        raise PlanSignatureError("the plan signature does not verify") from None
    return sig.public_key


def signature_path(plan_path: Path) -> Path:
    """Where a plan's detached signature lives: ``<plan file>.sig``."""
    return Path(str(plan_path) + ".sig")


def write_signature(plan_path: Path, sig: PlanSignature) -> Path:
    """Write ``<plan>.sig`` atomically; returns its path."""
    path = signature_path(plan_path)
    write_atomic(path, (sig.to_json() + "\n").encode(), mode=PUBLIC)
    return path


def read_signature(plan_path: Path) -> PlanSignature | None:
    """The plan's detached signature, or None when there is no ``.sig`` file."""
    path = signature_path(plan_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanSignatureError(f"{path}: cannot read ({exc})") from None
    return PlanSignature.from_json(text, source=str(path))
