"""SCAFFOLD: control variates beside the model, through plain and secure aggregation.

Real FederatedRun, real ClientApp (in process), resnet10 at 32 px on three small synthetic
hospitals with strong label skew (10%, 50%, 90% positives). Checks: SCAFFOLD reaches a lower
pooled training loss than FedAvg with many local steps (client drift); a secure SCAFFOLD round
gives plain SCAFFOLD's model and control variate within the codec bound and no control variate
ever leaves a silo in the clear; resume is bit-identical even when the silos already trained the
round being redone; the silo's control-variate store and the plan's rules.
"""

from __future__ import annotations

import dataclasses
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.aggregation import PlainAggregation
from aggregator.checkpoint import CHECKPOINT, load_checkpoint
from aggregator.federated_run import FederatedRun, initial_model
from aggregator.scaffold import Scaffold
from aggregator.strategies import build_strategy
from secure_agg.flower import SECAGG, SECAGG_ARRAYS
from silo_client.home import SiloHome
from silo_client.scaffold import ControlStore, scaffold_round, sgd_distance
from silo_client.training import SGD_MOMENTUM
from tests.test_secure_flower import CLIP, Recorder, codec_bound, grid_for, make_silos
from training_plan import parse_plan, plan_hash, wire
from training_plan.errors import PlanError

RUN = "scaffold-run"


def plan_text(
    strategy: str = "scaffold",
    *,
    secure: bool = False,
    rounds: int = 2,
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: str = "sgd",
) -> str:
    return (
        "title: scaffold\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
        f"training: {{optimizer: {optimizer}, learning_rate: {lr}, local_epochs: {epochs}, "
        "batch_size: 8}\n"
        f"federation: {{rounds: {rounds}, min_silos: 3, strategy: {strategy}}}\n"
        f"secure_aggregation: {{enabled: {str(secure).lower()}, max_weight: 40}}\n"
    )


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three hospitals of 24 images whose class balance differs strongly (label skew)."""
    from fedsilo.synthetic import generate_hospital, make_hospital_specs

    out = tmp_path_factory.mktemp("scaffold-hospitals")
    folders = []
    specs = make_hospital_specs(3, 24, seed=3, image_size=32)
    for spec, positives in zip(specs, (0.1, 0.5, 0.9), strict=True):
        spec = dataclasses.replace(spec, positive_fraction=positives, n_images=24)
        generate_hospital(out / spec.name, spec)
        folders.append(out / spec.name)
    return folders


def pooled_train_loss(plan, homes: list[SiloHome], arrays: dict[str, np.ndarray]) -> float:
    """The federation's objective: mean loss of a model over every silo's training split."""
    from silo_client.local_data import load_local_data
    from silo_client.local_model import build_global_model
    from silo_client.training import evaluate_sums

    total, count = 0.0, 0
    for home in homes:
        data = load_local_data(home, plan)
        model = build_global_model(plan, arrays)
        sums = evaluate_sums(model, data.train_images, data.train_labels)
        total, count = total + sums.loss_sum, count + sums.num_examples
    return total / count


# ------------------------------------------------------------------------------ convergence
@pytest.mark.slow
def test_scaffold_beats_fedavg_under_client_drift(hospitals: list[Path], tmp_path: Path) -> None:
    """Many local steps on label-skewed silos: FedAvg drifts, SCAFFOLD's correction holds."""
    losses = {}
    for strategy in ("fedavg", "scaffold"):
        plan = parse_plan(plan_text(strategy, rounds=3, epochs=4, lr=0.02))
        homes = make_silos(tmp_path / strategy, hospitals, identities=False)
        run = FederatedRun(plan, tmp_path / f"run-{strategy}", RUN, aggregation=PlainAggregation())
        result = run.run(grid_for(homes))
        assert result.status == "done"
        losses[strategy] = pooled_train_loss(plan, homes, result.final_arrays)
    start, _ = initial_model(plan)
    initial = pooled_train_loss(plan, homes, start)
    print(
        f"pooled training loss: initial {initial:.3f}, "
        + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
    )
    assert losses["scaffold"] < initial, losses
    assert losses["scaffold"] <= losses["fedavg"], losses


# ------------------------------------------------------------------------------ plain run
@dataclass
class PlainRun:
    result: object
    strategy: Scaffold
    homes: list[SiloHome]
    out: Path
    after_round_1: Path  # copy of the checkpoint and the silos' control stores after round 1


@pytest.fixture(scope="module")
def plain(hospitals: list[Path], tmp_path_factory: pytest.TempPathFactory) -> PlainRun:
    root = tmp_path_factory.mktemp("scaffold-plain")
    plan = parse_plan(plan_text())
    homes = make_silos(root / "silos", hospitals, identities=False)
    snapshot = root / "after-round-1"

    def keep_round_1(record) -> None:
        if record.round == 1:
            snapshot.mkdir()
            shutil.copy(root / "run" / CHECKPOINT, snapshot / CHECKPOINT)
            for home in homes:
                shutil.copytree(home.root / "scaffold", snapshot / home.name)

    strategy = build_strategy(plan)
    assert isinstance(strategy, Scaffold)
    run = FederatedRun(
        plan,
        root / "run",
        RUN,
        strategy=strategy,
        aggregation=PlainAggregation(),
        on_round=keep_round_1,
    )
    result = run.run(grid_for(homes))
    assert result.status == "done"
    return PlainRun(result, strategy, homes, root / "run", snapshot)


def test_control_variates_move_and_stay_private_to_each_silo(plain: PlainRun) -> None:
    control = plain.strategy.control
    assert control is not None and control.dtype == np.float32
    assert float(np.abs(control).max()) > 0, "the global control variate moved"
    assert plain.result.rounds[-1].train_metrics["scaffold-control-norm"] == pytest.approx(
        float(np.linalg.norm(control)), rel=1e-6
    )
    for home in plain.homes:
        path = ControlStore(home, RUN).path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with np.load(path) as data:
            assert sorted(data.files) == ["round-1", "round-2"]
            assert data["round-2"].shape == control.shape
    # the server's c is the example-weighted mean of the silos' c_i (all silos, every round)
    weights, stored = [], []
    for home in plain.homes:
        from silo_client.local_data import load_local_data

        weights.append(len(load_local_data(home, parse_plan(plan_text())).train_labels))
        stored.append(ControlStore(home, RUN).load(3, control.size))
    mean = sum(w * c for w, c in zip(weights, stored, strict=True)) / sum(weights)
    np.testing.assert_allclose(control, mean, atol=1e-4 * float(np.abs(mean).max()))


def test_resume_is_bit_identical_even_after_silos_trained_the_round(plain: PlainRun) -> None:
    """The aggregator died after the silos trained round 2 but before its checkpoint: the silos'
    stores already hold round 2, yet the redone round starts from their round-1 c_i."""
    checkpoint = load_checkpoint(plain.after_round_1)
    assert checkpoint.round == 1
    assert float(np.abs(checkpoint.strategy_state["control"]).max()) > 0
    out = plain.out.parent / "resumed"
    shutil.copytree(plain.after_round_1, out)
    plan = parse_plan(plan_text())
    resumed = FederatedRun(plan, out, RUN, aggregation=PlainAggregation(), resume=checkpoint).run(
        grid_for(plain.homes)
    )
    assert [r.round for r in resumed.rounds] == [1, 2]
    for key, value in plain.result.final_arrays.items():
        np.testing.assert_array_equal(resumed.final_arrays[key], value, err_msg=key)
    final = load_checkpoint(out)
    np.testing.assert_array_equal(final.strategy_state["control"], plain.strategy.control)


# ------------------------------------------------------------------------------ secure
def test_secure_scaffold_round_equals_plain(
    plain: PlainRun, hospitals: list[Path], tmp_path: Path
) -> None:
    """Round 2 (c and c_i both non-zero) from the same state, secure vs plain."""
    secure_plan = parse_plan(plan_text(secure=True))
    homes = make_silos(tmp_path / "silos", hospitals)
    for home in homes:
        shutil.copytree(plain.after_round_1 / home.name, home.root / "scaffold")
    checkpoint = load_checkpoint(plain.after_round_1)
    checkpoint = dataclasses.replace(checkpoint, plan_hash=plan_hash(secure_plan))
    tap = Recorder()
    strategy = build_strategy(secure_plan)
    result = FederatedRun(
        secure_plan, tmp_path / "run", RUN, strategy=strategy, resume=checkpoint
    ).run(grid_for(homes, tap=tap))
    assert result.status == "done"
    metrics = result.rounds[-1].train_metrics
    assert metrics["secure-contributors"] == 3 and metrics["clipped-fraction"] == 0.0

    weights = [float(min(len_train(h, secure_plan), 40)) for h in homes]
    bound = codec_bound(weights) + 1e-6
    model_gap = max(
        float(np.max(np.abs(result.final_arrays[k] - v)))
        for k, v in plain.result.final_arrays.items()
    )
    assert model_gap <= bound, (model_gap, bound)
    control_gap = float(np.max(np.abs(strategy.control - plain.strategy.control)))
    print(
        f"secure vs plain SCAFFOLD: model {model_gap:.2e}, c {control_gap:.2e}, bound {bound:.2e}"
    )
    assert control_gap <= bound, (control_gap, bound)
    moved = float(np.max(np.abs(plain.strategy.control - checkpoint.strategy_state["control"])))
    assert moved > 100 * bound, "the round moved the control variate far beyond the bound"
    assert float(np.abs(plain.strategy.control).max()) < CLIP

    # the server never saw a control variate (or anything else) in the clear
    for _request, reply in tap.pairs:
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) <= {SECAGG, SECAGG_ARRAYS}
    hellos = [q for q, _ in tap.pairs if q.metadata.message_type == "train.sa_hello"]
    assert hellos and all(
        set(q.content[wire.ARRAYS].keys()) == {wire.MODEL, wire.SCAFFOLD_CONTROL} for q in hellos
    )


def len_train(home: SiloHome, plan) -> int:
    from silo_client.local_data import load_local_data

    return len(load_local_data(home, plan).train_labels)


# ------------------------------------------------------------------------------ silo side
def test_control_store_rounds_retries_and_loss(tmp_path: Path) -> None:
    home = SiloHome(tmp_path / "h", "h")
    store = ControlStore(home, RUN)
    np.testing.assert_array_equal(store.load(1, 4), np.zeros(4, np.float32))
    one, two = np.full(4, 1.0, np.float32), np.full(4, 2.0, np.float32)
    store.save(1, one)
    store.save(2, two)
    np.testing.assert_array_equal(store.load(2, 4), one)  # round 2 redone: from round 1's c_i
    np.testing.assert_array_equal(store.load(3, 4), two)
    store.save(3, one * 3)
    with np.load(store.path) as data:
        assert sorted(data.files) == ["round-2", "round-3"]  # the newest two only
    np.testing.assert_array_equal(store.load(3, 5), np.zeros(5, np.float32))  # another model
    store.path.write_bytes(b"not an npz")
    np.testing.assert_array_equal(store.load(4, 4), np.zeros(4, np.float32))  # lost: zeros
    other = ControlStore(home, "../../etc/passwd")
    assert other.path.parent == store.path.parent and ".." not in other.path.name
    with pytest.raises(PlanError, match="run id"):
        ControlStore(home, "")


def test_sgd_distance_matches_torch_sgd_with_the_plans_momentum() -> None:
    for momentum in (0.0, SGD_MOMENTUM):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.1, momentum=momentum)
        for _ in range(7):
            opt.zero_grad()
            p.sum().backward()  # constant gradient 1
            opt.step()
        assert -float(p.detach()) == pytest.approx(0.1 * sgd_distance(7, momentum), rel=1e-5)
    assert sgd_distance(7, 0.0) == 7.0


def test_silo_refuses_a_scaffold_round_without_the_control_variate(
    plain: PlainRun, tmp_path: Path
) -> None:
    plan = parse_plan(plan_text())
    model = initial_model(plan)[0]
    vector = wire.pack(model)
    home = plain.homes[0]
    with pytest.raises(PlanError, match="scaffold-control"):
        scaffold_round(home, plan, {wire.MODEL: vector}, 1, RUN)
    with pytest.raises(PlanError, match="control variate has 3 values"):
        scaffold_round(
            home,
            plan,
            {wire.MODEL: vector, wire.SCAFFOLD_CONTROL: np.zeros(3, np.float32)},
            1,
            RUN,
        )


# ------------------------------------------------------------------------------ plan
def test_plan_rules() -> None:
    with pytest.raises(PlanError, match=r"scaffold needs training\.optimizer sgd, not adam"):
        parse_plan(plan_text(optimizer="adam"))
    bad = plan_text().replace("strategy: scaffold", "strategy: scaffold, strategy_args: {eta: 1}")
    with pytest.raises(PlanError, match="'eta' is not an argument of scaffold"):
        parse_plan(bad)
    tuned = plan_text(secure=True).replace(
        "strategy: scaffold", "strategy: scaffold, strategy_args: {server_learning_rate: 0.5}"
    )
    strategy = build_strategy(parse_plan(tuned))
    assert isinstance(strategy, Scaffold) and strategy.server_learning_rate == 0.5
    with pytest.raises(ValueError, match="server_learning_rate"):
        Scaffold(server_learning_rate=0.0)


def test_server_learning_rate_scales_the_model_step() -> None:
    """lr_g * (mean - w): checked on Flower messages without silos."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from tests.harness import InProcessGrid

    InProcessGrid({})  # sets Flower's task identity, which building a Message needs
    strategy = Scaffold(server_learning_rate=0.5, weighted_by_key=wire.NUM_EXAMPLES)
    w, c = np.ones(4, np.float32), np.zeros(4, np.float32)
    strategy.control, strategy.round_model, strategy.sampled = c, w, 2

    def reply(model: float, control: float, n: float) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord(
                    {
                        wire.MODEL: Array(np.full(4, model, np.float32)),
                        wire.SCAFFOLD_CONTROL: Array(np.full(4, control, np.float32)),
                    }
                ),
                "metrics": MetricRecord({wire.NUM_EXAMPLES: n}),
            }
        )
        msg = Message(content, dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = 1
        return msg

    arrays, _ = strategy.aggregate_train(1, [reply(3.0, 1.0, 1.0), reply(5.0, 4.0, 3.0)])
    # weighted means: model 4.5, control 3.25; w + 0.5 * (4.5 - 1) = 2.75
    np.testing.assert_allclose(arrays[wire.MODEL].numpy(), 2.75)
    np.testing.assert_allclose(strategy.control, 3.25)
    # one of three sampled silos dropped out: c moves |S|/N = 2/3 of the way
    strategy.control, strategy.sampled = np.zeros(4, np.float32), 3
    strategy.aggregate_train(2, [reply(3.0, 1.0, 1.0), reply(5.0, 4.0, 3.0)])
    np.testing.assert_allclose(strategy.control, 3.25 * 2 / 3, rtol=1e-6)
