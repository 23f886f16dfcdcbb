"""Enrollment requests, as the consortium reads them: the format and its verification.

Format ``fedsilo-enrollment-request/1`` (JSON; the silo side writes the same documented schema
without importing this module; see docs/operators/consortium.md)::

    {"format": ..., "payload": {"hospital": NAME, "secagg_ed25519": B64 (raw 32 bytes),
     "node_auth_public_key": "ecdsa-sha2-nistp384 AAAA...", "created": ISO-8601},
     "signature": B64 Ed25519 over canonical(payload) by the identity key,
     "node_auth_signature": B64 ECDSA-SHA256 (DER) over canonical(payload) by the node key}

``canonical(x)`` is ``json.dumps(x, sort_keys=True, separators=(",", ":")).encode()``.
Both signatures prove possession of both private keys.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.consortium_home import ConsortiumError
from fedsilo_base.fingerprints import fingerprint, ssh_key_fingerprint

REQUEST_FORMAT = "fedsilo-enrollment-request/1"


def canonical(payload: dict[str, Any]) -> bytes:
    """Canonical bytes of a JSON object: the bytes both signatures of a request cover."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()



@dataclass(frozen=True)
class EnrollmentRequest:
    """A verified enrollment request."""

    hospital: str
    secagg_public: bytes
    node_auth_public_key: str
    created: str

    @property
    def secagg_fingerprint(self) -> str:
        """Fingerprint of the secure-aggregation identity key (as secure_agg computes it)."""
        return fingerprint(self.secagg_public)

    @property
    def node_auth_fingerprint(self) -> str:
        """Fingerprint of the Flower node-authentication key."""
        try:
            return ssh_key_fingerprint(self.node_auth_public_key)
        except ValueError as exc:
            raise ConsortiumError(f"node-authentication public key: {exc}") from None

    def node_auth_pem(self) -> bytes:
        """The node key as PEM SubjectPublicKeyInfo: the bytes Flower's node registry stores."""
        return ssh_line_to_pem(self.node_auth_public_key)


def ssh_line_to_pem(line: str) -> bytes:
    """OpenSSH EC public key line -> PEM SubjectPublicKeyInfo (Flower's stored form)."""
    key = serialization.load_ssh_public_key(line.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConsortiumError("node-authentication key must be an EC (NIST curve) key")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_request(path: Path) -> EnrollmentRequest:
    """Read and verify an enrollment request file; ConsortiumError saying what is wrong."""
    from secure_agg.errors import SecureAggError
    from secure_agg.keys import check_name

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConsortiumError(f"enrollment request {path} does not exist") from None
    except IsADirectoryError:
        raise ConsortiumError(
            f"{path} is a folder; pass the enrollment-request.json file 'silo init' wrote"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ConsortiumError(f"{path} is not JSON; pass the file 'silo init' wrote") from None
    if not isinstance(data, dict) or data.get("format") != REQUEST_FORMAT:
        raise ConsortiumError(f"{path} is not a fedsilo enrollment request ({REQUEST_FORMAT})")
    try:
        payload = data["payload"]
        hospital = str(payload["hospital"])
        secagg = base64.b64decode(payload["secagg_ed25519"], validate=True)
        node_line = str(payload["node_auth_public_key"])
        signature = base64.b64decode(data["signature"], validate=True)
        node_signature = base64.b64decode(data["node_auth_signature"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConsortiumError(f"{path}: enrollment request lacks or garbles {exc}") from None
    try:
        check_name(hospital)
    except (ValueError, SecureAggError) as exc:
        raise ConsortiumError(f"{path}: {exc}") from None
    if len(secagg) != 32:
        raise ConsortiumError(f"{path}: identity key must be 32 raw bytes")
    message = canonical(payload)
    try:
        Ed25519PublicKey.from_public_bytes(secagg).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise ConsortiumError(
            f"{path}: the identity-key signature does not verify; the request was altered or "
            f"not made by 'silo init'. Ask {hospital} for a fresh request"
        ) from None
    try:
        node_key = serialization.load_ssh_public_key(node_line.encode())
    except (ValueError, TypeError):
        raise ConsortiumError(f"{path}: node-authentication key is not an OpenSSH key") from None
    if not isinstance(node_key, ec.EllipticCurvePublicKey):
        raise ConsortiumError(f"{path}: node-authentication key must be an EC (NIST) key")
    try:
        node_key.verify(node_signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ConsortiumError(
            f"{path}: the node-key signature does not verify; ask {hospital} for a fresh request"
        ) from None
    return EnrollmentRequest(hospital, secagg, node_line, str(payload.get("created", "")))

