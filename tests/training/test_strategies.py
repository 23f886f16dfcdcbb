"""Server strategies on the secure sum: Flower's own classes, chosen and tuned in the plan.

Each server optimizer runs one round with secure aggregation on (in process, real ClientApp); the
FedAdam model of a secure round equals Flower's FedAdam applied to the plain FedAvg mean, within
the codec bound. Strategies that need individual updates are refused under secure aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedMedian, Krum

from aggregator.aggregation import PlainAggregation
from aggregator.errors import StrategyRefused
from aggregator.federated_run import FederatedRun, initial_model
from aggregator.strategies import build_strategy, strategy_kwargs
from tests.test_secure_flower import PLAIN, SECURE, codec_bound, grid_for, make_silos
from training_plan import parse_plan, wire
from training_plan.errors import PlanError

ADAM_ARGS = "{eta: 0.01, beta_1: 0.9, beta_2: 0.99, tau: 0.001}"


def with_strategy(base: str, name: str, args: str = "{}") -> str:
    """The plan text with federation.strategy and strategy_args set."""
    return base.replace(
        "federation: {rounds: 1, min_silos: 3}",
        f"federation: {{rounds: 1, min_silos: 3, strategy: {name}, strategy_args: {args}}}",
    )


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("strategy-hospitals")
    specs = generate_hospitals(out, hospitals=3, images_per_hospital=20, seed=5, image_size=32)
    return [out / s.name for s in specs]


@dataclass
class PlainMean:
    """One plain FedAvg round: the initial model, the mean model and the silos' weights."""

    start: np.ndarray
    mean: np.ndarray
    weights: list[float]


@pytest.fixture(scope="module")
def plain_mean(hospitals: list[Path], tmp_path_factory: pytest.TempPathFactory) -> PlainMean:
    root = tmp_path_factory.mktemp("plain-mean")
    weights: list[float] = []

    def tap(request: Message, reply: Message) -> Message:
        if not reply.has_error():
            weights.append(float(reply.content[wire.METRICS][wire.NUM_EXAMPLES]))
        return reply

    plan = parse_plan(PLAIN)
    homes = make_silos(root / "silos", hospitals, identities=False)
    result = FederatedRun(plan, root / "run", "p", aggregation=PlainAggregation()).run(
        grid_for(homes, tap=tap)
    )
    named, layout = initial_model(plan)
    return PlainMean(
        start=wire.pack(named, layout),
        mean=wire.pack(result.final_arrays, layout),
        weights=weights[:3],
    )


def _secure_run(hospitals: list[Path], root: Path, plan_text: str) -> FederatedRun:
    homes = make_silos(root / "silos", hospitals)
    run = FederatedRun(parse_plan(plan_text), root / "run", "s")
    run.result = run.run(grid_for(homes))
    return run


# ------------------------------------------------------------------------------ secure rounds
def test_fedadam_on_the_secure_sum_equals_flower_fedadam_on_the_plain_mean(
    hospitals: list[Path], plain_mean: PlainMean, tmp_path: Path
) -> None:
    plan_text = with_strategy(SECURE, "fedadam", ADAM_ARGS)
    run = _secure_run(hospitals, tmp_path, plan_text)
    assert isinstance(run.strategy, FedAdam) and run.result.status == "done"
    assert run.strategy.m_t is not None and run.strategy.v_t is not None
    _, layout = initial_model(run.plan)
    secure = wire.pack(run.result.final_arrays, layout)

    # Flower's FedAdam, applied by hand to the plain FedAvg mean of the same round.
    expected_strategy = FedAdam(**strategy_kwargs(run.plan))
    expected_strategy.current_arrays = {wire.MODEL: plain_mean.start}
    carrier = Message(
        RecordDict(
            {
                wire.ARRAYS: ArrayRecord({wire.MODEL: Array(plain_mean.mean)}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: sum(plain_mean.weights)}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    carrier.metadata.__dict__["_src_node_id"] = 1
    record, _ = expected_strategy.aggregate_train(1, [carrier])
    expected = record[wire.MODEL].numpy()

    # FedAdam maps delta -> eta_n (1-b1) delta / ((1-b1)|delta| + tau) per value, Lipschitz
    # with constant eta_n (1-b1) / tau: the codec bound on the mean, scaled by that.
    s = expected_strategy
    eta_n = s.eta * np.sqrt(1 - s.beta_2**2) / (1 - s.beta_1**2)
    lipschitz = max(1.0, eta_n * (1 - s.beta_1) / s.tau)
    bound = (codec_bound(plain_mean.weights) + 1e-6) * lipschitz
    worst = float(np.max(np.abs(secure - expected)))
    assert worst <= bound, f"secure FedAdam differs from Flower's FedAdam by {worst} > {bound}"
    moved = float(np.max(np.abs(expected - plain_mean.start)))
    assert moved > 100 * bound, "the comparison must be meaningful"
    # and FedAdam really is not FedAvg here
    assert float(np.max(np.abs(secure - plain_mean.mean))) > 100 * bound


@pytest.mark.parametrize(
    ("name", "args", "state"),
    [
        ("fedavgm", "{server_learning_rate: 1.0, server_momentum: 0.9}", "momentum_vector"),
        ("fedyogi", "{eta: 0.01, tau: 0.001}", "v_t"),
        ("fedadagrad", "{eta: 0.01, tau: 0.001}", "v_t"),
        ("fedprox", "{proximal_mu: 0.1}", None),
    ],
)
def test_server_optimizers_run_with_secure_aggregation(
    hospitals: list[Path],
    plain_mean: PlainMean,
    tmp_path: Path,
    name: str,
    args: str,
    state: str | None,
) -> None:
    run = _secure_run(hospitals, tmp_path, with_strategy(SECURE, name, args))
    assert run.aggregation.name == "secure"
    assert run.result.status == "done" and run.result.rounds[0].participants == 3
    if state:
        assert getattr(run.strategy, state) is not None, f"{name} kept no {state}"
    _, layout = initial_model(run.plan)
    final = wire.pack(run.result.final_arrays, layout)
    assert np.all(np.isfinite(final))
    assert float(np.max(np.abs(final - plain_mean.start))) > 1e-4, "the model did not move"


def test_fedprox_changes_the_silo_update(hospitals: list[Path], plain_mean: PlainMean) -> None:
    """The proximal term reaches the silo: a strong mu keeps the local model nearer the global."""
    from silo_client.local_round import train_round

    root = Path(hospitals[0]).parent
    home = make_silos(root / "prox-silos", hospitals[:1], identities=False)[0]
    # SGD for several steps: Adam's first step is lr * sign(gradient), whatever the loss.
    sgd = PLAIN + "training: {optimizer: sgd, learning_rate: 0.01, local_epochs: 3}\n"
    plain = parse_plan(sgd)
    prox = parse_plan(with_strategy(sgd, "fedprox", "{proximal_mu: 1.0}"))
    assert prox.federation.proximal_mu == 1.0 and plain.federation.proximal_mu == 0.0
    start = {wire.MODEL: plain_mean.start}
    free, _ = train_round(home, plain, start, 1)
    held, _ = train_round(home, prox, start, 1)
    assert np.linalg.norm(held[wire.MODEL]) < np.linalg.norm(free[wire.MODEL])


def test_train_local_proximal_term_pulls_towards_global() -> None:
    from silo_client.training import train_local
    from training_plan.schema import TrainingSpec

    spec = TrainingSpec(optimizer="sgd", learning_rate=0.1, batch_size=4)
    images, labels = torch.randn(16, 3), (torch.rand(16) > 0.5).long()
    moved = []
    for mu in (0.0, 2.0):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        before = [p.detach().clone() for p in model.parameters()]
        train_local(model, images, labels, spec, seed=1, proximal_mu=mu)
        moved.append(
            sum(
                float((p.detach() - b).norm())
                for p, b in zip(model.parameters(), before, strict=True)
            )
        )
    assert moved[1] < moved[0]


# ------------------------------------------------------------------------------ plan checks
@pytest.mark.parametrize("name", ["krum", "multikrum", "median", "trimmed-mean", "bulyan"])
def test_individual_update_strategies_are_refused_under_secure_aggregation(name: str) -> None:
    with pytest.raises(PlanError, match="secure aggregation hides"):
        parse_plan(with_strategy(SECURE, name))


def test_build_strategy_refuses_robust_strategy_with_a_secure_step() -> None:
    plan = parse_plan(with_strategy(PLAIN, "krum", "{num_malicious_nodes: 0}"))
    assert isinstance(build_strategy(plan), Krum)
    with pytest.raises(StrategyRefused, match="individual update"):
        build_strategy(plan, secure=True)


def test_plain_median_round_runs(hospitals: list[Path], tmp_path: Path) -> None:
    plan = parse_plan(with_strategy(PLAIN, "median"))
    homes = make_silos(tmp_path / "silos", hospitals, identities=False)
    run = FederatedRun(plan, tmp_path / "run", "m", aggregation=PlainAggregation())
    assert isinstance(run.strategy, FedMedian)
    assert run.run(grid_for(homes)).status == "done"


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("fedadam", "{momentum: 0.9}", "'momentum' is not an argument of fedadam"),
        ("fedadam", "{beta_1: 1.5}", "outside"),
        ("fedprox", "{}", "proximal_mu > 0"),
        ("fedavg", "{eta: 0.1}", "it takes: none"),
        ("krum", "{num_malicious_nodes: 1.5}", "whole number"),
        ("scaffold", "{}", "strategy"),
    ],
)
def test_strategy_args_are_validated(name: str, args: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan(with_strategy(PLAIN, name, args))


def test_strategy_args_reach_flowers_class() -> None:
    plan = parse_plan(with_strategy(SECURE, "fedadam", ADAM_ARGS))
    strategy = build_strategy(plan)
    assert isinstance(strategy, FedAdam)
    assert (strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau) == (
        0.01,
        0.9,
        0.99,
        0.001,
    )
    assert strategy.weighted_by_key == wire.NUM_EXAMPLES
    assert strategy.arrayrecord_key == wire.ARRAYS
