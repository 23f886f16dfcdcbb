"""The silo runner's pre-warmed, forking task worker (silo_client/task_worker.py) and the task
token's way into a task process (never argv). Real processes, real fork, real torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from silo_client.app_runner import _task_args
from silo_client.task_worker import TaskRequest, WarmWorker

REPO = Path(__file__).resolve().parents[1]
TOKEN = "secret-task-token-0123456789"


def _python(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "FEDSILO_TORCH_THREADS": "2"},
        check=False,
    )


def test_a_child_forked_after_the_warm_imports_runs_a_matmul_and_gets_fresh_seeds() -> None:
    # The known fork hazard: an OpenMP/intra-op pool used before fork hangs the child's first
    # parallel op. The worker only imports; each child must finish a multi-threaded matmul.
    done = _python(
        """
        import os, threading, time
        from silo_client.task_worker import run_forked, warm_imports
        warm_imports()
        assert threading.active_count() == 1, threading.enumerate()

        def child():
            import numpy as np, torch
            torch.set_num_threads(2)
            a = torch.randn(384, 384)
            assert torch.isfinite(a @ a).all()
            print("draw", torch.rand(1).item(), float(np.random.rand()), flush=True)
            return 0

        for _ in range(2):
            pid = run_forked(child)
            deadline = time.monotonic() + 90
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    print("exit", os.waitstatus_to_exitcode(status), flush=True)
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    print("hung", flush=True)
                    break
                time.sleep(0.05)
        """,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    assert [line for line in lines if line.startswith(("exit", "hung"))] == ["exit 0", "exit 0"]
    # a child's stdout is the worker's stderr (its stdout answers the runner)
    draws = [line for line in done.stderr.split("\n") if line.startswith("draw")]
    assert len(draws) == 2 and draws[0] != draws[1], "two tasks drew the same random numbers"


def _wait_ready(worker: WarmWorker, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while not worker.ready():
        assert worker.alive(), "the worker died while warming up"
        assert time.monotonic() < deadline, "the worker did not warm up"
        time.sleep(0.2)


def _kill(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_worker_forks_tasks_keeps_the_token_off_argv_and_restarts_on_new_code(
    tmp_path: Path,
) -> None:
    installed = tmp_path / "installed-code"
    installed.write_text("v1")
    worker = WarmWorker(fingerprint=installed.read_text)
    # A Runtime API nobody serves: the child retries, which leaves time to look at it.
    request = TaskRequest("127.0.0.1:9", TOKEN, True, None, None)
    assert not worker.submit(request), "a cold worker must leave the task to the plain launch"
    children = []
    try:
        first = worker.pid
        _wait_ready(worker)
        assert worker.submit(request)
        child = worker.last_child
        children.append(child)
        status = Path(f"/proc/{child}/status").read_text()
        assert f"PPid:\t{first}" in status  # forked by the worker, not a fresh interpreter
        assert TOKEN.encode() not in Path(f"/proc/{child}/cmdline").read_bytes()
        assert TOKEN.encode() not in Path(f"/proc/{first}/cmdline").read_bytes()

        installed.write_text("v2")  # an upgrade changed the installed code
        worker.maintain(force_check=True)
        assert worker.restarts == 1 and worker.pid != first
        assert worker.started_with == "v2"
        assert not worker.submit(request), "a worker still warming up must not take tasks"
        _wait_ready(worker)
        assert worker.submit(request)
        children.append(worker.last_child)
    finally:
        worker.stop()
        for pid in children:
            _kill(pid)
    assert not worker.alive()


def test_plain_launch_passes_the_token_on_stdin_only() -> None:
    args = _task_args(TaskRequest("127.0.0.1:9", TOKEN, True, None, None))
    assert TOKEN not in " ".join(args) and "--token-stdin" in args


def test_a_task_without_token_stops_with_one_line() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "silo_client.app_runner",
            "task",
            "--runtime-api-address",
            "127.0.0.1:9",
            "--insecure",
            "--token-stdin",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "silo runner task: no task token (pass it on stdin with --token-stdin)"
    ]


@pytest.mark.parametrize("value", ["fast", ""])
def test_launch_mode_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from silo_client.app_runner import launch_mode

    monkeypatch.setenv("FEDSILO_TASK_LAUNCH", value)
    if value:
        with pytest.raises(SystemExit, match="neither 'fork' nor 'plain'"):
            launch_mode()
    else:
        assert launch_mode() == "fork"
