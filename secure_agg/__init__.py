"""Secure aggregation for fedsilo: the server learns only the SUM of the silos' vectors.

Bonawitz et al. (2017) with a dishonest-server hardening: round keys signed by Ed25519
identity keys checked against each silo's OWN roster, a consistency round over the survivor
set and the model context, refusal to reveal both shares of one peer, run/round/stage binding
of every message. Pure Python + numpy + cryptography (no flwr import). Spec and threat model:
``docs/secure_agg.md``.

Adapter API
===========

Messages are flat dicts of ``str -> str | int | bytes | list[str] | list[bytes] |
np.ndarray`` (fields in :data:`secure_agg.messages.SCHEMAS`); every one carries
``protocol``, ``run_id``, ``round``, ``stage``; replies also ``silo``.
:func:`~secure_agg.messages.pack` / :func:`~secure_agg.messages.unpack` turn them into bytes.

Server side (one :class:`ServerCoordinator` per round; each ``collect_*`` takes
``{silo: reply}`` of whoever answered and returns ``{silo: request}`` for the next stage)::

    cfg = RoundConfig(run_id, round, participants, vector_length, threshold=None,
                      clip=8.0, frac_bits=22, w_max=10_000.0, counter_names=("examples",))
    srv = ServerCoordinator(cfg, roster=None,   # roster: optional extra checks
                            bounds=None)        # AggregateBounds: counter sums to check
    reqs = srv.advertise_requests()             # ADVERTISE  {participants, threshold, config}
    reqs = srv.collect_advertisements(replies)  # -> SHARE   {peers, c_pks, s_pks, b_commits,
                                                #    context_hashes, setup_digests, signatures}
    reqs = srv.collect_shares(replies)          # -> MASK    {u2, share_from, ciphertexts}
    reqs = srv.collect_masked(replies)          # -> CONSISTENCY {survivors}
    reqs = srv.collect_consistency(replies)     # -> UNMASK  {survivors, dropped, signers,
                                                #    signatures}
    result = srv.collect_unmask(replies)        # AggregateResult: mean = sum(w d)/sum(w),
                                                # weight_sum, counters, clipped_values,
                                                # clipped_fraction, warnings, survivors, dropped,
                                                # bad_shares (silo -> why its share was dropped)
                                                # ImplausibleAggregate if the sum is out of bounds

Client side (a :class:`SecAggClient` per silo from its identity key and roster; the round
state travels between stages as bytes, e.g. in a 0600 file)::

    client = SecAggClient(name, IdentityKey.load(path), Roster.load(path))
    state, reply = client.advertise(req, context_hash)  # reply {c_pk, s_pk, b_commit,
                                                        #   context_hash, setup_digest,
                                                        #   signature}
    blob = state.to_bytes(); state = ClientState.from_bytes(blob)
    reply = client.share(state, req)                    # {recipients, ciphertexts, commit_to,
                                                        #   share_commits, commit_signatures}
    reply = client.mask(state, req, vector_f32, weight, counters)  # {masked: uint32 array,
                                                        #   weight_commit, weight_proof: b""
                                                        #   unless cfg.weight_proof}
    reply = client.consistency(state, req)              # {signature}
    reply = client.unmask(state, req)                   # {b_owners, b_shares, sk_owners,
                                                        #   sk_shares}; state wiped after
    state.wipe()                                        # on abort / at round end

A refusal raises a :class:`ProtocolAbort` subclass (``.reason``, ``.peer``) and wipes the
state; the server raises :class:`BelowThreshold` when fewer than ``t`` silos remain.
:func:`secure_agg.simulate.run_in_memory` wires all of this in memory.
"""

from .client import ClientState, SecAggClient
from .codec import DecodedSum, FixedPointCodec, cap_weight, check_headroom
from .errors import (
    BadSignature,
    BelowThreshold,
    ConfigurationError,
    ImplausibleAggregate,
    InconsistentView,
    MalformedMessage,
    ProtocolAbort,
    ReplayDetected,
    SecureAggError,
    UnknownPeer,
)
from .keys import IdentityKey, Roster
from .messages import SCHEMAS, STAGES, pack, unpack
from .round_config import RoundConfig, default_threshold
from .server import AggregateBounds, AggregateResult, ServerCoordinator

__all__ = [
    "SCHEMAS",
    "STAGES",
    "AggregateBounds",
    "AggregateResult",
    "BadSignature",
    "BelowThreshold",
    "ClientState",
    "ConfigurationError",
    "DecodedSum",
    "FixedPointCodec",
    "IdentityKey",
    "ImplausibleAggregate",
    "InconsistentView",
    "MalformedMessage",
    "ProtocolAbort",
    "ReplayDetected",
    "Roster",
    "RoundConfig",
    "SecAggClient",
    "SecureAggError",
    "ServerCoordinator",
    "UnknownPeer",
    "cap_weight",
    "check_headroom",
    "default_threshold",
    "pack",
    "unpack",
]
