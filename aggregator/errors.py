"""The consortium side's one exception hierarchy."""

from __future__ import annotations

from fedsilo_base.errors import UserError


class AggregatorError(UserError):
    """Base class of every error raised by the aggregator; the message is one line."""


class RoundFailed(AggregatorError):
    """A round could not produce a new global model; the previous model stays in force."""


class NotEnoughSilos(AggregatorError):
    """Fewer silos than the plan's minimum connected, answered or agreed."""


class StrategyRefused(AggregatorError):
    """The plan asks for a strategy that cannot work under its settings."""
