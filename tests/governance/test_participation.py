"""The participation ledger on its own: one survivor set per context, kept across restarts, safe
when several ClientApp processes claim at once, every decision in the hash-chained audit log."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from silo_client.governance.audit import AuditLog
from silo_client.governance.participation import (
    LedgerError,
    ParticipationLedger,
    ParticipationRefused,
    ledger_context,
)

ALL = ["hospital-0", "hospital-1", "hospital-2", "hospital-3"]
MODEL = (["model"], [np.arange(8, dtype=np.float32)])


def _context(phase: str = "train", plan: str = "p" * 64) -> str:
    return ledger_context(plan, phase, *MODEL)


def test_context_ignores_run_and_round_but_not_model_plan_or_phase() -> None:
    base = _context()
    assert base == _context()
    assert base != _context(phase="evaluate")
    assert base != _context(plan="q" * 64)
    other = np.arange(8, dtype=np.float32)
    other[3] = np.nextafter(other[3], np.float32(9))  # one ulp: another model
    assert base != ledger_context("p" * 64, "train", ["model"], [other])


def test_one_survivor_set_per_context_survives_a_restart(tmp_path: Path) -> None:
    ledger = ParticipationLedger(tmp_path)
    ctx = _context()
    ledger.claim(ctx, ALL, plan_hash="p" * 64, phase="train", run_id="r1", round_=1)
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    again = ParticipationLedger(tmp_path)  # a new process: only the file remains
    again.check_survivors(ctx, list(reversed(ALL)), run_id="r2", round_=5, stage="consistency")
    repeat = again.claim(ctx, ALL, plan_hash="p" * 64, phase="train", run_id="r2", round_=5)
    assert (repeat.reveals, repeat.first_run, repeat.last_run) == (2, "r1", "r2")
    with pytest.raises(ParticipationRefused, match=r"differencing") as info:
        again.claim(ctx, ALL[:3], plan_hash="p" * 64, phase="train", run_id="r3", round_=1)
    assert "'r1', round 1" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ParticipationRefused, match=r"without \{hospital-3\}"):
        again.check_participants(ctx, ALL[:3], run_id="r3", round_=1, stage="advertise")
    again.check_participants(ctx, [*ALL, "hospital-4"], run_id="r3", round_=1, stage="advertise")
    assert again.get(ctx).survivors == tuple(ALL), "a refusal changes nothing stored"
    events = [e["event"] for e in AuditLog.of_home(tmp_path).entries()]
    assert events == [
        "participation-recorded",
        "participation-repeated",
        "participation-refused",
        "participation-refused",
    ]
    assert AuditLog.of_home(tmp_path).verify().ok


def _claim(root: str, survivors: list[str], start, out) -> None:
    start.wait()
    try:
        ParticipationLedger(Path(root)).claim(
            _context(), survivors, plan_hash="p" * 64, phase="train", run_id="x", round_=1
        )
        out.put(("ok", survivors))
    except ParticipationRefused:
        out.put(("refused", survivors))


def test_concurrent_claims_of_two_sets_let_exactly_one_through(tmp_path: Path) -> None:
    """Two runs' unmask stages in two processes at once: one set wins, the other is refused."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    sets = [ALL, ALL[:3], ALL[1:], ALL[:2] + ALL[3:]]
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), s, start, out)) for s in sets]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [s for verdict, s in results if verdict == "ok"]
    assert len(winners) == 1
    assert ParticipationLedger(tmp_path).get(_context()).survivors == tuple(winners[0])
    assert AuditLog.of_home(tmp_path).verify().ok


def test_unreadable_ledger_is_a_clear_error_and_is_not_replaced(tmp_path: Path) -> None:
    ledger = ParticipationLedger(tmp_path)
    ledger.path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="participation ledger"):
        ledger.get(_context())
    assert ledger.path.read_bytes().startswith(b"this is not a database")
