"""Errors raised while reading, validating or using a training plan."""

from __future__ import annotations

from fedsilo_base.errors import UserError


class PlanError(UserError):
    """Base class of every training-plan error; the message is one line for a person."""


class PlanValidationError(PlanError):
    """A plan file is malformed: the message names the key, the line and what is wrong."""

    def __init__(self, message: str, *, source: str = "", key: str = "", line: int | None = None):
        self.source = source
        self.key = key
        self.line = line
        super().__init__(message)


class UnknownModelError(PlanError):
    """The plan names a model that is not in the registry of MONAI networks."""
