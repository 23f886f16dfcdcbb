"""The ground floor (fedsilo_base): atomic files, fingerprints, process-tree stop, TLS probe,
home options and the CLI runner, each tested on its own with real files and processes."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedsilo_base import atomic_files
from fedsilo_base.atomic_files import PRIVATE, PUBLIC, atomic_file, atomic_path, write_atomic
from fedsilo_base.cli_runner import new_cli, run_cli
from fedsilo_base.errors import UserError
from fedsilo_base.fingerprints import (
    certificate_fingerprint,
    fingerprint,
    pem_certificate_fingerprints,
    ssh_key_fingerprint,
)
from fedsilo_base.home_folder import CONSORTIUM_HOME, SILO_HOME
from fedsilo_base.process_tree import stop_process_trees, superexec_helpers
from fedsilo_base.tls_probe import probe_tls, refusal_hint


# ----------------------------------------------------------------------------- atomic files
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mode", [PRIVATE, PUBLIC])
def test_write_atomic_sets_the_mode_asked_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old = os.umask(0o077 if mode == PUBLIC else 0o000)
    try:
        write_atomic(tmp_path / "sub" / "f.json", b"new", mode=mode)
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "f.json").read_bytes() == b"new"
    assert _mode(tmp_path / "sub" / "f.json") == mode


def test_private_file_is_never_readable_by_others_while_written(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "key.pem", mode=PRIVATE) as handle:
        handle.write(b"secret")
        partial = [p for p in tmp_path.iterdir() if p.name != "key.pem"]
        assert len(partial) == 1 and _mode(partial[0]) == PRIVATE
    assert not [p for p in tmp_path.iterdir() if p.name != "key.pem"]


def test_file_and_folder_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync, real_dir = os.fsync, atomic_files.fsync_directory
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("file"), real_fsync(fd))[1])
    monkeypatch.setattr(
        atomic_files, "fsync_directory", lambda d: (synced.append(f"dir {d}"), real_dir(d))[1]
    )
    write_atomic(tmp_path / "a", b"x", mode=PUBLIC)
    # the file is synced before the rename, the folder after it (its fsync is the last "file")
    assert synced == ["file", f"dir {tmp_path}", "file"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "members.json"
    write_atomic(target, b"old", mode=PUBLIC)
    with pytest.raises(RuntimeError), atomic_file(target, mode=PUBLIC) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["members.json"]


def test_staging_folder_keeps_half_files_out_of_the_scanned_folder(tmp_path: Path) -> None:
    dest, staging = tmp_path / "dicom", tmp_path / ".partial"
    with atomic_file(dest / "x.dcm", mode=PRIVATE, staging_dir=staging) as handle:
        handle.write(b"DICM")
        assert not dest.exists() or not list(dest.iterdir())
        assert len(list(staging.iterdir())) == 1
    assert (dest / "x.dcm").read_bytes() == b"DICM" and not list(staging.iterdir())


def test_atomic_path_for_writers_that_want_a_name(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "plot.png", mode=PUBLIC) as tmp:
        tmp.write_bytes(b"png")
        assert not (tmp_path / "plot.png").exists()
    assert (tmp_path / "plot.png").read_bytes() == b"png" and _mode(tmp_path / "plot.png") == PUBLIC
    with pytest.raises(OSError), atomic_path(tmp_path / "plot.png", mode=PUBLIC) as tmp:
        raise OSError("writer failed")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


# ----------------------------------------------------------------------------- fingerprints
def _certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_fingerprints_are_sha256_grouped_by_four() -> None:
    digest = hashlib.sha256(b"key").hexdigest()[:32]
    assert fingerprint(b"key") == " ".join(digest[i : i + 4] for i in range(0, 32, 4))
    cert = _certificate()
    openssl_form = cert.fingerprint(hashes.SHA256()).hex()[:32]
    assert certificate_fingerprint(cert).replace(" ", "") == openssl_form
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert pem_certificate_fingerprints(pem + pem) == [certificate_fingerprint(cert)] * 2


def test_ssh_key_fingerprint_is_over_the_key_blob() -> None:
    line = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    import base64

    assert ssh_key_fingerprint(line + " comment") == fingerprint(base64.b64decode(line.split()[1]))
    for bad in ("", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp384 !!notbase64!!"):
        with pytest.raises(ValueError):
            ssh_key_fingerprint(bad)


# ----------------------------------------------------------------------------- process tree
_PARENT = """
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                           "--parent-pid", str(__import__("os").getpid())],
                          start_new_session=True)  # detached, as Flower's SuperExec is
print(helper.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_stop_reaches_detached_helpers(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        helper = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while helper not in superexec_helpers(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert superexec_helpers(parent.pid) == [helper]
        stop_process_trees([parent], grace=10)
        assert parent.returncode is not None
        deadline = time.monotonic() + 10
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(helper)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, 9)
            parent.wait(timeout=5)
        parent.stdout.close()


def test_stop_kills_what_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        stop_process_trees([stubborn], grace=0.5)
        assert stubborn.returncode == -9
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait(timeout=5)
        stubborn.stdout.close()


# ----------------------------------------------------------------------------- TLS probe
def test_probe_of_a_closed_port_says_unreachable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ca = tmp_path / "ca.pem"
    ca.write_bytes(_certificate().public_bytes(serialization.Encoding.PEM))
    ok, line, skew = probe_tls(f"127.0.0.1:{port}", ca, timeout=2)
    assert not ok and skew is None
    assert f"SuperLink 127.0.0.1:{port} unreachable" in line and "\n" not in line


def test_one_hint_per_verification_failure() -> None:
    assert "aggregator renew" in refusal_hint("certificate has expired", "h")
    assert "fresh join bundle" in refusal_hint("self-signed certificate in chain", "h")
    assert "fresh join bundle" in refusal_hint("unable to get local issuer certificate", "h")
    assert "not valid for h" in refusal_hint("Hostname mismatch", "h")
    assert "address" in refusal_hint("something else", "h")


# ----------------------------------------------------------------------------- home options
def _home_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def where(
        silo: Path = SILO_HOME.option("--silo"), consortium: Path = CONSORTIUM_HOME.option()
    ) -> None:
        print(f"{silo}|{consortium}")

    return app


def test_each_home_reads_only_its_own_variable() -> None:
    runner = CliRunner()
    env = {"FEDSILO_HOME": "/srv/silo", "FEDSILO_CONSORTIUM": "/wrong"}
    done = runner.invoke(_home_app(), [], env={**env, "FEDSILO_CONSORTIUM_HOME": ""})
    assert done.output.strip() == "/srv/silo|~/.fedsilo/consortium", done.output
    done = runner.invoke(_home_app(), [], env={**env, "FEDSILO_CONSORTIUM_HOME": "/srv/c"})
    assert done.output.strip() == "/srv/silo|/srv/c"
    assert "FEDSILO_CONSORTIUM_HOME" in runner.invoke(_home_app(), ["--help"]).output


# ----------------------------------------------------------------------------- CLI runner
class _Refused(UserError):
    pass


def _runner_app() -> typer.Typer:
    app = new_cli("t", "A test CLI.")

    @app.command()
    def refuse() -> None:
        raise _Refused("request.json: invalid silo name 'a/b' [use letters]")

    @app.command()
    def crash() -> None:
        raise KeyError("bug")

    @app.command()
    def leave() -> None:
        raise typer.Exit(3)

    return app


def _run(app: typer.Typer, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["t", *argv])
    with pytest.raises(SystemExit) as info:
        run_cli(app)
    return info.value.code


def test_runner_user_error_is_one_line_exit_2(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDSILO_DEBUG", raising=False)
    assert _run(_runner_app(), monkeypatch, "refuse") == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: request.json: invalid silo name 'a/b' [use letters]"


def test_runner_internal_error_is_one_line_exit_1_and_debug_shows_it(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDSILO_DEBUG", raising=False)
    assert _run(_runner_app(), monkeypatch, "crash") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("internal error: KeyError") and "--debug" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setattr(sys, "argv", ["t", "--debug", "refuse"])
    with pytest.raises(_Refused):
        run_cli(_runner_app())
    monkeypatch.setattr(sys, "argv", ["t", "refuse"])  # the switch does not outlive a run
    with pytest.raises(SystemExit):
        run_cli(_runner_app())
    monkeypatch.setenv("FEDSILO_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["t", "crash"])
    with pytest.raises(KeyError):
        run_cli(_runner_app())


def test_runner_keeps_exit_codes_and_shows_debug_in_help(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDSILO_DEBUG", raising=False)
    assert _run(_runner_app(), monkeypatch, "leave") == 3
    assert _run(_runner_app(), monkeypatch, "nope") == 2  # click's usage error
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["t", "--help"])
    run_cli(_runner_app())  # exit status 0: returns normally
    assert "--debug" in capsys.readouterr().out
