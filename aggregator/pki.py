"""The consortium's small PKI: one CA, the SuperLink's TLS certificate (with SANs for its address).

Keys are written 0600; a renewal reissues the server certificate under the same CA, so no silo
ever has to change what it trusts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo_base.atomic_files import PRIVATE, PUBLIC, write_atomic
from fedsilo_base.fingerprints import certificate_fingerprint


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files a SuperLink and its SuperNodes need."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, data, mode=PRIVATE)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PkiError(ValueError):
    """A certificate or key cannot be created or used; the message is one line."""


def create_ca(
    folder: Path, name: str, days: int = 3650, *, overwrite: bool = True
) -> tuple[Path, Path]:
    """Create a CA key and self-signed certificate in folder; returns (cert, key) paths.

    With ``overwrite=False`` an existing CA is never replaced (a new root would invalidate every
    silo's trust): :class:`PkiError` instead.
    """
    if not overwrite and ((folder / "ca.pem").exists() or (folder / "ca.key").exists()):
        raise PkiError(
            f"{folder} already holds a consortium CA; refusing to mint a new root (every silo "
            f"trusts the current one). Rotate it only with the staged procedure in "
            f"docs/operators/consortium.md"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} consortium CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # key identifiers let TLS stacks pick the right CA when two share a name (CA rotation)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    _write_key(key_path, key)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)
    return cert_path, key_path


def issue_server_certificate(
    folder: Path,
    ca_cert: Path,
    ca_key: Path,
    hosts: list[str],
    days: int = 397,
    *,
    not_before: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate for the given host names / IP addresses.

    ``not_before`` shifts the validity window (tests use it to mint an expired certificate).
    """
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(minutes=5) + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    cert_path, key_path = folder / "superlink.pem", folder / "superlink.key"
    _write_key(key_path, key)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)
    return cert_path, key_path


def make_tls(folder: Path, consortium: str, hosts: list[str]) -> TlsFiles:
    """A CA and a SuperLink certificate for hosts, in folder (used by the demo and tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = create_ca(folder, consortium)
    cert, key = issue_server_certificate(folder, ca_cert, ca_key, hosts)
    return TlsFiles(ca_cert=ca_cert, server_cert=cert, server_key=key)


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator needs to know about a certificate."""

    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sans: tuple[str, ...]
    fingerprint: str

    def days_left(self, now: dt.datetime | None = None) -> float:
        """Days until expiry (negative once expired)."""
        return (self.not_after - (now or _now())).total_seconds() / 86400.0


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate; PkiError with the path if it is missing or not a certificate."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"certificate {path} does not exist") from None
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate") from None


def certificate_info(path: Path) -> CertificateInfo:
    """Subject, issuer, validity, SANs and fingerprint of a PEM certificate."""
    cert = load_certificate(path)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(v) for v in ext.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in ext.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        sans = ()
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sans=sans,
        fingerprint=certificate_fingerprint(cert),
    )


def verify_issued_by(cert_path: Path, ca_path: Path) -> None:
    """PkiError unless the certificate at cert_path is signed by the CA at ca_path."""
    cert, ca = load_certificate(cert_path), load_certificate(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{cert_path} is not signed by the CA in {ca_path}") from None


def host_of(address: str) -> str:
    """The host part of HOST:PORT (IPv6 in brackets allowed)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PkiError(f"address {address!r} is not HOST:PORT (e.g. superlink.example.org:9093)")
    return host.strip("[]")


def superlink_hosts(address: str) -> list[str]:
    """SANs for a SuperLink reachable at address: its host, plus loopback for local tools."""
    hosts = [host_of(address)]
    for extra in ("127.0.0.1", "localhost"):
        if extra not in hosts:
            hosts.append(extra)
    return hosts
