"""Stopping a Flower process together with the SuperExec helpers it spawned.

Flower's SuperLink and SuperNode start SuperExec helpers that leave their process group
(``start_new_session``) but name their parent with ``--parent-pid PID``. Stopping only the
group would leave those behind, so every stop here also finds them through ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def superexec_helpers(pid: int) -> list[int]:
    """PIDs of the processes whose command line carries ``--parent-pid PID``."""
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


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _signal_process(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def stop_process_trees(popens: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop processes started with ``start_new_session=True``, in the order given.

    Each group and its SuperExec helpers get SIGTERM; whatever still runs after ``grace``
    seconds (one deadline for all) gets SIGKILL. Every process is reaped before returning.
    """
    for popen in popens:
        helpers = superexec_helpers(popen.pid)
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
        for helper in helpers:
            _signal_process(helper, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for popen in popens:
        try:
            popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait(timeout=5)


def stop_process_tree(popen: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop one process started in its own session, and its SuperExec helpers."""
    stop_process_trees([popen], grace)
