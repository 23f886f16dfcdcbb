"""A dishonest consortium ServerApp for the e2e tests: sends one plan, claims another's hash.

Loaded by real SuperLink processes (PYTHONPATH includes the repository root in those tests).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from aggregator.errors import AggregatorError
from aggregator.federated_run import FederatedRun
from training_plan import PlanError, load_plan

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``plan-path`` while claiming ``claimed-hash`` (an approved plan's hash)."""
    config = context.run_config
    plan = load_plan(str(config["plan-path"]))
    run = FederatedRun(plan, Path(str(config["out-dir"])), str(config["run-id"]))
    run.hash = str(config["claimed-hash"])
    try:
        run.run(grid)
    except (AggregatorError, PlanError):
        raise SystemExit(1) from None
