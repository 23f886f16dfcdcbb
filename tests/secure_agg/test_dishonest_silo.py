"""Dishonest SILOS against the real protocol code (in-memory wire, real clients and server).

A malicious silo controls what it encodes before masking. Adding ``delta`` (mod 2^32) to its
masked upload is exactly the same as masking the forged plaintext ``honest + delta``, so the
taps below play a silo that forges its weight slot, a counter or values beyond the clip. Other
attacks play a silo that reveals a wrong Shamir share at UNMASK, or deals shares that differ from
the ones it committed to at SHARE.
"""

from __future__ import annotations

import numpy as np
import pytest

from secure_agg import shamir
from secure_agg.client import SecAggClient
from secure_agg.codec import FixedPointCodec, cap_weight
from secure_agg.errors import (
    BadSignature,
    BelowThreshold,
    ConfigurationError,
    ImplausibleAggregate,
)
from secure_agg.round_config import RoundConfig, commit_transcript
from secure_agg.server import AggregateBounds, ServerCoordinator
from secure_agg.simulate import Federation, context_hash_of, run_in_memory

from .conftest import expected_mean

NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]  # t = 4
M = 256
W_MAX = 1000.0
COUNTERS = ("examples", "loss_sum")


def _data():
    rng = np.random.default_rng(5)
    vecs = {n: rng.normal(0, 0.5, M).astype(np.float32) for n in NAMES}
    weights = {n: 100.0 * (i + 1) for i, n in enumerate(NAMES)}
    counters = {n: {"examples": weights[n], "loss_sum": 0.7 * weights[n]} for n in NAMES}
    return vecs, weights, counters


def _cfg() -> RoundConfig:
    return RoundConfig("run-1", 1, tuple(NAMES), M, w_max=W_MAX, counter_names=COUNTERS)


BOUNDS = AggregateBounds(
    nonnegative=COUNTERS, per_silo_max={"examples": W_MAX}, weight_counter="examples"
)


def _round(tap=None, bounds=BOUNDS, federation=None):
    """One round with the server's aggregate bounds; ``tap`` plays the dishonest party."""
    vecs, weights, counters = _data()
    return run_in_memory(
        vecs,
        weights,
        counters,
        tap=tap,
        federation=federation,
        bounds=bounds,
        w_max=W_MAX,
        counter_names=COUNTERS,
    )


def _counter_slots(codec: FixedPointCodec, name: str) -> slice:
    i = codec.counter_names.index(name)
    return slice(1 + 3 * i, 4 + 3 * i)


def _forging(silo: str, delta: np.ndarray):
    """Tap: ``silo`` masks ``honest + delta`` instead of its honest encoding."""

    def tap(stage, direction, name, msg):
        if stage == "mask" and direction == "reply" and name == silo:
            msg["masked"] = msg["masked"] + delta.astype(np.uint32)
        return msg

    return tap


def _delta() -> tuple[FixedPointCodec, np.ndarray]:
    codec = _cfg().codec()
    return codec, np.zeros(codec.total_len, np.uint32)


# ------------------------------------------------------------------- honest baseline
def test_honest_round_passes_every_check() -> None:
    res = _round()
    vecs, weights, _ = _data()
    exp, bound = expected_mean(_cfg(), vecs, weights, NAMES)
    assert np.abs(res.mean - exp).max() <= bound
    assert res.counters["examples"] == sum(weights.values())
    assert res.bad_shares == {}


# ------------------------------------------------------------------- item 3: bounds
def test_forged_weight_slot_beyond_n_w_max_is_refused() -> None:
    _, delta = _delta()
    delta[0] = 1 << 31  # "my weight is 128 x w_max"
    with pytest.raises(ImplausibleAggregate, match="forged its weight") as info:
        _round(_forging("charlie", delta))
    assert "result refused" in info.value.reason and "\n" not in info.value.reason


def test_forged_weight_slot_inconsistent_with_examples_is_refused() -> None:
    _, delta = _delta()
    delta[0] = 1 << 24  # + w_max of weight, the examples counter unchanged: fits n x w_max
    with pytest.raises(ImplausibleAggregate, match="differs from the 'examples' sum"):
        _round(_forging("bravo", delta))
    # without the server's counter bounds the same forgery goes through (what bounds add)
    assert _round(_forging("bravo", delta), bounds=None).weight_sum > 1500 + W_MAX - 1


def test_negative_clipped_counter_is_refused() -> None:
    codec, delta = _delta()
    # the limbs the codec itself would write for values_clipped = -5
    delta[_counter_slots(codec, "values_clipped")] = codec._encode_counter("values_clipped", -5)
    with pytest.raises(ImplausibleAggregate, match="values_clipped sums to -5"):
        _round(_forging("alpha", delta))


def test_negative_examples_counter_is_refused() -> None:
    codec, delta = _delta()
    delta[_counter_slots(codec, "examples")] = codec._encode_counter("examples", -10_000)
    with pytest.raises(ImplausibleAggregate, match=r"'examples' sums to .* < 0"):
        _round(_forging("echo", delta))


def test_examples_beyond_n_w_max_are_refused() -> None:
    codec, delta = _delta()
    delta[_counter_slots(codec, "examples")] = codec._encode_counter("examples", 10 * W_MAX)
    with pytest.raises(ImplausibleAggregate, match=r"'examples' sums to .* > 5 silos x 1000"):
        _round(_forging("echo", delta))


def test_values_far_above_the_clip_are_refused() -> None:
    codec, delta = _delta()
    body = delta[codec.header_len :].view(np.int32)
    body[17] = 1 << 30  # ~ 2^30 / 2^22 / (w/w_max) = 256 x clip for this silo alone
    with pytest.raises(ImplausibleAggregate, match="beyond the clip"):
        _round(_forging("delta", delta))


def test_forgery_within_the_bounds_is_not_detected() -> None:
    """What the aggregate checks do NOT give (docs/secure_agg.md): a silo that keeps the sum
    plausible still moves the mean, here by doubling its own contribution on one coordinate."""
    codec, delta = _delta()
    vecs, weights, _ = _data()
    a_q = codec.quantize_weight(weights["echo"])
    q = round(float(vecs["echo"][3]) * a_q * 2.0 ** (codec.frac_bits - codec.weight_bits))
    delta[codec.header_len :].view(np.int32)[3] = q
    res = _round(_forging("echo", delta))
    exp, bound = expected_mean(_cfg(), vecs, weights, NAMES)
    assert abs(res.mean[3] - exp[3]) > 100 * bound  # moved ...
    assert np.abs(np.delete(res.mean - exp, 3)).max() <= bound  # ... and only there


def test_bounds_must_name_summed_counters() -> None:
    with pytest.raises(ConfigurationError, match="does not sum"):
        ServerCoordinator(_cfg(), None, AggregateBounds(nonnegative=("dice_num",)))


def test_cap_weight_keeps_counters_consistent() -> None:
    weight, counters = cap_weight(4000, {"examples": 4000.0, "loss_sum": 2000.0}, 1000.0)
    assert weight == 1000.0 and counters == {"examples": 1000.0, "loss_sum": 500.0}
    assert cap_weight(10, {"examples": 10.0}, 1000.0) == (10.0, {"examples": 10.0})
    with pytest.raises(ConfigurationError, match="finite"):
        cap_weight(float("nan"), {}, 1000.0)


def test_a_capped_silo_passes_the_bounds() -> None:
    vecs, weights, counters = _data()
    weights["echo"], counters["echo"] = cap_weight(
        5 * W_MAX, {"examples": 5 * W_MAX, "loss_sum": 0.7 * 5 * W_MAX}, W_MAX
    )
    cfg = _cfg()
    fed = Federation.create(NAMES)
    srv = ServerCoordinator(cfg, fed.server_roster(), BOUNDS)
    reqs = srv.advertise_requests()
    states, reps = {}, {}
    for n in NAMES:
        states[n], reps[n] = fed.clients[n].advertise(reqs[n], context_hash_of(b"m"))
    reqs = srv.collect_advertisements(reps)
    reqs = srv.collect_shares({n: fed.clients[n].share(states[n], reqs[n]) for n in NAMES})
    reqs = srv.collect_masked(
        {
            n: fed.clients[n].mask(states[n], reqs[n], vecs[n], weights[n], counters[n])
            for n in NAMES
        }
    )
    reqs = srv.collect_consistency(
        {n: fed.clients[n].consistency(states[n], reqs[n]) for n in reqs}
    )
    res = srv.collect_unmask({n: fed.clients[n].unmask(states[n], reqs[n]) for n in reqs})
    assert res.counters["examples"] == pytest.approx(1000 + W_MAX, abs=1e-3)
    assert res.weight_sum == pytest.approx(res.counters["examples"], rel=1e-6)


# ------------------------------------------------------------------- item 5: bad shares
def _corrupt_revealed_share(*liars: str, owner: str = "charlie"):
    def tap(stage, direction, name, msg):
        if stage == "unmask" and direction == "reply" and name in liars:
            i = msg["b_owners"].index(owner)
            x, y = shamir.parse_share(msg["b_shares"][i])
            msg["b_shares"][i] = x.to_bytes(2, "big") + ((y + 1) % shamir.PRIME).to_bytes(66, "big")
        return msg

    return tap


def test_one_wrong_share_is_dropped_and_its_sender_named() -> None:
    res = _round(_corrupt_revealed_share("bravo"))
    vecs, weights, _ = _data()
    exp, bound = expected_mean(_cfg(), vecs, weights, NAMES)
    assert np.abs(res.mean - exp).max() <= bound  # rebuilt from the 4 valid shares
    assert list(res.bad_shares) == ["bravo"] and "'charlie'" in res.bad_shares["bravo"]
    assert any("'bravo'" in w and "rebuilt" in w for w in res.warnings)


def test_too_many_wrong_shares_abort_naming_the_senders() -> None:
    with pytest.raises(BelowThreshold, match=r"3 valid shares of 'charlie'.*\['alpha', 'bravo'\]"):
        _round(_corrupt_revealed_share("alpha", "bravo"))


def test_a_dealer_committing_to_other_shares_is_named_by_the_recipient() -> None:
    fed = Federation.create(NAMES)
    dealer_key = fed.identities["delta"]

    def tap(stage, direction, name, msg):
        if stage == "share" and direction == "reply" and name == "delta":
            i = msg["commit_to"].index("alpha")
            forged = bytes(64)  # a commitment to shares it did not deal, properly signed
            msg["share_commits"][i] = forged
            msg["commit_signatures"][i] = dealer_key.sign(
                commit_transcript("run-1", 1, "delta", "alpha", forged)
            )
        return msg

    with pytest.raises(BadSignature, match="'delta' dealt us differ") as info:
        _round(tap, federation=fed)
    assert info.value.peer == "delta"


def test_a_server_altering_a_commitment_is_caught_by_the_signature() -> None:
    def tap(stage, direction, name, msg):
        if stage == "mask" and direction == "request" and name == "alpha":
            msg["share_commits"][0] = bytes(64)
        return msg

    with pytest.raises(BadSignature, match="does not verify under our roster key"):
        _round(tap)


class _InconsistentDealer(SecAggClient):
    """Deals shares of b that lie on no single polynomial (each matches its commitment)."""

    def share(self, state, request):
        real = shamir.split

        def bent(secret, threshold, xs):
            out = real(secret, threshold, xs)
            if bytes(secret) == bytes(state.b):
                x, y = shamir.parse_share(out[xs[0]])  # the share the server uses first
                out[xs[0]] = x.to_bytes(2, "big") + ((y + 7) % shamir.PRIME).to_bytes(66, "big")
            return out

        shamir.split = bent
        try:
            return super().share(state, request)
        finally:
            shamir.split = real


def test_a_dealer_of_inconsistent_shares_is_named_by_the_server() -> None:
    fed = Federation.create(NAMES)
    fed.clients["alpha"] = _InconsistentDealer(
        "alpha", fed.identities["alpha"], fed.rosters["alpha"]
    )
    with pytest.raises(BadSignature, match="'alpha' dealt inconsistent shares") as info:
        _round(federation=fed)
    assert info.value.peer == "alpha"


# ------------------------------------------------------------------- item 6: sizes first
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vector_length": 10**10}, r"vector_length=10000000000 is outside \[0, 1073741824\]"),
        ({"vector_length": True}, "vector_length must be an int"),
        ({"vector_length": 12.0}, "vector_length must be an int"),
        ({"frac_bits": "22"}, "frac_bits must be an int"),
        ({"clip": "8"}, "clip must be a number"),
        ({"counter_names": tuple(f"c{i}" for i in range(5000))}, "at most 4096"),
        ({"participants": tuple(f"s{i}" for i in range(1001))}, "1..1000 names"),
        ({"threshold": 4.0}, "threshold must be an int"),
    ],
)
def test_config_is_checked_before_anything_is_allocated(kwargs, match) -> None:
    args = {"run_id": "r", "round": 1, "participants": tuple(NAMES), "vector_length": 8}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        RoundConfig(**args)


def test_a_huge_vector_length_in_the_request_is_a_clear_refusal() -> None:
    def tap(stage, direction, name, msg):
        if stage == "advertise" and direction == "request":
            msg["config"] = msg["config"].replace(
                f'"vector_length":{M}', '"vector_length":10000000000'
            )
        return msg

    with pytest.raises(ConfigurationError, match="vector_length=10000000000 is outside"):
        _round(tap)


def test_a_wrong_vector_length_at_mask_is_refused_before_allocating() -> None:
    fed = Federation.create(NAMES[:3])
    cfg = RoundConfig("r", 1, tuple(NAMES[:3]), 1 << 29)  # 2 GiB per silo if ever allocated
    srv = ServerCoordinator(cfg)
    reqs = srv.advertise_requests()
    states, reps = {}, {}
    for n in NAMES[:3]:
        states[n], reps[n] = fed.clients[n].advertise(reqs[n], context_hash_of(b"m"))
    reqs = srv.collect_advertisements(reps)
    reqs = srv.collect_shares({n: fed.clients[n].share(states[n], reqs[n]) for n in NAMES[:3]})
    with pytest.raises(ConfigurationError, match=r"length 536870912, got shape \(4,\)"):
        fed.clients["alpha"].mask(states["alpha"], reqs["alpha"], np.zeros(4, np.float32), 1.0)
    assert states["alpha"].wiped


# ------------------------------------------------------------------- per-silo weight proofs
PROOF_NAMES = ["alpha", "bravo", "charlie", "delta"]  # t = 3: one silo may be left out


def _proof_round(tap=None):
    rng = np.random.default_rng(3)
    vecs = {n: rng.normal(0, 0.5, 32).astype(np.float32) for n in PROOF_NAMES}
    weights = {n: 100.0 * (i + 1) for i, n in enumerate(PROOF_NAMES)}
    counters = {n: {"examples": weights[n]} for n in PROOF_NAMES}
    # 8 weight bits keep the proofs short for a unit test (the default is 24)
    res = run_in_memory(
        vecs,
        weights,
        counters,
        tap=tap,
        w_max=W_MAX,
        weight_bits=8,
        weight_proof=True,
        counter_names=("examples",),
        bounds=AggregateBounds(nonnegative=("examples",), weight_counter="examples"),
    )
    return res, vecs, weights


def test_weight_proofs_accept_an_honest_round() -> None:
    res, vecs, weights = _proof_round()
    cfg = RoundConfig(
        "run-1", 1, tuple(PROOF_NAMES), 32, w_max=W_MAX, weight_bits=8, weight_proof=True
    )
    exp, bound = expected_mean(cfg, vecs, weights, PROOF_NAMES)
    assert np.abs(res.mean - exp).max() <= bound
    assert res.survivors == tuple(PROOF_NAMES)


def test_a_weight_above_w_max_cannot_be_proven_and_the_silo_is_left_out() -> None:
    from secure_agg import range_proof

    def tap(stage, direction, name, msg):
        if stage == "mask" and direction == "reply" and name == "bravo":
            # bravo claims 3 x w_max: it commits to that weight but can only replay a proof
            # made for another commitment (no proof exists for a value above 2^weight_bits)
            fake = range_proof.commit(3 << 8, range_proof.random_blind())
            msg["weight_commit"] = range_proof.element_bytes(fake)
        return msg

    res, _, weights = _proof_round(tap)
    assert res.dropped == ("bravo",)  # its vector was left out, its masks removed
    assert res.survivors == ("alpha", "charlie", "delta")
    assert res.counters["examples"] == sum(weights[n] for n in res.survivors)


def test_a_weight_slot_differing_from_the_proven_weight_is_refused() -> None:
    def tap(stage, direction, name, msg):
        if stage == "mask" and direction == "reply" and name == "charlie":
            masked = msg["masked"].copy()
            masked[0] += np.uint32(20)  # + 20/256 x w_max, proof for the honest weight kept
            msg["masked"] = masked
        return msg

    with pytest.raises(ImplausibleAggregate, match="range-proven weight commitments"):
        _proof_round(tap)
