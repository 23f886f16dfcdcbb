"""`aggregator resume|report|models|export`: what the operator does with a run after it started.

Mounted on the `aggregator` CLI by :func:`register`. Errors are AggregatorErrors: `aggregator`
prints them as one line and exits 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from aggregator.artifacts import read_events
from aggregator.checkpoint import load_checkpoint
from aggregator.control import require_loopback, submit_run
from aggregator.errors import AggregatorError
from fedsilo_base.atomic_files import PRIVATE, write_atomic
from fedsilo_base.home_folder import CONSORTIUM_HOME
from training_plan import load_plan, plan_hash

console = Console(soft_wrap=True)


def _run_dir(run_dir: Path) -> Path:
    if not (run_dir / "events.jsonl").exists():
        raise AggregatorError(f"{run_dir} holds no run (no events.jsonl); pass a run's out-dir")
    return run_dir


def resume_run_config(run_dir: Path) -> dict[str, str]:
    """The ServerApp run configuration that continues RUN_DIR from its last checkpoint.

    Checks first that the run stopped early, that its checkpoint is readable and that the plan
    beside it is the plan the checkpoint belongs to.
    """
    run_dir = _run_dir(Path(run_dir).resolve())
    events = read_events(run_dir / "events.jsonl")
    if any(e["event"] == "run-finished" for e in events):
        raise AggregatorError(f"run in {run_dir} already finished; nothing to resume")
    checkpoint = load_checkpoint(run_dir)
    plan_path = run_dir / "plan.yaml"
    if not plan_path.exists():
        raise AggregatorError(f"{run_dir} has no plan.yaml; the run cannot be resumed without it")
    plan = load_plan(plan_path)
    if plan_hash(plan) != checkpoint.plan_hash:
        raise AggregatorError(
            f"{plan_path} hashes to {plan_hash(plan)[:12]} but the checkpoint belongs to plan "
            f"{checkpoint.plan_hash[:12]}; restore the run's original plan.yaml"
        )
    if checkpoint.round >= plan.federation.rounds:
        raise AggregatorError(
            f"the checkpoint already holds the last round ({checkpoint.round}); nothing to resume"
        )
    config = {
        "plan-path": str(plan_path),
        "out-dir": str(run_dir),
        "run-id": checkpoint.run_id,
        "resume": "yes",
    }
    # the run keeps tracking where it started tracking (the ServerApp logged its targets)
    tracked = [e for e in events if e["event"] == "tracking"]
    if tracked:
        config["track"] = str(tracked[-1].get("track", ""))
    return config


def ensure_resume_key(app_dir: Path, keys: tuple[str, ...] = ("resume", "track")) -> None:
    """Declare the run-config keys resume needs in the run's app (Flower drops undeclared
    overrides; apps of older runs lack them)."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.exists():
        raise AggregatorError(f"{app_dir} has no pyproject.toml; the run's Flower app is missing")
    text = pyproject.read_text(encoding="utf-8")
    missing = [k for k in keys if not re.search(rf"^{k}\s*=", text, flags=re.MULTILINE)]
    if not missing:
        return
    if "[tool.flwr.app.config]" not in text:
        raise AggregatorError(f"{pyproject} has no [tool.flwr.app.config] table")
    declared = "".join(f'{k} = ""\n' for k in missing)
    updated = text.replace("[tool.flwr.app.config]\n", f"[tool.flwr.app.config]\n{declared}", 1)
    write_atomic(pyproject, updated.encode("utf-8"), mode=PRIVATE)


def resume(
    run_dir: Path = typer.Argument(..., help="The out-dir of a run that stopped early."),
    superlink: str = typer.Option(
        "127.0.0.1:9094", "--superlink", help="Control API on loopback (Fleet port + 1)."
    ),
    ca: Path = typer.Option(None, "--root-certificates", help="CA of the SuperLink's TLS."),
) -> None:
    """Continue a stopped run (e.g. its ServerApp was killed) after its last checkpoint.

    The ServerApp is submitted again through Flower's Control API on loopback, with the run
    configuration `resume` set; it restores model, strategy state, RNGs and round records.
    """
    require_loopback(superlink)
    config = resume_run_config(run_dir)
    run_dir = Path(config["out-dir"])
    app_dir = run_dir / "app"
    ensure_resume_key(app_dir)
    submit_run(app_dir, run_dir, superlink, ca, config)
    checkpoint = load_checkpoint(run_dir)
    console.print(
        f"run {config['run-id']} resumes at round {checkpoint.round + 1}; "
        f"see 'aggregator show-run {run_dir}'"
    )


def report(
    run_dir: Path = typer.Argument(..., help="A run's out-dir (holds events.jsonl)."),
) -> None:
    """Write RUN_DIR/report.html with PNG plots beside it (loss, metrics, traffic, timings)."""
    from aggregator.report import write_report

    out = write_report(_run_dir(run_dir))
    console.print(f"report written: {out}")


def models(
    home: Path = CONSORTIUM_HOME.option(),
    runs_dir: Path = typer.Option(
        None, "--runs", help="Folder of run out-dirs (default: HOME/runs)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the models finished runs exported (RUN/model/)."""
    from aggregator.model_registry import list_models

    if runs_dir is None:
        from aggregator.consortium_home import ConsortiumHome

        root = ConsortiumHome.open(home).root / "runs"
    elif not runs_dir.is_dir():
        raise AggregatorError(
            f"{runs_dir} is not a folder; pass the folder that holds run out-dirs"
        )
    else:
        root = runs_dir
    found = list_models(root)
    if as_json:
        print(
            json.dumps(
                [{**m.__dict__, "run_dir": str(m.run_dir)} for m in found], indent=2, default=str
            )
        )
        return
    table = Table(title=f"models in {root}")
    for column in ("run", "title", "plan", "rounds", "final validation"):
        table.add_column(column)
    for m in found:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m.final_metrics.items())) or "-"
        table.add_row(m.run_id, m.title, m.plan_hash[:12], str(m.rounds), metrics)
    console.print(table)


def export(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A finished run's out-dir."),
    to: Path = typer.Option(..., "--to", help="Folder to copy the model, plan, metrics, card."),
) -> None:
    """Copy a finished run's model (safetensors), plan, metrics and model card to a folder."""
    from aggregator.model_registry import copy_export

    written = copy_export(_run_dir(run_dir), to)
    console.print(f"exported {len(written)} files to {to}")


def register(app: typer.Typer) -> None:
    """Mount resume, report, models and export on the `aggregator` CLI."""
    app.command("resume")(resume)
    app.command("report")(report)
    app.command("models")(models)
    app.command("export")(export)
