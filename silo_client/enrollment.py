"""Joining a consortium from the hospital's side: node key, enrollment request, join bundle.

Layout added to the silo home::

    <home>/identity/node_auth_ecdsa        Flower node-authentication private key (OpenSSH,
                                           EC P-384, 0600): what 'flower-supernode
                                           --auth-supernode-private-key' reads
    <home>/identity/node_auth_ecdsa.pub    its public half (OpenSSH line)
    <home>/enrollment-request.json         signed request to send to the consortium
    <home>/consortium/ca.pem               the consortium CA (from the join bundle)
    <home>/consortium/consortium.json      consortium name, SuperLink address, CA fingerprint
    <home>/identity/roster.json            the pinned roster (see silo_client.identity)

The request and bundle formats are JSON with the schema documented in
docs/operators/consortium.md (``fedsilo-enrollment-request/1``, ``fedsilo-join-bundle/1``); the
consortium side reads and writes the same schema without either side importing the other.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo_base.atomic_files import write_atomic
from fedsilo_base.fingerprints import pem_certificate_fingerprints, ssh_key_fingerprint
from silo_client.errors import SiloConfigError
from silo_client.home import SiloHome
from silo_client.identity import ensure_identity, identity_dir, load_roster, roster_path

REQUEST_FORMAT = "fedsilo-enrollment-request/1"
BUNDLE_FORMAT = "fedsilo-join-bundle/1"
NODE_KEY_FILE = "node_auth_ecdsa"
REQUEST_FILE = "enrollment-request.json"
CONSORTIUM_DIR = "consortium"


def canonical(payload: dict[str, Any]) -> bytes:
    """Canonical JSON bytes: what the request's signatures cover."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def node_key_path(home: SiloHome) -> Path:
    """The node-authentication private key."""
    return identity_dir(home) / NODE_KEY_FILE


def consortium_dir(home: SiloHome) -> Path:
    """Where the installed join bundle's parts live."""
    return Path(home.root) / CONSORTIUM_DIR


def ca_path(home: SiloHome) -> Path:
    """The consortium CA this silo trusts."""
    return consortium_dir(home) / "ca.pem"


def ensure_node_key(home: SiloHome) -> ec.EllipticCurvePrivateKey:
    """Load or create the EC P-384 node-authentication key (OpenSSH format, 0600)."""
    path = node_key_path(home)
    if path.exists():
        if os.stat(path).st_mode & 0o077:
            raise SiloConfigError(
                f"the node-authentication key of silo '{home.name}' is readable by others; "
                f"run 'chmod 600' on it"
            )
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), None)
        except (ValueError, TypeError):
            raise SiloConfigError(
                f"the node-authentication key of silo '{home.name}' is unusable; move it away "
                f"and run 'silo init' again (then re-enroll)"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SiloConfigError(f"the node-authentication key of '{home.name}' is not EC")
        return key
    folder = identity_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_atomic(path, private, mode=0o600)
    write_atomic(path.with_suffix(".pub"), (node_public_line(key) + "\n").encode(), mode=0o644)
    return key


def node_public_line(key: ec.EllipticCurvePrivateKey) -> str:
    """The OpenSSH public line of a node key."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


@dataclass(frozen=True)
class Enrollment:
    """What 'silo init' produced: the request file and both fingerprints."""

    request_path: Path
    secagg_fingerprint: str
    node_auth_fingerprint: str


def write_enrollment_request(home: SiloHome) -> Enrollment:
    """Create keys if needed and write the signed enrollment request into the silo home."""
    identity = ensure_identity(home)
    node_key = ensure_node_key(home)
    line = node_public_line(node_key)
    payload = {
        "hospital": home.name,
        "secagg_ed25519": base64.b64encode(identity.public_bytes).decode(),
        "node_auth_public_key": line,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    message = canonical(payload)
    request = {
        "format": REQUEST_FORMAT,
        "payload": payload,
        "signature": base64.b64encode(identity.sign(message)).decode(),
        "node_auth_signature": base64.b64encode(
            node_key.sign(message, ec.ECDSA(hashes.SHA256()))
        ).decode(),
    }
    path = Path(home.root) / REQUEST_FILE
    write_atomic(path, (json.dumps(request, indent=2) + "\n").encode(), mode=0o644)
    return Enrollment(path, identity.fingerprint(), ssh_key_fingerprint(line))


# --------------------------------------------------------------------- join bundle
@dataclass
class JoinBundle:
    """A parsed join bundle."""

    consortium: str
    superlink: str
    ca_pem: str
    ca_fingerprint: str
    roster_json: str
    member: str
    members: dict[str, dict[str, str]] = field(default_factory=dict)


def read_bundle(path: Path) -> JoinBundle:
    """Parse a join bundle; SiloConfigError with what is wrong."""
    from secure_agg import Roster, SecureAggError

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SiloConfigError(f"join bundle {path} does not exist") from None
    except (ValueError, UnicodeDecodeError):
        raise SiloConfigError(f"{path} is not JSON; pass the bundle the consortium sent") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise SiloConfigError(f"{path} is not a fedsilo join bundle ({BUNDLE_FORMAT})")
    try:
        bundle = JoinBundle(
            consortium=str(data["consortium"]),
            superlink=str(data["superlink"]),
            ca_pem=str(data["ca_cert"]),
            ca_fingerprint=str(data["ca_fingerprint"]),
            roster_json=json.dumps(data["roster"]),
            member=str(data["member"]),
            members=dict(data.get("members", {})),
        )
    except (KeyError, TypeError) as exc:
        raise SiloConfigError(f"{path}: join bundle lacks {exc}") from None
    try:
        actual = pem_certificate_fingerprints(bundle.ca_pem)[0]
    except ValueError:
        raise SiloConfigError(f"{path}: the CA certificate in the bundle is unreadable") from None
    if actual != bundle.ca_fingerprint:
        raise SiloConfigError(f"{path}: CA fingerprint does not match its certificate")
    try:
        Roster.from_json(bundle.roster_json)
    except SecureAggError as exc:
        raise SiloConfigError(f"{path}: roster in the bundle is invalid ({exc})") from None
    return bundle


@dataclass(frozen=True)
class RosterDiff:
    """How a new roster differs from the pinned one."""

    added: list[str]
    removed: list[str]
    changed: list[str]

    @property
    def empty(self) -> bool:
        """No change at all."""
        return not (self.added or self.removed or self.changed)


def roster_diff(old: dict[str, bytes], new: dict[str, bytes]) -> RosterDiff:
    """Names added, removed, and whose key changed."""
    return RosterDiff(
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(n for n in set(old) & set(new) if old[n] != new[n]),
    )


@dataclass(frozen=True)
class JoinPlan:
    """What installing a bundle would change; shown before anything is written."""

    bundle: JoinBundle
    first_join: bool
    diff: RosterDiff
    ca_changed: bool
    own_key_ok: bool


def plan_join(home: SiloHome, bundle: JoinBundle) -> JoinPlan:
    """Compare a bundle with what the silo has pinned (nothing is written)."""
    from secure_agg import Roster

    new = Roster.from_json(bundle.roster_json)
    identity = ensure_identity(home)
    own_key_ok = home.name in new and new[home.name] == identity.public_bytes
    first = not roster_path(home).exists()
    old = {} if first else dict(load_roster(home).items())
    ca_changed = ca_path(home).exists() and ca_path(home).read_text() != bundle.ca_pem
    return JoinPlan(bundle, first, roster_diff(old, dict(new.items())), ca_changed, own_key_ok)


def install_bundle(home: SiloHome, bundle: JoinBundle) -> None:
    """Pin the bundle's roster and CA and record the SuperLink address (atomic writes)."""
    from secure_agg import Roster

    if bundle.member != home.name:
        raise SiloConfigError(
            f"this bundle was written for '{bundle.member}', not for silo '{home.name}'"
        )
    folder = consortium_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(ca_path(home), bundle.ca_pem.encode(), mode=0o644)
    info = {
        "consortium": bundle.consortium,
        "superlink": bundle.superlink,
        "ca_fingerprint": bundle.ca_fingerprint,
        "members": bundle.members,
        "joined": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    write_atomic(folder / "consortium.json", json.dumps(info, indent=2).encode(), mode=0o644)
    Roster.from_json(bundle.roster_json).save(roster_path(home))


def installed_consortium(home: SiloHome) -> dict[str, Any]:
    """The installed consortium info; SiloConfigError telling to run 'silo join' if none."""
    path = consortium_dir(home) / "consortium.json"
    if not path.is_file() or not ca_path(home).is_file():
        raise SiloConfigError(
            f"silo '{home.name}' has not joined a consortium; run 'silo join BUNDLE' with the "
            f"join bundle the consortium sent"
        )
    try:
        return dict(json.loads(path.read_text()))
    except ValueError:
        raise SiloConfigError(f"{path} is damaged; run 'silo join BUNDLE' again") from None
