"""`aggregator plans`, `aggregator run PLAN`, `aggregator runs`: the consortium's plan registry.

See aggregator.registry for how researchers reach the registry and why the SuperLink's Control
API stays on loopback.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from aggregator.control import require_loopback, submit_run, write_flower_app
from aggregator.registry import Registry, RegistryError
from fedsilo_base.home_folder import CONSORTIUM_HOME

console = Console(soft_wrap=True)


def plans(
    home: Path = CONSORTIUM_HOME.option(), as_json: bool = typer.Option(False, "--json")
) -> None:
    """List submitted plans with their status (submitted, running, done, failed, refused)."""
    entries = Registry(home).plans()
    if as_json:
        fields = ("plan_hash", "title", "researcher", "submitted_at", "status", "approvals")
        print(json.dumps([{k: getattr(e, k) for k in fields} for e in entries], indent=2))
        return
    table = Table(title="submitted plans")
    for column in ("hash", "title", "researcher", "submitted", "status"):
        table.add_column(column)
    for e in entries:
        status = e.status + (f" ({e.approvals})" if e.approvals else "")
        table.add_row(e.plan_hash[:16], e.title, e.researcher, e.submitted_at, status)
    console.print(table)


def runs(
    home: Path = CONSORTIUM_HOME.option(),
    plan: str = typer.Option(None, "--plan", help="Only runs of this plan hash."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List runs with their status and results (aggregates only)."""
    registry = Registry(home)
    digest = registry.plan(plan).plan_hash if plan else None
    entries = registry.runs(digest)
    if as_json:
        print(json.dumps([e.__dict__ for e in entries], indent=2))
        return
    table = Table(title="runs")
    for column in ("run", "plan", "status", "started", "rounds", "result"):
        table.add_column(column)
    for e in entries:
        result = e.result.get("reason") or json.dumps(e.result.get("last_evaluation", {}))
        table.add_row(
            e.run_id,
            e.plan_hash[:12],
            e.status,
            e.started_at,
            str(e.result.get("rounds", "-")),
            result,
        )
    console.print(table)


def run(
    plan: str = typer.Argument(..., metavar="PLAN", help="Hash (8+ hex digits) of a plan."),
    home: Path = CONSORTIUM_HOME.option(),
    superlink: str = typer.Option(
        "127.0.0.1:9094", "--superlink", help="Control API on loopback (Fleet port + 1)."
    ),
    ca: Path = typer.Option(None, "--root-certificates", help="CA of the SuperLink's TLS."),
    run_id: str = typer.Option(None, "--run-id", help="Name of the run (default: random)."),
    track: list[str] = typer.Option(
        None,
        "--track",
        help="Experiment tracking, KIND:DIR with KIND mlflow or tensorboard (repeatable; "
        "default: none).",
    ),
) -> None:
    """Start a run of a submitted plan through Flower's Control API on loopback."""
    from aggregator.tracking import check_available, parse_targets, targets_to_config

    targets = parse_targets(track or [])
    check_available(targets)
    registry = Registry(home)
    entry = registry.plan(plan)
    require_loopback(superlink, RegistryError)
    run_id = run_id or f"{entry.plan_hash[:8]}-{uuid.uuid4().hex[:6]}"
    run_dir = registry.home / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    plan_path = run_dir / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(entry.plan().model_dump(mode="json"), sort_keys=False))
    app_dir = write_flower_app(
        run_dir / "app",
        {"plan-path": "", "out-dir": "", "run-id": "", "node-wait": 180, "track": ""},
    )
    config = {"plan-path": str(plan_path), "out-dir": str(run_dir), "run-id": run_id}
    if targets:
        config["track"] = targets_to_config(targets)
    submit_run(app_dir, run_dir, superlink, ca, config, RegistryError)
    registry.start_run(entry.plan_hash, run_id, run_dir)
    console.print(f"run {run_id} of plan {entry.plan_hash[:12]} started; see 'aggregator runs'")


def register(app: typer.Typer) -> None:
    """Mount the registry commands on the `aggregator` CLI."""
    app.command("plans")(plans)
    app.command("runs")(runs)
    app.command("run")(run)
