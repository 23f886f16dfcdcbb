"""Client and server state machines of the secure aggregation round.

Stage order (requests from the server, replies from silos)::

    ADVERTISE -> SHARE -> MASK -> CONSISTENCY -> UNMASK

See ``docs/secure_agg.md`` for the specification and :mod:`secure_agg` for the adapter API.
"""

from __future__ import annotations

import base64
import hashlib
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
from .codec import CLIPPED_COUNTER, DecodedSum, FixedPointCodec
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
_MIN_CONTEXT = 16
_MAX_CONTEXT = 64
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


def _commit(b: bytes | bytearray, run_id: str, round_: int, name: str) -> bytes:
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


def _proof_context(run_id: str, round_: int, name: str) -> bytes:
    return transcript("weight-proof", run_id, round_, name)


def _sorted_unique(names: list[str], what: str) -> list[str]:
    if names != sorted(set(names)):
        raise MalformedMessage(f"{what} must be sorted and without duplicates")
    return names


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))


# =============================================================================== client
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
        b_commit = _commit(b, cfg.run_id, cfg.round, self.name)
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
                a_q, blind, codec.weight_bits, _proof_context(state.run_id, state.round, self.name)
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


# =============================================================================== server
@dataclass(frozen=True)
class AggregateResult(DecodedSum):
    """Decoded sums plus who contributed (U3), who dropped after sharing (U2 \\ U3) and who
    revealed shares that fail their dealer's commitment (dropped, named with the reason)."""

    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    bad_shares: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregateBounds:
    """What the server checks on the decoded counter SUMS of ``n`` contributors (besides the
    codec's own weight, clipped-count and clip checks, :meth:`FixedPointCodec.implausible`).

    Every check holds for any set of honest silos whose counters obey the per-silo rule it
    states, up to the codec's rounding (``2^-counter_frac_bits`` per silo and counter):

    * ``nonnegative``: each silo's counter is >= 0, so the sum is >= 0;
    * ``per_silo_max``: each silo's counter is <= the bound, so the sum is <= n x bound;
    * ``at_most``: ``{a: b}``: each silo's a <= its b, so sum a <= sum b;
    * ``weight_counter``: each silo's weight equals this counter (e.g. examples after
      :func:`~secure_agg.codec.cap_weight`), so the weight sum equals its sum.
    """

    nonnegative: tuple[str, ...] = ()
    per_silo_max: Mapping[str, float] = field(default_factory=dict)
    at_most: Mapping[str, str] = field(default_factory=dict)
    weight_counter: str | None = None

    def names(self) -> set[str]:
        """Every counter these bounds mention."""
        out = set(self.nonnegative) | set(self.per_silo_max) | set(self.at_most)
        out |= set(self.at_most.values())
        return out | ({self.weight_counter} if self.weight_counter else set())

    def problems(
        self, counters: Mapping[str, float], weight_sum: float, n: int, codec: FixedPointCodec
    ) -> list[str]:
        """Human-readable violations (empty: the sums are plausible)."""
        unit = n * 2.0**-codec.counter_frac_bits
        out = []
        for name in self.nonnegative:
            if counters[name] < -unit:
                out.append(f"counter {name!r} sums to {counters[name]:.6g} < 0")
        for name, bound in self.per_silo_max.items():
            if counters[name] > n * bound + unit:
                out.append(
                    f"counter {name!r} sums to {counters[name]:.6g} > {n} silos x {bound:.6g}"
                )
        for name, other in self.at_most.items():
            if counters[name] > counters[other] + 2 * unit:
                out.append(
                    f"counter {name!r} sums to {counters[name]:.6g}, more than {other!r} "
                    f"({counters[other]:.6g})"
                )
        if self.weight_counter is not None:
            value = counters[self.weight_counter]
            tolerance = n * codec.w_max * 2.0**-codec.weight_bits + 2 * unit
            if abs(weight_sum - value) > tolerance:
                out.append(
                    f"weight sum {weight_sum:.6g} differs from the {self.weight_counter!r} sum "
                    f"{value:.6g} (a silo forged its weight slot or that counter)"
                )
        return out


class ServerCoordinator:
    """The server's side: routes messages, tracks U0..U5, unmasks the sum.

    A silo whose reply is malformed or out of place is treated as dropped (the reason is kept
    in :attr:`rejected`). Fewer than ``t`` silos at any stage raises BelowThreshold.
    With a ``roster`` the server also verifies advertisement and consistency signatures and
    the reported setup digest, dropping silos that fail (the clients check all of it anyway).
    """

    def __init__(
        self,
        config: RoundConfig,
        roster: Roster | None = None,
        bounds: AggregateBounds | None = None,
    ) -> None:
        self.config = config
        self.roster = roster
        self.codec = config.codec()
        self.bounds = bounds
        if bounds is not None:
            unknown = bounds.names() - set(self.codec.counter_names)
            if unknown:
                raise ConfigurationError(
                    f"aggregate bounds name counters {sorted(unknown)} the round does not sum"
                )
        self.t = config.t
        self.stage = "advertise"
        self.u0: list[str] = list(config.participants)
        self.u1: list[str] = []
        self.u2: list[str] = []
        self.u3: list[str] = []
        self.u4: list[str] = []
        self.u5: list[str] = []
        self.rejected: dict[str, str] = {}
        self._adverts: dict[str, dict[str, Any]] = {}
        self._cts: dict[str, dict[str, bytes]] = {}  # recipient -> sender -> ciphertext
        self._sum: np.ndarray | None = None
        self._sigs: dict[str, bytes] = {}
        self._weight_commits: dict[str, int] = {}  # range-proven weight commitments of U3
        # dealer -> recipient -> (commitment, dealer's signature over it)
        self._commits: dict[str, dict[str, tuple[bytes, bytes]]] = {}

    def _msg(self, stage: str, **fields: Any) -> dict[str, Any]:
        return new_message(self.config.run_id, self.config.round, stage, **fields)

    def _accept(
        self,
        replies: Mapping[str, Any],
        stage: str,
        expected: list[str],
        check: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        if self.stage != stage:
            raise ReplayDetected(f"server: {stage!r} replies while at {self.stage!r}")
        ok: dict[str, dict[str, Any]] = {}
        for name, reply in replies.items():
            try:
                if name not in expected:
                    raise UnknownPeer(f"reply from {name!r}, who is not expected at {stage}")
                msg = validate(
                    reply, stage, "reply", run_id=self.config.run_id, round_=self.config.round
                )
                if msg["silo"] != name:
                    raise MalformedMessage(f"reply of {name!r} claims to be from {msg['silo']!r}")
                if check is not None:
                    check(name, msg)
                ok[name] = msg
            except ProtocolAbort as exc:
                self.rejected[name] = f"{stage}: {exc.reason}"
        return {k: ok[k] for k in sorted(ok)}

    def _need(self, names: list[str], what: str) -> None:
        if len(names) < self.t:
            raise BelowThreshold(
                f"server: only {len(names)} silos {what} (threshold {self.t}); round aborted"
                + (f"; rejected: {self.rejected}" if self.rejected else "")
            )

    def advertise_requests(self) -> dict[str, dict[str, Any]]:
        """ADVERTISE requests, one per participant (all identical)."""
        msg = self._msg(
            "advertise",
            participants=list(self.u0),
            threshold=self.t,
            config=self.config.codec_json(),
        )
        return {p: dict(msg) for p in self.u0}

    def collect_advertisements(self, replies: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Take ADVERTISE replies; return SHARE requests for U1 (the advertisers)."""
        digest = self.config.setup_digest()

        def check(name: str, m: dict[str, Any]) -> None:
            if self.roster is not None:
                if m["setup_digest"] != digest:
                    raise InconsistentView(f"{name!r} reports another round setup")
                self.roster.verify(
                    name,
                    SecAggClient._advert_transcript(
                        _StateView(self.config),
                        name,
                        m["c_pk"],
                        m["s_pk"],
                        m["b_commit"],
                        m["context_hash"],
                        m["setup_digest"],
                    ),
                    m["signature"],
                )

        self._adverts = self._accept(replies, "advertise", self.u0, check)
        self.u1 = list(self._adverts)
        self._need(self.u1, "advertised keys")
        a = self._adverts
        msg = self._msg(
            "share",
            peers=list(self.u1),
            c_pks=[a[p]["c_pk"] for p in self.u1],
            s_pks=[a[p]["s_pk"] for p in self.u1],
            b_commits=[a[p]["b_commit"] for p in self.u1],
            context_hashes=[a[p]["context_hash"] for p in self.u1],
            setup_digests=[a[p]["setup_digest"] for p in self.u1],
            signatures=[a[p]["signature"] for p in self.u1],
        )
        self.stage = "share"
        return {p: dict(msg) for p in self.u1}

    def collect_shares(self, replies: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Take SHARE replies; return MASK requests (ciphertexts for each recipient) for U2."""

        run, rnd = self.config.run_id, self.config.round

        def check(name: str, m: dict[str, Any]) -> None:
            if sorted(m["recipients"]) != [p for p in self.u1 if p != name]:
                raise MalformedMessage(f"{name!r} did not share with exactly the other U1 members")
            if m["commit_to"] != self.u1:
                raise MalformedMessage(f"{name!r} did not commit to a share for each U1 member")
            for rcpt, commit, sig in zip(
                m["commit_to"], m["share_commits"], m["commit_signatures"], strict=True
            ):
                if len(commit) != COMMIT_BYTES:
                    raise MalformedMessage(f"{name!r} sent a share commitment of a bad length")
                if self.roster is not None:
                    self.roster.verify(name, commit_transcript(run, rnd, name, rcpt, commit), sig)

        got = self._accept(replies, "share", self.u1, check)
        self.u2 = list(got)
        self._need(self.u2, "shared keys")
        self._cts = {p: {} for p in self.u2}
        for sender, m in got.items():
            for rcpt, ct in zip(m["recipients"], m["ciphertexts"], strict=True):
                if rcpt in self._cts:
                    self._cts[rcpt][sender] = ct
            self._commits[sender] = {
                rcpt: (commit, sig)
                for rcpt, commit, sig in zip(
                    m["commit_to"], m["share_commits"], m["commit_signatures"], strict=True
                )
            }
        self.stage = "mask"
        out = {}
        for p in self.u2:
            senders = sorted(self._cts[p])
            out[p] = self._msg(
                "mask",
                u2=list(self.u2),
                share_from=senders,
                ciphertexts=[self._cts[p][s] for s in senders],
                share_commits=[self._commits[s][p][0] for s in senders],
                commit_signatures=[self._commits[s][p][1] for s in senders],
            )
        return out

    def collect_masked(self, replies: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Sum the masked vectors as they come (mod 2^k); return CONSISTENCY requests for U3."""

        def check(name: str, m: dict[str, Any]) -> None:
            arr = m["masked"]
            if arr.dtype != self.codec.dtype or arr.shape != (self.codec.total_len,):
                raise MalformedMessage(
                    f"masked vector of {name!r} must be {self.codec.dtype} of length "
                    f"{self.codec.total_len}, got {arr.dtype} {arr.shape}"
                )
            if not self.codec.weight_proof:
                if m["weight_commit"] or m["weight_proof"]:
                    raise MalformedMessage(f"{name!r} sent a weight proof nobody asked for")
                return
            commitment = range_proof.element_from(m["weight_commit"])
            try:
                range_proof.verify_at_most(
                    commitment,
                    m["weight_proof"],
                    self.codec.weight_bits,
                    _proof_context(self.config.run_id, self.config.round, name),
                )
            except BadSignature:
                raise BadSignature(
                    f"the weight range proof of {name!r} does not verify: its weight may exceed "
                    f"w_max; its vector is left out",
                    peer=name,
                ) from None
            self._weight_commits[name] = commitment

        got = self._accept(replies, "mask", self.u2, check)
        self.u3 = list(got)
        self._need(self.u3, "uploaded masked vectors")
        total = np.zeros(self.codec.total_len, self.codec.dtype)
        for m in got.values():
            np.add(total, m["masked"], out=total)
        self._sum = total
        self.stage = "consistency"
        return {p: self._msg("consistency", survivors=list(self.u3)) for p in self.u3}

    def collect_consistency(self, replies: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Take the consistency signatures; return UNMASK requests for the signers (U4)."""

        def check(name: str, m: dict[str, Any]) -> None:
            if self.roster is not None:
                ctx = self._adverts[name]["context_hash"]
                self.roster.verify(
                    name,
                    transcript(
                        "consistency",
                        self.config.run_id,
                        self.config.round,
                        name,
                        self.u3,
                        ctx,
                        self.config.setup_digest(),
                    ),
                    m["signature"],
                )

        got = self._accept(replies, "consistency", self.u3, check)
        self.u4 = list(got)
        self._need(self.u4, "signed the survivor set")
        self._sigs = {p: got[p]["signature"] for p in self.u4}
        dropped = [p for p in self.u2 if p not in self.u3]
        self.stage = "unmask"
        msg = self._msg(
            "unmask",
            survivors=list(self.u3),
            dropped=dropped,
            signers=list(self.u4),
            signatures=[self._sigs[p] for p in self.u4],
        )
        return {p: dict(msg) for p in self.u4}

    def collect_unmask(self, replies: Mapping[str, Any]) -> AggregateResult:
        """Rebuild b_j (survivors) and sk_j (dropped), remove all masks, decode the sum.

        Every revealed share is checked against the commitment its dealer signed at SHARE: a
        share that fails is dropped and its revealer named in ``bad_shares``; a secret is
        rebuilt from the valid shares while at least ``t`` remain (else BelowThreshold naming
        the revealers of bad shares). Valid shares that do not rebuild the committed secret
        mean the dealer dealt inconsistent shares (BadSignature naming the dealer). The
        decoded sum is refused (ImplausibleAggregate) when it is outside the codec's bounds or
        the ``bounds`` given at construction.
        """
        dropped = [p for p in self.u2 if p not in self.u3]

        def check(name: str, m: dict[str, Any]) -> None:
            if sorted(m["b_owners"]) != self.u3 or sorted(m["sk_owners"]) != dropped:
                raise MalformedMessage(f"{name!r} did not reveal the requested shares")
            x = self.u0.index(name) + 1
            for s in m["b_shares"] + m["sk_shares"]:
                if shamir.parse_share(s)[0] != x:
                    raise MalformedMessage(f"{name!r} revealed a share with a foreign x")

        got = self._accept(replies, "unmask", self.u4, check)
        self.u5 = list(got)
        self._need(self.u5, "revealed shares")
        run, rnd = self.config.run_id, self.config.round
        bad: dict[str, list[str]] = {}
        minus: list[bytes] = []
        plus: list[bytes] = []
        for j in self.u3:
            b = self._rebuild(j, "b", got, bad)
            if _commit(b, run, rnd, j) != self._adverts[j]["b_commit"]:
                raise BadSignature(
                    f"server: the shares {j!r} dealt (each matching its signed commitment) do "
                    f"not rebuild its committed mask seed: {j!r} dealt inconsistent shares",
                    peer=j,
                )
            minus.append(derive(b, "self-mask", run, rnd, j))
        for j in dropped:
            sk = self._rebuild(j, "sk", got, bad)
            if x25519_public(sk) != self._adverts[j]["s_pk"]:
                raise BadSignature(
                    f"server: the shares {j!r} dealt (each matching its signed commitment) do "
                    f"not rebuild its key: {j!r} dealt inconsistent shares",
                    peer=j,
                )
            for i in self.u3:
                seed = pairwise_key(
                    sk,
                    self._adverts[i]["s_pk"],
                    run_id=run,
                    round_=rnd,
                    purpose="mask",
                    name_a=j,
                    name_b=i,
                )
                # survivor i added +PRG if i < j else -PRG: remove it.
                (minus if i < j else plus).append(seed)
        assert self._sum is not None
        total = self._sum
        MaskAccumulator(self.codec.dtype).apply(total, plus=plus, minus=minus)
        self._sum = None
        self.stage = "done"
        problems = self.codec.implausible(total, len(self.u3))
        if self.codec.weight_proof and not problems:
            product = 1
            for j in self.u3:
                product = product * self._weight_commits[j] % range_proof.P
            if product != range_proof.commit(int(total[0]), self.codec.blind_sum(total)):
                problems.append(
                    "the weight slots do not add up to the silos' range-proven weight "
                    "commitments (a silo encoded another weight than it proved)"
                )
        decoded = self.codec.decode_sum(total, len(self.u3))
        if not problems and self.bounds is not None:
            counters = {**decoded.counters, CLIPPED_COUNTER: float(decoded.clipped_values)}
            problems = self.bounds.problems(counters, decoded.weight_sum, len(self.u3), self.codec)
        if problems:
            raise ImplausibleAggregate(
                f"server: the unmasked sum of {len(self.u3)} silos is implausible, result "
                f"refused: {'; '.join(problems)}"
            )
        bad_shares = {
            i: f"revealed shares of {owners} that fail their dealers' commitments (dropped)"
            for i, owners in sorted(bad.items())
        }
        warnings = list(decoded.warnings)
        for i, why in bad_shares.items():
            warnings.append(f"silo {i!r} {why}; rebuilt from the other silos' shares")
        return AggregateResult(
            mean=decoded.mean,
            weight_sum=decoded.weight_sum,
            counters=decoded.counters,
            clipped_values=decoded.clipped_values,
            n_values=decoded.n_values,
            n_contributors=decoded.n_contributors,
            warnings=warnings,
            survivors=tuple(self.u3),
            dropped=tuple(dropped),
            bad_shares=bad_shares,
        )

    def _rebuild(
        self, owner: str, kind: str, got: Mapping[str, dict[str, Any]], bad: dict[str, list[str]]
    ) -> bytes:
        """``owner``'s b (kind "b") or sk (kind "sk") from the revealed shares that match the
        commitments ``owner`` signed; revealers of the others are recorded in ``bad``."""
        run, rnd = self.config.run_id, self.config.round
        part = slice(0, 32) if kind == "b" else slice(32, 64)
        label = "share-commit-" + kind
        valid = []
        for revealer, m in got.items():
            share = m[f"{kind}_shares"][m[f"{kind}_owners"].index(owner)]
            digest = hashlib.sha256(transcript(label, run, rnd, owner, revealer, share)).digest()
            commit = self._commits.get(owner, {}).get(revealer)
            if commit is None or not hmac.compare_digest(digest, commit[0][part]):
                bad.setdefault(revealer, []).append(owner)
                continue
            valid.append(share)
        if len(valid) < self.t:
            culprits = sorted(r for r, owners in bad.items() if owner in owners)
            raise BelowThreshold(
                f"server: only {len(valid)} valid shares of {owner!r}'s "
                f"{'mask seed' if kind == 'b' else 'key'} (threshold {self.t}); "
                f"bad shares from {culprits}",
                peer=culprits[0] if culprits else None,
            )
        return shamir.combine(valid, self.t)


class _StateView:
    """Minimal stand-in with run_id/round for transcript helpers used by the server."""

    def __init__(self, cfg: RoundConfig) -> None:
        self.run_id = cfg.run_id
        self.round = cfg.round
