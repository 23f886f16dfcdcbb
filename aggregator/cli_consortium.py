"""Consortium commands of `aggregator`: init, enroll, members, remove, start, doctor, renew.

Mounted on the `aggregator` app by :func:`register`. Every operator error is a
:class:`~aggregator.consortium_home.ConsortiumError` (one line, exit 2, no traceback).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aggregator.consortium_home import ConsortiumError, ConsortiumHome, init_consortium
from aggregator.doctor_checks import check_server_certificate, free_disk_check, gpu_check
from aggregator.enrollment_request import parse_request
from aggregator.join_bundle import write_all_bundles
from aggregator.membership import enroll as enroll_member
from aggregator.membership import remove_member
from aggregator.node_sync import local_control_address, sync_authorised_nodes
from fedsilo_base.home_folder import CONSORTIUM_HOME
from fedsilo_base.process_tree import stop_process_trees
from fedsilo_base.tls_probe import probe_tls

console = Console(soft_wrap=True)


def _superlink_running(home: ConsortiumHome) -> bool:
    try:
        pid = int(home.pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _sync_if_running(home: ConsortiumHome) -> None:
    if not _superlink_running(home):
        console.print("SuperLink not running here: the node list is applied at 'aggregator start'")
        return
    report = sync_authorised_nodes(home)
    console.print(
        f"SuperLink node list synced: registered {report.registered or 'none'}, "
        f"unregistered {len(report.unregistered)} node(s)"
    )


def init(
    name: str = typer.Option(..., "--name", help="The consortium's name."),
    address: str = typer.Option(
        ..., "--address", help="HOST:PORT where silos reach the SuperLink (goes in the cert SANs)."
    ),
    home: Path = CONSORTIUM_HOME.option(),
    days: int = typer.Option(397, "--days", help="Validity of the SuperLink certificate."),
    control_port: int = typer.Option(
        None,
        "--control-port",
        help="Loopback port of the SuperLink's Control/runtime API (default: Fleet port + 1).",
    ),
) -> None:
    """Create the consortium home: CA, SuperLink certificate, empty roster."""
    created = init_consortium(home, name, address, days=days, control_port=control_port)
    from aggregator.pki import certificate_info

    ca = certificate_info(created.ca_cert)
    server = certificate_info(created.server_cert)
    console.print(f"consortium '{name}' ready in {created.root}")
    console.print(f"CA fingerprint (read it to each hospital): {ca.fingerprint}")
    console.print(
        f"SuperLink certificate for {', '.join(server.sans)}, valid until "
        f"{server.not_after:%Y-%m-%d}"
    )


def enroll(
    request: Path = typer.Argument(..., help="The enrollment-request.json a silo sent."),
    home: Path = CONSORTIUM_HOME.option(),
    replace: bool = typer.Option(False, "--replace", help="Replace a member's keys."),
) -> None:
    """Verify an enrollment request, add the silo, write its join bundle."""
    consortium = ConsortiumHome.open(home)
    parsed = parse_request(request)
    console.print(f"request from '{parsed.hospital}' (both signatures verify)")
    console.print(f"  secure-aggregation key fingerprint: {parsed.secagg_fingerprint}")
    console.print(f"  node-authentication key fingerprint: {parsed.node_auth_fingerprint}")
    console.print("  compare both with the hospital's IT on the phone before sending the bundle")
    bundle = enroll_member(consortium, parsed, replace=replace)
    others = [p for p in write_all_bundles(consortium) if p != bundle]
    console.print(f"join bundle: {bundle}")
    if others:
        console.print(
            f"roster changed: {len(others)} other member bundle(s) refreshed in "
            f"{consortium.bundles_dir}; each member runs 'silo join' with its new bundle"
        )
    _sync_if_running(consortium)


def members(
    home: Path = CONSORTIUM_HOME.option(), as_json: bool = typer.Option(False, "--json")
) -> None:
    """List member silos with their fingerprints."""
    consortium = ConsortiumHome.open(home)
    current = consortium.members()
    if as_json:
        import json

        print(json.dumps({"members": current, "removed": consortium.removed()}, indent=2))
        return
    table = Table(title=f"consortium '{consortium.name}' ({len(current)} members)")
    for column in ("silo", "secure-agg fingerprint", "node-auth fingerprint", "enrolled"):
        table.add_column(column)
    for name, rec in sorted(current.items()):
        table.add_row(
            name, rec["secagg_fingerprint"], rec["node_auth_fingerprint"], rec["enrolled"]
        )
    console.print(table)
    for name, rec in sorted(consortium.removed().items()):
        console.print(f"removed: {name} on {rec.get('removed', '?')}")


def remove(
    name: str = typer.Argument(..., help="The member to revoke."),
    home: Path = CONSORTIUM_HOME.option(),
) -> None:
    """Revoke a member: out of the roster and out of the SuperLink's authorised nodes."""
    consortium = ConsortiumHome.open(home)
    remove_member(consortium, name)
    (consortium.bundles_dir / f"{name}.join.json").unlink(missing_ok=True)
    write_all_bundles(consortium)
    console.print(
        f"'{name}' removed from the roster; bundles refreshed for the remaining members "
        f"(each runs 'silo join' with its new bundle)"
    )
    _sync_if_running(consortium)


def renew(
    home: Path = CONSORTIUM_HOME.option(),
    days: int = typer.Option(397, "--days", help="Validity of the new certificate."),
) -> None:
    """Reissue the SuperLink certificate under the same CA (no silo changes anything)."""
    from aggregator.pki import certificate_info

    consortium = ConsortiumHome.open(home)
    consortium.renew(days=days)
    info = certificate_info(consortium.server_cert)
    console.print(
        f"SuperLink certificate reissued under the same CA, valid until {info.not_after:%Y-%m-%d}"
    )
    if _superlink_running(consortium):
        console.print("restart 'aggregator start' so the SuperLink serves the new certificate")


rotate_app = typer.Typer(
    help="Staged CA rotation: begin (bundles trust old + new CA), switch (SuperLink certificate "
    "from the new CA), finish (old CA dropped). See docs/operators/consortium.md.",
    no_args_is_help=True,
)


def _report_step(consortium: ConsortiumHome, step) -> None:  # step: ca_rotation.RotationStep
    console.print(
        f"CA rotation: {step.stage}; {step.bundles} member bundle(s) refreshed in "
        f"{consortium.bundles_dir}"
    )
    console.print(f"silos: {step.silos_do}")
    console.print(f"next: {step.operator_next}")


@rotate_app.command("begin")
def rotate_begin(
    home: Path = CONSORTIUM_HOME.option(),
    days: int = typer.Option(3650, "--days", help="Validity of the new CA."),
) -> None:
    """Stage 1: a new CA; join bundles carry the old and the new CA; the SuperLink is unchanged."""
    from aggregator import ca_rotation

    consortium = ConsortiumHome.open(home)
    _report_step(consortium, ca_rotation.begin(consortium, days=days))


@rotate_app.command("switch")
def rotate_switch(
    home: Path = CONSORTIUM_HOME.option(),
    days: int = typer.Option(397, "--days", help="Validity of the new SuperLink certificate."),
) -> None:
    """Stage 2: reissue the SuperLink certificate under the new CA."""
    from aggregator import ca_rotation

    consortium = ConsortiumHome.open(home)
    _report_step(consortium, ca_rotation.switch(consortium, days=days))
    if _superlink_running(consortium):
        console.print("the SuperLink is running: restart 'aggregator start' now")


@rotate_app.command("finish")
def rotate_finish(home: Path = CONSORTIUM_HOME.option()) -> None:
    """Stage 3: the new CA becomes the CA; bundles carry only it; the old CA is retired."""
    from aggregator import ca_rotation

    consortium = ConsortiumHome.open(home)
    _report_step(consortium, ca_rotation.finish(consortium))


def superlink_command(consortium: ConsortiumHome) -> list[str]:
    """The flower-superlink command line for this home: every API on 127.0.0.1 only.

    Flower 1.42 serves Fleet, Control and the ServerApp runtime API on one --host/--port (its
    --fleet-api-address/--control-api-address are deprecated and ignored), so the SuperLink
    itself never listens on a public interface; :func:`front_command` publishes the Fleet API.
    """
    exe = Path(sys.executable).parent / "flower-superlink"
    return [
        str(exe) if exe.exists() else "flower-superlink",
        "--ssl-certfile",
        str(consortium.server_cert),
        "--ssl-keyfile",
        str(consortium.server_key),
        "--ssl-ca-certfile",
        str(consortium.serving_ca_cert),
        "--host",
        "127.0.0.1",
        "--port",
        str(consortium.loopback_port),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(consortium.database),
    ]


def front_command(consortium: ConsortiumHome, bind: str, port: int) -> list[str]:
    """The fleet-only front (aggregator.fleet_front) on bind:port, forwarding to loopback."""
    host = f"[{bind}]" if ":" in bind else bind
    return [
        sys.executable,
        "-m",
        "aggregator.fleet_front",
        "--listen",
        f"{host}:{port}",
        "--upstream",
        local_control_address(consortium),
        "--certfile",
        str(consortium.server_cert),
        "--keyfile",
        str(consortium.server_key),
        "--cafile",
        str(consortium.serving_ca_cert),
    ]


def _wait_listening(
    popen: subprocess.Popen, what: str, host: str, port: int, log_path: Path, timeout: float
) -> None:
    """Return once host:port accepts connections; ConsortiumError if popen dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if popen.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise ConsortiumError(
                f"{what} exited at start (code {popen.returncode}); see {log_path}: "
                + " | ".join(tail)
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ConsortiumError(
                    f"{what} did not listen on {host}:{port} within {timeout:.0f} s; see {log_path}"
                ) from None
            time.sleep(0.2)


def start(
    home: Path = CONSORTIUM_HOME.option(),
    bind: str = typer.Option(
        None,
        "--bind",
        help="Interface of the public Fleet API (default: the host of --address; 0.0.0.0 for "
        "all). The Control API always stays on 127.0.0.1.",
    ),
    port: int = typer.Option(
        None, "--port", help="Port of the public Fleet API (default: the port of --address)."
    ),
    startup_timeout: float = typer.Option(60.0, "--startup-timeout"),
) -> None:
    """Run flower-superlink (TLS, node auth, persistent database) on loopback and the
    fleet-only front on the public address; foreground until SIGTERM/SIGINT."""
    consortium = ConsortiumHome.open(home)
    ok, line = check_server_certificate(consortium, warn_days=0)
    if not ok:
        raise ConsortiumError(line)
    if _superlink_running(consortium):
        raise ConsortiumError(
            f"a SuperLink of this home is already running (pid file {consortium.pid_file})"
        )
    host, _, address_port = consortium.address.rpartition(":")
    bind = bind or host.strip("[]")
    port = port or int(address_port)
    control_port = consortium.loopback_port
    if port == control_port:
        raise ConsortiumError(
            f"the Fleet port {port} is the SuperLink's loopback port; pick another --port or "
            f"set control_port in {consortium.root / 'consortium.json'}"
        )
    from aggregator.consortium_home import now_iso

    consortium.logs_dir.mkdir(parents=True, exist_ok=True)
    consortium.flwr_home.mkdir(parents=True, exist_ok=True)
    log_path = consortium.logs_dir / "superlink.log"
    front_log = consortium.logs_dir / "fleet-front.log"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(consortium.flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    procs: list[subprocess.Popen] = []

    def launch(command: list[str], log: Path) -> subprocess.Popen:
        with log.open("ab") as handle:
            handle.write(f"--- aggregator start {now_iso()} ---\n".encode())
            popen = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=consortium.superlink_dir,
                start_new_session=True,
            )
        procs.append(popen)
        return popen

    def stop(*_: object) -> None:
        stop_process_trees(list(reversed(procs)))
        consortium.pid_file.unlink(missing_ok=True)

    def on_signal(signum: int, _frame: object) -> None:
        stop()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        superlink = launch(superlink_command(consortium), log_path)
        consortium.pid_file.write_text(f"{superlink.pid}\n")
        _wait_listening(
            superlink, "flower-superlink", "127.0.0.1", control_port, log_path, startup_timeout
        )
        front = launch(front_command(consortium, bind, port), front_log)
        probe_host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
        _wait_listening(front, "the fleet-only front", probe_host, port, front_log, startup_timeout)
        report = sync_authorised_nodes(consortium)
        console.print(
            f"SuperLink '{consortium.name}' listening on {bind}:{port} (Fleet API only, TLS, node "
            f"auth on); Control API on 127.0.0.1:{control_port} only; database "
            f"{consortium.database}; authorised nodes: "
            f"{', '.join(sorted(report.registered + report.present)) or 'none'}; "
            f"logs {log_path}, {front_log}",
        )
        sys.stdout.flush()
        while superlink.poll() is None and front.poll() is None:
            time.sleep(0.5)
        dead, log = (superlink, log_path) if superlink.poll() is not None else (front, front_log)
        what = "flower-superlink" if dead is superlink else "the fleet-only front"
        raise ConsortiumError(f"{what} exited with code {dead.returncode}; see {log}")
    except BaseException:
        stop()
        raise


def doctor(home: Path = CONSORTIUM_HOME.option()) -> None:
    """One line per check: certificates, keys, roster, SuperLink, clock, disk, GPU."""
    import datetime as dt

    from aggregator.pki import PkiError, certificate_info

    consortium = ConsortiumHome.open(home)
    results: list[tuple[bool, str, str]] = []
    try:
        ca = certificate_info(consortium.ca_cert)
        left = ca.days_left()
        if left < 30:
            results.append(
                (
                    False,
                    "CA",
                    f"CA certificate expires in {left:.0f} days: start "
                    f"the staged CA rotation (docs/operators/consortium.md)",
                )
            )
        else:
            results.append(
                (
                    True,
                    "CA",
                    f"CA valid until {ca.not_after:%Y-%m-%d}, fingerprint {ca.fingerprint}",
                )
            )
    except PkiError as exc:
        results.append((False, "CA", str(exc)))
    ok, line = check_server_certificate(consortium)
    results.append((ok, "certificate", line))
    from aggregator.ca_rotation import rotation_status

    ok, line = rotation_status(consortium)
    results.append((ok, "CA rotation", line))
    loose = [
        str(p)
        for p in (consortium.ca_key, consortium.server_key)
        if p.exists() and os.stat(p).st_mode & 0o077
    ]
    results.append(
        (
            not loose,
            "key modes",
            "private keys are 0600"
            if not loose
            else f"{', '.join(loose)} readable by others: chmod 600",
        )
    )
    members = consortium.members()
    roster = consortium.roster()
    consistent = set(roster) == set(members)
    results.append(
        (
            consistent,
            "roster",
            f"roster and members agree ({len(members)} silos)"
            if consistent
            else "roster.json and members.json differ: re-run 'aggregator enroll' for the missing",
        )
    )
    if _superlink_running(consortium):
        reachable, line, skew = probe_tls(
            local_control_address(consortium), consortium.serving_ca_cert
        )
        results.append((reachable, "superlink", line + " (loopback: Control API)"))
        front_ok, front_line, _ = probe_tls(consortium.address, consortium.serving_ca_cert)
        results.append((front_ok, "fleet front", front_line.replace("SuperLink", "Fleet API", 1)))
        if skew is not None:
            results.append((abs(skew) < 5, "clock", f"clock skew vs SuperLink {skew:+.1f} s"))
        if reachable:
            try:
                report = sync_authorised_nodes(consortium, dry_run=True)
                in_sync = not (report.registered or report.unregistered)
                results.append(
                    (
                        in_sync,
                        "nodes",
                        "SuperLink authorised nodes match the members"
                        if in_sync
                        else f"SuperLink lacks {report.registered or 'none'} "
                        f"and has {len(report.unregistered)} node(s) of no member: "
                        f"restart 'aggregator start' (it syncs)",
                    )
                )
            except ConsortiumError as exc:
                results.append((False, "nodes", str(exc)))
    else:
        results.append((False, "superlink", "SuperLink not running; run 'aggregator start'"))
    results.append((True, "time", f"UTC now {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S}"))
    ok, line = free_disk_check(consortium.root)
    results.append((ok, "disk", line))
    ok, line = gpu_check()
    results.append((ok, "gpu", line))
    if _print_checks(results):
        raise SystemExit(1)


def _print_checks(results: list[tuple[bool, str, str]]) -> int:
    for ok, name, line in results:
        mark = "[green]ok  [/]" if ok else "[red]FAIL[/]"
        console.print(f"{mark} {name:<12} {escape(line)}", highlight=False)
    return sum(1 for ok, _, _ in results if not ok)


def register(app: typer.Typer) -> None:
    """Mount the consortium commands on the `aggregator` app."""
    app.command("init")(init)
    app.command("enroll")(enroll)
    app.command("members")(members)
    app.command("remove")(remove)
    app.command("start")(start)
    app.command("doctor")(doctor)
    app.command("renew")(renew)
    app.add_typer(rotate_app, name="rotate-ca")
