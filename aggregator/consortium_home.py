"""The consortium home: its folder layout, its configuration, its member records, its PKI files.

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
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.errors import AggregatorError
from aggregator.pki import PkiError, create_ca, issue_server_certificate, superlink_hosts
from fedsilo_base.atomic_files import PUBLIC, write_atomic
from fedsilo_base.home_folder import CONSORTIUM_HOME

CONFIG_FILE = "consortium.json"


class ConsortiumError(AggregatorError):
    """The consortium home, an enrollment request or a member operation is wrong (one line)."""


def now_iso() -> str:
    """The current UTC time, ISO-8601, seconds."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


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
            raise ConsortiumError(CONSORTIUM_HOME.missing_message(root, CONFIG_FILE))
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

    def save_members(self, members: dict, removed: dict) -> None:
        """Write members.json (current and removed members) and the roster built from it."""
        payload = {"version": 1, "members": members, "removed": removed}
        write_atomic(
            self.members_path, (json.dumps(payload, indent=2) + "\n").encode(), mode=PUBLIC
        )
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
    from secure_agg.errors import SecureAggError
    from secure_agg.keys import check_name

    try:
        check_name(name)
        hosts = superlink_hosts(address)
    except (ValueError, PkiError, SecureAggError) as exc:
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
    home.save_members({}, {})
    config: dict[str, Any] = {"version": 1, "name": name, "address": address, "created": now_iso()}
    if control_port:
        config["control_port"] = control_port
    write_atomic(
        home.root / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode(), mode=PUBLIC
    )
    return home

