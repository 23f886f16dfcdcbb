"""The consortium home: PKI, the roster of member silos, enrollment and the SuperLink's node list.

Layout (``aggregator init``)::

    <home>/consortium.json        name, SuperLink address, creation time
    <home>/pki/ca.pem, ca.key     the consortium CA (key 0600; never re-minted by a re-run)
    <home>/pki/superlink.pem/.key the SuperLink's TLS certificate (SANs for the address)
    <home>/pki/next/, rotation.json the incoming CA and the stage of a CA rotation in progress
    <home>/pki/retired/           CAs dropped by 'aggregator rotate-ca finish'
    <home>/members.json           member silos: both public keys, enrollment time, Flower node id
    <home>/roster.json            the secure-aggregation roster (silo name -> Ed25519 key)
    <home>/bundles/NAME.join.json the join bundle written for each member
    <home>/superlink/             state.db (persistent SuperLink database), superlink.pid
    <home>/logs/                  superlink.log
    <home>/flwr-home/             FLWR_HOME of the processes and Control API client started here

Exchange formats (JSON; the silo side reads and writes the same documented schema without
importing this module; see docs/operators/consortium.md):

* enrollment request ``fedsilo-enrollment-request/1``::

    {"format": ..., "payload": {"hospital": NAME, "secagg_ed25519": B64 (raw 32 bytes),
     "node_auth_public_key": "ecdsa-sha2-nistp384 AAAA...", "created": ISO-8601},
     "signature": B64 Ed25519 over canonical(payload) by the identity key,
     "node_auth_signature": B64 ECDSA-SHA256 (DER) over canonical(payload) by the node key}

  ``canonical(x)`` is ``json.dumps(x, sort_keys=True, separators=(",", ":")).encode()``.
  Both signatures prove possession of both private keys.

* join bundle ``fedsilo-join-bundle/1``::

    {"format": ..., "consortium": NAME, "superlink": "HOST:PORT", "ca_cert": PEM text (two
     certificates, old then new, while a CA rotation is in progress), "ca_fingerprint": of the
     first, "ca_fingerprints": [of each], "ca_rotation": null | "begun" | "switched",
     "roster": <roster JSON object>, "member": NAME,
     "members": {NAME: {"secagg_fingerprint": ..., "node_auth_fingerprint": ...}},
     "issued": ISO-8601}
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.errors import AggregatorError
from aggregator.pki import (
    PkiError,
    certificate_fingerprint,
    certificate_info,
    create_ca,
    issue_server_certificate,
    load_certificate,
    superlink_hosts,
    verify_issued_by,
)

CONFIG_FILE = "consortium.json"
REQUEST_FORMAT = "fedsilo-enrollment-request/1"
BUNDLE_FORMAT = "fedsilo-join-bundle/1"
HOME_ENV = "FEDSILO_CONSORTIUM_HOME"


class ConsortiumError(AggregatorError):
    """The consortium home, an enrollment request or a member operation is wrong (one line)."""


def canonical(payload: dict[str, Any]) -> bytes:
    """Canonical bytes of a JSON object: the bytes both signatures of a request cover."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(data: bytes) -> str:
    """SHA-256 of data, first 32 hex digits grouped by 4 (the form read out on the phone)."""
    digest = hashlib.sha256(data).hexdigest()[:32]
    return " ".join(digest[i : i + 4] for i in range(0, len(digest), 4))


def ssh_key_fingerprint(line: str) -> str:
    """Fingerprint of an OpenSSH public key line: SHA-256 over its decoded key blob."""
    parts = line.split()
    if len(parts) < 2:
        raise ConsortiumError("node-authentication public key is not an OpenSSH key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ConsortiumError("node-authentication public key is not valid base64") from None
    return fingerprint(blob)


def now_iso() -> str:
    """The current UTC time, ISO-8601, seconds."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        return ssh_key_fingerprint(self.node_auth_public_key)

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
    from secure_agg.keys import check_name

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConsortiumError(f"enrollment request {path} does not exist") from None
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
    except ValueError as exc:
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


@dataclass
class ConsortiumHome:
    """A consortium home folder (see the module docstring for its layout)."""

    root: Path
    name: str
    address: str
    control_port: int | None = None

    @property
    def fleet_port(self) -> int:
        """The public Fleet API port (the port of the consortium address)."""
        return int(self.address.rpartition(":")[2])

    @property
    def loopback_port(self) -> int:
        """The port flower-superlink listens on at 127.0.0.1 (all its APIs, Control included).

        Defaults to the Fleet port + 1; `aggregator init --control-port` sets another.
        """
        return self.control_port or self.fleet_port + 1

    # ---------------------------------------------------------------- paths
    @property
    def pki_dir(self) -> Path:
        """Folder of the CA and SuperLink certificate."""
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        """The consortium CA certificate."""
        return self.pki_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The consortium CA private key (0600)."""
        return self.pki_dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.pki_dir / "superlink.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key (0600)."""
        return self.pki_dir / "superlink.key"

    @property
    def next_ca_dir(self) -> Path:
        """Folder of the incoming CA during a staged rotation (pki/next/ca.pem, ca.key)."""
        return self.pki_dir / "next"

    @property
    def next_ca_cert(self) -> Path:
        """The incoming CA certificate of a rotation in progress."""
        return self.next_ca_dir / "ca.pem"

    @property
    def next_ca_key(self) -> Path:
        """The incoming CA private key (0600)."""
        return self.next_ca_dir / "ca.key"

    @property
    def rotation_path(self) -> Path:
        """pki/rotation.json: the stage of a CA rotation in progress (absent: none)."""
        return self.pki_dir / "rotation.json"

    def rotation(self) -> dict[str, Any] | None:
        """The CA rotation in progress ({"stage": "begun"|"switched", ...}) or None."""
        if not self.rotation_path.exists():
            return None
        try:
            data = json.loads(self.rotation_path.read_text())
            if data["stage"] in ("begun", "switched"):
                return dict(data)
        except (ValueError, KeyError, TypeError):
            pass
        raise ConsortiumError(
            f"{self.rotation_path} is damaged; restore it from backup (stage 'begun' or "
            f"'switched', see docs/operators/consortium.md)"
        )

    @property
    def serving_ca_cert(self) -> Path:
        """The CA that signs the SuperLink certificate now (the new one once switched)."""
        rotation = self.rotation()
        return self.next_ca_cert if rotation and rotation["stage"] == "switched" else self.ca_cert

    @property
    def serving_ca_key(self) -> Path:
        """The key of :attr:`serving_ca_cert`."""
        rotation = self.rotation()
        return self.next_ca_key if rotation and rotation["stage"] == "switched" else self.ca_key

    def trust_pem(self) -> str:
        """The CA certificates silos must trust: the CA, plus the incoming one mid-rotation."""
        pem = self.ca_cert.read_text()
        if self.rotation():
            pem = pem.rstrip("\n") + "\n" + self.next_ca_cert.read_text()
        return pem

    @property
    def members_path(self) -> Path:
        """members.json."""
        return self.root / "members.json"

    @property
    def roster_path(self) -> Path:
        """The consortium's secure-aggregation roster."""
        return self.root / "roster.json"

    @property
    def bundles_dir(self) -> Path:
        """Where join bundles are written."""
        return self.root / "bundles"

    @property
    def superlink_dir(self) -> Path:
        """SuperLink database and pid file."""
        return self.root / "superlink"

    @property
    def database(self) -> Path:
        """The SuperLink's persistent database."""
        return self.superlink_dir / "state.db"

    @property
    def pid_file(self) -> Path:
        """PID of the running flower-superlink (written by 'aggregator start')."""
        return self.superlink_dir / "superlink.pid"

    @property
    def logs_dir(self) -> Path:
        """Logs folder."""
        return self.root / "logs"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME for processes started from this home."""
        return self.root / "flwr-home"

    # ---------------------------------------------------------------- open / init
    @classmethod
    def open(cls, root: Path | str) -> ConsortiumHome:
        """Open an existing consortium home; ConsortiumError saying how to create one."""
        root = Path(root).expanduser()
        config = root / CONFIG_FILE
        if not config.is_file():
            raise ConsortiumError(
                f"{root} is not a consortium home (no {CONFIG_FILE}); create it with "
                f"'aggregator init --home {root} --name CONSORTIUM --address HOST:PORT'"
            )
        try:
            data = json.loads(config.read_text())
            control = data.get("control_port")
            return cls(
                root=root.resolve(),
                name=str(data["name"]),
                address=str(data["address"]),
                control_port=int(control) if control else None,
            )
        except (ValueError, KeyError, TypeError):
            raise ConsortiumError(f"{config} is damaged; restore it from backup") from None

    # ---------------------------------------------------------------- members
    def members(self) -> dict[str, dict[str, Any]]:
        """Current members: name -> record (public keys, fingerprints, enrolled, node_id)."""
        return dict(self._members_file().get("members", {}))

    def removed(self) -> dict[str, dict[str, Any]]:
        """Revoked members (kept for the record)."""
        return dict(self._members_file().get("removed", {}))

    def _members_file(self) -> dict[str, Any]:
        if not self.members_path.exists():
            return {"members": {}, "removed": {}}
        try:
            data = json.loads(self.members_path.read_text())
        except ValueError:
            raise ConsortiumError(f"{self.members_path} is damaged; restore it") from None
        return data

    def _save_members(self, members: dict, removed: dict) -> None:
        payload = {"version": 1, "members": members, "removed": removed}
        write_atomic(self.members_path, (json.dumps(payload, indent=2) + "\n").encode())
        self._save_roster(members)

    def _save_roster(self, members: dict) -> None:
        from secure_agg.keys import Roster

        roster = Roster()
        for name, record in members.items():
            roster.add(name, base64.b64decode(record["secagg_ed25519"]))
        roster.save(self.roster_path)

    def roster(self):  # -> secure_agg.Roster
        """The consortium's roster (built from members.json)."""
        from secure_agg.keys import Roster

        if not self.roster_path.exists():
            return Roster()
        return Roster.load(self.roster_path)

    def enroll(self, request: EnrollmentRequest, *, replace: bool = False) -> Path:
        """Add a verified request's silo to members and roster; returns the join bundle path."""
        members, removed = self.members(), self.removed()
        current = members.get(request.hospital)
        if current and not replace:
            same = (
                current["secagg_ed25519"] == base64.b64encode(request.secagg_public).decode()
                and current["node_auth_public_key"] == request.node_auth_public_key
            )
            if not same:
                raise ConsortiumError(
                    f"'{request.hospital}' is already a member with other keys; check the "
                    f"fingerprints with its IT, then 'aggregator enroll --replace REQUEST'"
                )
        for name, record in members.items():
            if name != request.hospital and (
                record["node_auth_public_key"] == request.node_auth_public_key
                or record["secagg_ed25519"] == base64.b64encode(request.secagg_public).decode()
            ):
                raise ConsortiumError(f"the keys in this request already belong to member '{name}'")
        members[request.hospital] = {
            "secagg_ed25519": base64.b64encode(request.secagg_public).decode(),
            "secagg_fingerprint": request.secagg_fingerprint,
            "node_auth_public_key": request.node_auth_public_key,
            "node_auth_fingerprint": request.node_auth_fingerprint,
            "enrolled": now_iso(),
        }
        removed.pop(request.hospital, None)
        self._save_members(members, removed)
        return self.write_bundle(request.hospital)

    def remove(self, name: str) -> None:
        """Revoke a member: out of the roster and the authorised nodes (at the next sync)."""
        members, removed = self.members(), self.removed()
        if name not in members:
            known = ", ".join(sorted(members)) or "none"
            raise ConsortiumError(f"'{name}' is not a member (members: {known})")
        record = members.pop(name)
        record["removed"] = now_iso()
        removed[name] = record
        self._save_members(members, removed)

    def write_bundle(self, member: str) -> Path:
        """Write the join bundle for member (CA cert, roster, SuperLink address)."""
        members = self.members()
        rotation = self.rotation()
        cas = [self.ca_cert, self.next_ca_cert] if rotation else [self.ca_cert]
        bundle = {
            "format": BUNDLE_FORMAT,
            "consortium": self.name,
            "superlink": self.address,
            # mid-rotation: both PEM certificates, old first; silos trust either
            "ca_cert": self.trust_pem(),
            "ca_fingerprint": certificate_fingerprint(load_certificate(self.ca_cert)),
            "ca_fingerprints": [certificate_fingerprint(load_certificate(p)) for p in cas],
            "ca_rotation": rotation["stage"] if rotation else None,
            "roster": json.loads(self.roster().to_json()),
            "member": member,
            "members": {
                name: {
                    "secagg_fingerprint": rec["secagg_fingerprint"],
                    "node_auth_fingerprint": rec["node_auth_fingerprint"],
                }
                for name, rec in sorted(members.items())
            },
            "issued": now_iso(),
        }
        path = self.bundles_dir / f"{member}.join.json"
        write_atomic(path, (json.dumps(bundle, indent=2) + "\n").encode())
        return path

    def write_all_bundles(self) -> list[Path]:
        """Refresh every member's join bundle (after the roster changed)."""
        return [self.write_bundle(name) for name in sorted(self.members())]

    # ---------------------------------------------------------------- pki
    def renew(self, days: int = 397) -> Path:
        """Reissue the SuperLink certificate under the same CA; silos change nothing.

        Mid-rotation "the same CA" is the one serving now (the new one once switched).
        """
        ca_cert, ca_key = self.serving_ca_cert, self.serving_ca_key
        if not ca_key.exists():
            raise ConsortiumError(f"{ca_key} is missing; the CA key is needed to renew")
        issue_server_certificate(
            self.pki_dir, ca_cert, ca_key, superlink_hosts(self.address), days=days
        )
        return self.server_cert


def init_consortium(
    root: Path | str,
    name: str,
    address: str,
    days: int = 397,
    control_port: int | None = None,
) -> ConsortiumHome:
    """Create a consortium home; an existing CA is never replaced (ConsortiumError).

    ``control_port`` is the loopback port of flower-superlink (default: the Fleet port + 1).
    """
    from secure_agg.keys import check_name

    try:
        check_name(name)
        hosts = superlink_hosts(address)
    except (ValueError, PkiError) as exc:
        raise ConsortiumError(str(exc)) from None
    root = Path(root).expanduser().resolve()
    if (root / CONFIG_FILE).exists() or (root / "pki" / "ca.pem").exists():
        raise ConsortiumError(
            f"{root} already holds a consortium (and its CA); re-running init never mints a new "
            f"root. Use 'aggregator renew' for the SuperLink certificate, or see the CA rotation "
            f"procedure in docs/operators/consortium.md"
        )
    home = ConsortiumHome(root=root, name=name, address=address, control_port=control_port)
    if home.loopback_port == home.fleet_port or not 0 < home.loopback_port < 65536:
        raise ConsortiumError(
            f"control port {home.loopback_port} must differ from the Fleet port "
            f"{home.fleet_port} and be 1-65535; pass another --control-port"
        )
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    home.pki_dir.mkdir(exist_ok=True)
    os.chmod(home.pki_dir, 0o700)
    try:
        create_ca(home.pki_dir, name, overwrite=False)
    except PkiError as exc:
        raise ConsortiumError(str(exc)) from None
    issue_server_certificate(home.pki_dir, home.ca_cert, home.ca_key, hosts, days=days)
    for folder in (home.bundles_dir, home.superlink_dir, home.logs_dir, home.flwr_home):
        folder.mkdir(exist_ok=True)
    home._save_members({}, {})
    config: dict[str, Any] = {"version": 1, "name": name, "address": address, "created": now_iso()}
    if control_port:
        config["control_port"] = control_port
    write_atomic(home.root / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return home


def check_server_certificate(home: ConsortiumHome, warn_days: float = 30.0) -> tuple[bool, str]:
    """(ok, one line) about the SuperLink certificate: signed by our CA, valid, SAN matches."""
    try:
        verify_issued_by(home.server_cert, home.serving_ca_cert)
        info = certificate_info(home.server_cert)
    except PkiError as exc:
        return False, f"{exc}; run 'aggregator renew'"
    left = info.days_left()
    host = superlink_hosts(home.address)[0]
    if host not in info.sans:
        return False, (
            f"SuperLink certificate has no SAN for {host} (has {', '.join(info.sans)}); "
            f"run 'aggregator renew'"
        )
    if left < 0:
        return False, "SuperLink certificate has EXPIRED; run 'aggregator renew'"
    if left < warn_days:
        return False, f"SuperLink certificate expires in {left:.0f} days; run 'aggregator renew'"
    sans = ", ".join(info.sans)
    return True, f"SuperLink certificate valid for {left:.0f} more days, SANs {sans}"


# --------------------------------------------------------------------- Flower's node registry
def _control_client(home: ConsortiumHome, address: str | None = None):
    """A Flower Control API client for the SuperLink of this home (TLS, our CA)."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address or local_control_address(home),
        insecure=False,
        root_certificates=home.serving_ca_cert.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def local_control_address(home: ConsortiumHome) -> str:
    """Where this machine reaches the Control API: flower-superlink's loopback-only port."""
    return f"127.0.0.1:{home.loopback_port}"


@dataclass(frozen=True)
class SyncReport:
    """What a sync of the authorised nodes changed."""

    registered: list[str]
    unregistered: list[int]
    present: list[str]


def sync_authorised_nodes(
    home: ConsortiumHome, address: str | None = None, *, dry_run: bool = False
) -> SyncReport:
    """Make the SuperLink's registered nodes equal the members' node keys (Control API).

    Registers each member whose key is unknown (named after the hospital), unregisters every
    node whose key belongs to no member (removed silos), and records node ids in members.json.
    With ``dry_run`` it only reports what it would change.
    """
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        RegisterNodeRequest,
        UnregisterNodeRequest,
    )

    members = home.members()
    wanted = {ssh_line_to_pem(rec["node_auth_public_key"]): name for name, rec in members.items()}
    client = _control_client(home, address)
    registered: list[str] = []
    unregistered: list[int] = []
    present: list[str] = []
    try:
        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        except Exception as exc:
            raise ConsortiumError(
                f"cannot reach the SuperLink's Control API at "
                f"{address or local_control_address(home)} ({type(exc).__name__}); is "
                f"'aggregator start' running?"
            ) from None
        known: dict[bytes, int] = {}
        for node in nodes:
            if node.unregistered_at:
                continue
            known[bytes(node.public_key)] = int(node.node_id)
        for pem, node_id in known.items():
            if pem not in wanted:
                if dry_run:
                    unregistered.append(node_id)
                    continue
                client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
                unregistered.append(node_id)
        for pem, name in wanted.items():
            if pem in known:
                members[name]["node_id"] = known[pem]
                present.append(name)
                continue
            if dry_run:
                registered.append(name)
                continue
            response = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
            members[name]["node_id"] = int(response.node_id)
            registered.append(name)
    finally:
        client.close()
    if not dry_run:
        home._save_members(members, home.removed())
    return SyncReport(registered, unregistered, present)


# --------------------------------------------------------------------- checks shared by doctor
def probe_tls(address: str, ca_file: Path, timeout: float = 5.0) -> tuple[bool, str, float | None]:
    """TLS handshake + GET /health at address, verifying against ca_file.

    Returns (ok, one line, clock skew in seconds from the server's Date header or None).
    """
    import email.utils
    import socket
    import ssl
    import time

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        if "expired" in reason:
            hint = "the SuperLink's certificate has expired; the consortium runs 'aggregator renew'"
        elif "self-signed" in reason or "unable to get local issuer" in reason:
            hint = (
                "the SuperLink's certificate is not signed by the consortium CA you hold; "
                "check the address or get a fresh join bundle"
            )
        elif "mismatch" in reason or "hostname" in reason.lower():
            hint = f"the SuperLink's certificate is not valid for {host}; check the address"
        else:
            hint = "check the address and the consortium CA"
        return False, f"TLS to {address} refused: {reason} ({hint})", None
    except (OSError, ValueError) as exc:
        return False, f"SuperLink {address} unreachable ({exc}); is it running, port open?", None
    skew = None
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"date:"):
            try:
                server = email.utils.parsedate_to_datetime(line[5:].decode().strip())
                skew = time.time() - server.timestamp()
            except (TypeError, ValueError):
                skew = None
    status = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return True, f"SuperLink {address} reachable with TLS ({status})", skew


def free_disk_check(path: Path, minimum_gb: float = 5.0) -> tuple[bool, str]:
    """(ok, line) about free disk space where path lives."""
    import shutil

    free = shutil.disk_usage(path).free / 1e9
    if free < minimum_gb:
        return False, f"only {free:.1f} GB free at {path}; free at least {minimum_gb:.0f} GB"
    return True, f"{free:.1f} GB free at {path}"


def gpu_check() -> tuple[bool, str]:
    """(True, line) saying whether a CUDA GPU is visible (informational, never a failure)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True, f"GPU visible: {torch.cuda.get_device_name(0)}"
    except Exception:  # a broken CUDA install is reported as 'no GPU', not a crash
        pass
    return True, "no GPU visible (training runs on CPU)"
