"""Property tests: any n, t, dropout pattern and vector length."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_agg.errors import BelowThreshold
from secure_agg.messages import STAGES
from secure_agg.round_config import RoundConfig, default_threshold
from secure_agg.simulate import run_in_memory

from .conftest import expected_mean


@st.composite
def scenarios(draw):
    n = draw(st.integers(3, 8))
    t = draw(st.integers(default_threshold(n), n))
    m = draw(st.integers(0, 40))
    # per silo: the stage before which it vanishes (None: stays to the end)
    drop_at = draw(st.lists(st.sampled_from([None, None, None, *STAGES]), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, t, m, drop_at, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_dropout_pattern(scenario) -> None:
    n, t, m, drop_at, seed = scenario
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(n)]
    vecs = {k: rng.normal(0, 2, m).astype(np.float32) for k in names}
    weights = {k: float(rng.uniform(1, 10_000)) for k in names}
    counters = {k: {"examples": int(weights[k])} for k in names}
    dropouts = {s: [k for k, d in zip(names, drop_at, strict=True) if d == s] for s in STAGES}

    def alive_after(stage: str) -> list[str]:
        idx = STAGES.index(stage)
        return [
            k for k, d in zip(names, drop_at, strict=True) if d is None or STAGES.index(d) > idx
        ]

    enough = all(len(alive_after(s)) >= t for s in STAGES)
    if not enough:
        with pytest.raises(BelowThreshold):
            run_in_memory(vecs, weights, counters, dropouts=dropouts, threshold=t)
        return
    res = run_in_memory(vecs, weights, counters, dropouts=dropouts, threshold=t)
    contributed = alive_after("mask")
    assert list(res.survivors) == contributed
    assert set(res.dropped) == set(alive_after("share")) - set(contributed)
    cfg = RoundConfig("run-1", 1, tuple(names), m, threshold=t, counter_names=("examples",))
    exp, bound = expected_mean(cfg, vecs, weights, contributed)
    assert res.mean.shape == (m,)
    if m:
        assert np.abs(res.mean - exp).max() <= bound
    assert res.counters["examples"] == sum(int(weights[k]) for k in contributed)
