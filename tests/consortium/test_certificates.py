"""Expired SuperLink certificate: refused by `aggregator start`, named by the silo; renew."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200")
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=120
    )


def _expire(home: Path) -> None:
    from aggregator.pki import issue_server_certificate

    pki = home / "pki"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    issue_server_certificate(pki, pki / "ca.pem", pki / "ca.key", ["127.0.0.1"], days=1,
                             not_before=past)  # fmt: skip


def test_aggregator_refuses_an_expired_certificate_and_renew_fixes_it(tmp_path: Path) -> None:
    home = tmp_path / "c"
    assert run("aggregator", "init", "--home", str(home), "--name", "n",
               "--address", "127.0.0.1:9").returncode == 0  # fmt: skip
    ca_before = (home / "pki" / "ca.pem").read_bytes()
    _expire(home)
    started = run("aggregator", "start", "--home", str(home))
    assert started.returncode == 2
    assert "EXPIRED" in started.stderr and "aggregator renew" in started.stderr
    assert "Traceback" not in started.stderr
    doctor = run("aggregator", "doctor", "--home", str(home))
    assert doctor.returncode == 1 and "FAIL certificate" in doctor.stdout
    assert run("aggregator", "renew", "--home", str(home)).returncode == 0
    assert (home / "pki" / "ca.pem").read_bytes() == ca_before  # same CA: no silo changes
    doctor = run("aggregator", "doctor", "--home", str(home))
    assert "ok   certificate" in doctor.stdout


@pytest.mark.e2e
def test_silo_names_an_expired_superlink_certificate(tmp_path: Path) -> None:
    from aggregator.pki import TlsFiles
    from fedsilo.flower_processes import FlowerCluster, free_port

    port = free_port()
    chome = tmp_path / "c"
    run("aggregator", "init", "--home", str(chome), "--name", "n", "--address", f"127.0.0.1:{port}")
    silo = tmp_path / "s"
    assert run("silo", "init", "--home", str(silo), "--name", "h").returncode == 0
    assert run("aggregator", "enroll", str(silo / "enrollment-request.json"),
               "--home", str(chome)).returncode == 0  # fmt: skip
    joined = run("silo", "join", str(chome / "bundles" / "h.join.json"), "--home", str(silo))
    assert joined.returncode == 0, joined.stderr
    assert json.loads((silo / "consortium" / "consortium.json").read_text())["superlink"]
    _expire(chome)
    pki = chome / "pki"
    tls = TlsFiles(pki / "ca.pem", pki / "superlink.pem", pki / "superlink.key")
    with FlowerCluster(tmp_path / "w", tls, port=port, enable_node_auth=True) as cluster:
        (tmp_path / "w").mkdir()
        cluster.start_superlink()
        done = run("silo", "start", "--home", str(silo), "--max-restarts", "0")
        assert done.returncode == 2
        assert "certificate has expired" in done.stderr and "aggregator renew" in done.stderr
        doctor = run("silo", "doctor", "--home", str(silo))
        assert "FAIL superlink" in doctor.stdout and "expired" in doctor.stdout
