"""FedAvg arithmetic of the plain aggregation step and the packed model vector."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from aggregator.aggregation import PlainAggregation, StepReport
from tests.harness import InProcessGrid
from training_plan import wire


def test_pack_unpack_round_trip() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    layout = [(k, v.shape) for k, v in arrays.items()]
    flat = wire.pack(arrays, layout)
    assert flat.shape == (10,)
    back = wire.unpack(flat, layout)
    for key in arrays:
        np.testing.assert_array_equal(back[key], arrays[key])
    with pytest.raises(ValueError, match="10 values"):
        wire.unpack(flat, [("a", (3, 3))])


class _EchoUpdate:
    """A fake silo replying a fixed update and weight (arithmetic test only)."""

    def __init__(self, update: np.ndarray, weight: int) -> None:
        self.update, self.weight = update, weight

    def __call__(self, message: Message, context) -> Message:
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({wire.MODEL: Array(self.update)}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: self.weight}),
            }
        )
        return Message(content, reply_to=message)


def test_plain_step_with_flower_fedavg_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    global_model = rng.normal(size=50).astype(np.float32)
    updates = [rng.normal(size=50).astype(np.float32) for _ in range(3)]
    weights = [10, 30, 60]
    grid = InProcessGrid(
        {
            i + 1: (_EchoUpdate(u, w), {})
            for i, (u, w) in enumerate(zip(updates, weights, strict=True))
        }
    )
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, weighted_by_key=wire.NUM_EXAMPLES)
    record = ArrayRecord({wire.MODEL: Array(global_model)})
    messages = list(strategy.configure_train(1, record, ConfigRecord({}), grid))
    report = StepReport()
    replies = PlainAggregation().train(grid, 1, messages, report)
    assert sorted(report.replied) == [1, 2, 3]
    new, _ = strategy.aggregate_train(1, replies)
    expected = global_model + sum(w * u for w, u in zip(weights, updates, strict=True)) / sum(
        weights
    )
    np.testing.assert_allclose(new[wire.MODEL].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_plain_step_records_refusals_and_bad_shapes() -> None:
    def refuse(message: Message, context) -> Message:
        from flwr.app import Error

        return Message(Error(code=wire.ERROR_REFUSED, reason="plan not approved"), reply_to=message)

    good = _EchoUpdate(np.zeros(5, np.float32), 1)
    wrong = _EchoUpdate(np.zeros(7, np.float32), 1)
    grid = InProcessGrid({1: (good, {}), 2: (refuse, {}), 3: (wrong, {})})
    record = ArrayRecord({wire.MODEL: Array(np.zeros(5, np.float32))})
    messages = [
        Message(
            RecordDict({wire.ARRAYS: record, wire.CONFIG: ConfigRecord({})}),
            dst_node_id=n,
            message_type="train",
        )
        for n in (1, 2, 3)
    ]
    report = StepReport()
    replies = PlainAggregation().train(grid, 1, messages, report)
    assert len(replies) == 1
    assert report.refused[2] == "plan not approved"
    assert "bad array" in report.refused[3]
