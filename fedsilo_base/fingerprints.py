"""Fingerprints people compare by reading them aloud: SHA-256, first 32 hex digits, by 4."""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def grouped(hex_digest: str) -> str:
    """The first 32 hex digits of a digest, in groups of 4 (``ab12 cd34 ...``)."""
    digits = hex_digest[:32]
    return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def fingerprint(data: bytes) -> str:
    """Fingerprint of raw bytes: a raw public key, or a certificate's DER encoding."""
    return grouped(hashlib.sha256(data).hexdigest())


def ssh_key_fingerprint(line: str) -> str:
    """Fingerprint of an OpenSSH public key line: over its decoded key blob.

    ValueError when the line is not ``TYPE BASE64 [comment]`` with valid base64.
    """
    parts = line.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ValueError("the OpenSSH public key is not valid base64") from None
    return fingerprint(blob)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Fingerprint of an X.509 certificate: over its DER encoding."""
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def pem_certificate_fingerprints(pem: str) -> list[str]:
    """Fingerprints of every certificate in a PEM text (two during a CA rotation).

    ValueError when the text holds no readable certificate.
    """
    return [certificate_fingerprint(c) for c in x509.load_pem_x509_certificates(pem.encode())]
