"""Exception hierarchy of :mod:`secure_agg`.

Every error raised on purpose by this package derives from :class:`SecureAggError`.
A silo that refuses to go on raises a :class:`ProtocolAbort` subclass whose ``reason`` says
why in plain words (and ``peer`` names the silo involved, when there is one).
"""

from __future__ import annotations

from fedsilo_base.errors import UserError


class SecureAggError(UserError):
    """Base class of every error raised by :mod:`secure_agg`."""


class ConfigurationError(SecureAggError):
    """A configuration or caller input cannot be used safely (e.g. overflow headroom)."""


class ProtocolAbort(SecureAggError):
    """A party refuses to continue the round; ``reason`` says why, ``peer`` who is involved."""

    def __init__(self, reason: str, *, peer: str | None = None) -> None:
        self.reason = reason
        self.peer = peer
        super().__init__(reason)


class UnknownPeer(ProtocolAbort):
    """A message names a silo that is not in the local roster (or not in the round)."""


class BadSignature(ProtocolAbort):
    """An Ed25519 signature, a GCM tag or a key commitment does not verify."""


class InconsistentView(ProtocolAbort):
    """The server showed different models, configurations or participant sets to silos."""


class BelowThreshold(ProtocolAbort):
    """Fewer than ``t`` silos remain, so secure aggregation cannot (or must not) go on."""


class ReplayDetected(ProtocolAbort):
    """A message belongs to another run, round or stage than the one in progress."""


class MalformedMessage(ProtocolAbort):
    """A message misses fields or has fields of the wrong type, dtype or length."""
