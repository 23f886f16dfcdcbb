"""Processes a silo runs beside Flower: the silo runner's command line.

(Stopping a SuperNode with the SuperExec helpers Flower detaches from it:
:mod:`fedsilo_base.process_tree`.)
"""

from __future__ import annotations

import sys


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
