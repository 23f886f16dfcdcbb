"""Full rounds through the in-memory driver: sums, dropouts, thresholds, state handling."""

from __future__ import annotations

import numpy as np
import pytest

from secure_agg.client import ClientState
from secure_agg.errors import (
    BelowThreshold,
    ConfigurationError,
    MalformedMessage,
    ReplayDetected,
)
from secure_agg.round_config import RoundConfig, default_threshold
from secure_agg.server import ServerCoordinator
from secure_agg.simulate import Federation, context_hash_of, run_in_memory

from .conftest import expected_mean


def _data(n: int, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [f"h{i}" for i in range(n)]
    vecs = {k: rng.normal(0, 1, m).astype(np.float32) for k in names}
    weights = {k: float(rng.integers(1, 5000)) for k in names}
    counters = {k: {"examples": weights[k], "loss_sum": 0.25 * weights[k]} for k in names}
    return names, vecs, weights, counters


def _cfg(names, m):
    return RoundConfig("run-1", 1, tuple(names), m, counter_names=("examples", "loss_sum"))


def test_default_threshold_and_small_n() -> None:
    assert [default_threshold(n) for n in (3, 4, 5, 6, 9, 10)] == [3, 3, 4, 5, 7, 7]
    with pytest.raises(ConfigurationError, match="at least 3"):
        default_threshold(2)
    with pytest.raises(ConfigurationError, match="at least 3"):
        RoundConfig("r", 1, ("a", "b"), 10)
    with pytest.raises(ConfigurationError, match="threshold"):
        RoundConfig("r", 1, ("a", "b", "c", "d", "e"), 10, threshold=3)
    assert RoundConfig("r", 1, ("a", "b", "c", "d", "e"), 10, threshold=5).t == 5


def test_full_round_weighted_mean_and_counters() -> None:
    names, vecs, weights, counters = _data(5, 3000)
    vecs["h2"][:7] = 100.0  # clipped
    res = run_in_memory(vecs, weights, counters)
    exp, bound = expected_mean(_cfg(names, 3000), vecs, weights, names)
    assert np.abs(res.mean - exp).max() <= bound
    assert res.mean.dtype == np.float32
    assert res.counters["examples"] == sum(weights.values())
    assert res.counters["loss_sum"] == pytest.approx(0.25 * sum(weights.values()))
    assert res.weight_sum == pytest.approx(sum(weights.values()), rel=1e-5)
    assert res.clipped_values == 7
    assert res.survivors == tuple(names) and res.dropped == ()


@pytest.mark.parametrize(
    ("stage", "n_drop", "ok"),
    [
        ("advertise", 1, True),
        ("share", 1, True),
        ("mask", 1, True),
        ("consistency", 1, True),
        ("unmask", 1, True),
        ("advertise", 2, False),
        ("share", 2, False),
        ("mask", 2, False),
        ("consistency", 2, False),
        ("unmask", 2, False),
    ],
)
def test_dropouts_at_each_stage(stage: str, n_drop: int, ok: bool) -> None:
    names, vecs, weights, counters = _data(5, 500, seed=3)  # t = 4
    gone = names[1 : 1 + n_drop]
    if not ok:
        with pytest.raises(BelowThreshold, match="threshold"):
            run_in_memory(vecs, weights, counters, dropouts={stage: gone})
        return
    res = run_in_memory(vecs, weights, counters, dropouts={stage: gone})
    contributed = (
        [n for n in names if n not in gone] if stage in ("advertise", "share", "mask") else names
    )
    exp, bound = expected_mean(_cfg(names, 500), vecs, weights, contributed)
    assert np.abs(res.mean - exp).max() <= bound
    assert list(res.survivors) == contributed
    assert res.counters["examples"] == sum(weights[n] for n in contributed)
    assert list(res.dropped) == (gone if stage == "mask" else [])


def test_multiple_dropouts_across_stages_with_large_n() -> None:
    names, vecs, weights, counters = _data(10, 200, seed=4)  # t = 7
    drops = {"advertise": ["h0"], "mask": ["h5"], "unmask": ["h9"]}
    res = run_in_memory(vecs, weights, counters, dropouts=drops)
    contributed = [n for n in names if n not in ("h0", "h5")]
    exp, bound = expected_mean(_cfg(names, 200), vecs, weights, contributed)
    assert np.abs(res.mean - exp).max() <= bound
    assert res.dropped == ("h5",)


def test_uint64_option() -> None:
    names, vecs, weights, counters = _data(4, 300, seed=5)
    res = run_in_memory(vecs, weights, counters, bits=64, frac_bits=40)
    cfg = RoundConfig(
        "run-1", 1, tuple(names), 300, bits=64, frac_bits=40, counter_names=("examples", "loss_sum")
    )
    exp, bound = expected_mean(cfg, vecs, weights, names)
    assert np.abs(res.mean - exp).max() <= bound


def test_state_serialisation_and_wipe() -> None:
    fed = Federation.create(["a", "b", "c"])
    cfg = RoundConfig("r", 7, ("a", "b", "c"), 10)
    srv = ServerCoordinator(cfg)
    reqs = srv.advertise_requests()
    states, reps = {}, {}
    for n in fed.names:
        states[n], reps[n] = fed.clients[n].advertise(reqs[n], context_hash_of(b"m"))
    reqs = srv.collect_advertisements(reps)
    reps = {n: fed.clients[n].share(states[n], reqs[n]) for n in fed.names}
    st = states["a"]
    blob = st.to_bytes()
    again = ClientState.from_bytes(blob)
    assert again == st
    secrets = [st.c_sk, st.s_sk, st.b, *[x for pair in st.shares.values() for x in pair]]
    assert all(any(s) for s in secrets)
    st.wipe()
    assert all(not any(s) for s in secrets) and st.shares == {} and st.wiped
    with pytest.raises(ReplayDetected, match="wiped"):
        fed.clients["a"].mask(st, {}, np.zeros(10, np.float32), 1.0)
    with pytest.raises(MalformedMessage):
        ClientState.from_bytes(b"FSAS1{not json")


def test_client_wipes_state_on_abort() -> None:
    fed = Federation.create(["a", "b", "c"])
    srv = ServerCoordinator(RoundConfig("r", 1, ("a", "b", "c"), 4))
    req = srv.advertise_requests()["a"]
    st, _ = fed.clients["a"].advertise(req, b"x" * 32)
    b = st.b
    with pytest.raises(MalformedMessage):
        fed.clients["a"].share(st, {"protocol": "fedsilo-secagg/1"})
    assert st.wiped and not any(b)


def test_unmask_wipes_state_after_round() -> None:
    captured = {}

    def tap(stage, direction, silo, msg):
        return None

    names, vecs, weights, counters = _data(3, 10)
    fed = Federation.create(names)
    orig = fed.clients["h0"].unmask

    def spy(state, req):
        captured["state"] = state
        return orig(state, req)

    fed.clients["h0"].unmask = spy
    run_in_memory(vecs, weights, counters, federation=fed, tap=tap)
    assert captured["state"].wiped and not any(captured["state"].s_sk)
