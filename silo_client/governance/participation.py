"""The participation ledger: for one context, this silo helps unmask ONE sum, whatever the run.

Local training is deterministic, so a server that gets the sum over "all silos" and the sum over
"all but X" for the same plan and the same global model learns X's update (and its example count,
loss and evaluation cells) by subtraction, without breaking the protocol. A *context* is what
decides what this silo computes: the plan hash, the hash of the global model it received, and the
phase (``train``, ``evaluate``, ``evaluate/test``); run id and round number are NOT part of it, so
a re-run of the same (run, round), a new run id with the same plan and model, or another round
number sent the same model all land on the same context.

For each context the ledger keeps the survivor set U3 of the first sum this silo revealed shares
for. The secure round (``silo_client.secure_round``) asks it

- at ADVERTISE: can the announced participants still reach that set? (refused early, before any
  training);
- at CONSISTENCY: is the survivor set the one on record? (else: do not sign it);
- at UNMASK: the same question, answered and recorded in ONE write transaction
  (``BEGIN IMMEDIATE``: two ClientApp processes of two runs cannot both pass), before any share
  leaves.

A resumed run (same survivor set) or a fresh global model (a new context) goes through. Each
first contribution, repeat and refusal is also an audit-log entry. Stored in
``<home>/participation.db`` (SQLite, 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from silo_client.errors import PlanRefused, SiloConfigError
from silo_client.governance.audit import audit

LEDGER_FILE = "participation.db"
_LABEL = b"fedsilo-participation-context/1\0"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS contributions (
    context      TEXT PRIMARY KEY,
    plan_hash    TEXT NOT NULL,
    phase        TEXT NOT NULL,
    survivors    TEXT NOT NULL,
    first_run    TEXT NOT NULL,
    first_round  INTEGER NOT NULL,
    first_time   REAL NOT NULL,
    last_run     TEXT NOT NULL,
    last_round   INTEGER NOT NULL,
    last_time    REAL NOT NULL,
    reveals      INTEGER NOT NULL
)
"""


class LedgerError(SiloConfigError):
    """The participation ledger cannot be read or written (the round is refused)."""


class ParticipationRefused(PlanRefused):
    """A request that would reveal a second, different sum for a context, or a sum over too few
    silos; the reason is one line that names no local detail."""


def ledger_context(
    plan_hash: str, phase: str, keys: Sequence[str], arrays: Sequence[np.ndarray]
) -> str:
    """Hex SHA-256 of (plan hash, phase, the global model's names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(_LABEL)
    h.update(json.dumps([plan_hash, phase, len(keys)]).encode() + b"\0")
    for key, array in zip(keys, arrays, strict=True):
        a = np.ascontiguousarray(array)
        h.update(json.dumps([key, a.dtype.str, list(a.shape), a.nbytes]).encode() + b"\0")
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


@dataclass(frozen=True)
class Contribution:
    """The sum this silo helped unmask for one context."""

    context: str
    plan_hash: str
    phase: str
    survivors: tuple[str, ...]
    first_run: str
    first_round: int
    last_run: str
    last_round: int
    reveals: int


def _names(survivors: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(survivors)))


def _shown(names: Sequence[str]) -> str:
    return "{" + ", ".join(names) + "}"


class ParticipationLedger:
    """The ledger of the silo home at ``root`` (one short connection per call: every ClientApp
    message is its own process)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LEDGER_FILE

    def _connect(self) -> sqlite3.Connection:
        try:
            fresh = not self.path.exists()
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            if fresh:
                os.chmod(self.path, 0o600)
            con.execute(_SCHEMA)
            return con
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the participation ledger ({exc})") from None

    def get(self, context: str) -> Contribution | None:
        """The recorded contribution for ``context``, or None."""
        con = self._connect()
        try:
            row = con.execute(
                "SELECT context, plan_hash, phase, survivors, first_run, first_round, last_run, "
                "last_round, reveals FROM contributions WHERE context = ?",
                (context,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the participation ledger ({exc})") from None
        finally:
            con.close()
        if row is None:
            return None
        return Contribution(
            row[0],
            row[1],
            row[2],
            tuple(json.loads(row[3])),
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
        )

    def entries(self) -> list[Contribution]:
        """Every recorded contribution, oldest first."""
        con = self._connect()
        try:
            rows = con.execute(
                "SELECT context FROM contributions ORDER BY first_time, context"
            ).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the participation ledger ({exc})") from None
        finally:
            con.close()
        return [c for (ctx,) in rows if (c := self.get(ctx)) is not None]

    def check_participants(
        self, context: str, participants: Sequence[str], *, run_id: str, round_: int, stage: str
    ) -> None:
        """Refuse (audited) a round whose participants cannot reach the recorded survivor set."""
        done = self.get(context)
        if done is None:
            return
        missing = sorted(set(done.survivors) - set(participants))
        if missing:
            raise self._refuse(
                done,
                run_id,
                round_,
                stage,
                f"this silo already helped unmask a sum for this plan, global model and phase "
                f"over {_shown(done.survivors)} (run {done.first_run!r}, round "
                f"{done.first_round}); a round without {_shown(missing)} would reveal a "
                f"different sum (differencing): refused",
            )

    def check_survivors(
        self, context: str, survivors: Sequence[str], *, run_id: str, round_: int, stage: str
    ) -> None:
        """Refuse (audited) a survivor set other than the one on record for ``context``."""
        done = self.get(context)
        if done is not None and done.survivors != _names(survivors):
            raise self._different(done, _names(survivors), run_id, round_, stage)

    def claim(
        self,
        context: str,
        survivors: Sequence[str],
        *,
        plan_hash: str,
        phase: str,
        run_id: str,
        round_: int,
    ) -> Contribution:
        """Record that this silo reveals shares for ``survivors`` in ``context`` (atomically);
        ParticipationRefused when another survivor set is on record."""
        names = _names(survivors)
        now = time.time()
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute(
                "SELECT survivors, first_run, first_round, reveals FROM contributions "
                "WHERE context = ?",
                (context,),
            ).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                    (
                        context,
                        plan_hash,
                        phase,
                        json.dumps(names),
                        run_id,
                        round_,
                        now,
                        run_id,
                        round_,
                        now,
                    ),
                )
                reveals, first = 1, (run_id, round_)
            else:
                recorded = tuple(json.loads(row[0]))
                if recorded != names:
                    con.execute("ROLLBACK")
                    done = Contribution(
                        context, plan_hash, phase, recorded, row[1], row[2], "", 0, row[3]
                    )
                    raise self._different(done, names, run_id, round_, "unmask")
                reveals, first = int(row[3]) + 1, (row[1], int(row[2]))
                con.execute(
                    "UPDATE contributions SET last_run = ?, last_round = ?, last_time = ?, "
                    "reveals = ? WHERE context = ?",
                    (run_id, round_, now, reveals, context),
                )
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write the participation ledger ({exc})") from None
        finally:
            con.close()
        audit(
            self.root,
            "participation-recorded" if reveals == 1 else "participation-repeated",
            context=context,
            plan_hash=plan_hash,
            phase=phase,
            survivors=list(names),
            run_id=run_id,
            round=round_,
            reveals=reveals,
        )
        return Contribution(
            context, plan_hash, phase, names, first[0], first[1], run_id, round_, reveals
        )

    def _different(
        self,
        done: Contribution,
        names: tuple[str, ...],
        run_id: str,
        round_: int,
        stage: str,
    ) -> ParticipationRefused:
        return self._refuse(
            done,
            run_id,
            round_,
            stage,
            f"this silo already helped unmask a sum for this plan, global model and phase over "
            f"{_shown(done.survivors)} (run {done.first_run!r}, round {done.first_round}); the "
            f"survivor set {_shown(names)} would reveal a different sum (differencing): refused",
        )

    def _refuse(
        self, done: Contribution, run_id: str, round_: int, stage: str, reason: str
    ) -> ParticipationRefused:
        return _audited_refusal(
            self.root,
            reason,
            context=done.context,
            plan_hash=done.plan_hash,
            phase=done.phase,
            run_id=run_id,
            round=round_,
            stage=stage,
        )


def _audited_refusal(root: Path, reason: str, **where: object) -> ParticipationRefused:
    """Record a ``participation-refused`` audit entry (``where`` first, then the reason) and
    return the exception to raise."""
    audit(root, "participation-refused", **where, reason=reason)
    return ParticipationRefused(reason)


def refuse_small_round(
    root: Path,
    *,
    what: str,
    count: int,
    minimum: int,
    plan_hash: str,
    run_id: str,
    round_: int,
    stage: str,
) -> None:
    """Refuse (audited) a round whose participants or survivors number fewer than ``minimum``
    (the plan's min_silos, the site's min_contributors, tolerated colluders + 2)."""
    if count >= minimum:
        return
    reason = (
        f"{count} {what}, this site contributes only to sums over at least {minimum} silos "
        f"(the plan's min_silos and the site policy's min_contributors / tolerated_colluders)"
    )
    raise _audited_refusal(
        root, reason, plan_hash=plan_hash, run_id=run_id, round=round_, stage=stage
    )


def refuse_low_threshold(
    root: Path,
    *,
    threshold: int,
    n: int,
    minimum: int,
    colluders: int,
    plan_hash: str,
    run_id: str,
    round_: int,
) -> None:
    """Refuse (audited) a round whose Shamir threshold is below the site's derived minimum."""
    if threshold >= minimum:
        return
    reason = (
        f"threshold {threshold} for {n} silos: this site tolerates {colluders} colluding "
        f"silo(s), which needs a threshold of at least {minimum} (2t - n > colluders)"
    )
    raise _audited_refusal(
        root, reason, plan_hash=plan_hash, run_id=run_id, round=round_, stage="advertise"
    )
