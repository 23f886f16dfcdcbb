"""`aggregator start` publishes only the Fleet API; the Control API stays on loopback.

Real processes on a non-loopback address of this machine: flower-superlink (all its APIs on
127.0.0.1) and the fleet-only front on HOST:PORT. From HOST the front answers the Fleet API
and /health, refuses /v1/control/* with 403, and the SuperLink's own port refuses connections.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator.fleet_front import is_forwarded

BIN = Path(sys.executable).parent


def _public_ipv4() -> str | None:
    """A global-scope IPv4 address of this machine (eth0 and the like), or None."""
    if not shutil.which("ip"):
        return None
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


def _request(host: str, port: int, ca: Path, method: str, path: str) -> tuple[int, bytes]:
    """One HTTPS request over a verified TLS connection; (status, body)."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/protobuf\r\n"
            f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_front_forwards_only_fleet_paths() -> None:
    assert is_forwarded("POST", "/v1/fleet/pull-messages")
    assert is_forwarded("GET", "/health")
    assert not is_forwarded("POST", "/v1/control/list-runs")
    assert not is_forwarded("POST", "/v1/fleet/../control/list-runs")
    assert not is_forwarded("GET", "/v1/fleet/pull-messages")
    assert not is_forwarded("POST", "/v1/runtime/get-run")
    assert not is_forwarded("GET", "/docs")


def test_front_answers_without_the_superlink(tmp_path: Path) -> None:
    """In process (ASGI): 403 for non-fleet paths, 502 in one line when the SuperLink is down."""
    import asyncio

    import httpx

    from aggregator.fleet_front import FleetOnlyFront
    from aggregator.pki import make_tls
    from fedsilo.flower_processes import free_port

    tls = make_tls(tmp_path, "net", ["127.0.0.1"])
    front = FleetOnlyFront(f"127.0.0.1:{free_port()}", str(tls.ca_cert), timeout=5)

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="https://front") as client:
            refused = await client.post("/v1/control/start-run", content=b"x")
            down = await client.post("/v1/fleet/pull-messages", content=b"x")
        await front.client.aclose()
        return refused, down

    refused, down = asyncio.run(ask())
    assert refused.status_code == 403 and b"only the Fleet API" in refused.content
    assert down.status_code == 502 and down.text.startswith("SuperLink unreachable")


def test_control_port_must_differ_from_the_fleet_port(tmp_path: Path) -> None:
    from aggregator.consortium_home import ConsortiumError, init_consortium

    with pytest.raises(ConsortiumError, match="must differ from the Fleet port 9093"):
        init_consortium(tmp_path / "c", "net", "127.0.0.1:9093", control_port=9093)
    assert not (tmp_path / "c").exists()  # nothing half-made
    home = init_consortium(tmp_path / "d", "net", "127.0.0.1:9093", control_port=7000)
    assert home.loopback_port == 7000
    done = subprocess.run(
        [str(BIN / "aggregator"), "start", "--home", str(home.root), "--port", "7000"],
        capture_output=True, text=True, check=False, timeout=60,
        env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"),
    )  # fmt: skip
    assert done.returncode == 2 and "is the SuperLink's loopback port" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.e2e
def test_control_api_is_unreachable_from_the_public_address(tmp_path: Path) -> None:
    from fedsilo.flower_processes import free_port

    public = _public_ipv4()
    if public is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test from")
    port = free_port()
    control = port + 1
    home = tmp_path / "c"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200")
    init = subprocess.run(
        [str(BIN / "aggregator"), "init", "--home", str(home), "--name", "net",
         "--address", f"{public}:{port}"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    out = tmp_path / "start.out"
    with out.open("wb") as handle:
        popen = subprocess.Popen(
            [str(BIN / "aggregator"), "start", "--home", str(home)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "listening on" not in out.read_text(errors="replace"):
            assert popen.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        assert f"Control API on 127.0.0.1:{control} only" in out.read_text()
        ca = home / "pki" / "ca.pem"
        # the Fleet API answers on the public address, through the front, from Flower itself
        status, _ = _request(public, port, ca, "GET", "/health")
        assert status == 200
        status, body = _request(public, port, ca, "POST", "/v1/fleet/get-run")
        assert status not in (403, 502), body  # reached the SuperLink, which judged it
        # the Control API: refused by the front on the public port ...
        status, body = _request(public, port, ca, "POST", "/v1/control/list-runs")
        assert status == 403 and b"only the Fleet API" in body
        # ... and the SuperLink's own port is closed on the public address
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((public, control), timeout=5).close()
        # while on loopback the Control API works (the node list was synced through it)
        status, _ = _request("127.0.0.1", control, ca, "GET", "/health")
        assert status == 200
        members = subprocess.run(
            [str(BIN / "aggregator"), "doctor", "--home", str(home)],
            capture_output=True, text=True, env=env, check=False, timeout=60,
        ).stdout  # fmt: skip
        assert "ok   fleet front" in members and "ok   superlink" in members, members
        assert json.loads((home / "consortium.json").read_text())["address"].startswith(public)
    finally:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=5)
    assert not (home / "superlink" / "superlink.pid").exists()
