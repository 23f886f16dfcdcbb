"""The plan's server strategy, built from Flower's own classes (never rewritten).

Secure aggregation hands a strategy one reply carrying the unmasked weighted mean model and the
summed weight, so every strategy that needs only that mean (FedAvg, FedAvgM, FedAdam, FedYogi,
FedAdagrad, FedProx) works unchanged on it. SCAFFOLD (aggregator/scaffold.py) wraps FedAvg and
sends its control variate beside the model, so it too needs only the means. Robust strategies
(Krum, MultiKrum, median, trimmed mean, Bulyan) compare silos' individual updates: they are
refused under secure aggregation and run only with plain aggregation.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from aggregator.errors import StrategyRefused
from aggregator.scaffold import Scaffold
from training_plan import TrainingPlan, wire
from training_plan.schema import _INTEGER_ARGS, NEEDS_INDIVIDUAL_UPDATES, STRATEGY_ARGS

STRATEGY_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedprox": FedProx,
    "scaffold": Scaffold,
    "krum": Krum,
    "multikrum": MultiKrum,
    "median": FedMedian,
    "trimmed-mean": FedTrimmedAvg,
    "bulyan": Bulyan,
}
"""Plan strategy name -> Flower class."""


def check_strategy(plan: TrainingPlan, secure: bool | None = None) -> None:
    """Raise StrategyRefused when the plan's strategy cannot run under its aggregation."""
    fed = plan.federation
    secure = plan.secure_aggregation.enabled if secure is None else secure
    if fed.strategy not in STRATEGY_CLASSES:
        raise StrategyRefused(f"strategy '{fed.strategy}' is not supported")
    if secure and fed.strategy in NEEDS_INDIVIDUAL_UPDATES:
        raise StrategyRefused(
            f"strategy '{fed.strategy}' needs each silo's individual update, which secure "
            "aggregation hides by design; choose fedavg, fedavgm, fedadam, fedyogi, fedadagrad, "
            "fedprox or scaffold, or run with secure aggregation off where every silo's policy "
            "allows it"
        )
    unknown = set(fed.strategy_args) - set(STRATEGY_ARGS.get(fed.strategy, {}))
    if unknown:
        raise StrategyRefused(
            f"strategy '{fed.strategy}' takes no argument(s) {', '.join(sorted(unknown))}"
        )


def strategy_kwargs(plan: TrainingPlan) -> dict[str, Any]:
    """Constructor arguments of the plan's Flower strategy: sampling, keys and the plan's tunables.

    Every connected silo is sampled each round (cross-silo); weights, arrays and config ride
    under our wire keys.
    """
    fed = plan.federation
    kwargs: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": fed.min_silos,
        "min_evaluate_nodes": fed.min_silos,
        "min_available_nodes": fed.min_silos,
        "weighted_by_key": wire.NUM_EXAMPLES,
        "arrayrecord_key": wire.ARRAYS,
        "configrecord_key": wire.CONFIG,
    }
    for name, value in fed.strategy_args.items():
        kwargs[name] = int(value) if name in _INTEGER_ARGS else float(value)
    return kwargs


def build_strategy(plan: TrainingPlan, secure: bool | None = None) -> Strategy:
    """The Flower strategy the plan asks for, sampling every connected silo each round.

    ``secure`` says whether the round's aggregation step is secure (default: the plan's setting).
    """
    check_strategy(plan, secure)
    cls = STRATEGY_CLASSES[plan.federation.strategy]
    try:
        return cls(**strategy_kwargs(plan))
    except (TypeError, ValueError) as exc:
        raise StrategyRefused(
            f"strategy '{plan.federation.strategy}' rejected its arguments: {exc}"
        ) from None
