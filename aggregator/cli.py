"""`aggregator`: what the consortium operator runs. Inspect runs the ServerApp has written."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from aggregator.artifacts import read_events
from aggregator.errors import AggregatorError
from fedsilo_base.cli_runner import new_cli, run_cli

app = new_cli("aggregator", "Consortium side of fedsilo: runs, models, reports.")
console = Console(soft_wrap=True)

from aggregator.cli_consortium import register as _register_consortium  # noqa: E402

_register_consortium(app)

from aggregator.cli_registry import register as _register_registry  # noqa: E402

_register_registry(app)

from aggregator.cli_runs import register as _register_runs  # noqa: E402

_register_runs(app)


@app.command("show-run")
def show_run(
    run_dir: Path = typer.Argument(..., help="A run's out-dir (holds events.jsonl)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show a run's rounds: participants, refusals, validation metrics, bytes received."""
    events_path = run_dir / "events.jsonl"
    if not events_path.exists():
        raise AggregatorError(f"{run_dir} holds no run (no events.jsonl); pass a run's out-dir")
    events = read_events(events_path)
    if as_json:
        print(json.dumps(events, indent=2))
        return
    table = Table(title=f"run in {run_dir}")
    for column in ("round", "silos", "val loss", "val acc", "bytes in", "seconds", "refused"):
        table.add_column(column)
    for event in events:
        if event["event"] != "round-finished":
            continue
        ev = event.get("evaluate", {})
        table.add_row(
            str(event["round"]),
            str(event["participants"]),
            f"{ev.get('eval-loss', float('nan')):.4f}",
            f"{ev.get('eval-accuracy', float('nan')):.3f}",
            f"{event['bytes_received']:,}",
            f"{event['seconds']:.1f}",
            "; ".join(f"{k}: {v}" for k, v in event.get("refused", {}).items()) or "-",
        )
    console.print(table)
    for event in events:
        if event["event"] in ("run-failed", "round-failed"):
            console.print(f"[red]{event['event']}[/]: {event.get('reason', '')}")


def main() -> None:
    """Console entry point of `aggregator`."""
    run_cli(app)
