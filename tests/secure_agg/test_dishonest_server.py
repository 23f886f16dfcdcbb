"""A dishonest server, played by taps on the in-memory wire, against real client code."""

from __future__ import annotations

import numpy as np
import pytest

from secure_agg.errors import (
    BadSignature,
    InconsistentView,
    MalformedMessage,
    ProtocolAbort,
    ReplayDetected,
    UnknownPeer,
)
from secure_agg.keys import IdentityKey, transcript, x25519_generate
from secure_agg.round_config import RoundConfig
from secure_agg.simulate import Federation, context_hash_of, run_in_memory

NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]  # t = 4


def _data(m: int = 64):
    rng = np.random.default_rng(9)
    vecs = {n: rng.normal(0, 1, m).astype(np.float32) for n in NAMES}
    weights = {n: 100.0 * (i + 1) for i, n in enumerate(NAMES)}
    return vecs, weights


def _run(tap, **kw):
    vecs, weights = _data()
    kw.setdefault("server_roster", False)  # a dishonest server checks nothing
    return run_in_memory(vecs, weights, tap=tap, **kw)


def test_key_swap_is_refused_naming_the_peer() -> None:
    _, attacker_pk = x25519_generate()

    def tap(stage, direction, silo, msg):
        if stage == "share" and direction == "request" and silo == "alpha":
            i = msg["peers"].index("bravo")
            msg["s_pks"][i] = attacker_pk  # server's own key for bravo's pairwise mask
        return msg

    with pytest.raises(BadSignature, match="'bravo'") as exc:
        _run(tap)
    assert exc.value.peer == "bravo"


def test_own_advertisement_altered_is_refused() -> None:
    _, attacker_pk = x25519_generate()

    def tap(stage, direction, silo, msg):
        if stage == "share" and direction == "request" and silo == "alpha":
            msg["c_pks"][msg["peers"].index("alpha")] = attacker_pk
        return msg

    with pytest.raises(BadSignature, match="alpha"):
        _run(tap)


def test_unknown_peer_injected_is_refused() -> None:
    mallory = IdentityKey.generate()
    cpk, spk = x25519_generate()[1], x25519_generate()[1]

    def tap(stage, direction, silo, msg):
        if stage == "share" and direction == "request":
            cfg = RoundConfig("run-1", 1, tuple(NAMES), 64)
            sig = mallory.sign(
                transcript(
                    "advertise",
                    "run-1",
                    1,
                    "mallory",
                    cpk,
                    spk,
                    b"\0" * 32,
                    msg["context_hashes"][0],
                    cfg.setup_digest(),
                )
            )
            rows = list(
                zip(
                    msg["peers"],
                    msg["c_pks"],
                    msg["s_pks"],
                    msg["b_commits"],
                    msg["context_hashes"],
                    msg["setup_digests"],
                    msg["signatures"],
                    strict=True,
                )
            )
            rows.append(
                (
                    "mallory",
                    cpk,
                    spk,
                    b"\0" * 32,
                    msg["context_hashes"][0],
                    msg["setup_digests"][0],
                    sig,
                )
            )
            rows.sort()
            for k, col in zip(
                (
                    "peers",
                    "c_pks",
                    "s_pks",
                    "b_commits",
                    "context_hashes",
                    "setup_digests",
                    "signatures",
                ),
                zip(*rows, strict=True),
                strict=True,
            ):
                msg[k] = list(col)
        return msg

    with pytest.raises(UnknownPeer, match="'mallory' is not in our roster"):
        _run(tap)


def test_unknown_participant_at_advertise_is_refused() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "advertise" and direction == "request":
            msg["participants"] = sorted([*msg["participants"], "mallory"])
        return msg

    with pytest.raises(UnknownPeer, match="mallory"):
        _run(tap)


def test_active_and_dropped_overlap_at_unmask_is_refused() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "unmask" and direction == "request":
            msg["dropped"] = ["charlie"]  # charlie is also a survivor
        return msg

    with pytest.raises(InconsistentView, match="both the mask seed and the key") as exc:
        _run(tap)
    assert exc.value.peer == "charlie"


def test_both_shares_attack_after_real_dropout_is_refused() -> None:
    # delta really dropped after sharing; the server also lists delta as a survivor.
    def tap(stage, direction, silo, msg):
        if stage == "unmask" and direction == "request":
            msg["survivors"] = sorted([*msg["survivors"], "delta"])
        return msg

    with pytest.raises(InconsistentView, match="differs from the one we signed"):
        _run(tap, dropouts={"mask": ["delta"]})


def test_different_survivor_sets_to_different_silos() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "consistency" and direction == "request" and silo == "alpha":
            msg["survivors"] = [s for s in msg["survivors"] if s != "echo"]
        return msg

    with pytest.raises(InconsistentView, match="alpha"):
        _run(tap)


def test_forged_survivor_set_at_unmask_is_refused() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "unmask" and direction == "request" and silo == "bravo":
            msg["survivors"] = msg["survivors"][:-1]
            msg["dropped"] = [NAMES[-1]]
        return msg

    with pytest.raises(InconsistentView, match="differs from the one we signed"):
        _run(tap)


def test_different_models_to_different_silos() -> None:
    ctx = {n: context_hash_of(b"model-A") for n in NAMES}
    ctx["delta"] = context_hash_of(b"model-B (poisoned)")
    vecs, weights = _data()
    with pytest.raises(InconsistentView, match="different model") as exc:
        run_in_memory(vecs, weights, context_hashes=ctx)
    assert exc.value.peer is not None


def test_different_setup_to_different_silos() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "advertise" and direction == "request" and silo == "echo":
            msg["threshold"] = 5
        return msg

    with pytest.raises(InconsistentView, match="different round setup"):
        _run(tap)


def test_threshold_below_policy_is_refused() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "advertise" and direction == "request":
            msg["threshold"] = 1
        return msg

    with pytest.raises(ProtocolAbort, match="threshold 1"):
        _run(tap)


def test_forged_consistency_signature_is_refused() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "unmask" and direction == "request":
            msg["signatures"][1] = bytes(64)
        return msg

    with pytest.raises(InconsistentView, match="did not sign our view"):
        _run(tap)


def test_replay_of_an_earlier_round_is_detected() -> None:
    fed = Federation.create(NAMES)
    vecs, weights = _data()
    recorded: dict = {}

    def record(stage, direction, silo, msg):
        recorded[(stage, direction, silo)] = msg
        return msg

    run_in_memory(vecs, weights, federation=fed, tap=record, round_=1)

    for stage in ("share", "mask", "consistency", "unmask"):

        def replay(st, direction, silo, msg, stage=stage):
            if st == stage and direction == "request" and silo == "alpha":
                return recorded[(stage, "request", "alpha")]
            return msg

        with pytest.raises(ReplayDetected, match="round 1 received during round 2"):
            run_in_memory(vecs, weights, federation=fed, tap=replay, round_=2)

    # header rewritten to the current round: the old signatures no longer verify
    def rewrite(st, direction, silo, msg):
        if st == "share" and direction == "request" and silo == "alpha":
            old = dict(recorded[("share", "request", "alpha")])
            old["round"] = 2
            old["setup_digests"] = msg["setup_digests"]
            return old
        return msg

    with pytest.raises(BadSignature):
        run_in_memory(vecs, weights, federation=fed, tap=rewrite, round_=2)

    # ciphertexts of round 1 re-used in round 2 do not authenticate
    def old_cts(st, direction, silo, msg):
        if st == "mask" and direction == "request" and silo == "alpha":
            msg["ciphertexts"] = recorded[("mask", "request", "alpha")]["ciphertexts"]
        return msg

    with pytest.raises(BadSignature, match="does not authenticate"):
        run_in_memory(vecs, weights, federation=fed, tap=old_cts, round_=2)


def test_stage_out_of_order_is_detected() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "consistency" and direction == "request" and silo == "alpha":
            msg["stage"] = "unmask"
        return msg

    with pytest.raises(ReplayDetected, match="expecting 'consistency'"):
        _run(tap)


def test_other_run_is_detected() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "mask" and direction == "request":
            msg["run_id"] = "other-run"
        return msg

    with pytest.raises(ReplayDetected, match="run 'other-run'"):
        _run(tap)


@pytest.mark.parametrize(
    ("stage", "mutate", "match"),
    [
        ("share", lambda m: m.pop("signatures"), "misses fields"),
        ("share", lambda m: m.update(peers="alpha"), "must be list"),
        ("share", lambda m: m["c_pks"].pop(), "differ in length"),
        ("share", lambda m: m["c_pks"].__setitem__(0, b"short"), "wrong lengths"),
        ("mask", lambda m: m.update(ciphertexts=[1, 2, 3, 4]), "must be list"),
        ("mask", lambda m: m["ciphertexts"].__setitem__(0, b"x"), "authenticate"),
        ("mask", lambda m: m.update(extra=1), "unexpected fields"),
        ("consistency", lambda m: m.update(survivors=["b", "a"]), "sorted"),
        ("unmask", lambda m: m.update(round="1"), "must be int"),
        ("advertise", lambda m: m.update(config="{not json"), "config"),
        ("advertise", lambda m: m.update(threshold=True), "must be int"),
    ],
)
def test_malformed_requests_abort_cleanly(stage, mutate, match) -> None:
    def tap(st, direction, silo, msg):
        if st == stage and direction == "request" and silo == "alpha":
            mutate(msg)
        return msg

    with pytest.raises((MalformedMessage, BadSignature), match=match):
        _run(tap)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(masked=m["masked"].astype(np.int64)),
        lambda m: m.update(masked=m["masked"][:-1]),
        lambda m: m.update(masked="nope"),
        lambda m: m.pop("silo"),
        lambda m: m.update(silo="bravo"),
    ],
)
def test_malformed_reply_counts_as_dropout(mutate) -> None:
    def tap(st, direction, silo, msg):
        if st == "mask" and direction == "reply" and silo == "alpha":
            mutate(msg)
        return msg

    res = _run(tap)
    assert "alpha" not in res.survivors and res.dropped == ("alpha",)


def test_recording_server_cannot_see_a_vector() -> None:
    vecs, weights = _data(m=50_000)
    vecs["alpha"][:] = 0.0  # a very structured input
    seen: list = []

    def tap(stage, direction, silo, msg):
        if direction == "reply":
            seen.append((stage, silo, msg))
        return msg

    cfg = RoundConfig("run-1", 1, tuple(NAMES), 50_000)
    run_in_memory(vecs, weights, tap=tap)
    codec = cfg.codec()
    masked = {silo: m["masked"] for st, silo, m in seen if st == "mask"}
    for silo, arr in masked.items():
        plain = codec.encode(vecs[silo], weights[silo])
        assert np.count_nonzero(arr == plain) < 10  # ~ 50_000 / 2^32 expected
        body = arr[codec.header_len :]
        assert abs(body.astype(np.float64).mean() / 2**32 - 0.5) < 0.01
        bits = np.unpackbits(body.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 0.002
        hist = np.bincount(body.view(np.uint8), minlength=256)
        exp = body.nbytes / 256
        chi2 = float(((hist - exp) ** 2 / exp).sum())
        assert chi2 < 400  # 255 dof, p ~ 1e-8 cut-off
        # no raw bytes of the secret vector in any reply
        needle = vecs[silo][1000:1004].tobytes()
        for _, _, m in seen:
            for v in m.values():
                blob = (
                    v.tobytes()
                    if isinstance(v, np.ndarray)
                    else (
                        b"".join(v)
                        if isinstance(v, list) and v and isinstance(v[0], bytes)
                        else v
                        if isinstance(v, bytes)
                        else b""
                    )
                )
                assert needle not in blob or silo == "alpha"
    # unmask replies never reveal both shares for the same owner
    for st, _, m in seen:
        if st == "unmask":
            assert not set(m["b_owners"]) & set(m["sk_owners"])


def test_honest_server_with_roster_drops_a_tampered_advertisement() -> None:
    def tap(stage, direction, silo, msg):
        if stage == "advertise" and direction == "reply" and silo == "echo":
            msg["signature"] = bytes(64)  # a man in the middle, not the server
        return msg

    res = _run(tap, server_roster=True)
    assert "echo" not in res.survivors and len(res.survivors) == 4
