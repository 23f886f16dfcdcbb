"""Fixed-point codec: round trip, error bound, headroom, counters."""

from __future__ import annotations

import numpy as np
import pytest

from secure_agg.codec import CLIPPED_COUNTER, FixedPointCodec, check_headroom
from secure_agg.errors import ConfigurationError


def _sum(codec: FixedPointCodec, encoded: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(codec.total_len, codec.dtype)
    for e in encoded:
        np.add(total, e, out=total)
    return total


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_round_trip_within_documented_bound(bits: int, rounding: str) -> None:
    rng = np.random.default_rng(1)
    n, m = 5, 20_000
    codec = FixedPointCodec(
        vector_length=m,
        n_silos=n,
        bits=bits,
        rounding=rounding,
        counter_names=("examples",),
        w_max=1000.0,
    )
    vecs = [rng.normal(0, 3, m).astype(np.float32) for _ in range(n)]
    weights = [1.0, 10.0, 100.0, 500.0, 1000.0]
    enc = [codec.encode(v, w, {"examples": w}) for v, w in zip(vecs, weights, strict=True)]
    out = codec.decode_sum(_sum(codec, enc), n)
    a_q = [codec.quantize_weight(w) for w in weights]
    expected = sum(a * np.clip(v.astype(np.float64), -8, 8) for a, v in zip(a_q, vecs, strict=True))
    expected /= sum(a_q)
    bound = codec.mean_error_bound(n, sum(a_q) / 2**codec.weight_bits)
    assert np.abs(out.mean - expected).max() <= bound
    exact = sum(
        w * np.clip(v.astype(np.float64), -8, 8) for w, v in zip(weights, vecs, strict=True)
    )
    exact /= sum(weights)
    bound_exact = codec.mean_error_bound(n, sum(a_q) / 2**codec.weight_bits, exact_weights=True)
    assert np.abs(out.mean - exact).max() <= bound_exact
    assert out.counters == {"examples": sum(weights)}
    assert out.weight_sum == pytest.approx(sum(weights), rel=1e-6)
    n_clip = sum(int(np.count_nonzero(np.abs(v) > 8)) for v in vecs)
    assert out.clipped_values == n_clip > 0
    assert out.clipped_fraction == pytest.approx(n_clip / (n * m))


def test_stochastic_rounding_is_unbiased() -> None:
    codec = FixedPointCodec(
        vector_length=200_000, n_silos=3, frac_bits=4, rounding="stochastic", w_max=1.0
    )
    v = np.full(200_000, 0.3, np.float32)  # 0.3 * 16 = 4.8: floor/ceil 4 or 5
    out = codec.decode_sum(codec.encode(v, 1.0), 1)
    assert abs(float(out.mean.mean()) - 0.3) < 2e-3
    assert set(np.unique(out.mean)) == {0.25, 0.3125}


def test_negative_values_and_wraparound() -> None:
    codec = FixedPointCodec(vector_length=4, n_silos=3, w_max=1.0)
    v = np.array([-8.0, -1.5, 0.0, 7.99], np.float32)
    out = codec.decode_sum(_sum(codec, [codec.encode(v, 1.0)] * 3), 3)
    np.testing.assert_allclose(out.mean, v, atol=1e-6)


def test_headroom_raises() -> None:
    check_headroom(10, 8.0, 22)
    with pytest.raises(ConfigurationError, match="overflow headroom"):
        check_headroom(100, 8.0, 24)
    with pytest.raises(ConfigurationError, match="overflow headroom"):
        check_headroom(3, 1000.0, 22, max_weight=1.0)
    check_headroom(1000, 8.0, 40, bits=64)
    with pytest.raises(ConfigurationError):
        FixedPointCodec(vector_length=3, n_silos=70, frac_bits=24)


def test_counters_signed_and_large() -> None:
    codec = FixedPointCodec(vector_length=1, n_silos=3, counter_names=("a", "b"), w_max=1.0)
    vals = [{"a": -5, "b": 1e7}, {"a": 3.25, "b": 2e7}, {"a": 0, "b": 123456789}]
    enc = [codec.encode(np.zeros(1, np.float32), 0.5, c) for c in vals]
    out = codec.decode_sum(_sum(codec, enc), 3)
    assert out.counters == {"a": -1.75, "b": 1e7 + 2e7 + 123456789}
    assert out.weight_sum == 1.5


def test_bad_inputs_raise_configuration_error() -> None:
    codec = FixedPointCodec(vector_length=3, n_silos=3, counter_names=("x",), w_max=10.0)
    z = np.zeros(3, np.float32)
    with pytest.raises(ConfigurationError, match="w_max"):
        codec.encode(z, 11.0)
    with pytest.raises(ConfigurationError, match="unknown counters"):
        codec.encode(z, 1.0, {"y": 1})
    with pytest.raises(ConfigurationError, match="unknown counters"):
        codec.encode(z, 1.0, {CLIPPED_COUNTER: 1})
    with pytest.raises(ConfigurationError, match="NaN"):
        codec.encode(np.array([0, np.nan, 0], np.float32), 1.0)
    with pytest.raises(ConfigurationError, match="length"):
        codec.encode(np.zeros(4, np.float32), 1.0)
    with pytest.raises(ConfigurationError, match="floating"):
        codec.encode(np.zeros(3, np.int32), 1.0)


def test_clip_warning() -> None:
    codec = FixedPointCodec(vector_length=100, n_silos=3, clip=1.0, w_max=1.0)
    v = np.linspace(-3, 3, 100).astype(np.float32)
    out = codec.decode_sum(codec.encode(v, 1.0), 1)
    assert out.clipped_values == int(np.count_nonzero(np.abs(v) > 1))
    assert any("clipped" in w for w in out.warnings)
