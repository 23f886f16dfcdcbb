"""Consortium commands of `silo`: join, start (a supervised SuperNode), doctor.

`silo init` (in silo_client/cli.py) calls :func:`report_enrollment` to create the node key and
the signed enrollment request. Everything here talks only to the SuperLink named in the join
bundle; errors are :class:`SiloConfigError` (one line, exit 2).
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

from fedsilo_base.fingerprints import pem_certificate_fingerprints
from fedsilo_base.home_folder import SILO_HOME
from fedsilo_base.process_tree import stop_process_tree
from fedsilo_base.tls_probe import probe_tls
from silo_client.enrollment import (
    ca_path,
    install_bundle,
    installed_consortium,
    node_key_path,
    plan_join,
    read_bundle,
    write_enrollment_request,
)
from silo_client.errors import SiloConfigError, SiloError
from silo_client.home import SiloHome
from silo_client.processes import runner_command, supernode_launch

console = Console(soft_wrap=True)

#: Lines in a SuperNode log that mean the SuperLink refused this node's key (Flower 1.42).
AUTH_REFUSED_MARKERS = ("[code: 2004]", "Failed to activate SuperNode", "Invalid SuperNode auth")


def report_enrollment(silo: SiloHome) -> None:
    """Create the node key and enrollment request; print both fingerprints."""
    enrollment = write_enrollment_request(silo)
    console.print(f"secure-aggregation identity fingerprint: {enrollment.secagg_fingerprint}")
    console.print(f"node-authentication key fingerprint:     {enrollment.node_auth_fingerprint}")
    console.print(
        f"enrollment request: {enrollment.request_path} (send it to the consortium operator and "
        f"read both fingerprints to them on the phone)"
    )


def join(
    bundle: Path = typer.Argument(..., help="The join bundle the consortium sent."),
    home: Path = SILO_HOME.option(),
    yes: bool = typer.Option(False, "--yes", help="Install a changed roster without asking."),
) -> None:
    """Install a join bundle: CA, SuperLink address, and the roster this silo pins."""
    silo = SiloHome.open(home)
    parsed = read_bundle(bundle)
    plan = plan_join(silo, parsed)
    if not plan.own_key_ok:
        raise SiloConfigError(
            f"the bundle's roster does not hold this silo's identity key for '{silo.name}'; do "
            f"not install it, and call the consortium operator"
        )
    table = Table(title=f"consortium '{parsed.consortium}' at {parsed.superlink}")
    for column in ("silo", "secure-agg fingerprint", "node-auth fingerprint"):
        table.add_column(column)
    for name, rec in sorted(parsed.members.items()):
        mark = " (this silo)" if name == silo.name else ""
        table.add_row(
            name + mark, rec.get("secagg_fingerprint", "?"), rec.get("node_auth_fingerprint", "?")
        )
    console.print(table)
    cas = pem_certificate_fingerprints(parsed.ca_pem)
    if len(cas) > 1:
        # a staged CA rotation: the SuperLink's certificate may come from either CA
        console.print(f"CA fingerprints (the consortium is rotating its CA): {', '.join(cas)}")
    else:
        console.print(f"CA fingerprint: {parsed.ca_fingerprint}")
    if plan.ca_changed:
        console.print("[yellow]the consortium CA differs from the one installed[/]")
    if not plan.first_join:
        if plan.diff.empty and not plan.ca_changed:
            install_bundle(silo, parsed)
            console.print("roster unchanged; bundle re-installed")
            return
        for name in plan.diff.added:
            console.print(f"[green]+ {name}[/] joins the roster")
        for name in plan.diff.removed:
            console.print(f"[red]- {name}[/] leaves the roster")
        for name in plan.diff.changed:
            console.print(f"[yellow]~ {name}[/] has a NEW key: confirm its fingerprint by phone")
        if not yes:
            if not sys.stdin.isatty():
                raise SiloConfigError(
                    "the roster changed; compare the fingerprints above, then re-run "
                    "'silo join' with --yes to install it"
                )
            if not typer.confirm("Install this roster?", default=False):
                raise SiloConfigError("roster change not installed; the pinned roster is kept")
    install_bundle(silo, parsed)
    console.print(
        f"joined '{parsed.consortium}': {len(parsed.members)} member(s) pinned; SuperLink "
        f"{parsed.superlink}"
    )


# --------------------------------------------------------------------- checks
def _cert_days_left(path: Path) -> float:
    import datetime as dt

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def doctor(
    home: Path = SILO_HOME.option(),
    aet: str = typer.Option("FEDSILO", "--aet", help="Our AE title for the PACS C-ECHO."),
    called_aet: str = typer.Option("ORTHANC", "--called-aet", help="The PACS's AE title."),
) -> None:
    """One line per check: joined, CA, keys, roster, SuperLink TLS, clock, disk, GPU, PACS."""
    import shutil

    from silo_client.identity import key_path, load_roster

    silo = SiloHome.open(home)
    results: list[tuple[bool, str, str]] = []
    try:
        info = installed_consortium(silo)
    except SiloConfigError as exc:
        info = None
        results.append((False, "joined", str(exc)))
    if info:
        results.append((True, "joined", f"consortium '{info['consortium']}', {info['superlink']}"))
        left = _cert_days_left(ca_path(silo))
        if len(pem_certificate_fingerprints(ca_path(silo).read_text())) > 1:
            results.append(
                (
                    True,
                    "CA rotation",
                    "this silo trusts the old and the new consortium CA (rotation in progress); "
                    "run 'silo join' with each bundle the consortium sends until it finishes",
                )
            )
        results.append(
            (
                left >= 30,
                "CA",
                f"consortium CA valid {left:.0f} more days"
                if left >= 30
                else f"consortium CA expires in {left:.0f} days: ask the consortium "
                f"about its CA rotation",
            )
        )
    for label, path in (("identity key", key_path(silo)), ("node key", node_key_path(silo))):
        if not path.exists():
            results.append((False, label, f"missing: run 'silo init --home {silo.root}'"))
        elif os.stat(path).st_mode & 0o077:
            results.append((False, label, f"{path} readable by others: chmod 600 it"))
        else:
            results.append((True, label, "present, 0600"))
    if info:
        try:
            roster = load_roster(silo)
            fingerprints = {n: roster.fingerprint(n) for n in roster}
            expected = {n: r.get("secagg_fingerprint") for n, r in info["members"].items()}
            own = silo.name in roster
            ok = own and fingerprints == expected
            results.append(
                (
                    ok,
                    "roster",
                    f"pinned roster of {len(roster)} silos, this silo included"
                    if ok
                    else "pinned roster does not match the installed bundle or lacks this "
                    "silo: run 'silo join BUNDLE' again",
                )
            )
        except SiloConfigError as exc:
            results.append((False, "roster", str(exc)))
        reachable, line, skew = probe_tls(info["superlink"], ca_path(silo))
        results.append((reachable, "superlink", line))
        if skew is not None:
            results.append(
                (
                    abs(skew) < 5,
                    "clock",
                    f"clock skew vs SuperLink {skew:+.1f} s"
                    + ("" if abs(skew) < 5 else ": fix NTP (node auth needs < 5 s)"),
                )
            )
    free = shutil.disk_usage(silo.root).free / 1e9
    results.append((free >= 5, "disk", f"{free:.1f} GB free at {silo.root}"))
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install is reported as 'no GPU', not a crash
        gpu = None
    results.append((True, "gpu", f"GPU visible: {gpu}" if gpu else "no GPU (CPU training)"))
    from silo_client.pacs_check import check_pacs, pacs_sources

    try:
        sources = pacs_sources(silo.root)
    except SiloError as exc:  # a damaged catalogue is reported, the other checks still run
        sources = []
        results.append((False, "pacs", str(exc)))
    if not sources:
        results.append((True, "pacs", "no dataset pulled from a PACS"))
    for source in sources:
        ok, line = check_pacs(source, aet=aet, called_aet=called_aet)
        results.append((ok, "pacs", line))
    failed = 0
    for ok, name, line in results:
        failed += not ok
        mark = "[green]ok  [/]" if ok else "[red]FAIL[/]"
        # escaped: a check's line may carry brackets that rich would take for markup
        console.print(f"{mark} {name:<12} {escape(line)}", highlight=False)
    if failed:
        raise SystemExit(1)


# --------------------------------------------------------------------- supervised SuperNode
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supernode_command(silo: SiloHome, superlink: str, runtime_port: int) -> list[str]:
    """The flower-supernode command line for this silo."""
    return [
        *supernode_launch(),
        "--root-certificates",
        str(ca_path(silo)),
        "--superlink",
        superlink,
        "--auth-supernode-private-key",
        str(node_key_path(silo)),
        "--node-config",
        f'home="{silo.root}"',
        "--isolation",
        "process",
        "--port",
        str(runtime_port),
        "--max-wait-time",
        "300",
    ]


def start(
    home: Path = SILO_HOME.option(),
    runtime_port: int = typer.Option(
        0, "--runtime-port", help="Local port of the SuperNode's runtime API (0: pick a free one)."
    ),
    max_restarts: int = typer.Option(
        -1, "--max-restarts", help="Give up after this many restarts (-1: never)."
    ),
    max_backoff: float = typer.Option(60.0, "--max-backoff", help="Longest wait between restarts."),
) -> None:
    """Run flower-supernode (TLS, node auth, node-config home=...), restarting it if it dies."""
    silo = SiloHome.open(home)
    info = installed_consortium(silo)
    if not node_key_path(silo).exists():
        raise SiloConfigError(f"silo '{silo.name}' has no node key; run 'silo init' first")
    superlink = str(info["superlink"])
    reachable, line, _ = probe_tls(superlink, ca_path(silo))
    if not reachable and "TLS" in line:
        raise SiloConfigError(line)
    silo.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = silo.logs_dir / "supernode.log"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(silo.root / "flwr-home")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("FEDSILO_TORCH_THREADS", "1")
    current: list[subprocess.Popen] = []

    def on_signal(signum: int, _frame: object) -> None:
        for popen in current:
            stop_process_tree(popen)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    console.print(
        f"silo '{silo.name}': SuperNode for {superlink}"
        + ("" if reachable else f" (not reachable yet: {line})")
        + f"; log {log_path}"
    )
    sys.stdout.flush()
    restarts, backoff = 0, 1.0
    while True:
        offset = log_path.stat().st_size if log_path.exists() else 0
        started = time.monotonic()
        with log_path.open("ab") as handle:
            handle.write(f"--- silo start: SuperNode launch {restarts + 1} ---\n".encode())
            handle.flush()
            port = runtime_port or _free_port()
            popen = subprocess.Popen(
                supernode_command(silo, superlink, port),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=silo.root,
                start_new_session=True,
            )
        with (silo.logs_dir / "runner.log").open("ab") as runner_log:
            runner = subprocess.Popen(
                runner_command(port),
                stdout=runner_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=silo.root,
                start_new_session=True,
            )
        current[:] = [popen, runner]
        try:
            while popen.poll() is None and runner.poll() is None:
                time.sleep(0.5)
            code = popen.poll() if popen.poll() is not None else runner.poll()
        finally:
            for process in (popen, runner):
                if process.poll() is None:
                    stop_process_tree(process)
        with log_path.open("rb") as handle:
            handle.seek(offset)
            tail = handle.read().decode(errors="replace")
        if any(marker in tail for marker in AUTH_REFUSED_MARKERS):
            raise SiloConfigError(
                f"the SuperLink refused this silo's node key (not enrolled, or removed from the "
                f"consortium): send {silo.root / 'enrollment-request.json'} to the consortium "
                f"operator and ask them to run 'aggregator enroll'"
            )
        if "CERTIFICATE_VERIFY_FAILED" in tail:
            _, line, _ = probe_tls(superlink, ca_path(silo))
            raise SiloConfigError(line)
        restarts += 1
        if 0 <= max_restarts < restarts:
            raise SiloConfigError(
                f"the SuperNode exited (code {code}) {restarts} times; giving up, see {log_path}"
            )
        if time.monotonic() - started > 300:
            backoff = 1.0  # it ran for a while: a fresh failure, not a crash loop
        console.print(f"SuperNode exited with code {code}; restarting in {backoff:.0f} s")
        sys.stdout.flush()
        time.sleep(backoff)
        backoff = min(max_backoff, backoff * 2)


def register(app: typer.Typer) -> None:
    """Mount join, start and doctor on the `silo` app."""
    app.command("join")(join)
    app.command("start")(start)
    app.command("doctor")(doctor)
