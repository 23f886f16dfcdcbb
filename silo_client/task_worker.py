"""A pre-warmed worker that forks one process per ClientApp task.

Flower 1.42 (and 1.43) starts a fresh ClientApp process for every message, and that process
imports Flower, torch, MONAI and the silo code again: 5-6 s on a 2-core machine, six times per
secure round. Flower has no long-lived ClientApp (upstream issue #3670), so the silo runner
(``silo_client.app_runner``) keeps this worker beside it instead:

    runner (SuperExec loop)  --JSON line per task (pipe)-->  worker (imports done once)
                                                               |- fork -> task child (exits)
                                                               |- fork -> task child (exits)

Each child runs exactly today's task code (``task_run.run_task``: bundle check, installed
ClientApp, reply) and exits, so every message still gets its own process and the round state a
task wipes stays wiped. The token reaches the child through the pipe, never through argv.

Fork hazards, and what this module does about each:

- thread pools: the worker only *imports* torch and never runs an operator, so no OpenMP/intra-op
  pool exists at fork time (a child that ran a matmul after the parent had used the pool could
  hang); the worker starts no thread of its own (``tests/training/test_task_worker.py`` forks after
  the warm imports and runs a matmul under a timeout).
- random state: ``random`` reseeds itself in a child (CPython's at-fork hook); numpy's and torch's
  global generators are reseeded from the OS in every child, so no two tasks share a stream.
  Secrets never come from these generators anyway (secure_agg uses the OS CSPRNG).
- stale code: the runner compares :func:`installed_code_fingerprint` with the one taken when
  the worker started and restarts the worker when an upgrade changed the installed code.
- anything else going wrong (worker not ready yet, dead, a broken pipe): the runner falls back
  to the plain launch (a fresh ``python -m silo_client.app_runner task`` process).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from silo_client.task_run import run_task

LAUNCH_ENV = "FEDSILO_TASK_LAUNCH"
"""Environment variable of the silo runner: ``fork`` (default, the pre-warmed worker) or
``plain`` (one fresh interpreter per task, as Flower does)."""

_CODE_PACKAGES = ("silo_client", "training_plan", "secure_agg", "fedsilo_base")
_DISTRIBUTIONS = ("flwr", "torch", "monai", "numpy", "cryptography", "pydicom")
WARM_MODULES = (
    "numpy",
    "torch",
    "monai.networks.nets",
    "monai.transforms",
    "flwr.app",
    "flwr.clientapp",
    "flwr.common.serde",
    "flwr.supercore.heartbeat",
    "flwr.supercore.runtime",
    "flwr.supernode.runtime.run_clientapp",
    "silo_client.app_runner",
    "silo_client.client_app",
    "silo_client.local_data",
    "silo_client.local_model",
    "silo_client.local_round",
    "silo_client.secure_round",
    "silo_client.training",
    "silo_client.scaffold",
    "silo_client.data.dataset_builder",
    "silo_client.data.segmentation_dataset",
    "silo_client.governance.bundle",
    "silo_client.governance.enforcement",
    "training_plan.models",
    "training_plan.metrics",
)
"""What every task would otherwise import again (imported, never run, in the worker)."""


class WorkerError(RuntimeError):
    """The pre-warmed worker could not take a task (the runner then launches it plainly)."""


@dataclass(frozen=True)
class TaskRequest:
    """What one task process needs from the SuperExec's ExecutionSpec (the token included)."""

    runtime_api_address: str
    token: str
    insecure: bool
    root_certificates: str | None
    parent_pid: int | None

    @classmethod
    def from_spec(cls, spec) -> TaskRequest:
        """From Flower 1.42's ``ExecutionSpec``."""
        return cls(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=bool(spec.insecure),
            root_certificates=spec.root_certificates_path,
            parent_pid=spec.parent_pid,
        )

    def namespace(self) -> argparse.Namespace:
        """The arguments ``task_run.run_task`` takes."""
        return argparse.Namespace(**asdict(self))


def installed_code_fingerprint() -> str:
    """Hash of what a task would import: our packages' files (path, size, mtime) and the
    versions of the libraries they stand on. Cheap (stat only); changes on any upgrade."""
    h = hashlib.sha256()
    for name in _CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            for path in sorted(Path(location).rglob("*.py")):
                try:
                    st = path.stat()
                except OSError:
                    continue
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for dist in _DISTRIBUTIONS:
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=-\n".encode())
    return h.hexdigest()[:16]


def warm_imports() -> None:
    """Import (never run) what tasks need; no thread pool starts here (see module docstring)."""
    import importlib

    for module in WARM_MODULES:
        importlib.import_module(module)
    _warm_runtime_client()


def _warm_runtime_client() -> None:
    """Build (and close) one Runtime API client: its first construction loads the TLS defaults
    (about 15 ms here), which every forked task would otherwise pay again. No connection is
    made and no thread starts."""
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    client = RuntimeHttpClient.from_server_address(
        server_address="127.0.0.1:9",
        insecure=True,
        root_certificates=validate_and_resolve_root_certificates(None, True),
        interceptors=[],
    )
    client.close()


def reseed_child() -> None:
    """Fresh numpy and torch global generators in a forked child (``random`` reseeds itself)."""
    import numpy as np
    import torch

    seed = int.from_bytes(os.urandom(8), "little")
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_forked(fn: Callable[[], int]) -> int:
    """Fork; the child resets what it inherited, reseeds, runs ``fn`` and exits with its code.
    Returns the child's pid in the parent."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the request pipe belongs to the worker
        os.close(devnull)
        os.dup2(2, 1)  # stdout is the worker's answer pipe; a task's output goes to the log
        reseed_child()
        code = int(fn())
    except BaseException:  # the child must never return into the worker's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return 0  # unreachable


def _read_line(fd: int, buffer: bytearray, timeout: float) -> bytes | None:
    """One line from ``fd`` (b"" at end of file), or None when nothing came within ``timeout``."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        left = max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b""
        buffer.extend(chunk)
    index = buffer.index(b"\n")
    line = bytes(buffer[:index])
    del buffer[: index + 1]
    return line


def serve() -> int:
    """The worker's loop: warm up, say ``ready``, then fork a child per request line and answer
    ``forked PID``; ends when the runner closes the pipe."""
    warm_imports()

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    answers.write("ready\n")
    buffer = bytearray()
    while True:
        _reap_children()
        line = _read_line(0, buffer, timeout=1.0)
        if line is None:
            continue
        if line == b"":
            return 0
        try:
            request = TaskRequest(**json.loads(line))
        except (ValueError, TypeError) as exc:
            answers.write(f"error unreadable request ({type(exc).__name__})\n")
            continue
        pid = run_forked(lambda request=request: run_task(request.namespace()))
        answers.write(f"forked {pid}\n")


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class WarmWorker:
    """The runner's handle on the worker: start, readiness, hand over a task, restart when the
    installed code changed. Every failure is a ``False`` from :meth:`submit` (launch plainly)."""

    def __init__(
        self,
        fingerprint: Callable[[], str] = installed_code_fingerprint,
        command: list[str] | None = None,
        check_every: float = 2.0,
    ) -> None:
        self._fingerprint = fingerprint
        self._command = command or [sys.executable, "-m", "silo_client.task_worker"]
        self._check_every = check_every
        self._popen: subprocess.Popen | None = None
        self._buffer = bytearray()
        self.started_with: str | None = None
        self._ready = False
        self.last_child: int | None = None
        self._checked = 0.0
        self.restarts = 0

    def start(self) -> None:
        """Start a worker (it warms up in the background)."""
        self.stop()
        # Taken before the worker imports anything: a change during its warm-up shows at the
        # next check and restarts it again.
        self.started_with = self._fingerprint()
        self._ready = False
        self._buffer = bytearray()
        self._popen = subprocess.Popen(
            self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )
        self._checked = time.monotonic()

    @property
    def pid(self) -> int | None:
        """The worker's process id (None when none runs)."""
        return self._popen.pid if self._popen is not None else None

    def alive(self) -> bool:
        """Whether the worker process runs."""
        return self._popen is not None and self._popen.poll() is None

    def ready(self) -> bool:
        """Whether the worker finished warming up (reads its ``ready`` line without blocking)."""
        if not self.alive():
            return False
        if not self._ready:
            assert self._popen is not None and self._popen.stdout is not None
            line = _read_line(self._popen.stdout.fileno(), self._buffer, timeout=0.0)
            self._ready = line == b"ready"
        return self._ready

    def maintain(self, force_check: bool = False) -> None:
        """Start a worker if none runs; restart it when the installed code changed since."""
        if not self.alive():
            if self._popen is not None:
                self.restarts += 1
            self.start()
            return
        now = time.monotonic()
        if force_check or now - self._checked >= self._check_every:
            self._checked = now
            if self._fingerprint() != self.started_with:
                self.restarts += 1
                self.start()

    def submit(self, request: TaskRequest, timeout: float = 10.0) -> bool:
        """Hand ``request`` to the worker; True once it forked the task's child."""
        self.maintain(force_check=True)
        if not self.ready():
            return False
        assert self._popen is not None and self._popen.stdin is not None
        try:
            self._popen.stdin.write(json.dumps(asdict(request)).encode() + b"\n")
            self._popen.stdin.flush()
        except OSError:
            self.stop()
            return False
        assert self._popen.stdout is not None
        line = _read_line(self._popen.stdout.fileno(), self._buffer, timeout)
        if not line or not line.startswith(b"forked "):
            # No answer: the task may or may not have started; a second process would race it
            # for the same token, so report it as taken and let the SuperNode time it out.
            if line is None:
                self.stop()
                return True
            self.stop()
            return False
        self.last_child = int(line.split()[1])
        return True

    def stop(self) -> None:
        """Stop the worker (its task children finish their tasks)."""
        popen, self._popen = self._popen, None
        if popen is None:
            return
        for stream in (popen.stdin, popen.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=5)


def main() -> int:
    """Entry point of ``python -m silo_client.task_worker`` (started by the silo runner)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runner, which stops us
    return serve()


if __name__ == "__main__":
    raise SystemExit(main())
