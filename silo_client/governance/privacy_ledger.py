"""The privacy-budget ledger: per local dataset, the epsilon every run has spent on its patients.

``<home>/governance/privacy.sqlite`` holds one row per (dataset, run, plan): the rounds the run
actually trained on that dataset and the accountant's epsilon over them. Before a DP round
touches any data, :meth:`PrivacyLedger.charge_round` checks, in one IMMEDIATE transaction, that
the run's epsilon after this round stays within the plan's target and that, with every other
run's spend on the same dataset, it stays within the site policy's per-dataset maximum; it then
records the round *before* training (a crash afterwards over-counts, never under-counts). Every
charge and every refusal is also an entry in the hash-chained audit log.

Runs compose sequentially: a dataset's total is the sum of its runs' epsilons (and deltas).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from silo_client.errors import PlanRefused, SiloError
from silo_client.governance.audit import audit
from training_plan.privacy import PrivacyBudget

LEDGER_FILE = "privacy.sqlite"
EPSILON_SLACK = 1e-4
"""Relative slack on comparisons: Opacus derives sigma to a tolerance, not exactly."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    plan_hash TEXT NOT NULL,
    rounds_trained INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    target_epsilon REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sampling_rate REAL NOT NULL,
    steps_per_round INTEGER NOT NULL,
    clip_norm REAL NOT NULL,
    accountant TEXT NOT NULL,
    first_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (dataset, run_id, plan_hash)
)
"""


class PrivacyLedgerError(SiloError):
    """The privacy ledger cannot be read or written."""


class PrivacyBudgetExceeded(PlanRefused):
    """A DP round would spend more than the plan's budget or the site's per-dataset maximum.

    The message is what the server may learn (which limit, no figure of this site's ledger);
    the audit entry ``privacy-refused`` keeps the figures locally.
    """


@dataclass(frozen=True)
class PrivacySpend:
    """One run's spend on one dataset (no data values: parameters and counts of rounds)."""

    dataset: str
    run_id: str
    plan_hash: str
    rounds_trained: int
    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sampling_rate: float
    steps_per_round: int
    clip_norm: float
    accountant: str
    first_at: str
    updated_at: str

    def as_dict(self) -> dict[str, object]:
        """The row as plain JSON-able values."""
        return asdict(self)


@dataclass(frozen=True)
class DatasetTotal:
    """What a dataset has spent over all runs, and what the site allows."""

    dataset: str
    epsilon: float
    delta: float
    runs: int
    max_epsilon: float | None

    @property
    def remaining(self) -> float | None:
        """Epsilon still allowed by the site policy (None: the policy sets no maximum)."""
        return None if self.max_epsilon is None else max(0.0, self.max_epsilon - self.epsilon)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PrivacyLedger:
    """The privacy ledger of one silo home."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / "governance" / LEDGER_FILE

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        if not write and not self.path.exists():
            db = sqlite3.connect(":memory:")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            except sqlite3.Error as exc:
                raise PrivacyLedgerError(
                    f"cannot open the privacy ledger {self.path} ({exc}); check its permissions"
                ) from None
        try:
            db.row_factory = sqlite3.Row
            db.execute(_SCHEMA)
            yield db
        except sqlite3.DatabaseError as exc:
            raise PrivacyLedgerError(
                f"the privacy ledger {self.path} cannot be used ({exc}); restore it from backup"
            ) from None
        finally:
            db.close()

    def spends(self, dataset: str | None = None) -> list[PrivacySpend]:
        """Every run's spend (on one dataset when given), oldest first."""
        with self._connect() as db:
            query = "SELECT * FROM spends"
            args: tuple[str, ...] = ()
            if dataset is not None:
                query, args = query + " WHERE dataset = ?", (dataset,)
            rows = db.execute(query + " ORDER BY first_at, run_id", args).fetchall()
        return [PrivacySpend(**dict(row)) for row in rows]

    def total(self, dataset: str, max_epsilon: float | None) -> DatasetTotal:
        """A dataset's spend over all runs (sequential composition: epsilons and deltas add)."""
        rows = self.spends(dataset)
        return DatasetTotal(
            dataset=dataset,
            epsilon=sum(r.epsilon for r in rows),
            delta=sum(r.delta for r in rows),
            runs=len(rows),
            max_epsilon=max_epsilon,
        )

    def charge_round(
        self,
        *,
        dataset: str,
        run_id: str,
        plan_hash: str,
        budget: PrivacyBudget,
        server_round: int,
        max_epsilon: float | None,
    ) -> PrivacySpend:
        """Record one more trained round of this run, or raise PrivacyBudgetExceeded (audited)
        when it would exceed the plan's target or the site's per-dataset maximum. Nothing is
        written on refusal."""
        with self._connect(write=True) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                spend, refusal, public = self._charge(
                    db, dataset, run_id, plan_hash, budget, max_epsilon
                )
                if refusal is None:
                    db.execute("COMMIT")
                else:
                    db.execute("ROLLBACK")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if refusal is not None:
            audit(
                self.root,
                "privacy-refused",
                run_id=run_id,
                plan_hash=plan_hash,
                dataset=dataset,
                server_round=server_round,
                reason=refusal,
            )
            raise PrivacyBudgetExceeded(public or refusal)
        assert spend is not None
        audit(
            self.root,
            "privacy-spent",
            run_id=run_id,
            plan_hash=plan_hash,
            dataset=dataset,
            server_round=server_round,
            rounds_trained=spend.rounds_trained,
            run_epsilon=round(spend.epsilon, 6),
            delta=spend.delta,
            noise_multiplier=round(spend.noise_multiplier, 6),
            sampling_rate=spend.sampling_rate,
            accountant=spend.accountant,
        )
        return spend

    @staticmethod
    def _charge(
        db: sqlite3.Connection,
        dataset: str,
        run_id: str,
        plan_hash: str,
        budget: PrivacyBudget,
        max_epsilon: float | None,
    ) -> tuple[PrivacySpend | None, str | None, str | None]:
        """(the spend, or None with the local reason and the reason the server may read)."""
        row = db.execute(
            "SELECT * FROM spends WHERE dataset = ? AND run_id = ? AND plan_hash = ?",
            (dataset, run_id, plan_hash),
        ).fetchone()
        done = int(row["rounds_trained"]) if row else 0
        after = budget.epsilon_after(done + 1)
        limit = budget.target_epsilon * (1 + EPSILON_SLACK)
        if after > limit:
            return (
                None,
                f"privacy budget: round {done + 1} of this run would bring epsilon on dataset "
                f"'{dataset}' to {after:.3f}, above the plan's target {budget.target_epsilon:g} "
                f"(this run has trained {done} round(s))",
                "privacy budget: this round would exceed the plan's target epsilon "
                "(the silo has already trained the rounds the plan accounts for)",
            )
        others = db.execute(
            "SELECT COALESCE(SUM(epsilon), 0) FROM spends WHERE dataset = ? "
            "AND NOT (run_id = ? AND plan_hash = ?)",
            (dataset, run_id, plan_hash),
        ).fetchone()[0]
        if max_epsilon is not None and others + after > max_epsilon * (1 + EPSILON_SLACK):
            return (
                None,
                f"privacy budget: dataset '{dataset}' has spent epsilon {others:.3f} in other "
                f"runs; this round would bring it to {others + after:.3f}, above this site's "
                f"maximum {max_epsilon:g} (policy privacy_max_epsilon)",
                "privacy budget: this round would exceed this site's privacy budget for the "
                "dataset",
            )
        now = _now()
        spend = PrivacySpend(
            dataset=dataset,
            run_id=run_id,
            plan_hash=plan_hash,
            rounds_trained=done + 1,
            epsilon=after,
            delta=budget.delta,
            target_epsilon=budget.target_epsilon,
            noise_multiplier=budget.noise_multiplier,
            sampling_rate=budget.sampling_rate,
            steps_per_round=budget.steps_per_round,
            clip_norm=budget.clip_norm,
            accountant=budget.accountant,
            first_at=row["first_at"] if row else now,
            updated_at=now,
        )
        values = spend.as_dict()
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        db.execute(
            f"INSERT OR REPLACE INTO spends ({columns}) VALUES ({marks})", tuple(values.values())
        )
        return spend, None, None


def review_lines(
    ledger: PrivacyLedger, dataset: str, budget: PrivacyBudget, max_epsilon: float | None
) -> list[str]:
    """What a DP plan would spend on a dataset and what would remain (for 'silo plan review')."""
    total = ledger.total(dataset, max_epsilon)
    planned = budget.planned_epsilon
    lines = [
        f"DP (patient)  would spend epsilon {planned:.3f} (delta {budget.delta:g}) on dataset "
        f"'{dataset}' over {budget.rounds} round(s): noise multiplier "
        f"{budget.noise_multiplier:.3f}, clip {budget.clip_norm:g}, patient sampling rate "
        f"{budget.sampling_rate:g}, {budget.steps_per_round} steps/round, "
        f"{budget.accountant.upper()} accountant",
    ]
    if max_epsilon is None:
        lines.append(
            f"DP budget     dataset '{dataset}' has spent epsilon {total.epsilon:.3f} in "
            f"{total.runs} run(s); this site sets no maximum (policy privacy_max_epsilon)"
        )
    else:
        after = max_epsilon - total.epsilon - planned
        verdict = (
            f"{after:.3f} would remain"
            if after >= -max_epsilon * EPSILON_SLACK
            else f"EXCEEDS the maximum by {-after:.3f}: rounds past the budget will be refused"
        )
        lines.append(
            f"DP budget     dataset '{dataset}' has spent epsilon {total.epsilon:.3f} of this "
            f"site's maximum {max_epsilon:g} in {total.runs} run(s); after this plan: {verdict}"
        )
    return lines
