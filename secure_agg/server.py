"""The server's side of the secure aggregation round: routes the stages, tracks who is still
in (U0..U5), rebuilds masks from the revealed shares (checked against their dealer's signed
commitments) and unmasks the sum.

See ``docs/secure_agg.md`` for the specification, :mod:`secure_agg.client` for the other side.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import range_proof, shamir
from .client import SecAggClient
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
    UnknownPeer,
)
from .keys import Roster, derive, pairwise_key, transcript, x25519_public
from .messages import new_message, validate
from .prg import MaskAccumulator
from .round_config import (
    COMMIT_BYTES,
    RoundConfig,
    b_commitment,
    commit_transcript,
    weight_proof_context,
)


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
                    weight_proof_context(self.config.run_id, self.config.round, name),
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
            if b_commitment(b, run, rnd, j) != self._adverts[j]["b_commit"]:
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
