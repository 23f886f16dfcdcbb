"""The aggregation step of a round: the one replaceable object between a strategy's
configure_train and its aggregate_train.

A step receives the strategy's outgoing messages (one per sampled silo, all carrying the same
global model and config) and returns the replies the strategy aggregates. The plain step relays
silos' individual updates; the secure step (secure_agg.flower) returns a single reply carrying
the unmasked weighted mean, so any strategy that only needs the weighted mean works unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from secure_agg.flower import send_and_receive
from training_plan import wire

log = logging.getLogger("fedsilo.aggregator")


@dataclass
class StepReport:
    """What a step observed: who answered, who refused and why, bytes moved (no values)."""

    replied: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    bytes_received: int = 0
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each message exchange a multi-stage step ran (secure: one per stage)."""


class AggregationStep(Protocol):
    """Turns a strategy's outgoing train/evaluate messages into the replies it aggregates."""

    name: str

    def train(
        self, grid: Grid, server_round: int, messages: list[Message], report: StepReport
    ) -> list[Message]:
        """Run the train exchange; return replies whose arrays are full model weights."""
        ...

    def evaluate(
        self, grid: Grid, server_round: int, messages: list[Message], report: StepReport
    ) -> list[Message]:
        """Run the evaluate exchange; return replies with metrics weighted by num-examples."""
        ...


def split_replies(replies: Iterable[Message], report: StepReport) -> list[Message]:
    """Keep replies with content; record error replies as refusals with their reason."""
    good = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            report.refused[node] = reply.error.reason or f"error code {reply.error.code}"
            log.warning("silo node %s refused or failed: %s", node, report.refused[node])
        else:
            good.append(reply)
            report.replied.append(node)
            report.bytes_received += content_bytes(reply.content)
    return good


def content_bytes(content: RecordDict) -> int:
    """Bytes of array data in a reply (what dominates the wire)."""
    return sum(record.count_bytes() for record in content.array_records.values())


class PlainAggregation:
    """Silos send their updates in the clear; the strategy sees each silo's model.

    Only for plans that turn secure aggregation off and silos whose policy allows it. Each reply's
    update d is turned into the silo's model w_global + d so that Flower's strategies (which average
    models) apply unchanged.
    """

    name = "plain"

    def __init__(self, timeout: float | None = 3600.0) -> None:
        self.timeout = timeout

    def train(
        self, grid: Grid, server_round: int, messages: list[Message], report: StepReport
    ) -> list[Message]:
        """Send the train messages; rebuild each silo's model from its update."""
        if not messages:
            return []
        global_record = messages[0].content[wire.ARRAYS]
        global_arrays = dict(
            zip(global_record.keys(), global_record.to_numpy_ndarrays(), strict=True)
        )
        replies = split_replies(send_and_receive(grid, messages, timeout=self.timeout), report)
        rebuilt = []
        for reply in replies:
            update = reply.content[wire.ARRAYS]
            model = {}
            for key, delta in zip(update.keys(), update.to_numpy_ndarrays(), strict=True):
                if key not in global_arrays or delta.shape != global_arrays[key].shape:
                    report.refused[reply.metadata.src_node_id] = f"update has a bad array '{key}'"
                    break
                model[key] = Array((global_arrays[key] + delta).astype(np.float32))
            else:
                reply.content = RecordDict(
                    {wire.ARRAYS: ArrayRecord(model), wire.METRICS: reply.content[wire.METRICS]}
                )
                rebuilt.append(reply)
        return rebuilt

    def evaluate(
        self, grid: Grid, server_round: int, messages: list[Message], report: StepReport
    ) -> list[Message]:
        """Send the evaluate messages and relay the replies."""
        if not messages:
            return []
        return split_replies(send_and_receive(grid, messages, timeout=self.timeout), report)


def mean_reply(
    carrier: Message, mean_arrays: dict[str, np.ndarray], total_weight: float, metrics: dict
) -> Message:
    """One reply carrying a weighted mean model and its summed weight, for the strategy.

    ``carrier`` is a real reply of the round whose content is replaced: the strategy then sees one
    ordinary reply, whose weight is the sum of all silos' weights.
    """
    carrier.content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(
                {k: Array(v.astype(np.float32)) for k, v in mean_arrays.items()}
            ),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: float(total_weight), **metrics}),
        }
    )
    return carrier
