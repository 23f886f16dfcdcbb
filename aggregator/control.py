"""Submitting runs to the SuperLink: the code-free Flower app folder, and `flwr run` through
Flower's Control API, which has no authentication of its own and is driven on loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from aggregator.errors import AggregatorError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def write_flower_app(folder: Path, defaults: dict[str, str | int]) -> Path:
    """A Flower app folder whose components are fedsilo's installed apps.

    The FAB built from it carries only this pyproject.toml: the code that runs at each silo is the
    fedsilo its IT installed, never code shipped with a run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in defaults.items())
    (folder / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "fedsilo-run"\n'
        'version = "1.0.0"\n'
        'description = "fedsilo federated run (apps installed with fedsilo)"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedsilo"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "aggregator.server_app:app"\n'
        'clientapp = "silo_client.client_app:app"\n\n'
        "[tool.flwr.app.config]\n"
        f"{config}\n"
    )
    return folder


def require_loopback(superlink: str, error: type[AggregatorError] = AggregatorError) -> None:
    """Refuse a Control API address off this host: the API is unauthenticated."""
    if superlink.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
        raise error(
            "the Control API is unauthenticated: drive it on loopback only (--superlink "
            "127.0.0.1:PORT on the aggregator host)"
        )


def submit_run(
    app_dir: Path,
    run_dir: Path,
    superlink: str,
    ca: Path | None,
    run_config: dict[str, str],
    error: type[AggregatorError] = AggregatorError,
) -> None:
    """`flwr run APP` against the SuperLink at `superlink` (loopback), with the run's config."""
    require_loopback(superlink, error)
    flwr_home = run_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    certs = f'root-certificates = "{ca}"\n' if ca else "insecure = true\n"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "consortium"\n\n[superlink.consortium]\n'
        f'address = "{superlink}"\n{certs}'
    )
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "consortium",
         "--run-config", overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "FLWR_HOME": str(flwr_home)},
        timeout=180,
        check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise error(f"'flwr run' failed: {detail[-1] if detail else 'no output'}")
