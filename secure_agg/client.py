"""A silo's side of the secure aggregation round: its per-round state and stage handlers.

Stage order (requests from the server, replies from silos)::

    ADVERTISE -> SHARE -> MASK -> CONSISTENCY -> UNMASK

See ``docs/secure_agg.md`` for the specification, :mod:`secure_agg.server` for the other side.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import range_proof, shamir
from .errors import (
    BadSignature,
    BelowThreshold,
    ConfigurationError,
    InconsistentView,
    MalformedMessage,
    ProtocolAbort,
    ReplayDetected,
    SecureAggError,
    UnknownPeer,
)
from .keys import (
    IdentityKey,
    Roster,
    check_name,
    derive,
    pairwise_key,
    transcript,
    x25519_generate,
    x25519_public,
)
from .messages import new_message, validate
from .prg import MaskAccumulator
from .round_config import (
    COMMIT_BYTES,
    RoundConfig,
    b_commitment,
    commit_transcript,
    default_threshold,
    share_commitment,
    weight_proof_context,
)

_MIN_CONTEXT = 16
_MAX_CONTEXT = 64


def _sorted_unique(names: list[str], what: str) -> list[str]:
    if names != sorted(set(names)):
        raise MalformedMessage(f"{what} must be sorted and without duplicates")
    return names


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))


@dataclass
class ClientState:
    """Everything a silo keeps between stages (serialisable; holds round secrets)."""

    name: str
    run_id: str
    round: int
    stage: str
    config: str  # ADVERTISE request's config JSON
    participants: list[str]
    threshold: int
    context_hash: bytes
    setup_digest: bytes
    c_sk: bytearray
    s_sk: bytearray
    b: bytearray
    peers: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # U1: (c_pk, s_pk)
    shares: dict[str, tuple[bytearray, bytearray]] = field(default_factory=dict)  # (b, sk)
    u2: list[str] = field(default_factory=list)
    u3: list[str] = field(default_factory=list)
    wiped: bool = False

    def wipe(self) -> None:
        """Overwrite and drop every round secret; the state can no longer be used."""
        for buf in (self.c_sk, self.s_sk, self.b):
            _wipe(buf)
        for b_share, sk_share in self.shares.values():
            _wipe(b_share)
            _wipe(sk_share)
        self.shares.clear()
        self.peers.clear()
        self.stage = "wiped"
        self.wiped = True

    def to_bytes(self) -> bytearray:
        """Serialise (contains secrets: store it 0600 and wipe the returned bytearray)."""
        e = lambda b: base64.b64encode(bytes(b)).decode()  # noqa: E731
        d = {
            "v": 1,
            "name": self.name,
            "run_id": self.run_id,
            "round": self.round,
            "stage": self.stage,
            "config": self.config,
            "participants": self.participants,
            "threshold": self.threshold,
            "context_hash": e(self.context_hash),
            "setup_digest": e(self.setup_digest),
            "c_sk": e(self.c_sk),
            "s_sk": e(self.s_sk),
            "b": e(self.b),
            "peers": {k: [e(c), e(s)] for k, (c, s) in self.peers.items()},
            "shares": {k: [e(b), e(s)] for k, (b, s) in self.shares.items()},
            "u2": self.u2,
            "u3": self.u3,
            "wiped": self.wiped,
        }
        return bytearray(b"FSAS1" + json.dumps(d).encode())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> ClientState:
        """Inverse of :meth:`to_bytes`; raises MalformedMessage on a corrupt blob."""
        try:
            if bytes(data[:5]) != b"FSAS1":
                raise MalformedMessage("not a secure_agg client state")
            d = json.loads(bytes(data[5:]))
            if d.get("v") != 1:
                raise MalformedMessage("unsupported client state version")
            u = lambda s: base64.b64decode(s, validate=True)  # noqa: E731
            return cls(
                name=d["name"],
                run_id=d["run_id"],
                round=d["round"],
                stage=d["stage"],
                config=d["config"],
                participants=list(d["participants"]),
                threshold=int(d["threshold"]),
                context_hash=u(d["context_hash"]),
                setup_digest=u(d["setup_digest"]),
                c_sk=bytearray(u(d["c_sk"])),
                s_sk=bytearray(u(d["s_sk"])),
                b=bytearray(u(d["b"])),
                peers={k: (u(c), u(s)) for k, (c, s) in d["peers"].items()},
                shares={k: (bytearray(u(b)), bytearray(u(s))) for k, (b, s) in d["shares"].items()},
                u2=list(d["u2"]),
                u3=list(d["u3"]),
                wiped=bool(d["wiped"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"corrupt client state: {exc}") from None


_R = TypeVar("_R")


class SecAggClient:
    """A silo's side of the protocol: long-term identity + its own roster, no round state.

    Each stage method takes the :class:`ClientState` and the server's request dict and returns
    the reply dict. On any refusal the state is wiped and a ProtocolAbort (or
    ConfigurationError for bad local inputs) is raised.
    """

    def __init__(
        self, name: str, identity: IdentityKey, roster: Roster, *, min_threshold: int | None = None
    ) -> None:
        self.name = check_name(name)
        self.identity = identity
        self.roster = roster
        self.min_threshold = min_threshold
        if name not in roster:
            raise ConfigurationError(f"our own name {name!r} is not in our roster")
        if roster[name] != identity.public_bytes:
            raise ConfigurationError(f"our roster entry for {name!r} is not our identity key")

    # ------------------------------------------------------------------ helpers
    def _guard(self, state: ClientState | None, fn: Callable[[], _R]) -> _R:
        try:
            return fn()
        except SecureAggError:
            if state is not None:
                state.wipe()
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if state is not None:
                state.wipe()
            raise MalformedMessage(f"{self.name}: unusable message: {exc!r}") from None

    def _expect(self, state: ClientState, request: Any, stage: str, previous: str) -> dict:
        if state.wiped:
            raise ReplayDetected(f"{self.name}: round state was wiped; start a new round")
        msg = validate(request, stage, "request", run_id=state.run_id, round_=state.round)
        if state.stage != previous:
            raise ReplayDetected(
                f"{self.name}: {stage!r} request but our round is after {state.stage!r}"
            )
        return msg

    def _reply(self, state: ClientState, stage: str, **fields: Any) -> dict[str, Any]:
        state.stage = stage
        return new_message(state.run_id, state.round, stage, silo=self.name, **fields)

    # ------------------------------------------------------------------ ADVERTISE
    def advertise(
        self, request: Mapping[str, Any], context_hash: bytes
    ) -> tuple[ClientState, dict[str, Any]]:
        """Start a round: check the setup, make ephemeral keys, return (state, signed reply).

        ``context_hash`` is computed by the caller over the global model and config it
        received for this round (16..64 bytes); every peer must report the same one.
        """
        return self._guard(None, lambda: self._advertise(request, context_hash))

    def _advertise(
        self, request: Mapping[str, Any], context_hash: bytes
    ) -> tuple[ClientState, dict[str, Any]]:
        msg = validate(request, "advertise", "request")
        if not isinstance(context_hash, bytes) or not (
            _MIN_CONTEXT <= len(context_hash) <= _MAX_CONTEXT
        ):
            raise ConfigurationError("context_hash must be 16..64 bytes")
        participants = _sorted_unique(msg["participants"], "participants")
        for p in participants:
            if p not in self.roster:
                raise UnknownPeer(
                    f"{self.name}: participant {p!r} is not in our roster; refusing the round",
                    peer=p,
                )
        if self.name not in participants:
            raise InconsistentView(f"{self.name}: we are not in the participant list")
        n = len(participants)
        t_min = max(default_threshold(n), self.min_threshold or 0)
        if not t_min <= msg["threshold"] <= n:
            raise ProtocolAbort(
                f"{self.name}: threshold {msg['threshold']} for {n} participants is outside "
                f"our policy [{t_min}, {n}]"
            )
        cfg = RoundConfig.from_request(msg)
        c_sk, c_pk = x25519_generate()
        s_sk, s_pk = x25519_generate()
        b = bytearray(os.urandom(32))
        state = ClientState(
            name=self.name,
            run_id=cfg.run_id,
            round=cfg.round,
            stage="start",
            config=msg["config"],
            participants=participants,
            threshold=cfg.t,
            context_hash=context_hash,
            setup_digest=cfg.setup_digest(),
            c_sk=c_sk,
            s_sk=s_sk,
            b=b,
        )
        b_commit = b_commitment(b, cfg.run_id, cfg.round, self.name)
        sig = self.identity.sign(
            self._advert_transcript(
                state, self.name, c_pk, s_pk, b_commit, context_hash, state.setup_digest
            )
        )
        return state, self._reply(
            state,
            "advertise",
            c_pk=c_pk,
            s_pk=s_pk,
            b_commit=b_commit,
            context_hash=context_hash,
            setup_digest=state.setup_digest,
            signature=sig,
        )

    @staticmethod
    def _advert_transcript(
        state: ClientState,
        name: str,
        c_pk: bytes,
        s_pk: bytes,
        b_commit: bytes,
        context_hash: bytes,
        setup_digest: bytes,
    ) -> bytes:
        return transcript(
            "advertise",
            state.run_id,
            state.round,
            name,
            c_pk,
            s_pk,
            b_commit,
            context_hash,
            setup_digest,
        )

    # ------------------------------------------------------------------ SHARE
    def share(self, state: ClientState, request: Mapping[str, Any]) -> dict[str, Any]:
        """Verify every advertisement against our roster, deal encrypted Shamir shares."""
        return self._guard(state, lambda: self._share(state, request))

    def _share(self, state: ClientState, request: Mapping[str, Any]) -> dict[str, Any]:
        msg = self._expect(state, request, "share", "advertise")
        peers = _sorted_unique(msg["peers"], "peers")
        u0 = set(state.participants)
        own = (x25519_public(state.c_sk), x25519_public(state.s_sk))
        seen_keys: set[bytes] = set()
        keys: dict[str, tuple[bytes, bytes]] = {}
        for i, p in enumerate(peers):
            if p not in self.roster:
                raise UnknownPeer(f"{self.name}: peer {p!r} is not in our roster", peer=p)
            if p not in u0:
                raise InconsistentView(
                    f"{self.name}: peer {p!r} was not announced as a participant", peer=p
                )
            c_pk, s_pk = msg["c_pks"][i], msg["s_pks"][i]
            b_commit, ctx, setup = (
                msg["b_commits"][i],
                msg["context_hashes"][i],
                msg["setup_digests"][i],
            )
            if len(c_pk) != 32 or len(s_pk) != 32 or len(b_commit) != 32:
                raise MalformedMessage(f"{self.name}: keys of {p!r} have wrong lengths", peer=p)
            if not hmac.compare_digest(setup, state.setup_digest):
                raise InconsistentView(
                    f"{self.name}: {p!r} was given a different round setup (participants, "
                    f"threshold or codec config) than we were",
                    peer=p,
                )
            if not hmac.compare_digest(ctx, state.context_hash):
                raise InconsistentView(
                    f"{self.name}: {p!r} was sent a different model/config (context hash "
                    f"differs from ours)",
                    peer=p,
                )
            self.roster.verify(
                p,
                self._advert_transcript(state, p, c_pk, s_pk, b_commit, ctx, setup),
                msg["signatures"][i],
            )
            if p == self.name and (c_pk, s_pk) != own:
                raise BadSignature(f"{self.name}: our own advertisement was altered", peer=p)
            if c_pk in seen_keys or s_pk in seen_keys or c_pk == s_pk:
                raise InconsistentView(f"{self.name}: key reuse across peers at {p!r}", peer=p)
            seen_keys.update((c_pk, s_pk))
            keys[p] = (c_pk, s_pk)
        if self.name not in keys:
            raise InconsistentView(f"{self.name}: our own advertisement was dropped")
        if len(keys) < state.threshold:
            raise BelowThreshold(
                f"{self.name}: only {len(keys)} silos advertised keys, threshold is "
                f"{state.threshold}"
            )
        xs = {p: state.participants.index(p) + 1 for p in peers}
        b_shares = shamir.split(state.b, state.threshold, list(xs.values()))
        sk_shares = shamir.split(state.s_sk, state.threshold, list(xs.values()))
        recipients, ciphertexts, commits, commit_sigs = [], [], [], []
        for p in peers:
            x = xs[p]
            commit = share_commitment(
                state.run_id, state.round, self.name, p, b_shares[x], sk_shares[x]
            )
            commits.append(commit)
            commit_sigs.append(
                self.identity.sign(
                    commit_transcript(state.run_id, state.round, self.name, p, commit)
                )
            )
            if p == self.name:
                state.shares[p] = (bytearray(b_shares[x]), bytearray(sk_shares[x]))
                continue
            key = pairwise_key(
                state.c_sk,
                keys[p][0],
                run_id=state.run_id,
                round_=state.round,
                purpose="share-enc",
                name_a=self.name,
                name_b=p,
            )
            nonce = os.urandom(12)
            ad = transcript("share", state.run_id, state.round, self.name, p)
            ct = AESGCM(key).encrypt(nonce, b_shares[x] + sk_shares[x], ad)
            recipients.append(p)
            ciphertexts.append(nonce + ct)
        state.peers = keys
        return self._reply(
            state,
            "share",
            recipients=recipients,
            ciphertexts=ciphertexts,
            commit_to=list(peers),
            share_commits=commits,
            commit_signatures=commit_sigs,
        )

    # ------------------------------------------------------------------ MASK
    def mask(
        self,
        state: ClientState,
        request: Mapping[str, Any],
        vector: np.ndarray,
        weight: float,
        counters: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Store the shares addressed to us, then upload encode(w*d, w, counters) + masks."""
        return self._guard(state, lambda: self._mask(state, request, vector, weight, counters))

    def _mask(
        self,
        state: ClientState,
        request: Mapping[str, Any],
        vector: np.ndarray,
        weight: float,
        counters: Mapping[str, float] | None,
    ) -> dict[str, Any]:
        msg = self._expect(state, request, "mask", "share")
        u2 = _sorted_unique(msg["u2"], "u2")
        for p in u2:
            if p not in state.peers:
                raise InconsistentView(f"{self.name}: {p!r} in U2 never advertised keys", peer=p)
        if self.name not in u2:
            raise InconsistentView(f"{self.name}: we are missing from U2")
        if len(u2) < state.threshold:
            raise BelowThreshold(
                f"{self.name}: only {len(u2)} silos shared keys, threshold is {state.threshold}"
            )
        senders = msg["share_from"]
        if sorted(senders) != [p for p in u2 if p != self.name]:
            raise InconsistentView(
                f"{self.name}: ciphertexts are not exactly one from each other member of U2"
            )
        my_x = state.participants.index(self.name) + 1
        codec = RoundConfig.from_request(
            {
                "run_id": state.run_id,
                "round": state.round,
                "participants": state.participants,
                "threshold": state.threshold,
                "config": state.config,
            }
        ).codec()
        codec.check_vector(vector)  # a wrong length is refused before anything is allocated
        for i, (p, blob) in enumerate(zip(senders, msg["ciphertexts"], strict=True)):
            key = pairwise_key(
                state.c_sk,
                state.peers[p][0],
                run_id=state.run_id,
                round_=state.round,
                purpose="share-enc",
                name_a=self.name,
                name_b=p,
            )
            ad = transcript("share", state.run_id, state.round, p, self.name)
            try:
                plain = bytearray(AESGCM(key).decrypt(blob[:12], blob[12:], ad))
            except (InvalidTag, ValueError):
                raise BadSignature(
                    f"{self.name}: share ciphertext from {p!r} does not authenticate", peer=p
                ) from None
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise MalformedMessage(f"{self.name}: share from {p!r} has a bad length", peer=p)
            b_sh, sk_sh = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            if (
                shamir.parse_share(bytes(b_sh))[0] != my_x
                or shamir.parse_share(bytes(sk_sh))[0] != my_x
            ):
                raise MalformedMessage(f"{self.name}: share from {p!r} is for another x", peer=p)
            self._check_share_commit(state, p, b_sh, sk_sh, msg, i)
            state.shares[p] = (b_sh, sk_sh)
            _wipe(plain)
        commit_bytes, proof = b"", b""
        blind = None
        if codec.weight_proof:
            a_q = codec.quantize_weight(weight)
            blind = range_proof.random_blind()
            commitment = range_proof.commit(a_q, blind)
            commit_bytes = range_proof.element_bytes(commitment)
            proof = range_proof.prove_at_most(
                a_q,
                blind,
                codec.weight_bits,
                weight_proof_context(state.run_id, state.round, self.name),
            )
        acc = np.empty(codec.total_len, codec.dtype)
        codec.encode_into(acc, vector, weight, counters, blind)
        plus = [derive(state.b, "self-mask", state.run_id, state.round, self.name)]
        minus = []
        for p in u2:
            if p == self.name:
                continue
            seed = pairwise_key(
                state.s_sk,
                state.peers[p][1],
                run_id=state.run_id,
                round_=state.round,
                purpose="mask",
                name_a=self.name,
                name_b=p,
            )
            (plus if self.name < p else minus).append(seed)
        masker = MaskAccumulator(codec.dtype)
        masker.apply(acc, plus=plus, minus=minus)
        masker.wipe()
        state.u2 = u2
        return self._reply(
            state, "mask", masked=acc, weight_commit=commit_bytes, weight_proof=proof
        )

    def _check_share_commit(
        self,
        state: ClientState,
        dealer: str,
        b_share: bytearray,
        sk_share: bytearray,
        msg: Mapping[str, Any],
        i: int,
    ) -> None:
        """The dealer signed a commitment to exactly the shares we decrypted (else it dealt
        something else than it committed to, or the server altered the commitment)."""
        commit = msg["share_commits"][i]
        if len(commit) != COMMIT_BYTES:
            raise MalformedMessage(
                f"{self.name}: share commitment of {dealer!r} has a bad length", peer=dealer
            )
        self.roster.verify(
            dealer,
            commit_transcript(state.run_id, state.round, dealer, self.name, commit),
            msg["commit_signatures"][i],
        )
        mine = share_commitment(state.run_id, state.round, dealer, self.name, b_share, sk_share)
        if not hmac.compare_digest(mine, commit):
            raise BadSignature(
                f"{self.name}: the shares {dealer!r} dealt us differ from the ones it committed "
                f"to; refusing",
                peer=dealer,
            )

    # ------------------------------------------------------------------ CONSISTENCY
    def consistency(self, state: ClientState, request: Mapping[str, Any]) -> dict[str, Any]:
        """Check the survivor set U3 and sign (run, round, U3, context hash, setup)."""
        return self._guard(state, lambda: self._consistency(state, request))

    def _consistency_transcript(self, state: ClientState, u3: list[str], signer: str) -> bytes:
        return transcript(
            "consistency",
            state.run_id,
            state.round,
            signer,
            u3,
            state.context_hash,
            state.setup_digest,
        )

    def _consistency(self, state: ClientState, request: Mapping[str, Any]) -> dict[str, Any]:
        msg = self._expect(state, request, "consistency", "mask")
        u3 = _sorted_unique(msg["survivors"], "survivors")
        outside = [p for p in u3 if p not in state.u2]
        if outside:
            raise InconsistentView(
                f"{self.name}: survivors {outside} are not in U2 (never shared keys)",
                peer=outside[0],
            )
        if len(u3) < state.threshold:
            raise BelowThreshold(
                f"{self.name}: only {len(u3)} masked vectors arrived, threshold is "
                f"{state.threshold}"
            )
        state.u3 = u3
        sig = self.identity.sign(self._consistency_transcript(state, u3, self.name))
        return self._reply(state, "consistency", signature=sig)

    # ------------------------------------------------------------------ UNMASK
    def unmask(self, state: ClientState, request: Mapping[str, Any]) -> dict[str, Any]:
        """Check >= t consistent signatures, reveal b-shares of U3, sk-shares of U2 \\ U3.

        The state is wiped afterwards (also on refusal).
        """
        try:
            return self._guard(state, lambda: self._unmask(state, request))
        finally:
            state.wipe()

    def _unmask(self, state: ClientState, request: Mapping[str, Any]) -> dict[str, Any]:
        msg = self._expect(state, request, "unmask", "consistency")
        survivors = _sorted_unique(msg["survivors"], "survivors")
        dropped = _sorted_unique(msg["dropped"], "dropped")
        if survivors != state.u3:
            raise InconsistentView(
                f"{self.name}: unmask survivor set differs from the one we signed"
            )
        both = sorted(set(dropped) & set(survivors))
        if both:
            raise InconsistentView(
                f"{self.name}: server asks for both the mask seed and the key of {both}: "
                f"that would reveal their vectors; refusing",
                peer=both[0],
            )
        for p in dropped:
            if p not in state.u2:
                raise InconsistentView(f"{self.name}: dropped silo {p!r} is not in U2", peer=p)
        if len(set(msg["signers"])) != len(msg["signers"]):
            raise MalformedMessage(f"{self.name}: duplicate signers")
        for signer, sig in zip(msg["signers"], msg["signatures"], strict=True):
            if signer not in self.roster:
                raise UnknownPeer(
                    f"{self.name}: signer {signer!r} is not in our roster", peer=signer
                )
            if signer not in survivors:
                raise InconsistentView(
                    f"{self.name}: signer {signer!r} is not a survivor", peer=signer
                )
            try:
                self.roster.verify(
                    signer, self._consistency_transcript(state, survivors, signer), sig
                )
            except BadSignature:
                raise InconsistentView(
                    f"{self.name}: {signer!r} did not sign our view (survivor set, model "
                    f"context, setup): the server showed silos different views",
                    peer=signer,
                ) from None
        if self.name not in msg["signers"]:
            raise InconsistentView(f"{self.name}: our own consistency signature is missing")
        if len(msg["signers"]) < state.threshold:
            raise BelowThreshold(
                f"{self.name}: only {len(msg['signers'])} consistency signatures, threshold is "
                f"{state.threshold}"
            )
        b_owners = [p for p in survivors if p in state.shares]
        sk_owners = [p for p in dropped if p in state.shares]
        return self._reply(
            state,
            "unmask",
            b_owners=b_owners,
            b_shares=[bytes(state.shares[p][0]) for p in b_owners],
            sk_owners=sk_owners,
            sk_shares=[bytes(state.shares[p][1]) for p in sk_owners],
        )
