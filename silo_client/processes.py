"""Processes a silo runs beside Flower: the silo runner's command line, and stopping a SuperNode
together with the SuperExec helpers Flower detaches from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def runner_command(runtime_port: int) -> list[str]:
    """The silo runner beside the SuperNode: it executes each task with the installed ClientApp
    only, refusing app bundles that carry code (silo_client/app_runner.py)."""
    return [
        sys.executable,
        "-m",
        "silo_client.app_runner",
        "superexec",
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--insecure",
    ]


def supernode_launch() -> list[str]:
    """The start of a SuperNode command line: ``flower-supernode`` with fedsilo's short idle poll
    (silo_client/supernode_launch.py); append flower-supernode's own arguments."""
    return [sys.executable, "-m", "silo_client.supernode_launch"]


def superexec_helpers(pid: int) -> list[int]:
    """SuperExec helpers are detached from the SuperNode but carry --parent-pid PID."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in args:
            index = args.index(b"--parent-pid")
            if index + 1 < len(args) and args[index + 1] == str(pid).encode():
                found.append(int(entry.name))
    return found


def stop_process_tree(popen: subprocess.Popen) -> None:
    """Stop a process started in its own session (TERM, then KILL) and its SuperExec helpers."""
    helpers = superexec_helpers(popen.pid)
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for helper in helpers:
        try:
            os.kill(helper, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=5)
