"""Public parameters of one secure-aggregation round, and the transcripts both sides compute.

:class:`RoundConfig` is what the server chooses and every silo checks; the commitment helpers
here are computed by a silo (:mod:`secure_agg.client`) and re-checked by the server
(:mod:`secure_agg.server`), so they live below both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .codec import FixedPointCodec
from .errors import ConfigurationError, MalformedMessage
from .keys import check_name, transcript

_CODEC_KEYS = (
    "vector_length",
    "clip",
    "frac_bits",
    "bits",
    "weight_bits",
    "w_max",
    "rounding",
    "counter_names",
    "counter_frac_bits",
    "clip_warn_fraction",
    "weight_proof",
)
MAX_PARTICIPANTS = 1000
"""Most silos one round may name (Shamir x coordinates and the overflow headroom bound it
long before; a longer list is refused before any per-silo work)."""
COMMIT_BYTES = 64


def default_threshold(n: int) -> int:
    """t = max(3, floor(2n/3) + 1), capped at n; n < 3 is refused (ConfigurationError)."""
    if n < 3:
        raise ConfigurationError(
            f"secure aggregation needs at least 3 contributors, got {n}: with fewer, the sum "
            f"reveals a single silo's update to the others"
        )
    return min(n, max(3, 2 * n // 3 + 1))


@dataclass(frozen=True)
class RoundConfig:
    """Public parameters of one round, chosen by the server and checked by every silo."""

    run_id: str
    round: int
    participants: tuple[str, ...]
    vector_length: int
    threshold: int | None = None
    clip: float = 8.0
    frac_bits: int = 22
    bits: int = 32
    weight_bits: int = 24
    w_max: float = 10_000.0
    rounding: str = "nearest"
    counter_names: tuple[str, ...] = ()
    counter_frac_bits: int = 16
    clip_warn_fraction: float = 0.01
    weight_proof: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ConfigurationError("run_id must be a non-empty string")
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
            raise ConfigurationError("round must be a non-negative int")
        if not isinstance(self.participants, tuple | list) or not (
            0 < len(self.participants) <= MAX_PARTICIPANTS
        ):
            raise ConfigurationError(f"participants must be a list of 1..{MAX_PARTICIPANTS} names")
        if self.threshold is not None and (
            not isinstance(self.threshold, int) or isinstance(self.threshold, bool)
        ):
            raise ConfigurationError("threshold must be an int")
        names = tuple(sorted(check_name(p) for p in self.participants))
        if len(set(names)) != len(names):
            raise ConfigurationError("participants must be distinct")
        object.__setattr__(self, "participants", names)
        object.__setattr__(self, "counter_names", tuple(self.counter_names))
        t = default_threshold(len(names)) if self.threshold is None else int(self.threshold)
        if not default_threshold(len(names)) <= t <= len(names):
            raise ConfigurationError(
                f"threshold {t} must be in [{default_threshold(len(names))}, {len(names)}]"
            )
        object.__setattr__(self, "threshold", t)
        self.codec()  # runs the headroom checks before any round starts

    @property
    def t(self) -> int:
        """The threshold as an int."""
        return int(self.threshold or 0)

    def codec_json(self) -> str:
        """Canonical JSON of the codec parameters (the ``config`` field of ADVERTISE)."""
        d = {k: getattr(self, k) for k in _CODEC_KEYS}
        d["counter_names"] = list(self.counter_names)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def codec(self) -> FixedPointCodec:
        """The codec these parameters define."""
        kw = {k: getattr(self, k) for k in _CODEC_KEYS}
        return FixedPointCodec(n_silos=len(self.participants), **kw)

    def setup_digest(self) -> bytes:
        """SHA-256 over run, round, participants, threshold and codec config."""
        return hashlib.sha256(
            transcript(
                "setup", self.run_id, self.round, list(self.participants), self.t, self.codec_json()
            )
        ).digest()

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> RoundConfig:
        """Rebuild the config from a validated ADVERTISE request."""
        try:
            d = json.loads(request["config"])
            if not isinstance(d, dict) or set(d) != set(_CODEC_KEYS):
                raise MalformedMessage("config must carry exactly the codec parameters")
            d["counter_names"] = tuple(d["counter_names"])
            return cls(
                run_id=request["run_id"],
                round=request["round"],
                participants=tuple(request["participants"]),
                threshold=request["threshold"],
                **d,
            )
        except (ValueError, TypeError) as exc:
            raise MalformedMessage(f"unusable round config: {exc}") from None


def b_commitment(b: bytes | bytearray, run_id: str, round_: int, name: str) -> bytes:
    """SHA-256 commitment to a silo's mask seed ``b``, bound to run, round and silo; sent at
    ADVERTISE, checked by the server when it rebuilds ``b`` at UNMASK."""
    return hashlib.sha256(transcript("b-commit", run_id, round_, name, bytes(b))).digest()


def share_commitment(
    run_id: str,
    round_: int,
    dealer: str,
    recipient: str,
    b_share: bytes | bytearray,
    sk_share: bytes | bytearray,
) -> bytes:
    """64 bytes: SHA-256 of the b-share, then of the sk-share, each bound to run, round, dealer
    and recipient. The dealer signs it; the server checks every revealed share against it."""
    return b"".join(
        hashlib.sha256(transcript(label, run_id, round_, dealer, recipient, bytes(share))).digest()
        for label, share in (("share-commit-b", b_share), ("share-commit-sk", sk_share))
    )


def commit_transcript(
    run_id: str, round_: int, dealer: str, recipient: str, commitment: bytes
) -> bytes:
    """What a dealer signs for the share it deals to ``recipient``."""
    return transcript("share-commit", run_id, round_, dealer, recipient, commitment)


def weight_proof_context(run_id: str, round_: int, name: str) -> bytes:
    """The context a silo's weight range proof is bound to (run, round, silo)."""
    return transcript("weight-proof", run_id, round_, name)
