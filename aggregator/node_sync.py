"""Flower's node registry kept equal to the members: the SuperLink's authorised node keys.

Talks to the SuperLink's Control API (loopback only, TLS with the consortium CA).
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.consortium_home import ConsortiumError, ConsortiumHome
from aggregator.enrollment_request import ssh_line_to_pem


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
        home.save_members(members, home.removed())
    return SyncReport(registered, unregistered, present)

