"""The collusion bound, exactly as it is: a server with c colluding silos that shows two survivor
sets to two groups of honest silos recovers BOTH secrets (mask seed b and key sk) of one silo,
hence its update, when c >= 2t - n; with one colluder fewer it cannot.

The honest silos are the real protocol client (``SecAggClient``, as the silo runs it); the
server and the colluders are played by the test (the colluders hand over their round state).
"""

from __future__ import annotations

import numpy as np
import pytest

from secure_agg import shamir
from secure_agg.client import ClientState
from secure_agg.errors import BelowThreshold
from secure_agg.keys import derive, pairwise_key, x25519_public
from secure_agg.messages import new_message
from secure_agg.prg import MaskAccumulator
from secure_agg.round_config import RoundConfig
from secure_agg.server import ServerCoordinator
from secure_agg.simulate import Federation, context_hash_of

NAMES = ["alpha", "bravo", "charlie", "delta"]  # n = 4
TARGET = "alpha"
RUN, ROUND, LENGTH = "run-c", 1, 48


def _split_view_attack(threshold: int, colluders: list[str], others_shown_b: list[str]):
    """Run one round; the target and the honest silos not in ``others_shown_b`` see survivor
    set U3 = everyone, ``others_shown_b`` see U3' = everyone but the target (who "dropped").
    Returns (decoded vector of the target, its true vector, its weight) or raises what an
    honest client raises."""
    rng = np.random.default_rng(17)
    vectors = {n: rng.normal(0, 1, LENGTH).astype(np.float32) for n in NAMES}
    weights = {n: 10.0 * (i + 1) for i, n in enumerate(NAMES)}
    fed = Federation.create(NAMES)
    cfg = RoundConfig(RUN, ROUND, tuple(NAMES), LENGTH, threshold=threshold)
    server = ServerCoordinator(cfg)
    ctx = context_hash_of(b"one global model")
    states: dict[str, ClientState] = {}
    adverts = {}
    requests = server.advertise_requests()
    for n in NAMES:
        states[n], adverts[n] = fed.clients[n].advertise(requests[n], ctx)
    requests = server.collect_advertisements(adverts)
    replies = {n: fed.clients[n].share(states[n], requests[n]) for n in NAMES}
    requests = server.collect_shares(replies)
    masked = {
        n: fed.clients[n].mask(states[n], requests[n], vectors[n], weights[n])["masked"]
        for n in NAMES
    }
    honest = [n for n in NAMES if n not in colluders]
    view_a = sorted(NAMES)
    view_b = sorted(n for n in NAMES if n != TARGET)
    shown = {n: (view_b if n in others_shown_b else view_a) for n in honest}

    # consistency: each honest silo signs the view it is shown; colluders sign both
    signatures: dict[tuple[str, ...], dict[str, bytes]] = {tuple(view_a): {}, tuple(view_b): {}}
    for n in honest:
        request = new_message(RUN, ROUND, "consistency", survivors=shown[n])
        signatures[tuple(shown[n])][n] = fed.clients[n].consistency(states[n], request)["signature"]
    for c in colluders:
        for view in (view_a, view_b):
            copy = ClientState.from_bytes(states[c].to_bytes())
            request = new_message(RUN, ROUND, "consistency", survivors=view)
            signatures[tuple(view)][c] = fed.clients[c].consistency(copy, request)["signature"]

    # unmask: honest silos reveal what their own view asks for
    b_shares = [bytes(states[c].shares[TARGET][0]) for c in colluders]
    sk_shares = [bytes(states[c].shares[TARGET][1]) for c in colluders]
    for n in honest:
        view = shown[n]
        signers = sorted(signatures[tuple(view)])
        request = new_message(
            RUN,
            ROUND,
            "unmask",
            survivors=view,
            dropped=sorted(set(NAMES) - set(view)),
            signers=signers,
            signatures=[signatures[tuple(view)][s] for s in signers],
        )
        reply = fed.clients[n].unmask(states[n], request)
        if TARGET in reply["b_owners"]:
            b_shares.append(reply["b_shares"][reply["b_owners"].index(TARGET)])
        if TARGET in reply["sk_owners"]:
            sk_shares.append(reply["sk_shares"][reply["sk_owners"].index(TARGET)])

    # the server rebuilds both secrets of the target and strips every mask from its vector
    b = shamir.combine(b_shares[:threshold], threshold)
    sk = shamir.combine(sk_shares[:threshold], threshold)
    assert x25519_public(sk) == adverts[TARGET]["s_pk"]
    total = masked[TARGET].copy()
    minus, plus = [derive(b, "self-mask", RUN, ROUND, TARGET)], []
    for p in NAMES:
        if p != TARGET:
            seed = pairwise_key(
                sk,
                adverts[p]["s_pk"],
                run_id=RUN,
                round_=ROUND,
                purpose="mask",
                name_a=TARGET,
                name_b=p,
            )
            (minus if p > TARGET else plus).append(seed)
    codec = cfg.codec()
    MaskAccumulator(codec.dtype).apply(total, plus=plus, minus=minus)
    decoded = codec.decode_sum(total, 1)
    return decoded, vectors[TARGET], weights[TARGET], codec


def test_two_colluders_of_four_recover_one_silo_at_t3() -> None:
    """n = 4, t = 3, c = 2 = 2t - n: alpha (shown U3) and bravo (shown U3 without alpha) each
    see three signatures over their own view and reveal; alpha's update comes out exactly."""
    decoded, truth, weight, codec = _split_view_attack(3, ["charlie", "delta"], ["bravo"])
    assert decoded.weight_sum == pytest.approx(weight, rel=1e-3)
    bound = codec.mean_error_bound(1, codec.quantize_weight(weight) / 2**codec.weight_bits)
    assert np.max(np.abs(decoded.mean - truth)) <= bound + 1e-6


@pytest.mark.parametrize(
    ("threshold", "colluders", "shown_b"),
    [
        (3, ["charlie"], ["bravo"]),  # c = 1 < 2t - n = 2: bravo's view has two signers
        (4, ["charlie", "delta"], ["bravo"]),  # t = 4: 2t - n = 4 colluders needed
    ],
    ids=["one-colluder-t3", "two-colluders-t4"],
)
def test_below_the_bound_an_honest_silo_refuses_to_reveal(
    threshold: int, colluders: list[str], shown_b: list[str]
) -> None:
    with pytest.raises(BelowThreshold, match="threshold is"):
        _split_view_attack(threshold, colluders, shown_b)


def test_site_minimum_threshold_follows_the_tolerated_colluders() -> None:
    """floor((n + k) / 2) + 1: one round needs 2t - n > k, and two runs of one context (the
    second without the target, n - 1 silos) need t(n) + t(n - 1) - n > k."""
    from silo_client.governance.policy import SitePolicy

    for k in range(0, 6):
        policy = SitePolicy(tolerated_colluders=k)
        for n in range(max(3, k + 2), 30):
            t, t_less = policy.min_threshold(n), policy.min_threshold(n - 1) if n > 3 else None
            assert 2 * t - n > k and t <= n
            if t_less is not None:
                assert t + t_less - n > k
    assert SitePolicy(tolerated_colluders=2).min_threshold(4) == 4
    assert SitePolicy(tolerated_colluders=1).min_threshold(4) == 3
