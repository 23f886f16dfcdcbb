"""Dishonest silos against the real FederatedRun + SecureAggregation + ClientApp (in process,
every message through Flower's serialisation): forged weight slots and counters are refused
with a clear event, a wrong Shamir share is dropped and its sender named, a silo above the
plan's max_weight is capped consistently, and the mask reply is held to the pacing grid.

The grid's tap stands between a silo and the server; adding ``delta`` (mod 2^32) to a silo's
masked upload there is exactly what a silo masking ``honest + delta`` would send.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from aggregator.artifacts import read_events
from aggregator.errors import RoundFailed
from aggregator.federated_run import FederatedRun
from secure_agg import shamir
from secure_agg.codec import CLIPPED_COUNTER, FixedPointCodec
from secure_agg.flower import SECAGG, SECAGG_ARRAYS, TRAIN_COUNTERS
from silo_client import reply_pacing, secure_round
from tests.test_secure_flower import SECURE, grid_for, make_silos, secagg_files
from training_plan import parse_plan


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("sa-bounds-hospitals")
    specs = generate_hospitals(out, hospitals=4, images_per_hospital=20, seed=11, image_size=32)
    return [out / s.name for s in specs]


# the layout a train round uses (codec slots do not depend on clip or w_max)
CODEC = FixedPointCodec(vector_length=0, n_silos=3, counter_names=TRAIN_COUNTERS)


def _header(weight_slot: int = 0, **counters: float) -> np.ndarray:
    """What a forging silo adds to its header: the weight slot and the counters' limbs."""
    out = np.zeros(CODEC.header_len, np.uint32)
    out[0] = weight_slot
    for name, value in counters.items():
        i = CODEC.counter_names.index(name)
        out[1 + 3 * i : 4 + 3 * i] = CODEC._encode_counter(name, value)
    return out


def _forge(node: int, header: np.ndarray):
    """Tap: silo ``node`` adds ``header`` to the header of its train masked upload."""

    def tap(request: Message, reply: Message) -> Message:
        if (
            request.metadata.message_type == "train.sa_mask"
            and request.metadata.dst_node_id == node
            and not reply.has_error()
        ):
            masked = reply.content[SECAGG_ARRAYS]["masked"].numpy().copy()
            masked[: header.size] += header
            reply.content[SECAGG_ARRAYS] = ArrayRecord({"masked": Array(masked)})
        return reply

    return tap


@pytest.mark.parametrize(
    ("forgery", "reason"),
    [
        (_header(weight_slot=1 << 31), "forged its weight"),
        (_header(examples=-1000), "'examples' sums to"),
        (_header(**{CLIPPED_COUNTER: -3}), "values_clipped sums to -3"),
    ],
    ids=["weight-slot", "negative-examples", "negative-clipped"],
)
def test_a_forging_silo_gets_the_round_refused(
    forgery, reason: str, hospitals: list[Path], tmp_path: Path
) -> None:
    homes = make_silos(tmp_path, hospitals[:3])
    grid = grid_for(homes, tap=_forge(2, forgery))
    with pytest.raises(RoundFailed) as info:
        FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-bound").run(grid)
    assert "implausible" in str(info.value) and reason in str(info.value)
    assert "not advanced" in str(info.value)
    events = read_events(tmp_path / "run" / "events.jsonl")
    failed = next(e for e in events if e["event"] == "round-failed")
    assert all("implausible" in why for why in failed["refused"].values())
    rounds = sorted(p.name for p in (tmp_path / "run" / "rounds").iterdir())
    assert rounds == ["round-000.safetensors"], "the global model was not advanced"
    assert secagg_files(homes) == {h.name: [] for h in homes}


def test_a_wrong_share_is_dropped_and_its_sender_named(
    hospitals: list[Path], tmp_path: Path
) -> None:
    homes = make_silos(tmp_path, hospitals)  # 4 silos: t = 3, 4 revealers

    def lie(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == "train.sa_unmask" and (
            request.metadata.dst_node_id == 1 and not reply.has_error()
        ):
            record = reply.content[SECAGG]
            shares = list(record["b_shares"])
            x, y = shamir.parse_share(shares[-1])
            shares[-1] = x.to_bytes(2, "big") + ((y + 1) % shamir.PRIME).to_bytes(66, "big")
            record["b_shares"] = shares
        return reply

    result = FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-share").run(
        grid_for(homes, tap=lie)
    )
    assert result.status == "done" and result.rounds[0].participants == 4
    events = read_events(tmp_path / "run" / "events.jsonl")
    finished = next(e for e in events if e["event"] == "round-finished")
    liar = homes[0].name
    assert any(f"silo '{liar}'" in note and "commitment" in note for note in finished["notes"])


def test_a_silo_above_max_weight_is_capped_consistently(
    hospitals: list[Path], tmp_path: Path
) -> None:
    homes = make_silos(tmp_path, hospitals[:3])
    plan = parse_plan(SECURE.replace("max_weight: 40", "max_weight: 4"))
    result = FederatedRun(plan, tmp_path / "run", "sa-cap").run(grid_for(homes))
    assert result.status == "done"
    record = result.rounds[0]
    # every silo has more than 4 training examples: each counts as exactly 4
    events = read_events(tmp_path / "run" / "events.jsonl")
    finished = next(e for e in events if e["event"] == "round-finished")
    assert not any("implausible" in n for n in finished["notes"])
    assert record.participants == 3


def test_mask_replies_are_held_to_the_pacing_grid(
    hospitals: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[tuple[float, float]] = []
    real = reply_pacing.hold_until_grid_point

    def record(started: float, **kwargs) -> float:
        import time

        worked = time.monotonic() - started
        target = real(started, **kwargs)
        held.append((worked, target))
        return target

    monkeypatch.setattr(secure_round, "hold_until_grid_point", record)
    homes = make_silos(tmp_path, hospitals[:3])
    FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-pace").run(grid_for(homes))
    assert len(held) == 6  # 3 silos x (train mask + evaluate mask)
    grid = {reply_pacing.PACE_BASE_SECONDS * reply_pacing.PACE_RATIO**k for k in range(40)}
    for worked, target in held:
        assert target in grid and worked <= target


@pytest.mark.parametrize("ratio", [None, 1.5])
def test_the_site_policy_sets_or_turns_off_the_pacing(
    ratio: float | None, hospitals: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from silo_client.governance.policy import SitePolicy, save_policy

    held: list[dict] = []
    monkeypatch.setattr(
        secure_round, "hold_until_grid_point", lambda started, **kw: held.append(kw) or 0.0
    )
    homes = make_silos(tmp_path, hospitals[:3])
    lenient = {"require_signed_plans": False, "secure_aggregation_required": False}
    for home in homes:
        policy = SitePolicy(min_local_examples=0, reply_pacing_ratio=ratio, **lenient)
        save_policy(home.root, policy, actor="tests")
    run = FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-pace-policy").run(grid_for(homes))
    assert run.status == "done"
    assert held == ([] if ratio is None else [{"ratio": ratio}] * 6)


def test_a_pacing_ratio_of_one_or_less_is_refused_with_one_line(tmp_path: Path) -> None:
    from silo_client.governance.policy import PolicyError, load_policy

    (tmp_path / "policy.yaml").write_text("policy_version: 1\nreply_pacing_ratio: 1.0\n")
    with pytest.raises(PolicyError, match="reply_pacing_ratio") as info:
        load_policy(tmp_path)
    assert "\n" not in str(info.value)


def test_paced_seconds_is_the_next_grid_point() -> None:
    assert reply_pacing.paced_seconds(0.0, 0.5, 2.0) == 0.5
    assert reply_pacing.paced_seconds(0.5, 0.5, 2.0) == 0.5
    assert reply_pacing.paced_seconds(0.51, 0.5, 2.0) == 1.0
    assert reply_pacing.paced_seconds(3.0, 0.5, 2.0) == 4.0
    assert reply_pacing.paced_seconds(4.0, 0.5, 2.0) == 4.0
    assert reply_pacing.paced_seconds(4.01, 0.5, 2.0) == 8.0
    # silos with 10x different training times land 3-4 grid points apart, never closer
    with pytest.raises(ValueError, match="ratio > 1"):
        reply_pacing.paced_seconds(1.0, 0.5, 1.0)


def test_hold_sleeps_until_the_grid_point() -> None:
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    now[0] = 102.7  # 2.7 s of work since 100.0
    assert (
        reply_pacing.hold_until_grid_point(
            100.0, base=0.5, ratio=2.0, clock=lambda: now[0], sleep=sleep
        )
        == 4.0
    )
    assert now[0] == 104.0
