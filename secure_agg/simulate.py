"""In-memory driver: real clients and a real server wired through serialised messages.

Every message goes through :func:`~secure_agg.messages.pack` / ``unpack`` and every client
state through ``to_bytes`` / ``from_bytes`` between stages, as if each stage ran in a fresh
process, so nothing is shared by reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .client import ClientState, SecAggClient
from .errors import ProtocolAbort
from .keys import IdentityKey, Roster
from .messages import STAGES, pack, unpack
from .round_config import RoundConfig
from .server import AggregateBounds, AggregateResult, ServerCoordinator

#: Callback that sees (stage, direction, silo, message) and may return a replacement.
Tap = Callable[[str, str, str, dict[str, Any]], dict[str, Any] | None]


def _wire(msg: Mapping[str, Any]) -> dict[str, Any]:
    return unpack(pack(msg))


@dataclass
class Federation:
    """Identities, each silo's own roster copy and a client object per silo."""

    names: list[str]
    identities: dict[str, IdentityKey]
    rosters: dict[str, Roster]
    clients: dict[str, SecAggClient] = field(default_factory=dict)

    @classmethod
    def create(cls, names: Sequence[str]) -> Federation:
        """Fresh identity keys; every silo gets its own (JSON round-tripped) roster copy."""
        ids = {n: IdentityKey.generate() for n in names}
        master = Roster({n: k.public_bytes for n, k in ids.items()})
        rosters = {n: Roster.from_json(master.to_json()) for n in names}
        fed = cls(list(names), ids, rosters)
        fed.clients = {n: SecAggClient(n, ids[n], rosters[n]) for n in names}
        return fed

    def server_roster(self) -> Roster:
        """A roster copy for the server (optional server-side verification)."""
        return Roster({n: k.public_bytes for n, k in self.identities.items()})


def context_hash_of(data: bytes) -> bytes:
    """What an adapter would compute over the model + config it received (SHA-256)."""
    return hashlib.sha256(data).digest()


def run_in_memory(
    vectors: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    weights: Mapping[str, float] | Sequence[float],
    counters: Mapping[str, Mapping[str, float]] | Sequence[Mapping[str, float]] | None = None,
    *,
    dropouts: Mapping[str, Sequence[str]] | None = None,
    threshold: int | None = None,
    run_id: str = "run-1",
    round_: int = 1,
    federation: Federation | None = None,
    context_hashes: Mapping[str, bytes] | None = None,
    tap: Tap | None = None,
    server_roster: bool = True,
    bounds: AggregateBounds | None = None,
    **codec: Any,
) -> AggregateResult:
    """Run one full round in memory and return the server's decoded result.

    ``dropouts`` maps a stage name (``advertise``, ``share``, ``mask``, ``consistency``,
    ``unmask``) to silos that vanish before replying to that stage. ``counters`` per silo
    must use names declared via ``counter_names=`` (default: the union of their keys).
    ``tap`` sees every message (after serialisation) and may replace it: a test hook to play
    a dishonest server (or a dishonest silo, on replies) or to record what the server
    receives. ``bounds`` are the server's checks of the counter sums. Raises what the server
    or a client raises (ProtocolAbort subclasses, ConfigurationError).
    """
    if isinstance(vectors, Mapping):
        names = list(vectors)
        vecs = dict(vectors)
    else:
        names = [f"silo-{i:02d}" for i in range(len(vectors))]
        vecs = dict(zip(names, vectors, strict=True))
    w = dict(weights) if isinstance(weights, Mapping) else dict(zip(names, weights, strict=True))
    if counters is None:
        cnt: dict[str, Mapping[str, float]] = {n: {} for n in names}
    elif isinstance(counters, Mapping):
        cnt = dict(counters)
    else:
        cnt = dict(zip(names, counters, strict=True))
    codec.setdefault("counter_names", tuple(sorted({k for c in cnt.values() for k in c})))
    length = len(next(iter(vecs.values())))
    cfg = RoundConfig(
        run_id=run_id,
        round=round_,
        participants=tuple(names),
        vector_length=length,
        threshold=threshold,
        **codec,
    )
    fed = federation or Federation.create(names)
    server = ServerCoordinator(cfg, fed.server_roster() if server_roster else None, bounds)
    drops = {s: set(dropouts.get(s, ())) if dropouts else set() for s in STAGES}
    gone: set[str] = set()
    ctx = context_hashes or {
        n: context_hash_of(b"global-model-v1|" + cfg.codec_json().encode()) for n in names
    }
    states: dict[str, bytearray] = {}

    def deliver(
        stage: str,
        requests: dict[str, dict[str, Any]],
        act: Callable[[str, ClientState | None, dict[str, Any]], tuple[Any, Any]],
    ) -> dict[str, dict[str, Any]]:
        gone.update(drops[stage])
        replies: dict[str, dict[str, Any]] = {}
        for name, req in requests.items():
            if name in gone:
                continue
            req = _wire(req)
            if tap is not None:
                req = tap(stage, "request", name, req) or req
            blob = states.pop(name, None)
            state = ClientState.from_bytes(blob) if blob is not None else None
            if blob is not None:
                blob[:] = bytes(len(blob))
            new_state, reply = act(name, state, req)
            if new_state is not None and not new_state.wiped:
                states[name] = new_state.to_bytes()
            reply = _wire(reply)
            if tap is not None:
                reply = tap(stage, "reply", name, reply) or reply
            replies[name] = reply
        return replies

    try:
        reqs = server.advertise_requests()
        reps = deliver("advertise", reqs, lambda n, s, r: fed.clients[n].advertise(r, ctx[n]))
        reqs = server.collect_advertisements(reps)
        reps = deliver("share", reqs, lambda n, s, r: (s, fed.clients[n].share(s, r)))
        reqs = server.collect_shares(reps)
        reps = deliver(
            "mask",
            reqs,
            lambda n, s, r: (s, fed.clients[n].mask(s, r, vecs[n], w[n], cnt.get(n, {}))),
        )
        reqs = server.collect_masked(reps)
        reps = deliver("consistency", reqs, lambda n, s, r: (s, fed.clients[n].consistency(s, r)))
        reqs = server.collect_consistency(reps)
        reps = deliver("unmask", reqs, lambda n, s, r: (s, fed.clients[n].unmask(s, r)))
        return server.collect_unmask(reps)
    except ProtocolAbort:
        raise
    finally:
        for blob in states.values():
            blob[:] = bytes(len(blob))
