"""Shared helpers for the secure aggregation tests."""

from __future__ import annotations

import numpy as np

from secure_agg.round_config import RoundConfig


def expected_mean(cfg: RoundConfig, vecs: dict, weights: dict, who) -> tuple[np.ndarray, float]:
    """Plain weighted mean (quantized weights, as the codec uses) and the error bound."""
    codec = cfg.codec()
    a_q = {n: codec.quantize_weight(weights[n]) for n in who}
    num = sum(a_q[n] * np.clip(vecs[n].astype(np.float64), -cfg.clip, cfg.clip) for n in who)
    total = sum(a_q.values())
    bound = codec.mean_error_bound(len(who), total / 2**codec.weight_bits)
    return num / total, bound
