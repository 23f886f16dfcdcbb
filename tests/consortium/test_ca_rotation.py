"""The staged CA rotation: begin (trust old + new), switch (SuperLink on the new CA), finish.

Each stage is checked by verifying the SuperLink certificate chain with cryptography's X.509
verifier against what a silo trusts: the old bundle, the two-CA bundle, the final bundle.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from aggregator import ca_rotation
from aggregator.consortium_home import ConsortiumError, ConsortiumHome, init_consortium
from aggregator.doctor_checks import check_server_certificate
from aggregator.enrollment_request import EnrollmentRequest
from aggregator.membership import enroll

BIN = Path(sys.executable).parent


def _member(name: str) -> EnrollmentRequest:
    secagg = Ed25519PrivateKey.generate().public_key()
    node = ec.generate_private_key(ec.SECP384R1()).public_key()
    return EnrollmentRequest(
        hospital=name,
        secagg_public=secagg.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
        node_auth_public_key=node.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode(),
        created="2026-01-01T00:00:00+00:00",
    )


@pytest.fixture
def home(tmp_path: Path) -> ConsortiumHome:
    created = init_consortium(tmp_path / "c", "net", "127.0.0.1:9093")
    for name in ("hospital-a", "hospital-b"):
        enroll(created, _member(name))
    return created


def _trusts(pem: str, home: ConsortiumHome) -> bool:
    """Does a silo holding these CA certificates accept the SuperLink's certificate?"""
    store = Store(x509.load_pem_x509_certificates(pem.encode()))
    verifier = (
        PolicyBuilder()
        .store(store)
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    server = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    try:
        verifier.verify(server, [])
    except VerificationError:
        return False
    return True


def _handshake(pem: str, home: ConsortiumHome, tmp_path: Path) -> bool:
    """A real OpenSSL TLS handshake (what SuperNodes do) with `pem` as the trust file."""
    import socket
    import ssl
    import threading

    cafile = tmp_path / "trust.pem"
    cafile.write_text(pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(home.server_cert, home.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True
    except ssl.SSLCertVerificationError:
        return False
    finally:
        thread.join(timeout=10)
        listener.close()


def _bundle(home: ConsortiumHome, member: str = "hospital-a") -> dict:
    return json.loads((home.bundles_dir / f"{member}.join.json").read_text())


def test_the_three_stages(home: ConsortiumHome, tmp_path: Path) -> None:
    from silo_client.enrollment import read_bundle

    old_bundle = _bundle(home)["ca_cert"]
    assert _trusts(old_bundle, home)

    step = ca_rotation.begin(home)
    assert step.stage == "begun" and step.bundles == 2 and "silo join" in step.silos_do
    both = _bundle(home)
    assert both["ca_rotation"] == "begun" and len(both["ca_fingerprints"]) == 2
    assert len(x509.load_pem_x509_certificates(both["ca_cert"].encode())) == 2
    assert both["ca_fingerprint"] == both["ca_fingerprints"][0]  # old first
    assert read_bundle(home.bundles_dir / "hospital-a.join.json").ca_pem == both["ca_cert"]
    # the SuperLink still uses the old chain: silos on the old and on the new bundle both work
    assert _trusts(old_bundle, home) and _trusts(both["ca_cert"], home)
    assert check_server_certificate(home)[0]
    new_ca = home.next_ca_cert.read_text()
    assert not _trusts(new_ca, home)
    assert "stage 1/3 'begun'" in ca_rotation.rotation_status(home)[1]

    step = ca_rotation.switch(home)
    assert step.stage == "switched" and "restart 'aggregator start'" in step.operator_next
    # the SuperLink certificate now chains to the new CA only
    assert _trusts(new_ca, home) and _trusts(_bundle(home)["ca_cert"], home)
    assert not _trusts(old_bundle, home)
    # and OpenSSL, given the two same-named CAs in one file, finds the right one
    assert _handshake(_bundle(home)["ca_cert"], home, tmp_path)
    assert not _handshake(old_bundle, home, tmp_path)
    assert check_server_certificate(home)[0]
    home.renew()  # a renewal mid-rotation stays under the CA that serves now
    assert _trusts(new_ca, home) and not _trusts(old_bundle, home)
    assert "stage 2/3 'switched'" in ca_rotation.rotation_status(home)[1]

    step = ca_rotation.finish(home)
    assert step.stage == "finished" and step.bundles == 2
    final = _bundle(home)
    assert final["ca_rotation"] is None and final["ca_cert"] == new_ca
    assert len(final["ca_fingerprints"]) == 1 and _trusts(final["ca_cert"], home)
    assert home.ca_cert.read_text() == new_ca and not home.next_ca_dir.exists()
    retired = sorted((home.pki_dir / "retired").iterdir())
    assert [p.suffix for p in retired] == [".key", ".pem"]
    assert retired[1].read_text() == old_bundle
    assert os.stat(retired[0]).st_mode & 0o777 == 0o600
    assert os.stat(home.ca_key).st_mode & 0o777 == 0o600
    assert ca_rotation.rotation_status(home) == (True, "no CA rotation in progress")
    assert check_server_certificate(home)[0]
    # the new CA key signs what the CA cert says
    home.renew()
    assert _trusts(home.ca_cert.read_text(), home)


def test_stages_refuse_out_of_order(home: ConsortiumHome) -> None:
    with pytest.raises(ConsortiumError, match=r"no CA rotation is in progress.*rotate-ca begin"):
        ca_rotation.switch(home)
    with pytest.raises(ConsortiumError, match=r"no CA rotation is in progress.*rotate-ca begin"):
        ca_rotation.finish(home)
    ca_rotation.begin(home)
    with pytest.raises(ConsortiumError, match="at 'begun'; next step is 'aggregator rotate-ca sw"):
        ca_rotation.begin(home)
    with pytest.raises(ConsortiumError, match="at 'begun'; next step is 'aggregator rotate-ca sw"):
        ca_rotation.finish(home)
    ca_rotation.switch(home)
    with pytest.raises(
        ConsortiumError, match="at 'switched'; next step is 'aggregator rotate-ca fin"
    ):
        ca_rotation.switch(home)
    home.rotation_path.write_text("{not json")
    with pytest.raises(ConsortiumError, match=r"rotation\.json is damaged"):
        ca_rotation.finish(home)


def test_begin_refuses_a_left_over_next_ca(home: ConsortiumHome) -> None:
    home.next_ca_dir.mkdir()
    home.next_ca_cert.write_text("left over")
    with pytest.raises(ConsortiumError, match="left-over of an interrupted"):
        ca_rotation.begin(home)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="250")
    return subprocess.run(
        [str(BIN / "aggregator"), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_stages_and_error_lines(home: ConsortiumHome) -> None:
    where = ["--home", str(home.root)]
    early = _cli("rotate-ca", "finish", *where)
    assert early.returncode == 2 and "Traceback" not in early.stderr
    assert "refused: no CA rotation is in progress" in early.stderr
    assert len(early.stderr.strip().splitlines()) == 1
    begun = _cli("rotate-ca", "begin", *where)
    assert begun.returncode == 0, begun.stderr
    assert "silos: each member runs 'silo join'" in begun.stdout
    assert "2 member bundle(s) refreshed" in begun.stdout
    doctor = _cli("doctor", *where).stdout
    assert "CA rotation" in doctor and "stage 1/3 'begun'" in doctor
    early = _cli("rotate-ca", "finish", *where)
    assert early.returncode == 2 and "rotate-ca switch" in early.stderr
    assert _cli("rotate-ca", "switch", *where).returncode == 0
    assert "stage 2/3 'switched'" in _cli("doctor", *where).stdout
    done = _cli("rotate-ca", "finish", *where)
    assert done.returncode == 0 and "old CA is in" in done.stdout
    assert "no CA rotation in progress" in _cli("doctor", *where).stdout
    secagg = base64.b64decode(home.members()["hospital-a"]["secagg_ed25519"])
    assert len(secagg) == 32  # members untouched by the rotation
