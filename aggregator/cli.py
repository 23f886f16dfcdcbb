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
    """Show a run's rounds: participants, refusals, validation metrics, bytes received, and where
    a secure round's time went (mask: the stages where silos train; exchanges: the others)."""
    events_path = run_dir / "events.jsonl"
    if not events_path.exists():
        raise AggregatorError(f"{run_dir} holds no run (no events.jsonl); pass a run's out-dir")
    events = read_events(events_path)
    if as_json:
        print(json.dumps(events, indent=2))
        return
    table = Table(title=f"run in {run_dir}")
    for column in ("round", "silos", "val loss", "val acc", "bytes in", "seconds", "mask",
                   "exchanges", "refused"):  # fmt: skip
        table.add_column(column)
    for event in events:
        if event["event"] != "round-finished":
            continue
        ev = event.get("evaluate", {})
        mask, others = _exchange_seconds(event.get("timings", {}))
        table.add_row(
            str(event["round"]),
            str(event["participants"]),
            _number(ev.get("eval-loss"), ".4f"),
            _number(ev.get("eval-accuracy"), ".3f"),
            f"{event['bytes_received']:,}",
            f"{event['seconds']:.1f}",
            _number(mask, ".1f"),
            _number(others, ".1f"),
            "; ".join(f"{k}: {v}" for k, v in event.get("refused", {}).items()) or "-",
        )
    console.print(table)
    for event in events:
        if event["event"] in ("run-failed", "round-failed"):
            console.print(f"[red]{event['event']}[/]: {event.get('reason', '')}")


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted, or "-" when the round has none (e.g. no federated validation)."""
    if value is None or value != value:  # absent or nan
        return "-"
    return format(value, spec)


def _exchange_seconds(timings: dict[str, float]) -> tuple[float | None, float | None]:
    """(mask stages, all other secure-aggregation exchanges) in seconds, both phases; None
    for a round without secure aggregation."""
    stages = {k: v for k, v in timings.items() if k.split(".")[0] in ("train", "evaluate")}
    if not stages:
        return None, None
    mask = sum(v for k, v in stages.items() if k.endswith(".mask"))
    return mask, sum(v for k, v in stages.items() if not k.endswith(".mask"))


def main() -> None:
    """Console entry point of `aggregator`."""
    run_cli(app)
