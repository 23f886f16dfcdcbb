"""The silo-side runner: the silo executes only the ClientApp its IT installed.

Flower's default SuperNode (``--isolation subprocess``) starts ``flower-superexec``, which starts
``flwr-clientapp`` per message; that process *installs the run's app bundle (FAB)* and imports the
``clientapp`` component it names, with the bundle's folder on ``sys.path``. A bundle carrying a
``.py`` file (or a ``silo_client/`` package shadowing ours), or naming another component, would
run its own code at the hospital. Flower's own guard, ``flower-supernode --trusted-entities``,
only accepts bundles signed through Flower Hub (the SuperLink marks a bundle ``valid_license`` only
when it fetched it from the Hub), so it cannot vouch for a consortium's own bundles.

So the silo runs its SuperNode with ``--isolation process`` and this runner beside it::

    flower-supernode --isolation process --port 9094 ...   # Runtime API on 127.0.0.1:9094
    silo runner --runtime-api-address 127.0.0.1:9094 --insecure

``python -m silo_client.app_runner superexec`` is Flower's SuperExec loop with one change: each
ClientApp task is started as ``python -m silo_client.app_runner task`` instead of
``flwr-clientapp``. The task process pulls the message, context and bundle from the SuperNode,
checks the bundle (``governance.bundle.check_bundle``: only ``pyproject.toml``, components naming
fedsilo's installed apps) *without installing or importing anything from it*, then calls the
installed ``silo_client.client_app.app``. A refused bundle gets an ``ERROR_REFUSED`` reply and an
audit entry; none of its code ever runs.

Latency (written for Flower 1.42): the loop asks the SuperNode for tasks every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (Flower's default 1 s; the runner sets 0.1 s unless
the variable is set), and each task is forked from a pre-warmed worker that imported Flower,
torch, MONAI and the silo code once (``silo_client.task_worker``) instead of a fresh interpreter
that imports them again (5-6 s here). ``FEDSILO_TASK_LAUNCH=plain``, or a worker that is not
ready, launches the task process plainly. Either way the task token travels through a pipe
(stdin), never on the command line, where any local user could read it in ``ps``.

This uses Flower internals (``run_superexec``'s executor factory, the Runtime API client), which
fedsilo pins (flwr 1.42.x).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from silo_client.task_run import run_task
from silo_client.task_worker import LAUNCH_ENV, TaskRequest, WarmWorker

TASK_POLL_INTERVAL = "0.1"
"""Seconds between the runner's task polls (Flower 1.42's SuperExec default: 1.0)."""


def _task_args(request) -> list[str]:
    """The plain task launch: a fresh interpreter; the token follows on its stdin."""
    args = [
        sys.executable,
        "-m",
        "silo_client.app_runner",
        "task",
        "--runtime-api-address",
        request.runtime_api_address,
        "--token-stdin",
    ]
    if request.insecure:
        args.append("--insecure")
    elif request.root_certificates is not None:
        args.extend(["--root-certificates", request.root_certificates])
    if request.parent_pid is not None:
        args.extend(["--parent-pid", str(request.parent_pid)])
    return args


def launch_plain(request) -> subprocess.Popen:
    """Start one task in a fresh interpreter, handing it the token through a pipe."""
    popen = subprocess.Popen(_task_args(request), stdin=subprocess.PIPE)
    assert popen.stdin is not None
    try:
        popen.stdin.write(request.token.encode() + b"\n")
        popen.stdin.close()
    except OSError:  # it died at start; the SuperNode times the task out
        pass
    return popen


def launch_mode() -> str:
    """``fork`` (default) or ``plain``, from FEDSILO_TASK_LAUNCH."""
    mode = os.environ.get(LAUNCH_ENV, "fork").strip() or "fork"
    if mode not in ("fork", "plain"):
        raise SystemExit(f"{LAUNCH_ENV}={mode!r} is neither 'fork' nor 'plain'; unset it or fix it")
    return mode


def _executor(mode: str = "fork"):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class SiloExecutor(SubprocessExecutor):
        """Starts fedsilo's task runner for ClientApp tasks; refuses every other task type."""

        def __init__(self) -> None:
            self.worker = WarmWorker() if mode == "fork" else None
            self.forked = 0
            self.plain = 0

        def get_eligible_capacity(self, supported_task_types, **kwargs):
            return {TaskType.CLIENT_APP} & set(supported_task_types), set()

        def reconcile(self) -> None:
            if self.worker is not None:
                self.worker.maintain()

        def launch(self, spec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP:
                return LaunchResult.failed("this silo runs only fedsilo's ClientApp")
            request = TaskRequest.from_spec(spec)
            if self.worker is not None and self.worker.submit(request):
                self.forked += 1
            else:
                launch_plain(request)
                self.plain += 1
            return LaunchResult.accepted()

        def close(self) -> None:
            if self.worker is not None:
                self.worker.stop()

    return SiloExecutor()


def run_superexec_loop(args: argparse.Namespace) -> None:
    """Flower's SuperExec loop, launching our task runner instead of ``flwr-clientapp``."""
    from flwr.supercore.superexec import run_superexec as module

    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL)
    executor = _executor(launch_mode())
    executor.reconcile()  # the worker warms up while the SuperNode connects
    module.get_executor = lambda *a, **k: executor
    module.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="silo runner", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["superexec", "task"])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument(
        "--token-stdin",
        action="store_true",
        help="read the task token from stdin (it never goes on the command line)",
    )
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``superexec`` (long-running loop) or ``task`` (one ClientApp task)."""
    args = _parser().parse_args(argv)
    if args.mode == "superexec":
        run_superexec_loop(args)
        return 0
    return run_task(args)


if __name__ == "__main__":
    raise SystemExit(main())
