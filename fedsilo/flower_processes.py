"""Start and stop real Flower processes (SuperLink, SuperNodes) on this machine, and submit runs.

Used by `fedsilo demo` and the end-to-end tests. Every process started here is stopped by
`FlowerCluster.stop()` (also on Ctrl-C or error, via the context manager), together with the
SuperExec helpers Flower spawns for it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.pki import TlsFiles
from fedsilo_base.errors import UserError
from fedsilo_base.process_tree import stop_process_trees
from silo_client.processes import runner_command, supernode_launch


class ClusterError(RuntimeError, UserError):
    """A Flower process failed to start or a run could not be submitted."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"'{name}' not found; is flwr installed in this environment?")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our venv first on PATH, telemetry off, own FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("FEDSILO_TORCH_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


FLOWER_DEFAULT_LATENCIES = {
    "FEDSILO_GRID_PULL_INTERVAL": "3",  # Flower 1.42 Grid.send_and_receive
    "FEDSILO_SUPERNODE_POLL_INTERVAL": "3",  # Flower 1.42 SuperNode idle sleep
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0",  # Flower 1.42 SuperExec default
    "FEDSILO_TASK_LAUNCH": "plain",  # one fresh interpreter per message, as flwr-clientapp
    "FEDSILO_OBJECT_PULL_BACKOFF": "flower",  # Flower 1.42 pull_objects: 1 s, doubling to 10 s
}
"""Environment that makes fedsilo's processes wait as Flower 1.42's defaults do."""


@dataclass
class ManagedProcess:
    """One started process and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


FLOWER_IN_MEMORY_STATE = ":flwr-in-memory:"
"""``flower-superlink --database`` value of Flower's in-memory state (its default in 1.42)."""


@dataclass
class FlowerCluster:
    """A SuperLink with TLS and some SuperNodes on 127.0.0.1, all stopped together."""

    workdir: Path
    tls: TlsFiles
    port: int = field(default_factory=free_port)
    processes: list[ManagedProcess] = field(default_factory=list)
    enable_node_auth: bool = False
    database: Path | None = None
    """The SuperLink's state. None (the default, and Flower's own): in memory, the fast state
    for anything whose SuperLink never restarts (the demo, the benches, most tests). A path:
    Flower's persistent SQLite state, as ``aggregator start`` runs the consortium's SuperLink, so
    that a restarted SuperLink still knows its runs and nodes; every Fleet and ServerApp request
    then runs SQLAlchemy queries, which made each exchange of a secure round about 0.25 s slower
    on 2 cores (docs/measurements.md)."""
    flower_defaults: bool = False
    """Run with Flower 1.42's own latencies (3 s SuperNode and ServerApp polls, 1 s SuperExec
    poll, a fresh interpreter per task) instead of fedsilo's: for bench/round_latency.py."""

    @property
    def fast_polling(self) -> bool:
        """Whether processes use fedsilo's short polls and pre-warmed task worker."""
        return not self.flower_defaults

    def env(self, flwr_home: Path) -> dict[str, str]:
        """The environment of this cluster's processes."""
        env = flower_env(flwr_home)
        if self.flower_defaults:
            env.update(FLOWER_DEFAULT_LATENCIES)
        return env

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and ServerApp APIs share it in Flower 1.42)."""
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str], flwr_home: Path) -> ManagedProcess:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        flwr_home.mkdir(parents=True, exist_ok=True)
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(flwr_home),
            cwd=self.workdir,
            start_new_session=True,
        )
        handle.close()
        process = ManagedProcess(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_superlink(self, timeout: float = 60.0) -> ManagedProcess:
        """Start flower-superlink with TLS and wait until its port accepts connections."""
        process = self._start(
            "superlink",
            [
                _bin("flower-superlink"),
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                "--database",
                str(self.database) if self.database else FLOWER_IN_MEMORY_STATE,
                *(["--enable-supernode-auth"] if self.enable_node_auth else []),
            ],
            self.workdir / "flwr-home" / "superlink",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise ClusterError(f"flower-superlink exited at start:\n{process.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return process
            except OSError:
                time.sleep(0.2)
        raise ClusterError(
            f"flower-superlink did not listen on {self.address} within {timeout:.0f} s"
        )

    def start_supernode(
        self,
        name: str,
        node_config: dict[str, str],
        auth_key: Path | None = None,
        root_certificates: Path | None = None,
        runner: bool = True,
    ) -> ManagedProcess:
        """Start a flower-supernode that trusts our CA and passes node_config to the ClientApp.

        ``auth_key`` is the node-authentication private key (OpenSSH EC) for a SuperLink started
        with ``enable_node_auth``; ``root_certificates`` overrides the CA it trusts. With
        ``runner`` (the default, as at a hospital) the SuperNode runs with ``--isolation process``
        and fedsilo's silo runner beside it executes each task: a run whose app bundle carries
        code, or names another ClientApp, is refused before any of it is imported
        (silo_client/app_runner.py). Without it, Flower's own SuperExec installs the bundle.
        """
        config = " ".join(f'{key}="{value}"' for key, value in node_config.items())
        auth = ["--auth-supernode-private-key", str(auth_key)] if auth_key else []
        runtime_port = free_port()
        isolation = ["--isolation", "process"] if runner else []
        supernode = self._start(
            f"supernode-{name}",
            [
                *(supernode_launch() if self.fast_polling else [_bin("flower-supernode")]),
                "--root-certificates",
                str(root_certificates or self.tls.ca_cert),
                "--superlink",
                self.address,
                *auth,
                "--node-config",
                config,
                *isolation,
                "--port",
                str(runtime_port),
                "--max-retries",
                "60",
                "--max-wait-time",
                "300",
            ],
            self.workdir / "flwr-home" / f"supernode-{name}",
        )
        if runner:
            self._start(
                f"runner-{name}",
                runner_command(runtime_port),
                self.workdir / "flwr-home" / f"runner-{name}",
            )
        return supernode

    def cli_home(self) -> Path:
        """FLWR_HOME for the `flwr` CLI, with this cluster as its default SuperLink connection."""
        home = self.workdir / "flwr-home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            "[superlink]\n"
            'default = "fedsilo"\n\n'
            "[superlink.fedsilo]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.tls.ca_cert}"\n'
        )
        return home

    def submit(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        """`flwr run APP fedsilo --run-config ...`; returns Flower's run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        completed = subprocess.run(
            [
                _bin("flwr"),
                "run",
                str(app_dir),
                "fedsilo",
                "--run-config",
                overrides,
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            env=flower_env(self.cli_home()),
            cwd=self.workdir,
            timeout=180,
            check=False,
        )
        out = completed.stdout.strip()
        try:
            payload = json.loads(out[out.index("{") :])
        except ValueError:
            payload = {}
        if completed.returncode != 0 or not payload.get("success", False):
            detail = payload.get("error-message") or (completed.stderr or out).strip()[-800:]
            raise ClusterError(f"'flwr run' failed: {detail}")
        return int(payload["run-id"])

    def check_alive(self) -> None:
        """Raise ClusterError naming the first Flower process that died."""
        for process in self.processes:
            if not process.alive():
                raise ClusterError(
                    f"{process.name} exited with code {process.popen.returncode}:\n{process.tail()}"
                )

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL), SuperExec helpers included."""
        stop_process_trees([p.popen for p in reversed(self.processes)], grace)
        self.processes.clear()

    def __enter__(self) -> FlowerCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
