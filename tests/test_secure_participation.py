"""A dishonest server against the real ClientApp: differencing across re-runs, round-size and
threshold minimums, and abandoned rounds.

The server is the real FederatedRun + SecureAggregation on the in-process grid (every message
through Flower's serialisation); it "cheats" only by choosing whom it talks to: re-running the
same (run, round), starting a new run id with the same plan and initial model, or making one
silo drop out so that the survivor set differs. Local training is deterministic, so two sums for
one context over different survivor sets would give a silo's exact update by subtraction.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from aggregator.artifacts import read_events
from aggregator.errors import RoundFailed
from aggregator.federated_run import FederatedRun
from silo_client.abandoned_rounds import SPAWNED
from silo_client.governance.audit import AuditLog
from silo_client.governance.participation import ParticipationLedger
from silo_client.governance.policy import SitePolicy, save_policy
from silo_client.home import SiloHome
from tests.harness import InProcessGrid
from tests.test_secure_flower import SECURE, Recorder, grid_for, make_silos, secagg_files
from training_plan import parse_plan, wire

LENIENT = {"require_signed_plans": False, "min_local_examples": 0}


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("ledger-hospitals")
    specs = generate_hospitals(out, hospitals=4, images_per_hospital=12, seed=5, image_size=32)
    return [out / s.name for s in specs]


def _policy(homes: list[SiloHome], **fields) -> None:
    for home in homes:
        save_policy(home.root, SitePolicy(**{**LENIENT, **fields}), actor="tests")


def _refusals(out: Path) -> dict[str, str]:
    """What the operator sees: the reasons of every silos-refused event of the run."""
    refused: dict[str, str] = {}
    for event in read_events(out / "events.jsonl"):
        if event["event"] == "silos-refused":
            refused.update(event["refused"])
    return refused


def _events(home: SiloHome, name: str) -> list[dict]:
    return [e for e in AuditLog.of_home(home.root).entries() if e["event"] == name]


def _sent(grid: InProcessGrid, message_type: str) -> list[int]:
    return [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == message_type]


@pytest.fixture
def contributed(hospitals: list[Path], tmp_path: Path) -> list[SiloHome]:
    """Four silos that took part in run 'run-a' round 1 (train and evaluate) all together."""
    homes = make_silos(tmp_path / "silos", hospitals)
    _policy(homes)
    result = FederatedRun(parse_plan(SECURE), tmp_path / "run-a", "run-a").run(grid_for(homes))
    assert result.status == "done"
    for home in homes:
        (train, evaluate) = ParticipationLedger(home.root).entries()
        assert train.survivors == evaluate.survivors == tuple(h.name for h in homes)
        assert (train.phase, evaluate.phase) == ("train", "evaluate")
    return homes


# ------------------------------------------------------------------------------ (a) refused
@pytest.mark.parametrize("run_id", ["run-a", "run-b"], ids=["same-run-and-round", "new-run-id"])
def test_rerun_without_one_silo_is_refused_before_training(
    contributed: list[SiloHome], tmp_path: Path, run_id: str
) -> None:
    """Same plan, same initial model, all silos but the last: a sum that differs from the
    first one by exactly hospital-3's update. The three others refuse at advertise."""
    three = contributed[:3]
    recorder = Recorder()
    grid = grid_for(three, tap=recorder)
    with pytest.raises(RoundFailed) as info:
        FederatedRun(parse_plan(SECURE), tmp_path / "rerun", run_id).run(grid)
    assert "differencing" in str(info.value)
    refused = _refusals(tmp_path / "rerun")
    assert set(refused) == {"1", "2", "3"}
    for reason in refused.values():
        assert reason.startswith("advertise: ") and "differencing" in reason
        assert "hospital-3" in reason and "\n" not in reason
    errors = [r.error for r in recorder.replies("sa_advertise") if r.has_error()]
    assert {e.code for e in errors} == {wire.ERROR_REFUSED}
    assert not _sent(grid, "train.sa_mask"), "refused before any silo trained"
    for home in three:
        (entry,) = _events(home, "participation-refused")
        assert entry["stage"] == "advertise" and entry["run_id"] == run_id
        assert AuditLog.of_home(home.root).verify().ok
    assert secagg_files(three) == {h.name: [] for h in three}


def test_survivor_set_without_a_dropped_silo_is_refused_at_consistency(
    contributed: list[SiloHome], tmp_path: Path
) -> None:
    """All four are announced (so advertise passes), the server "loses" hospital-3's masked
    vector: the survivor set {0, 1, 2} is not signed, so no share is revealed."""

    def drop(node: int, message: Message) -> bool:
        return node == 4 and message.metadata.message_type == "train.sa_mask"

    grid = grid_for(contributed, drop=drop)
    with pytest.raises(RoundFailed):
        FederatedRun(parse_plan(SECURE), tmp_path / "rerun", "run-c").run(grid)
    refused = _refusals(tmp_path / "rerun")
    for node in ("1", "2", "3"):
        assert refused[node].startswith("consistency: ") and "differencing" in refused[node]
    assert not _sent(grid, "train.sa_unmask"), "nobody revealed a share"
    for home in contributed[:3]:
        assert _events(home, "participation-refused")[0]["stage"] == "consistency"


def test_unmask_is_refused_even_after_a_signed_consistency(
    contributed: list[SiloHome], tmp_path: Path
) -> None:
    """The commit point is unmask: a server that skips consistency checks on the silo side
    (e.g. a silo that signed before its ledger had the entry) still gets no shares. Here the
    ledger entry of hospital-0 is changed between consistency and unmask, as a concurrent run
    of the same context would."""
    ledger = ParticipationLedger(contributed[0].root)
    (train, _) = ledger.entries()

    def drop(node: int, message: Message) -> bool:
        if message.metadata.message_type == "train.sa_unmask" and node == 1:
            import sqlite3

            with sqlite3.connect(ledger.path) as db:  # another run claimed another set
                db.execute(
                    "UPDATE contributions SET survivors = ? WHERE context = ?",
                    ('["hospital-0", "hospital-1", "hospital-2"]', train.context),
                )
        return False

    result = FederatedRun(parse_plan(SECURE), tmp_path / "rerun", "run-d").run(
        grid_for(contributed, drop=drop)
    )
    # the three others revealed (their record matches): t = 3 shares suffice for the server
    assert result.status == "done" and result.rounds[0].participants == 4
    refused = _refusals(tmp_path / "rerun")
    assert set(refused) == {"1"}
    assert refused["1"].startswith("unmask: ") and "differencing" in refused["1"]
    assert _events(contributed[0], "participation-refused")[-1]["stage"] == "unmask"


# ------------------------------------------------------------------------------ (b) allowed
def test_same_survivor_set_or_a_fresh_model_still_runs(
    contributed: list[SiloHome], tmp_path: Path
) -> None:
    """A resume re-runs the interrupted round with the same silos: allowed (the same sum). A
    round on a fresh global model (round 2) is a new context: any survivor set is allowed."""
    again = FederatedRun(parse_plan(SECURE), tmp_path / "again", "run-a").run(grid_for(contributed))
    assert again.status == "done"
    for home in contributed:
        assert [e["phase"] for e in _events(home, "participation-repeated")] == [
            "train",
            "evaluate",
        ]
        assert [c.reveals for c in ParticipationLedger(home.root).entries()] == [2, 2]

    two_rounds = SECURE.replace("rounds: 1", "rounds: 2")

    def drop(node: int, message: Message) -> bool:  # hospital-3 is gone after round 1
        return node == 4 and message.metadata.group_id == "2"

    result = FederatedRun(parse_plan(two_rounds), tmp_path / "fresh", "run-e").run(
        grid_for(contributed, drop=drop)
    )
    assert result.status == "done"
    assert [r.participants for r in result.rounds] == [4, 3]
    assert ParticipationLedger(contributed[0].root).entries()[-1].survivors == (
        "hospital-0",
        "hospital-1",
        "hospital-2",
    )


# ------------------------------------------------------------------------------ (c) minimums
@pytest.mark.parametrize(
    ("plan_text", "policy"),
    [
        (SECURE.replace("min_silos: 3", "min_silos: 4"), {}),
        (SECURE, {"min_contributors": 4}),
    ],
    ids=["plan-min-silos", "site-min-contributors"],
)
def test_round_smaller_than_the_minimum_is_refused(
    hospitals: list[Path], tmp_path: Path, plan_text: str, policy: dict
) -> None:
    homes = make_silos(tmp_path / "silos", hospitals)
    _policy(homes, **policy)

    def drop(node: int, message: Message) -> bool:  # the server leaves hospital-3 out
        return node == 4

    grid = grid_for(homes, drop=drop)
    with pytest.raises(RoundFailed):
        FederatedRun(parse_plan(plan_text), tmp_path / "run", "run-m").run(grid)
    refused = _refusals(tmp_path / "run")
    for node in ("1", "2", "3"):
        assert refused[node].startswith("advertise: 3 participants")
        assert "at least 4 silos" in refused[node]
    assert not _sent(grid, "train.sa_mask")


def test_survivors_below_the_site_minimum_are_refused(
    hospitals: list[Path], tmp_path: Path
) -> None:
    homes = make_silos(tmp_path / "silos", hospitals)
    _policy(homes, min_contributors=4)

    def drop(node: int, message: Message) -> bool:
        return node == 4 and message.metadata.message_type == "train.sa_mask"

    grid = grid_for(homes, drop=drop)
    with pytest.raises(RoundFailed):
        FederatedRun(parse_plan(SECURE), tmp_path / "run", "run-s").run(grid)
    refused = _refusals(tmp_path / "run")
    assert refused["1"].startswith("consistency: 3 survivors")
    assert not _sent(grid, "train.sa_unmask")
    assert ParticipationLedger(homes[0].root).entries() == []


# ------------------------------------------------------------------------------ (d) colluders
def test_threshold_below_the_tolerated_colluders_minimum_is_refused(
    hospitals: list[Path], tmp_path: Path
) -> None:
    """n = 4, default t = 3: two colluders recover a silo's update (2t - n = 2). A site that
    tolerates 2 colluders needs t >= floor((4 + 2) / 2) + 1 = 4; the plan's threshold 4 runs."""
    homes = make_silos(tmp_path / "silos", hospitals)
    _policy(homes, tolerated_colluders=2)
    grid = grid_for(homes)
    with pytest.raises(RoundFailed):
        FederatedRun(parse_plan(SECURE), tmp_path / "low", "run-t").run(grid)
    refused = _refusals(tmp_path / "low")
    assert set(refused) == {"1", "2", "3", "4"}
    for reason in refused.values():
        assert "threshold 3 for 4 silos" in reason and "at least 4" in reason
    assert not _sent(grid, "train.sa_mask")

    strict = SECURE.replace("max_weight: 40}", "max_weight: 40, threshold: 4}")
    result = FederatedRun(parse_plan(strict), tmp_path / "ok", "run-t2").run(grid_for(homes))
    assert result.status == "done"


# ------------------------------------------------------------------------------ (e) wiping
def _abandon_after_share(homes: list[SiloHome], tmp_path: Path) -> None:
    """The server stops after the share stage: every silo keeps keys and shares on disk."""

    def drop(node: int, message: Message) -> bool:
        return message.metadata.message_type == "train.sa_mask"

    with pytest.raises(RoundFailed):
        FederatedRun(parse_plan(SECURE), tmp_path / "run", "run-w").run(grid_for(homes, drop=drop))


def _secrets(homes: list[SiloHome]) -> dict[str, list[str]]:
    return {
        h.name: [n for n in names if n.endswith((".state", ".global.npz", ".context.json"))]
        for h, names in zip(homes, secagg_files(homes).values(), strict=True)
    }


def test_abandoned_round_is_shredded_at_its_deadline(hospitals: list[Path], tmp_path: Path) -> None:
    homes = make_silos(tmp_path / "silos", hospitals[:3])
    _policy(homes, secure_round_timeout_seconds=4)
    _abandon_after_share(homes, tmp_path)
    left = _secrets(homes)
    assert all(any(n.endswith(".state") for n in names) for names in left.values()), left
    assert SPAWNED, "each silo home started its reaper"
    stop = time.monotonic() + 60
    while any(secagg_files(homes).values()) and time.monotonic() < stop:
        time.sleep(0.5)
    assert secagg_files(homes) == {h.name: [] for h in homes}
    for home in homes:
        (entry,) = _events(home, "secure-round-abandoned")
        assert entry["round_files"] == "run-w-1-train"


def test_abandoned_round_is_shredded_at_the_next_message_of_any_run(
    hospitals: list[Path], tmp_path: Path
) -> None:
    """Without a reaper (killed, host restarted), the next message of any run (here a plain
    request of another run that is itself refused) shreds what passed its deadline."""
    homes = make_silos(tmp_path / "silos", hospitals[:3])
    _policy(homes, secure_round_timeout_seconds=5)
    _abandon_after_share(homes, tmp_path)
    while SPAWNED:  # the reapers die before the deadline
        process = SPAWNED.pop()
        process.kill()
        process.wait(timeout=10)
    assert all(_secrets(homes).values())
    time.sleep(5.5)
    assert all(_secrets(homes).values()), "nothing else wiped them"
    grid = grid_for(homes)
    for node in grid.apps:
        message = Message(
            RecordDict({wire.CONFIG: ConfigRecord({wire.RUN_ID: "another-run"})}),
            dst_node_id=node,
            message_type="train",
            group_id="1",
        )
        (reply,) = grid.send_and_receive([message])
        assert reply.has_error()
    assert secagg_files(homes) == {h.name: [] for h in homes}
    for home in homes:
        assert _events(home, "secure-round-abandoned")


def test_a_running_stage_is_never_shredded(tmp_path: Path, hospitals: list[Path]) -> None:
    """The sweep leaves a round alone while one of its stages holds the round lock, even past
    the deadline (a long local training)."""
    from silo_client.abandoned_rounds import set_deadline, stage_lock, sweep_expired

    home = make_silos(tmp_path, hospitals[:1])[0]
    secret = home.secagg_dir / "run-x-1-train.state"
    secret.write_bytes(b"secret")
    set_deadline(home.secagg_dir, "run-x-1-train", -1)
    with stage_lock(home.secagg_dir, "run-x-1-train"):
        assert sweep_expired(home.root)[0] == []
        assert secret.exists()
    assert sweep_expired(home.root)[0] == ["run-x-1-train"]
    assert not secret.exists()
    assert os.listdir(home.secagg_dir) == []
