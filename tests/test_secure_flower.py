"""Secure aggregation over Flower messages: the real FederatedRun + SecureAggregation against the
real ClientApp (in process, every message through Flower's serialisation), on tiny hospitals.

Checks: the securely aggregated model equals plain FedAvg within the codec bound; the server
never receives anything that reveals one silo's update; a silo dropping out after sharing is
unmasked away; below threshold the round fails and the model stays; a tampering server gets
ERROR_SECURE_AGG refusals with clear reasons; no secret files remain after a round.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FEDSILO_TORCH_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Array, ArrayRecord, Message, RecordDict

from aggregator.aggregation import PlainAggregation
from aggregator.artifacts import read_events
from aggregator.errors import RoundFailed
from aggregator.federated_run import FederatedRun
from secure_agg import Roster
from secure_agg.flower import SECAGG, SECAGG_ARRAYS, SecureAggregation
from secure_agg.keys import x25519_generate
from silo_client.client_app import app as client_app
from silo_client.home import SiloHome, init_silo_home
from silo_client.identity import ensure_identity, key_path, load_identity, save_roster
from silo_client.secure_round import RoundFiles
from tests.harness import InProcessGrid, _wire_copy
from training_plan import parse_plan, wire

BASE = (
    "title: t\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "federation: {rounds: 1, min_silos: 3}\n"
)
# max_weight is the public cap of a silo's example count: tight, as docs/secure_agg.md advises.
SECURE = BASE + "secure_aggregation: {max_weight: 40}\n"
PLAIN = BASE + "secure_aggregation: {enabled: false, max_weight: 40}\n"
CLIP, FRAC_BITS, W_MAX = 8.0, 22, 40.0


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsilo.synthetic import generate_hospitals

    out = tmp_path_factory.mktemp("sa-hospitals")
    specs = generate_hospitals(out, hospitals=4, images_per_hospital=20, seed=11, image_size=32)
    return [out / s.name for s in specs]


def make_silos(root: Path, folders: list[Path], *, identities: bool = True) -> list[SiloHome]:
    """Fresh silo homes; each gets an identity key and its OWN copy of one shared roster."""
    homes = [init_silo_home(root / f.name, f.name, f) for f in folders]
    if identities:
        keys = {h.name: ensure_identity(h) for h in homes}
        roster = Roster({n: k.public_bytes for n, k in keys.items()})
        for h in homes:
            save_roster(h, Roster.from_json(roster.to_json()))
    return homes


@dataclass
class Recorder:
    """A tap keeping a copy of every (request, reply) the server sees, as it arrived."""

    pairs: list[tuple[Message, Message]] = field(default_factory=list)

    def __call__(self, request: Message, reply: Message) -> Message:
        self.pairs.append((request, reply if reply.has_error() else _wire_copy(reply)))
        return reply

    def replies(self, suffix: str = "") -> list[Message]:
        return [r for q, r in self.pairs if q.metadata.message_type.endswith(suffix)]


class TamperingGrid(InProcessGrid):
    """A dishonest server: ``edit(message)`` may change each request before delivery."""

    def __init__(self, apps: dict, edit, **kwargs) -> None:
        super().__init__(apps, **kwargs)
        self.edit = edit

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            self.edit(m)
        return super().push_messages(messages)


def grid_for(homes: list[SiloHome], cls=InProcessGrid, **kwargs) -> InProcessGrid:
    return cls({i + 1: (client_app, {"home": str(h.root)}) for i, h in enumerate(homes)}, **kwargs)


def secagg_files(homes: list[SiloHome]) -> dict[str, list[str]]:
    return {h.name: sorted(p.name for p in h.secagg_dir.iterdir()) for h in homes}


def codec_bound(weights: list[float]) -> float:
    """docs/secure_agg.md bound vs exact weights: n 2^-(f+1)/A + clip 2^-21 + clip n 2^-24/A."""
    n, a = len(weights), sum(weights) / W_MAX
    return n * 2.0 ** -(FRAC_BITS + 1) / a + CLIP * 2.0**-21 + CLIP * n * 2.0**-24 / a


# ------------------------------------------------------------------------------ fixtures
@dataclass
class Runs:
    secure: object
    plain: object
    secure_tap: Recorder
    plain_tap: Recorder
    secure_homes: list[SiloHome]
    out: Path


@pytest.fixture(scope="module")
def runs(hospitals: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The same round twice on fresh, identical silos: secure aggregation and plain FedAvg."""
    root = tmp_path_factory.mktemp("sa-runs")
    secure_homes = make_silos(root / "secure", hospitals[:3])
    plain_homes = make_silos(root / "plain", hospitals[:3], identities=False)
    secure_tap, plain_tap = Recorder(), Recorder()
    grid = grid_for(secure_homes, tap=secure_tap)
    secure = FederatedRun(parse_plan(SECURE), root / "run-secure", "sa-a").run(grid)
    grid = grid_for(plain_homes, tap=plain_tap)
    plain = FederatedRun(
        parse_plan(PLAIN), root / "run-plain", "sa-a", aggregation=PlainAggregation()
    ).run(grid)
    return Runs(secure, plain, secure_tap, plain_tap, secure_homes, root)


# ------------------------------------------------------------------------------ (a)
def test_default_aggregation_of_a_secure_plan_is_secure() -> None:
    from aggregator.federated_run import default_aggregation

    step = default_aggregation(parse_plan(SECURE))
    assert isinstance(step, SecureAggregation) and step.name == "secure"
    assert (step.clip, step.frac_bits, step.w_max) == (CLIP, FRAC_BITS, W_MAX)


def test_secure_model_equals_plain_fedavg(runs: Runs) -> None:
    assert runs.secure.status == runs.plain.status == "done"
    weights = [
        float(r.content[wire.METRICS][wire.NUM_EXAMPLES])
        for r in runs.plain_tap.replies("train")
        if not r.has_error()
    ]
    assert len(weights) == 3
    bound = codec_bound(weights) + 1e-6  # + float32 rounding of global + mean
    secure, plain = runs.secure.final_arrays, runs.plain.final_arrays
    assert set(secure) == set(plain)
    worst = max(float(np.max(np.abs(secure[k] - plain[k]))) for k in plain)
    assert worst <= bound, f"secure vs plain FedAvg differ by {worst} > {bound}"
    # the comparison means something: the round moved the model far more than the bound
    initial = runs.out / "run-plain" / "rounds" / "round-000.safetensors"
    from aggregator.artifacts import load_model

    start = load_model(initial)
    moved = max(float(np.max(np.abs(plain[k] - start[k]))) for k in plain)
    assert moved > 100 * bound

    s_round, p_round = runs.secure.rounds[0], runs.plain.rounds[0]
    assert s_round.participants == p_round.participants == 3
    assert s_round.train_metrics["train-loss"] == pytest.approx(
        p_round.train_metrics["train-loss"], rel=1e-5
    )
    assert s_round.train_metrics["clipped-fraction"] == 0.0
    # evaluation: sums of counters; the models differ only within the codec bound
    assert s_round.eval_metrics["eval-loss"] == pytest.approx(
        p_round.eval_metrics["eval-loss"], rel=1e-3
    )
    assert s_round.eval_metrics["eval-accuracy"] == pytest.approx(
        p_round.eval_metrics["eval-accuracy"], abs=0.1
    )
    for key in ("eval-sensitivity", "eval-specificity"):
        assert 0.0 <= s_round.eval_metrics[key] <= 1.0


# ------------------------------------------------------------------------------ (b)
def test_server_never_receives_an_individual_update(runs: Runs) -> None:
    updates = [
        r.content[wire.ARRAYS][wire.MODEL].numpy()
        for r in runs.plain_tap.replies("train")
        if not r.has_error()
    ]
    assert len(updates) == 3 and all(np.any(u != 0) for u in updates)
    received = []
    for request, reply in runs.secure_tap.pairs:
        assert not reply.has_error(), reply.error.reason
        # replies carry protocol records only: no model, no metrics, no example counts
        assert set(reply.content.keys()) <= {SECAGG, SECAGG_ARRAYS}, request.metadata.message_type
        assert wire.NUM_EXAMPLES not in reply.content[SECAGG]
        for record in reply.content.array_records.values():
            for key in record:
                received.append((request.metadata.message_type, record[key].numpy()))
    # the only arrays the server ever got are the uint32 masked vectors of the mask stages
    assert {t for t, _ in received} == {"train.sa_mask", "evaluate.sa_mask"}
    masked = [a for t, a in received if t == "train.sa_mask"]
    assert len(masked) == 3
    length = updates[0].size
    for vector in masked:
        assert vector.dtype == np.uint32 and vector.size >= length
        body = vector[-length:].view(np.int32).astype(np.float64)
        for update in updates:
            assert not np.array_equal(vector[-length:].view(np.float32), update)
            corr = np.corrcoef(body, update.astype(np.float64))[0, 1]
            assert abs(corr) < 0.01, f"masked vector correlates with an update ({corr:.4f})"
    # even all masked vectors together (pairwise masks cancel) still hide the sum: self masks
    total = np.zeros(masked[0].size, np.uint32)
    for vector in masked:
        total += vector
    corr = np.corrcoef(
        total[-length:].view(np.int32).astype(np.float64), np.sum(updates, axis=0, dtype=np.float64)
    )[0, 1]
    assert abs(corr) < 0.01


# ------------------------------------------------------------------------------ (f)
def test_no_secret_files_remain_after_the_round(runs: Runs) -> None:
    assert secagg_files(runs.secure_homes) == {h.name: [] for h in runs.secure_homes}
    for home in runs.secure_homes:
        assert stat.S_IMODE(key_path(home).stat().st_mode) == 0o600
        assert stat.S_IMODE(home.secagg_dir.stat().st_mode) == 0o700
    events = read_events(runs.out / "run-secure" / "events.jsonl")
    started = next(e for e in events if e["event"] == "run-started")
    assert started["aggregation"] == "secure"


def test_stale_round_files_are_wiped_by_the_next_hello(
    tmp_path: Path, hospitals: list[Path]
) -> None:
    home = make_silos(tmp_path, hospitals[:1])[0]
    old = RoundFiles(home, "run-x", 1, "train")
    other_run = RoundFiles(home, "run-y", 7, "evaluate")
    for files in (old, other_run):
        files.save_global(["model"], [np.zeros(3, np.float32)], {"phase": "train"})
        files.state.write_bytes(b"secret")
    current = RoundFiles(home, "run-x", 2, "train")
    removed = {p.name for p in current.remove_stale()}
    assert removed >= {old.state.name, old.global_npz.name, old.context.name}
    assert not [p for p in home.secagg_dir.iterdir() if p.name.startswith(old.stem)]
    assert other_run.state.exists(), "a recent file of another run is left alone"
    future = other_run.state.stat().st_mtime + 2 * 3600
    current.remove_stale(now=future)
    assert not any(home.secagg_dir.iterdir())


# ------------------------------------------------------------------------------ (c)
def test_silo_dropping_after_sharing_is_unmasked_away(
    runs: Runs, hospitals: list[Path], tmp_path: Path
) -> None:
    homes = make_silos(tmp_path, hospitals)  # 4 silos: t = 3
    gone = 4

    def drop(node: int, message: Message) -> bool:
        return node == gone and message.metadata.message_type == "train.sa_mask"

    grid = grid_for(homes, drop=drop)
    result = FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-c").run(grid)
    assert result.status == "done"
    record = result.rounds[0]
    assert record.participants == 3
    assert "mask" in record.refused[str(gone)]
    assert record.train_metrics["secure-dropped"] == 1
    # hospitals 0..2 trained exactly as in the plain 3-silo run: same model within the bound
    weights = [
        float(r.content[wire.METRICS][wire.NUM_EXAMPLES])
        for r in runs.plain_tap.replies("train")
        if not r.has_error()
    ]
    bound = codec_bound(weights) + 1e-6
    plain = runs.plain.final_arrays
    worst = max(float(np.max(np.abs(result.final_arrays[k] - plain[k]))) for k in plain)
    assert worst <= bound
    assert record.eval_metrics["secure-contributors"] == 4
    # survivors wiped at unmask; the dropped silo's train state went at its next hello (the
    # evaluation of the same round), so no secret is left anywhere
    assert secagg_files(homes) == {h.name: [] for h in homes}


# ------------------------------------------------------------------------------ (d)
def test_below_threshold_the_round_fails_and_the_model_stays(
    hospitals: list[Path], tmp_path: Path
) -> None:
    homes = make_silos(tmp_path, hospitals[:3])  # t = 3 of 3

    def drop(node: int, message: Message) -> bool:
        return node == 3 and message.metadata.message_type == "train.sa_share"

    grid = grid_for(homes, drop=drop)
    with pytest.raises(RoundFailed) as info:
        FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-d").run(grid)
    text = str(info.value)
    assert "not advanced" in text and "threshold" in text
    rounds = sorted(p.name for p in (tmp_path / "run" / "rounds").iterdir())
    assert rounds == ["round-000.safetensors"]
    assert not (tmp_path / "run" / "final_model.safetensors").exists()
    events = read_events(tmp_path / "run" / "events.jsonl")
    failed = next(e for e in events if e["event"] == "round-failed")
    assert "share" in failed["refused"]["3"]
    # no silo ever trained: nothing was masked
    assert not any(m.metadata.message_type == "train.sa_mask" for m in grid.sent)


def test_too_few_silos_for_secure_aggregation(hospitals: list[Path], tmp_path: Path) -> None:
    homes = make_silos(tmp_path, hospitals[:3])
    (homes[2].root / "identity" / "roster.json").unlink()
    recorder = Recorder()
    grid = grid_for(homes, tap=recorder)
    with pytest.raises(RoundFailed) as info:
        FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-d2").run(grid)
    assert "silo join" in str(info.value)  # the silo says how to fix its setup
    assert str(homes[2].root) not in str(info.value), "a silo must not reveal its paths"
    assert "at least 3" in str(info.value)
    (error,) = [r for r in recorder.replies("sa_hello") if r.has_error()]
    assert error.error.code == wire.ERROR_CONFIG


# ------------------------------------------------------------------------------ (e)
def _swap_peer_key(message: Message) -> None:
    """Man in the middle: replace the first peer's encryption key by the server's own."""
    if message.metadata.message_type == "train.sa_share":
        record = message.content[SECAGG]
        record["c_pks"] = [x25519_generate()[1], *record["c_pks"][1:]]


def _other_model_for_node_2(message: Message) -> None:
    """Show silo 2 a different global model than the others."""
    if message.metadata.message_type == "train.sa_hello" and message.metadata.dst_node_id == 2:
        record = message.content[wire.ARRAYS]
        vector = record[wire.MODEL].numpy().copy()
        vector[0] += 0.5
        message.content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({wire.MODEL: Array(vector)}),
                wire.CONFIG: message.content[wire.CONFIG],
                SECAGG: message.content[SECAGG],
            }
        )


def _lower_clip_for_node_1(message: Message) -> None:
    """Announce another codec config than the plan's to silo 1."""
    if message.metadata.message_type == "train.sa_advertise" and message.metadata.dst_node_id == 1:
        record = message.content[SECAGG]
        config = json.loads(record["config"])
        config["clip"] = 0.5
        record["config"] = json.dumps(config, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize(
    ("edit", "stage", "refusers", "reason"),
    [
        (_swap_peer_key, "train.sa_share", {1, 2, 3}, "does not verify under our roster key"),
        (_other_model_for_node_2, "train.sa_share", {1, 2, 3}, "different model/config"),
        (_lower_clip_for_node_1, "train.sa_advertise", {1}, "differ from the approved plan"),
    ],
    ids=["peer-key-swap", "different-model", "codec-config"],
)
def test_tampering_server_gets_secure_agg_refusals(
    edit,
    stage: str,
    refusers: set[int],
    reason: str,
    hospitals: list[Path],
    tmp_path: Path,
) -> None:
    homes = make_silos(tmp_path, hospitals[:3])
    recorder = Recorder()
    grid = grid_for(homes, cls=TamperingGrid, edit=edit, tap=recorder)
    with pytest.raises(RoundFailed) as info:
        FederatedRun(parse_plan(SECURE), tmp_path / "run", "sa-e").run(grid)
    errors = {
        r.metadata.src_node_id: r.error
        for q, r in recorder.pairs
        if r.has_error() and q.metadata.message_type == stage
    }
    assert set(errors) == refusers
    for error in errors.values():
        assert error.code == wire.ERROR_SECURE_AGG
        assert reason in error.reason and "\n" not in error.reason
    assert reason in str(info.value)
    assert not any(m.metadata.message_type == "train.sa_mask" for m in grid.sent)
    files = secagg_files(homes)
    for node in refusers:
        assert files[homes[node - 1].name] == [], "a refusing silo wipes its round state"
    # identity keys are untouched by a refusal
    for home in homes:
        load_identity(home)
