"""The round loop of one federated run on Flower's Message API.

configure (strategy) -> aggregation step (plain or secure) -> aggregate (strategy) -> evaluate ->
checkpoint. The aggregation step is the one replaceable object: see aggregation.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from aggregator.aggregation import AggregationStep, PlainAggregation, StepReport
from aggregator.artifacts import EventLog, save_model
from aggregator.checkpoint import (
    Checkpoint,
    restore_rng,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from aggregator.errors import NotEnoughSilos, RoundFailed, StrategyRefused
from aggregator.strategies import build_strategy
from training_plan import TrainingPlan, canonical_json, plan_hash, wire

log = logging.getLogger("fedsilo.aggregator")


def initial_model(plan: TrainingPlan) -> tuple[dict[str, np.ndarray], list[tuple[str, tuple]]]:
    """The plan's network, freshly initialised with the plan's seed: float32 arrays and layout."""
    import torch

    from training_plan.models import build_plan_model

    torch.manual_seed(plan.training.seed)
    model = build_plan_model(plan.model, plan.preprocessing.channels)
    arrays = {
        k: v.detach().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }
    return arrays, [(k, tuple(v.shape)) for k, v in arrays.items()]


def seed_server_rngs(seed: int) -> None:
    """Seed the server's RNGs (Flower samples and orders silos with ``random``) from the plan.

    Same seed, same silo order, same float summation order: a resumed run (which restores these
    states from its checkpoint) ends with the same model as an uninterrupted one. Secure
    aggregation's secrets never come from these generators (they use the OS's CSPRNG).
    """
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_aggregation(plan: TrainingPlan) -> AggregationStep:
    """Secure aggregation unless the plan turned it off."""
    if plan.secure_aggregation.enabled:
        from secure_agg.flower import SecureAggregation

        return SecureAggregation.from_plan(plan)
    return PlainAggregation()


@dataclass
class RoundRecord:
    """What one round produced (aggregates only)."""

    round: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    participants: int
    refused: dict[str, str]
    bytes_received: int
    seconds: float


@dataclass
class RunResult:
    """The outcome of a run."""

    run_id: str
    plan_hash: str
    rounds: list[RoundRecord] = field(default_factory=list)
    final_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    status: str = "running"


class FederatedRun:
    """Drives one run: wait for silos, then rounds of train/aggregate/evaluate/checkpoint."""

    def __init__(
        self,
        plan: TrainingPlan,
        out_dir: Path,
        run_id: str,
        *,
        strategy: Strategy | None = None,
        aggregation: AggregationStep | None = None,
        node_wait_seconds: float = 180.0,
        on_round: Callable[[RoundRecord], None] | None = None,
        resume: Checkpoint | None = None,
    ) -> None:
        self.plan = plan
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.aggregation = aggregation or default_aggregation(plan)
        self.strategy = strategy or build_strategy(plan, secure=self.aggregation.name != "plain")
        self.resume = resume
        self.node_wait_seconds = node_wait_seconds
        self.on_round = on_round
        self.events = EventLog(self.out_dir / "events.jsonl")
        self.hash = plan_hash(plan)

    def _wait_for_silos(self, grid: Grid) -> list[int]:
        needed = self.plan.federation.min_silos
        deadline = time.monotonic() + self.node_wait_seconds
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= needed:
                return nodes
            if time.monotonic() > deadline:
                raise NotEnoughSilos(
                    f"only {len(nodes)} silo(s) connected after {self.node_wait_seconds:.0f} s; "
                    f"the plan needs {needed} (check 'silo start' at each hospital)"
                )
            time.sleep(1.0)

    def _config(self, server_round: int, phase: str, split: str | None = None) -> ConfigRecord:
        config = {
            wire.PLAN_JSON: canonical_json(self.plan).decode(),
            wire.PLAN_HASH: self.hash,
            wire.RUN_ID: self.run_id,
            wire.ROUND: server_round,
            wire.PHASE: phase,
        }
        if split is not None:
            config[wire.SPLIT] = split
        return ConfigRecord(config)

    def _evaluate(
        self, grid: Grid, server_round: int, record: ArrayRecord, split: str
    ) -> tuple[dict[str, float], StepReport]:
        """One federated evaluation of ``record`` on the silos' ``split``: metrics from sums."""
        messages = list(
            self.strategy.configure_evaluate(
                server_round, record, self._config(server_round, split, split), grid
            )
        )
        report = StepReport()
        replies = self.aggregation.evaluate(grid, server_round, messages, report)
        if report.refused:  # e.g. a silo's participation ledger: the operator must see why
            self.events.write(
                "silos-refused",
                round=server_round,
                phase=f"evaluate/{split}",
                refused=_str_keys(report.refused),
                notes=report.notes,
            )
        if not replies:
            return {}, report
        if any(_counters(r) for r in replies):
            return metrics_from_replies(self.plan, replies, split), report
        metrics = self.strategy.aggregate_evaluate(server_round, replies)  # secure: one sum
        return dict(metrics or {}), report

    def _test(self, grid: Grid, arrays: dict[str, np.ndarray], result: RunResult) -> None:
        """The one evaluation on the silos' test splits, with the final model."""
        server_round = self.plan.federation.rounds
        record = ArrayRecord({k: _array(v) for k, v in arrays.items()})
        metrics, report = self._evaluate(grid, server_round, record, "test")
        result.test_metrics = metrics
        self.events.write(
            "test-evaluated",
            round=server_round,
            test=metrics,
            participants=len(report.replied),
            refused=_str_keys(report.refused),
            notes=report.notes,
        )

    def run(self, grid: Grid) -> RunResult:
        """Run every round of the plan; the global model never advances on a failed round."""
        result = RunResult(run_id=self.run_id, plan_hash=self.hash)
        named, self.layout = initial_model(self.plan)
        first_round = 1
        if self.resume is None:
            seed_server_rngs(self.plan.training.seed)
            save_model(self.out_dir / "rounds" / "round-000.safetensors", named)
            arrays = {wire.MODEL: wire.pack(named, self.layout)}
        else:
            arrays = self._restore(self.resume, result)
            first_round = self.resume.round + 1
        try:
            nodes = self._wait_for_silos(grid)
        except NotEnoughSilos as exc:
            result.status = "failed"
            self.events.write("run-failed", reason=str(exc))
            raise
        self.events.write(
            "run-started" if self.resume is None else "run-resumed",
            first_round=first_round,
            run_id=self.run_id,
            plan_hash=self.hash,
            silos=len(nodes),
            rounds=self.plan.federation.rounds,
            aggregation=self.aggregation.name,
        )
        try:
            for server_round in range(first_round, self.plan.federation.rounds + 1):
                arrays = self._one_round(grid, server_round, arrays, result)
        except Exception as exc:
            result.status = "failed"
            self.events.write(
                "run-failed", reason=str(exc).splitlines()[0] if str(exc) else repr(exc)
            )
            raise
        if self.plan.training.test_fraction > 0:
            self._test(grid, arrays, result)
        result.final_arrays = wire.unpack(arrays[wire.MODEL], self.layout)
        result.status = "done"
        save_model(
            self.out_dir / "final_model.safetensors", result.final_arrays, {"plan_hash": self.hash}
        )
        self.events.write("run-finished", rounds=len(result.rounds))
        from aggregator.model_registry import export_run

        export_run(self.out_dir, self.plan, self.run_id, result.final_arrays)
        return result

    def _restore(self, checkpoint: Checkpoint, result: RunResult) -> dict[str, np.ndarray]:
        """Strategy state, RNGs and round records from a checkpoint; the model to continue from."""
        if checkpoint.plan_hash != self.hash:
            raise StrategyRefused(
                f"the checkpoint belongs to plan {checkpoint.plan_hash[:12]}, not to this run's "
                f"plan {self.hash[:12]}; resume with the plan the run started with"
            )
        restore_strategy_state(self.strategy, checkpoint.strategy_state)
        restore_rng(checkpoint.rng)
        result.rounds.extend(RoundRecord(**r) for r in checkpoint.rounds)
        return {k: np.asarray(v, dtype=np.float32) for k, v in checkpoint.arrays.items()}

    def _one_round(
        self, grid: Grid, server_round: int, arrays: dict[str, np.ndarray], result: RunResult
    ) -> dict[str, np.ndarray]:
        started = time.monotonic()
        needed = self.plan.federation.min_silos
        record = ArrayRecord({k: _array(v) for k, v in arrays.items()})
        messages = list(
            self.strategy.configure_train(
                server_round, record, self._config(server_round, "train"), grid
            )
        )
        report = StepReport()
        timings: dict[str, float] = {}
        mark = time.monotonic()
        replies = self.aggregation.train(grid, server_round, messages, report)
        timings["train-exchange"] = time.monotonic() - mark
        if report.refused:
            self.events.write(
                "silos-refused",
                round=server_round,
                refused=_str_keys(report.refused),
                decision=self.plan.federation.on_refusal,
            )
        if report.refused and self.plan.federation.on_refusal == "stop":
            reasons = "; ".join(f"{n}: {r}" for n, r in report.refused.items())
            self.events.write(
                "round-failed",
                round=server_round,
                replied=len(report.replied),
                refused=_str_keys(report.refused),
                reason="a silo refused and the plan says stop",
            )
            raise RoundFailed(
                f"round {server_round}: {len(report.refused)} silo(s) refused ({reasons}); "
                "the plan says stop on refusal; the global model was not advanced"
            )
        if len(report.replied) < needed or not replies:
            reasons = "; ".join(f"{n}: {r}" for n, r in report.refused.items()) or "no replies"
            self.events.write(
                "round-failed",
                round=server_round,
                replied=len(report.replied),
                refused=_str_keys(report.refused),
            )
            raise RoundFailed(
                f"round {server_round}: {len(report.replied)} of {len(messages)} silos "
                f"contributed, "
                f"the plan needs {needed} ({reasons}); the global model was not advanced"
            )
        mark = time.monotonic()
        new_record, train_metrics = self.strategy.aggregate_train(server_round, replies)
        timings["aggregate"] = time.monotonic() - mark
        if new_record is None:
            raise RoundFailed(f"round {server_round}: the strategy produced no model")
        new_arrays = dict(zip(new_record.keys(), new_record.to_numpy_ndarrays(), strict=True))

        mark = time.monotonic()
        every = self.plan.federation.evaluate_every
        last = server_round == self.plan.federation.rounds
        if (last and self.plan.federation.final_evaluation) or (
            every and server_round % every == 0
        ):
            eval_metrics, _ = self._evaluate(grid, server_round, new_record, "validation")
        else:
            eval_metrics = {}

        timings["evaluate-exchange"] = time.monotonic() - mark
        timings.update(report.stage_seconds)
        if set(new_arrays) != {wire.MODEL}:
            raise RoundFailed(
                f"round {server_round}: the strategy returned arrays {sorted(new_arrays)[:3]}"
            )
        save_model(
            self.out_dir / "rounds" / f"round-{server_round:03d}.safetensors",
            wire.unpack(new_arrays[wire.MODEL], self.layout),
        )
        round_record = RoundRecord(
            round=server_round,
            train_metrics=dict(train_metrics or {}),
            eval_metrics=dict(eval_metrics or {}),
            participants=len(report.replied),
            refused=_str_keys(report.refused),
            bytes_received=report.bytes_received,
            seconds=time.monotonic() - started,
        )
        result.rounds.append(round_record)
        save_checkpoint(
            self.out_dir,
            Checkpoint(
                round=server_round,
                run_id=self.run_id,
                plan_hash=self.hash,
                arrays={k: np.asarray(v) for k, v in new_arrays.items()},
                strategy_state=strategy_state(self.strategy),
                rng=rng_state(),
                rounds=[asdict(r) for r in result.rounds],
            ),
        )
        self.events.write(
            "round-finished",
            round=server_round,
            train=round_record.train_metrics,
            evaluate=round_record.eval_metrics,
            participants=round_record.participants,
            refused=round_record.refused,
            bytes_received=round_record.bytes_received,
            seconds=round_record.seconds,
            timings=timings,
            notes=report.notes,
        )
        if self.on_round:
            self.on_round(round_record)
        return new_arrays


def _counters(reply) -> dict[str, float]:
    """The evaluation counters a plain reply carries (none in a secure sum's reply)."""
    metrics = reply.content.get(wire.METRICS, {})
    return {
        key[len(wire.COUNTER) :]: float(value)
        for key, value in metrics.items()
        if key.startswith(wire.COUNTER)
    }


def metrics_from_replies(plan: TrainingPlan, replies: list, split: str) -> dict[str, float]:
    """Add the silos' evaluation counters (plain path) and turn the sums into metrics, exactly
    as secure aggregation does inside the mask (training_plan.metrics)."""
    from training_plan.metrics import metric_prefix, metrics_from_sums, sum_counters

    try:
        sums = sum_counters(plan, (_counters(r) for r in replies))
    except ValueError as exc:
        raise RoundFailed(f"a silo's evaluation reply does not fit the plan: {exc}") from None
    prefix = metric_prefix(split)
    return {f"{prefix}-{k}": v for k, v in metrics_from_sums(plan, sums).items()}


def _str_keys(mapping: dict[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in mapping.items()}


def _array(value: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(value, dtype=np.float32))
