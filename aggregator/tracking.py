"""Optional experiment tracking of a run: MLflow (local file store) and TensorBoard. Off by default.

Tracking is the consortium's choice, not the researcher's: it is not in the plan (which every
hospital approves) but in the aggregator's run configuration, set by
``aggregator run PLAN --track mlflow:DIR --track tensorboard:DIR`` (run-config key ``track``,
targets joined by ``;``). ``aggregator resume`` keeps the run's targets.

A tracker mirrors the run's event log (``events.jsonl``): it listens to each event the round loop
writes, so it sees exactly what the operator's own log holds (aggregates only, never anything
per silo) and adds no hook to the round loop:

    run-started / run-resumed   params: plan hash, title, strategy and its args, rounds, model,
                                secure aggregation on/off, run id
    round-finished              per-round metrics (step = round): train/*, eval/*, participants,
                                refused, bytes received, seconds, time per stage
    run-finished / run-failed   the final model's path; the tracked run's end status

A missing package, when asked for, is one clear error before the run starts. A tracker that
fails during the run logs a warning and is dropped: tracking never stops a federated run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aggregator.errors import AggregatorError
from training_plan import TrainingPlan, plan_hash

log = logging.getLogger("fedsilo.aggregator")

KINDS = ("mlflow", "tensorboard")
"""What ``--track KIND:DIR`` may name."""
RUN_CONFIG_KEY = "track"
"""The ServerApp's run-config key holding the targets."""
EXPERIMENT = "fedsilo"
"""The MLflow experiment every run is logged under (one MLflow run per fedsilo run id)."""
RUN_TAG = "fedsilo.run_id"
_PACKAGES = {"mlflow": "mlflow-skinny", "tensorboard": "tensorboard"}


class TrackingError(AggregatorError):
    """A tracking target is malformed or its package is missing."""


@dataclass(frozen=True)
class TrackTarget:
    """One place to track to: a kind and its local directory."""

    kind: str
    directory: Path

    def spec(self) -> str:
        """``KIND:DIR`` as given on the command line."""
        return f"{self.kind}:{self.directory}"


def parse_targets(specs: Iterable[str]) -> list[TrackTarget]:
    """``KIND:DIR`` strings -> targets with absolute directories; TrackingError when malformed."""
    targets = []
    for spec in specs:
        kind, sep, directory = str(spec).partition(":")
        if not sep or kind not in KINDS or not directory.strip():
            raise TrackingError(
                f"--track {spec!r} is not KIND:DIR (kinds: {', '.join(KINDS)}); "
                "e.g. --track mlflow:/srv/fedsilo/mlruns"
            )
        if ";" in directory:
            raise TrackingError(f"--track {spec!r}: the directory may not contain ';'")
        targets.append(TrackTarget(kind, Path(directory).expanduser().resolve()))
    return targets


def targets_to_config(targets: Iterable[TrackTarget]) -> str:
    """The run-config value for the targets ('' when none)."""
    return ";".join(t.spec() for t in targets)


def targets_from_config(value: str) -> list[TrackTarget]:
    """Inverse of :func:`targets_to_config`."""
    return parse_targets(s for s in str(value or "").split(";") if s.strip())


def check_available(targets: Iterable[TrackTarget]) -> None:
    """TrackingError (one line: what is missing, how to install it) for an absent package."""
    for target in targets:
        try:
            if target.kind == "mlflow":
                import mlflow.tracking  # noqa: F401
            else:
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise TrackingError(
                f"--track {target.kind} needs the '{_PACKAGES[target.kind]}' package on the "
                "aggregator host: pip install 'fedsilo[tracking]'"
            ) from None


class Tracker(Protocol):
    """One tracking backend."""

    def start(self, params: dict[str, str]) -> None:
        """Open (or, on resume, reopen) the tracked run and record its parameters."""
        ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics of one round."""
        ...

    def finish(self, status: str, final_model: Path | None) -> None:
        """Record the end of the run and, when it finished, the final model's path."""
        ...


class MlflowTracker:
    """Logs to an MLflow file store at ``directory`` (experiment ``fedsilo``, run name = run id).

    MLflow 3 keeps the file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; we set
    it for this process only, because a local file store is what the consortium asked for.
    """

    def __init__(self, directory: Path, run_id: str) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=directory.resolve().as_uri())
        self.fedsilo_run = run_id
        self.run: str | None = None

    def start(self, params: dict[str, str]) -> None:
        """Reuse the MLflow run of this fedsilo run id (resume), else create one."""
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        )
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{self.fedsilo_run}'"
        )
        if found:
            self.run = found[0].info.run_id
            self.client.update_run(self.run, status="RUNNING")
            known = found[0].data.params
        else:
            created = self.client.create_run(
                experiment_id, run_name=self.fedsilo_run, tags={RUN_TAG: self.fedsilo_run}
            )
            self.run, known = created.info.run_id, {}
        for key, value in params.items():
            if key not in known:
                self.client.log_param(self.run, key, value)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One MLflow metric per name, at step = round."""
        from mlflow.entities import Metric

        if self.run is None:
            return
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        self.client.log_batch(self.run, metrics=batch)

    def finish(self, status: str, final_model: Path | None) -> None:
        """Tag the final model's path and end the MLflow run (FINISHED or FAILED)."""
        if self.run is None:
            return
        if final_model is not None:
            self.client.set_tag(self.run, "fedsilo.final_model", str(final_model))
        self.client.set_terminated(self.run, "FINISHED" if status == "done" else "FAILED")


class TensorBoardTracker:
    """Writes TensorBoard event files to ``directory/<run id>`` (a resumed run appends)."""

    def __init__(self, directory: Path, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory / run_id))

    def start(self, params: dict[str, str]) -> None:
        """The parameters as one markdown table (text plugin)."""
        table = "| param | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {v} |" for k, v in sorted(params.items())
        )
        self.writer.add_text("params", table, global_step=0)
        self.writer.flush()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One scalar per name, at step = round."""
        for key, value in sorted(metrics.items()):
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def finish(self, status: str, final_model: Path | None) -> None:
        """Status and final model's path as text; close the writer."""
        self.writer.add_text("status", status)
        if final_model is not None:
            self.writer.add_text("final_model", str(final_model))
        self.writer.close()


def run_params(plan: TrainingPlan, run_id: str) -> dict[str, str]:
    """What a tracked run records as parameters (the plan's public settings, no silo facts)."""
    fed = plan.federation
    params = {
        "run_id": run_id,
        "plan_hash": plan_hash(plan),
        "title": plan.title,
        "model": plan.model.name,
        "strategy": fed.strategy,
        "rounds": str(fed.rounds),
        "min_silos": str(fed.min_silos),
        "secure_aggregation": "on" if plan.secure_aggregation.enabled else "off",
        "optimizer": plan.training.optimizer,
        "learning_rate": str(plan.training.learning_rate),
        "local_epochs": str(plan.training.local_epochs),
    }
    params.update({f"strategy.{k}": str(v) for k, v in sorted(fed.strategy_args.items())})
    return params


def round_metrics(event: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``round-finished`` event, flat, by tracker name."""
    out: dict[str, float] = {}
    for key, value in (event.get("train") or {}).items():
        out[f"train/{key}"] = value
    for key, value in (event.get("evaluate") or {}).items():
        out[f"eval/{key}"] = value
    for key, value in (event.get("timings") or {}).items():
        out[f"seconds/{key}"] = value
    out["round/participants"] = event.get("participants", 0)
    out["round/refused"] = len(event.get("refused") or {})
    out["round/bytes_received"] = event.get("bytes_received", 0)
    out["round/seconds"] = event.get("seconds", 0.0)
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


class RunTracking:
    """The run's trackers, fed by its event log (``EventLog.listeners``)."""

    def __init__(
        self, trackers: list[Tracker], params: dict[str, str], final_model: Path | None
    ) -> None:
        self.trackers = list(trackers)
        self.params = params
        self.final_model = final_model

    def __call__(self, event: dict[str, Any]) -> None:
        """Forward one event of the run to every tracker."""
        name = event.get("event")
        if name in ("run-started", "run-resumed"):
            self._each(lambda t: t.start(self.params))
        elif name == "round-finished":
            step, metrics = int(event.get("round", 0)), round_metrics(event)
            self._each(lambda t: t.log_metrics(step, metrics))
        elif name in ("run-finished", "run-failed"):
            status = "done" if name == "run-finished" else "failed"
            model = self.final_model if status == "done" else None
            self._each(lambda t: t.finish(status, model))
            self.trackers = []

    def _each(self, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # tracking never stops a federated run
                log.warning("tracking to %s failed and stops: %s", type(tracker).__name__, exc)
                self.trackers.remove(tracker)


def open_tracking(
    targets: list[TrackTarget], plan: TrainingPlan, run_id: str, out_dir: Path
) -> RunTracking | None:
    """The run's trackers for ``targets`` (None when there are none); TrackingError if a
    package is missing."""
    if not targets:
        return None
    check_available(targets)
    trackers: list[Tracker] = []
    for target in targets:
        if target.kind == "mlflow":
            trackers.append(MlflowTracker(target.directory, run_id))
        else:
            trackers.append(TensorBoardTracker(target.directory, run_id))
    return RunTracking(
        trackers, run_params(plan, run_id), Path(out_dir).resolve() / "final_model.safetensors"
    )
