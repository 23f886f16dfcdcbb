"""SCAFFOLD's server side (Karimireddy et al. 2020), as a thin wrapper around Flower's FedAvg.

The wrapper keeps the global control variate c and adds it to the outgoing ArrayRecord under
``wire.SCAFFOLD_CONTROL`` next to the model. Silos answer with (delta w_i, delta c_i) under the
same two keys (silo_client/scaffold.py), so both go through the aggregation step together: the
plain step rebuilds (w + delta w_i, c + delta c_i) per silo, the secure step hands over one reply
with the unmasked weighted means. FedAvg's own ``aggregate_train`` averages the two arrays; the
wrapper then applies the server learning rate to the model and the |S|/N factor to the control:

    w <- w + lr_g * (mean_w - w)         c <- c + (|S| / N) * (mean_c - c)

with S the silos whose updates are in the mean and N the silos sampled for the round (every
connected silo, cross-silo). The global model the round loop sees stays the model alone; c is
strategy state, so the checkpoint (``aggregator.checkpoint.strategy_state``) carries it.

Weighting (our choice, documented in docs/training.md): the paper averages delta c_i uniformly;
here it is averaged with the same example weights as the model (one weighted vector under secure
aggregation). That is SCAFFOLD for the example-weighted objective sum_i (n_i/n) f_i, the
objective FedAvg's weighted mean optimises: c stays the weighted mean of the silos' c_i.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aggregator.errors import RoundFailed
from training_plan import wire

CONTRIBUTORS = "secure-contributors"
"""Metric of the secure step's single reply: how many silos its mean holds."""


class Scaffold(FedAvg):
    """FedAvg plus SCAFFOLD's global control variate and server learning rate.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        lr_g: the model moves lr_g times the averaged update (1.0: the FedAvg mean).
    **kwargs
        FedAvg's own arguments (sampling, wire keys).
    """

    def __init__(self, *, server_learning_rate: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not server_learning_rate > 0:
            raise ValueError("server_learning_rate must be > 0")
        self.server_learning_rate = float(server_learning_rate)
        self.control: np.ndarray | None = None
        self.round_model: np.ndarray | None = None
        self.sampled = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, carrying c next to the model."""
        if set(arrays.keys()) != {wire.MODEL}:
            raise RoundFailed(
                f"SCAFFOLD runs on the packed model '{wire.MODEL}', got {sorted(arrays.keys())}"
            )
        model = np.asarray(arrays[wire.MODEL].numpy(), dtype=np.float32)
        if self.control is None:
            self.control = np.zeros_like(model)
        if self.control.shape != model.shape:
            raise RoundFailed(
                f"SCAFFOLD control variate has {self.control.size} values, the model {model.size}"
            )
        self.round_model = model.copy()
        record = ArrayRecord(
            {wire.MODEL: Array(model), wire.SCAFFOLD_CONTROL: Array(self.control.copy())}
        )
        messages = list(super().configure_train(server_round, record, config, grid))
        self.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted means, then the server step on w and the control step on c."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.round_model is None or self.control is None:
            return arrays, metrics
        if set(arrays.keys()) != {wire.MODEL, wire.SCAFFOLD_CONTROL}:
            raise RoundFailed(
                f"round {server_round}: SCAFFOLD replies carry {sorted(arrays.keys())}, not "
                f"'{wire.MODEL}' and '{wire.SCAFFOLD_CONTROL}'"
            )
        mean_w = arrays[wire.MODEL].numpy().astype(np.float32)
        mean_c = arrays[wire.SCAFFOLD_CONTROL].numpy().astype(np.float32)
        if self.server_learning_rate == 1.0:
            model = mean_w  # exactly FedAvg's mean, no rounding from w + (mean - w)
        else:
            step = np.float32(self.server_learning_rate) * (mean_w - self.round_model)
            model = (self.round_model + step).astype(np.float32)
        # Plain replies are one silo each; the secure step's single reply says how many it holds.
        included = sum(
            int(next(iter(r.content.metric_records.values())).get(CONTRIBUTORS, 1))
            for r in replies
            if not r.has_error()
        )
        share = np.float32(min(1.0, included / max(self.sampled, 1)))
        self.control = (self.control + share * (mean_c - self.control)).astype(np.float32)
        out = MetricRecord(dict(metrics or {}))
        out["scaffold-control-norm"] = float(np.linalg.norm(self.control))
        return ArrayRecord({wire.MODEL: Array(model)}), out
