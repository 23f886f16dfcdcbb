"""Who is a member: enrolling a verified request's silo, and removing (revoking) a member.

Members live in the home's members.json; the secure-aggregation roster is rebuilt from it on
every change (:meth:`ConsortiumHome.save_members`), and the member's join bundle is written.
"""

from __future__ import annotations

import base64
from pathlib import Path

from aggregator.consortium_home import ConsortiumError, ConsortiumHome, now_iso
from aggregator.enrollment_request import EnrollmentRequest
from aggregator.join_bundle import write_bundle


def enroll(home: ConsortiumHome, request: EnrollmentRequest, *, replace: bool = False) -> Path:
    """Add a verified request's silo to members and roster; returns the join bundle path."""
    members, removed = home.members(), home.removed()
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
    home.save_members(members, removed)
    return write_bundle(home, request.hospital)

def remove_member(home: ConsortiumHome, name: str) -> None:
    """Revoke a member: out of the roster and the authorised nodes (at the next sync)."""
    members, removed = home.members(), home.removed()
    if name not in members:
        known = ", ".join(sorted(members)) or "none"
        raise ConsortiumError(f"'{name}' is not a member (members: {known})")
    record = members.pop(name)
    record["removed"] = now_iso()
    removed[name] = record
    home.save_members(members, removed)
