"""The consortium's registry of submitted plans and their runs (SQLite, ``<home>/registry.db``).

How researchers reach it: a researcher signs a plan (``fedsilo plan sign``) and submits it with
``fedsilo plan submit --consortium HOME``, where HOME is the aggregator's home as the operator
exposes it to members (on the aggregator host, over SSH, or a drop folder the operator syncs).
A submission is authenticated by the plan's Ed25519 signature, which must verify; the registry
keeps the signature with the plan. The operator starts runs (``aggregator run HASH``), which drive
the SuperLink through Flower's Control API **on loopback only**: that API is unauthenticated in
this setup, so the SuperLink's Control and ServerApp APIs must never listen on an outside
interface (fedsilo's processes bind 127.0.0.1; SuperNodes reach only the Fleet API through TLS).

Plan statuses: ``submitted`` -> ``running`` -> ``done`` | ``failed`` | ``refused`` (silos refused:
the registry records "approved by k of n" from the run's refusals).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aggregator.errors import AggregatorError
from fedsilo_base.home_folder import CONSORTIUM_HOME
from training_plan import TrainingPlan, canonical_json, plan_hash
from training_plan.signing import PlanSignature, verify_plan_signature

REGISTRY_FILE = "registry.db"
PLAN_STATUSES = ("submitted", "running", "done", "failed", "refused")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan_hash TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    researcher TEXT NOT NULL,
    signer_key TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    signature_json TEXT NOT NULL,
    submitted_at TEXT NOT NULL,
    status TEXT NOT NULL,
    approvals TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    plan_hash TEXT NOT NULL REFERENCES plans(plan_hash),
    status TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    result_json TEXT NOT NULL DEFAULT '{}'
);
"""


class RegistryError(AggregatorError):
    """A registry request cannot be served (unknown plan, bad signature, ...)."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PlanEntry:
    """One submitted plan."""

    plan_hash: str
    title: str
    researcher: str
    signer_key: str
    submitted_at: str
    status: str
    approvals: str
    plan_json: str

    def plan(self) -> TrainingPlan:
        """The submitted plan."""
        return TrainingPlan.model_validate_json(self.plan_json)


@dataclass
class RunEntry:
    """One run of a plan."""

    run_id: str
    plan_hash: str
    status: str
    out_dir: str
    started_at: str
    finished_at: str | None
    result: dict


class Registry:
    """The consortium registry in an aggregator home.

    The home must exist (``aggregator init``): a mistyped ``--home``/``--consortium`` is an
    error, never a fresh empty registry. Reading a home whose registry.db does not exist yet
    answers "no plans" without creating it; only submitting and starting runs write.
    """

    def __init__(self, home: Path) -> None:
        self.home = Path(home).expanduser()
        self.path = self.home / REGISTRY_FILE

    @contextmanager
    def _db(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        from aggregator.consortium_home import CONFIG_FILE, ConsortiumError

        if not (self.home / CONFIG_FILE).is_file():
            raise ConsortiumError(CONSORTIUM_HOME.missing_message(self.home, CONFIG_FILE))
        # nothing submitted yet: read empty tables in memory, create nothing on disk
        target = ":memory:" if not write and not self.path.exists() else str(self.path)
        conn = sqlite3.connect(target, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            with conn:  # one transaction: all or nothing
                yield conn
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"the registry database is unusable ({exc})") from None
        finally:
            conn.close()

    def submit(self, plan: TrainingPlan, signature: PlanSignature | None) -> PlanEntry:
        """Register a signed plan (idempotent for the same plan)."""
        if signature is None:
            raise RegistryError(
                "the consortium accepts only signed plans: run 'fedsilo plan sign PLAN --key KEY'"
            )
        signer = verify_plan_signature(plan, signature)
        digest = plan_hash(plan)
        from dataclasses import asdict

        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO plans VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    digest,
                    plan.title,
                    plan.researcher.name if plan.researcher else "",
                    signer,
                    canonical_json(plan).decode(),
                    json.dumps(asdict(signature)),
                    _now(),
                    "submitted",
                    "",
                ),
            )
        return self.plan(digest)

    def plan(self, prefix: str) -> PlanEntry:
        """A plan by (a prefix of, 8+ hex digits) its hash."""
        prefix = prefix.strip().lower()
        if len(prefix) < 8:
            raise RegistryError("give at least 8 hex digits of the plan hash")
        with self._db(write=False) as db:
            rows = db.execute(
                "SELECT plan_hash,title,researcher,signer_key,submitted_at,status,approvals,"
                "plan_json FROM plans WHERE plan_hash LIKE ?",
                (prefix + "%",),
            ).fetchall()
        if not rows:
            raise RegistryError(f"no submitted plan has a hash starting with {prefix}")
        if len(rows) > 1:
            raise RegistryError(f"{len(rows)} plans match {prefix}; give more digits")
        return PlanEntry(*rows[0])

    def plans(self) -> list[PlanEntry]:
        """Every plan, newest first (statuses refreshed from their runs)."""
        self.refresh()
        with self._db(write=False) as db:
            rows = db.execute(
                "SELECT plan_hash,title,researcher,signer_key,submitted_at,status,approvals,"
                "plan_json FROM plans ORDER BY submitted_at DESC"
            ).fetchall()
        return [PlanEntry(*row) for row in rows]

    def start_run(self, digest: str, run_id: str, out_dir: Path) -> RunEntry:
        """Record that a run of the plan started."""
        with self._db() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise RegistryError(f"a run named {run_id} exists; pick another --run-id")
            db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?)",
                (run_id, digest, "running", str(out_dir), _now(), None, "{}"),
            )
            db.execute("UPDATE plans SET status='running' WHERE plan_hash=?", (digest,))
        return self.runs(digest)[0]

    def runs(self, digest: str | None = None) -> list[RunEntry]:
        """Runs (of one plan, or all), newest first, statuses refreshed from their event logs."""
        self.refresh()
        query = (
            "SELECT run_id,plan_hash,status,out_dir,started_at,finished_at,result_json FROM runs"
        )
        args: tuple = ()
        if digest:
            query += " WHERE plan_hash=?"
            args = (digest,)
        with self._db(write=False) as db:
            rows = db.execute(query + " ORDER BY started_at DESC", args).fetchall()
        return [RunEntry(*row[:6], json.loads(row[6])) for row in rows]

    def refresh(self) -> None:
        """Update running runs (and their plans) from the events.jsonl the ServerApp writes."""
        from aggregator.artifacts import read_events

        with self._db(write=False) as db:
            running = db.execute(
                "SELECT run_id, plan_hash, out_dir FROM runs WHERE status='running'"
            ).fetchall()
            for run_id, digest, out_dir in running:
                events = read_events(Path(out_dir) / "events.jsonl")
                ended = [e for e in events if e["event"] in ("run-finished", "run-failed")]
                if not ended:
                    continue
                refused: dict[str, str] = {}
                silos = 0
                for e in events:
                    if e["event"] == "silos-refused":
                        refused.update(e.get("refused", {}))
                    if e["event"] == "run-started":
                        silos = int(e.get("silos", 0))
                rounds = [e for e in events if e["event"] == "round-finished"]
                result = {
                    "rounds": len(rounds),
                    "last_evaluation": rounds[-1].get("evaluate", {}) if rounds else {},
                    "refused": refused,
                    "reason": ended[-1].get("reason", ""),
                }
                if ended[-1]["event"] == "run-finished":
                    status = "done"
                elif refused:
                    status = "refused"
                else:
                    status = "failed"
                db.execute(
                    "UPDATE runs SET status=?, finished_at=?, result_json=? WHERE run_id=?",
                    (status, _now(), json.dumps(result), run_id),
                )
                approvals = f"approved by {silos - len(refused)} of {silos}" if silos else ""
                db.execute(
                    "UPDATE plans SET status=?, approvals=? WHERE plan_hash=?",
                    (status, approvals, digest),
                )
