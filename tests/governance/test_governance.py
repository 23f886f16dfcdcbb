"""The silo's governance without processes: audit chain, approvals, policy, the gate in the real
ClientApp (in process), signatures, the bundle check, plan validation properties, CLI errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.aggregation import PlainAggregation
from aggregator.errors import RoundFailed
from aggregator.federated_run import FederatedRun
from silo_client.client_app import app as client_app
from silo_client.errors import PlanRefused
from silo_client.governance.approvals import ApprovalStore, approve_plan, revoke_plan
from silo_client.governance.audit import AuditLog
from silo_client.governance.bundle import BundleRefused, check_bundle
from silo_client.governance.policy import (
    AllowedResearcher,
    PolicyError,
    SitePolicy,
    parse_policy,
    save_policy,
)
from tests.harness import InProcessGrid
from training_plan import PlanValidationError, parse_plan, plan_hash
from training_plan.signing import (
    PlanSignatureError,
    generate_keypair,
    load_private_key,
    sign_plan,
    verify_plan_signature,
)

PLAN = (
    "title: gov\nresearcher: {name: R}\nmodel: {name: resnet10}\n"
    "preprocessing: {input_size: 32}\ntraining: {batch_size: 8, seed: 3}\n"
    "federation: {rounds: 1, min_silos: 3, on_refusal: stop}\n"
    "secure_aggregation: {enabled: false}\n"
)


@pytest.fixture
def keys(tmp_path: Path):
    key, pub = generate_keypair(tmp_path / "researcher")
    return load_private_key(key), pub.read_text().strip()


def _policy(pub: str, **changes) -> SitePolicy:
    base = {
        "allowed_researchers": [AllowedResearcher(name="R", public_key=pub)],
        "secure_aggregation_required": False,
        "min_local_examples": 2,
    }
    return SitePolicy(**{**base, **changes})


def _grid(homes) -> InProcessGrid:
    return InProcessGrid({i + 1: (client_app, {"home": str(h.root)}) for i, h in enumerate(homes)})


def _run(homes, plan, tmp_path: Path, name: str) -> str:
    run = FederatedRun(plan, tmp_path / name, name, aggregation=PlainAggregation())
    with pytest.raises(RoundFailed) as info:
        run.run(_grid(homes))
    return str(info.value)


# ---------------------------------------------------------------------------- audit
def test_audit_chain_detects_edit_removal_and_reorder(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append("sent", kind="masked-update", bytes=i)
    assert log.verify().ok and log.verify().entries == 5
    lines = log.path.read_text().splitlines(keepends=True)

    def check(new_lines: list[str], expected: str) -> None:
        log.path.write_text("".join(new_lines))
        result = log.verify()
        assert not result.ok and expected in result.problem, result

    check([*lines[:2], lines[2].replace('"bytes": 2', '"bytes": 9'), *lines[3:]], "line 3")
    check([*lines[:2], *lines[3:]], "sequence")
    check([lines[0], lines[2], lines[1], *lines[3:]], "sequence")
    check([lines[0], "{not json\n", *lines[1:]], "not a JSON object")
    log.path.write_text("".join(lines))
    assert log.verify().ok


def test_a_torn_write_never_damages_earlier_entries(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("plan-approved", plan_hash="a" * 64)
    log.append("sent", kind="plain-update", bytes=10)
    good = log.path.read_bytes()
    with log.path.open("ab") as handle:  # a crash in the middle of the third write
        handle.write(b'{"seq": 2, "event": "sent", "kind": "mask')
    assert not log.verify().ok and "torn" in log.verify().problem
    assert [e["event"] for e in log.entries()] == ["plan-approved", "sent"]
    log.append("sent", kind="plain-update", bytes=11)
    assert log.path.read_bytes().startswith(good)
    result = log.verify()
    assert result.ok and result.entries == 4
    assert [e["event"] for e in log.entries()][2:] == ["audit-torn-write", "sent"]


# ---------------------------------------------------------------------------- signing
def test_signature_covers_the_plan_hash(keys, tmp_path: Path) -> None:
    key, pub = keys
    plan = parse_plan(PLAN)
    sig = sign_plan(plan, key)
    assert verify_plan_signature(plan, sig) == pub
    changed = parse_plan(PLAN.replace("seed: 3", "seed: 4"))
    with pytest.raises(PlanSignatureError, match="changed after signing"):
        verify_plan_signature(changed, sig)
    other, _ = generate_keypair(tmp_path / "other")
    pinned = parse_plan(PLAN.replace("{name: R}", f"{{name: R, public_key: '{pub}'}}"))
    with pytest.raises(PlanSignatureError, match="names researcher key"):
        sign_plan(pinned, load_private_key(other))
    forged = sig.__class__(sig.plan_hash, sig.public_key, sig.signature[:-4] + "AAA=", "")
    with pytest.raises(PlanSignatureError, match="does not verify"):
        verify_plan_signature(plan, forged)


# ---------------------------------------------------------------------------- the gate
def test_every_refusal_path_of_the_gate(silo_homes, keys, tmp_path: Path) -> None:
    key, pub = keys
    plan = parse_plan(PLAN)
    digest = plan_hash(plan)
    for home in silo_homes:
        save_policy(home.root, _policy(pub), actor="it")

    # unapproved
    reason = _run(silo_homes, plan, tmp_path, "r1")
    assert f"plan {digest[:12]} is not approved at this site" in reason
    for home in silo_homes:
        assert not any(home.cache_dir.iterdir()), "no data loaded for a refused plan"
        events = [e["event"] for e in AuditLog.of_home(home.root).entries()]
        assert "plan-refused" in events and "reply-refused" in events
        assert AuditLog.of_home(home.root).verify().ok

    # unsigned, while the policy requires signatures: approve refuses it
    with pytest.raises(PlanRefused, match="not signed"):
        approve_plan(silo_homes[0].root, plan, actor="it")

    # approved everywhere, then revoked at one silo
    signature = sign_plan(plan, key)
    for home in silo_homes:
        approve_plan(home.root, plan, signature, actor="it")
    revoke_plan(silo_homes[0].root, digest[:10], actor="it")
    assert "was revoked at this site" in _run(silo_homes, plan, tmp_path, "r2")

    # the researcher's key is removed from the policy after approval
    approve_plan(silo_homes[0].root, plan, signature, actor="it")
    save_policy(silo_homes[1].root, _policy(pub, allowed_researchers=[]), actor="it")
    assert "which this site does not allow" in _run(silo_homes, plan, tmp_path, "r3")
    save_policy(silo_homes[1].root, _policy(pub), actor="it")

    # out of policy after approval
    save_policy(
        silo_homes[2].root,
        _policy(pub, max_local_epochs=1, max_rounds=1, allowed_models=["densenet121"]),
        actor="it",
    )
    assert "model 'resnet10' is not allowed at this site" in _run(silo_homes, plan, tmp_path, "r4")
    save_policy(silo_homes[2].root, _policy(pub), actor="it")

    # too few local examples: trained, but nothing leaves
    save_policy(silo_homes[0].root, _policy(pub, min_local_examples=10_000), actor="it")
    reason = _run(silo_homes, plan, tmp_path, "r5")
    assert "minimum number of local examples per round is not met" in reason
    assert "10000" not in reason and "/" not in reason


def test_a_plain_folder_that_does_not_fit_the_plan_is_refused_at_the_gate(
    silo_homes, keys, tmp_path: Path
) -> None:
    """A colour plan at silos whose plain folders hold grayscale images: refused with the
    reason at the gate (audited), before any pixel is decoded; not a dropout mid-round."""
    key, pub = keys
    plan = parse_plan(PLAN.replace("{input_size: 32}", "{input_size: 32, channels: 3}"))
    for home in silo_homes:
        save_policy(home.root, _policy(pub), actor="it")
        approve_plan(home.root, plan, sign_plan(plan, key), actor="it")
    reason = _run(silo_homes, plan, tmp_path, "colour")
    assert (
        "none of this site's images fit the plan: they are grayscale (MONOCHROME2) and the plan "
        "takes colour images (preprocessing.channels: 3)"
    ) in reason
    for home in silo_homes:
        assert not any(home.cache_dir.iterdir()), "no data loaded for a refused plan"
        refused = [e for e in AuditLog.of_home(home.root).entries() if e["event"] == "plan-refused"]
        assert refused and "images fit the plan" in refused[-1]["reason"]


def test_altered_plan_refused_and_audited(silo_homes, keys, tmp_path: Path) -> None:
    key, pub = keys
    plan = parse_plan(PLAN)
    for home in silo_homes:
        save_policy(home.root, _policy(pub), actor="it")
        approve_plan(home.root, plan, sign_plan(plan, key), actor="it")
    altered = parse_plan(PLAN.replace("seed: 3", "seed: 5"))
    run = FederatedRun(altered, tmp_path / "alt", "alt", aggregation=PlainAggregation())
    run.hash = plan_hash(plan)  # the server claims the approved plan's hash
    with pytest.raises(RoundFailed, match="plan altered"):
        run.run(_grid(silo_homes))
    refused = [
        e for e in AuditLog.of_home(silo_homes[0].root).entries() if e["event"] == "reply-refused"
    ]
    assert refused and "plan altered" in refused[-1]["reason"]


def test_approved_plan_runs_and_the_audit_says_what_left(silo_homes, keys, tmp_path) -> None:
    key, pub = keys
    plan = parse_plan(PLAN.replace("on_refusal: stop", "on_refusal: continue"))
    for home in silo_homes:
        save_policy(home.root, _policy(pub), actor="it")
        approve_plan(home.root, plan, sign_plan(plan, key), actor="it")
    result = FederatedRun(plan, tmp_path / "ok", "ok", aggregation=PlainAggregation()).run(
        _grid(silo_homes)
    )
    assert result.status == "done"
    entries = list(AuditLog.of_home(silo_homes[0].root).entries())
    started = [e for e in entries if e["event"] == "run-started"]
    assert len(started) == 1 and started[0]["plan_hash"] == plan_hash(plan)
    sent = [e for e in entries if e["event"] == "sent"]
    assert {e["kind"] for e in sent} == {"plain-update", "plain-metrics"}
    assert all(
        e["bytes"] > 0
        and set(e)
        <= {"seq", "time", "event", "run_id", "message_type", "kind", "bytes", "prev", "hash"}
        for e in sent
    )


def test_continue_on_refusal_with_enough_silos(silo_homes, keys, hospitals, tmp_path) -> None:
    """One of four silos refuses; the plan says continue and three suffice."""
    from silo_client.home import init_silo_home

    key, pub = keys
    extra = init_silo_home(tmp_path / "extra", "extra", sorted(hospitals.iterdir())[0])
    homes = [*silo_homes, extra]
    plan = parse_plan(PLAN.replace("on_refusal: stop", "on_refusal: continue"))
    for home in homes:
        save_policy(home.root, _policy(pub), actor="it")
    for home in silo_homes:
        approve_plan(home.root, plan, sign_plan(plan, key), actor="it")
    run = FederatedRun(plan, tmp_path / "c", "c", aggregation=PlainAggregation())
    result = run.run(_grid(homes))
    assert result.status == "done" and result.rounds[0].participants == 3
    assert any("not approved" in r for r in result.rounds[0].refused.values())


# ---------------------------------------------------------------------------- policy file
def test_policy_errors_name_the_line(keys) -> None:
    _, pub = keys
    with pytest.raises(PolicyError, match=r"policy.yaml:2:1: max_round: unknown key"):
        parse_policy("max_rounds: 3\nmax_round: 4\n")
    with pytest.raises(PolicyError, match="public_key"):
        parse_policy("allowed_researchers:\n  - {name: x, public_key: nope}\n")
    assert parse_policy(f"allowed_researchers:\n  - {{name: x, public_key: '{pub}'}}\n")


def test_approvals_survive_and_record_who(silo_homes, keys) -> None:
    key, pub = keys
    root = silo_homes[0].root
    save_policy(root, _policy(pub), actor="it")
    plan = parse_plan(PLAN)
    approve_plan(root, plan, sign_plan(plan, key), actor="alice")
    record = ApprovalStore(root).get(plan_hash(plan))
    assert record.approved_by == "alice" and record.signer_key == pub and not record.revoked
    revoke_plan(root, plan_hash(plan)[:8], actor="bob")
    assert ApprovalStore(root).get(plan_hash(plan)).revoked_by == "bob"
    assert json.loads((root / "approvals.json").read_text())["version"] == 1


# ---------------------------------------------------------------------------- bundle
def _fab(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buf.getvalue()


def test_bundle_check(tmp_path: Path) -> None:
    from aggregator.control import write_flower_app

    pyproject = (write_flower_app(tmp_path / "app", {"a": 1}) / "pyproject.toml").read_text()
    good = {"pyproject.toml": pyproject, ".info/CONTENT": "x"}
    check_bundle(_fab(good))
    with pytest.raises(BundleRefused, match=r"carries files other than pyproject\.toml"):
        check_bundle(_fab({**good, "silo_client/__init__.py": "import os"}))
    with pytest.raises(BundleRefused, match="clientapp is 'evil:app'"):
        check_bundle(_fab({"pyproject.toml": pyproject.replace("silo_client.client_app", "evil")}))
    with pytest.raises(BundleRefused, match="dependencies"):
        check_bundle(_fab({"pyproject.toml": pyproject.replace("[]", '["evil"]')}))
    with pytest.raises(BundleRefused, match="not a Flower app bundle"):
        check_bundle(b"not a zip")


# ---------------------------------------------------------------------------- properties
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10_000),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
_keys = st.sampled_from(
    [
        "title",
        "model",
        "name",
        "training",
        "federation",
        "rounds",
        "min_silos",
        "batch_size",
        "purpose",
        "researcher",
        "dataset",
        "evaluation",
        "metrics",
        "on_refusal",
        "bogus",
        "task",
    ]
)
_yaml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yaml_values)
def test_random_yaml_is_a_plan_or_one_clear_line(data) -> None:
    text = yaml.safe_dump(data)
    try:
        plan = parse_plan(text, source="p.yaml")
    except PlanValidationError as exc:
        message = str(exc)
        assert message.startswith("p.yaml") and "\n" not in message
        return
    assert parse_plan(json.dumps(plan.model_dump(mode="json"))) == plan


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(
        [
            "training",
            "federation",
            "secure_aggregation",
            "evaluation",
            "researcher",
            "preprocessing",
        ]
    ),
    st.text("abcdefghij_", min_size=3, max_size=10),
)
def test_unknown_nested_key_names_line_and_column(section: str, key: str) -> None:
    base = "title: t\nresearcher: {name: R}\nmodel: {name: resnet10}\n"
    text = base + f"{section}:\n  {key}: 1\n"
    if section == "researcher":
        text = "title: t\nmodel: {name: resnet10}\nresearcher:\n  name: R\n" + f"  {key}: 1\n"
    try:
        parse_plan(text, source="p.yaml")
    except PlanValidationError as exc:
        assert "unknown key" in str(exc) or key in ("name",)
        assert f"{section}.{key}" in str(exc) and ":5:3:" in str(exc)


def test_v1_examples_and_demo_plan_still_validate() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in (
        root / "examples" / "plan-classification.yaml",
        root / "fedsilo" / "plans" / "demo-classification.yaml",
    ):
        assert yaml.safe_load(path.read_text())["researcher"]["name"]
        parse_plan(path.read_text())
    assert parse_plan("schema_version: 1\ntitle: t\nmodel: {name: resnet10}\n").schema_version == 1


# ---------------------------------------------------------------------------- CLIs
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )


def test_cli_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    assert _cli("silo", "init", "--name", "h", "--home", "h", cwd=tmp_path).returncode == 0
    (tmp_path / "p.yaml").write_text(PLAN)
    (tmp_path / "bad.yaml").write_text("max_round: 1\n")
    cases = [
        (("silo", "plan", "approve", "p.yaml", "--home", "h"), "not signed"),
        (("silo", "plan", "revoke", "abcdef12", "--home", "h"), "no approved plan"),
        (("silo", "policy", "check", "--file", "bad.yaml"), "max_round: unknown key"),
        (("fedsilo", "plan", "submit", "p.yaml", "--consortium", "c"), "only signed plans"),
        (("fedsilo", "plan", "sign", "p.yaml", "--key", "nope.key"), "key file not found"),
        (("aggregator", "plans", "--home", "c"), "c is not a consortium home"),
    ]
    for args, expected in cases:
        done = _cli(*args, cwd=tmp_path)
        if expected is None:
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr + done.stdout
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _cli("silo", "audit", "verify", "--home", "h", cwd=tmp_path).returncode == 0
