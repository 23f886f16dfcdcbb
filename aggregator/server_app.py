"""The consortium's Flower ServerApp (Message API: ServerApp + Grid, no LegacyContext).

Run configuration (``flwr run ... --run-config``):
  plan-path  path of the validated plan YAML on the aggregator's machine
  out-dir    where checkpoints, the event log and the final model go
  run-id     the consortium's name for this run (binds every secure-aggregation message)
  node-wait  seconds to wait for the plan's minimum number of silos (default 180)
  stage-timeout  seconds a secure-aggregation key stage waits for silent silos (default 600)
  resume     non-empty: continue the run in out-dir from its last checkpoint (`aggregator resume`)
  track      experiment tracking targets, 'mlflow:DIR;tensorboard:DIR' (default: none; see
             aggregator/tracking.py)
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from aggregator.artifacts import EventLog
from aggregator.errors import AggregatorError
from aggregator.federated_run import FederatedRun
from training_plan import PlanError, load_plan

log = logging.getLogger("fedsilo.aggregator")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the plan named by the run configuration."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from secure_agg.flower import shorten_object_pull_backoff

    config = context.run_config
    plan_path = str(config.get("plan-path", ""))
    out_dir = Path(str(config.get("out-dir", "") or "fedsilo-run"))
    run_id = str(config.get("run-id", "") or uuid.uuid4().hex[:12])
    try:
        shorten_object_pull_backoff()  # replies' objects are pulled again after 0.02 s, not 1 s
        plan = load_plan(plan_path)
    except (PlanError, ValueError) as exc:
        EventLog(out_dir / "events.jsonl").write("run-failed", reason=str(exc))
        log.error("run %s stopped: %s", run_id, exc)
        raise SystemExit(1) from None
    try:
        aggregation = None
        stage_timeout = float(config.get("stage-timeout", 0) or 0)
        if stage_timeout and plan.secure_aggregation.enabled:
            from secure_agg.flower import SecureAggregation

            # How long a key/consistency/unmask stage waits for silent silos before it counts
            # them as dropped (the mask stage, which trains, keeps its own longer limit).
            aggregation = SecureAggregation.from_plan(plan, key_timeout=stage_timeout)
        checkpoint = None
        if str(config.get("resume", "") or ""):
            from aggregator.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(out_dir)
            run_id = checkpoint.run_id
        from aggregator.tracking import open_tracking, targets_from_config, targets_to_config

        targets = targets_from_config(str(config.get("track", "") or ""))
        tracking = open_tracking(targets, plan, run_id, out_dir)
        run = FederatedRun(
            plan,
            out_dir,
            run_id,
            aggregation=aggregation,
            node_wait_seconds=float(config.get("node-wait", 180)),
            resume=checkpoint,
        )
        if tracking is not None:
            # recorded so that `aggregator resume` keeps tracking to the same places
            run.events.write("tracking", track=targets_to_config(targets))
            run.events.listeners.append(tracking)
        result = run.run(grid)
        log.info("run %s finished: %d rounds", run_id, len(result.rounds))
    except (AggregatorError, PlanError) as exc:
        log.error("run %s stopped: %s", run_id, exc)
        raise SystemExit(1) from None
