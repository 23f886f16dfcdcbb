"""Plan approvals: which plans (by canonical hash) hospital IT approved, who, when, revoked?

Stored in ``<home>/approvals.json`` (written atomically under a lock), one record per plan hash,
with the approved plan's canonical JSON and its researcher signature (when it had one), so the
ClientApp can re-check the signer against the *current* policy at every round. Every approval and
revocation is also an audit-log entry.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from silo_client.errors import PlanRefused, SiloError
from training_plan import TrainingPlan, canonical_json, plan_hash
from training_plan.signing import PlanSignature, verify_plan_signature

APPROVALS_FILE = "approvals.json"


class ApprovalError(SiloError):
    """An approval cannot be recorded, found or revoked."""


@dataclass
class Approval:
    """One approved plan."""

    plan_hash: str
    title: str
    researcher: str
    signer_key: str | None
    signature: dict | None
    plan_json: str
    approved_by: str
    approved_at: str
    revoked_by: str | None = None
    revoked_at: str | None = None
    note: str = ""

    @property
    def revoked(self) -> bool:
        """Whether IT withdrew this approval."""
        return self.revoked_at is not None

    def plan(self) -> TrainingPlan:
        """The approved plan."""
        return TrainingPlan.model_validate_json(self.plan_json)

    def plan_signature(self) -> PlanSignature | None:
        """The researcher's signature recorded with the approval."""
        return PlanSignature(**self.signature) if self.signature else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_actor() -> str:
    """Who is approving: the login name of the person running the command."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


class ApprovalStore:
    """The approvals of one silo home."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / APPROVALS_FILE

    def _read(self) -> dict[str, Approval]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ApprovalError(
                f"the approvals file of this silo is damaged ({type(exc).__name__}); restore "
                f"{APPROVALS_FILE} from backup"
            ) from None
        try:
            return {k: Approval(**v) for k, v in dict(data.get("approvals", {})).items()}
        except TypeError as exc:
            raise ApprovalError(f"the approvals file has an unexpected record ({exc})") from None

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Approval]]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.root / f".{APPROVALS_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            yield records
            from fedsilo_base.atomic_files import write_atomic

            payload = {"version": 1, "approvals": {k: asdict(v) for k, v in records.items()}}
            write_atomic(self.path, json.dumps(payload, indent=2).encode(), mode=0o600)
        finally:
            os.close(lock)

    def get(self, digest: str) -> Approval | None:
        """The approval of a plan hash, revoked or not; None when never approved."""
        return self._read().get(digest)

    def all(self) -> list[Approval]:
        """Every approval, oldest first."""
        return sorted(self._read().values(), key=lambda a: a.approved_at)

    def find(self, prefix: str) -> Approval:
        """The approval whose hash starts with ``prefix`` (at least 8 hex digits)."""
        prefix = prefix.strip().lower()
        if len(prefix) < 8:
            raise ApprovalError("give at least 8 hex digits of the plan hash")
        found = [a for h, a in self._read().items() if h.startswith(prefix)]
        if not found:
            raise ApprovalError(f"no approved plan has a hash starting with {prefix}")
        if len(found) > 1:
            raise ApprovalError(f"{len(found)} plans match {prefix}; give more digits")
        return found[0]

    def approve(
        self,
        plan: TrainingPlan,
        signature: PlanSignature | None,
        *,
        actor: str,
        note: str = "",
    ) -> Approval:
        """Record an approval (a previously revoked plan may be approved again)."""
        digest = plan_hash(plan)
        signer = verify_plan_signature(plan, signature) if signature else None
        record = Approval(
            plan_hash=digest,
            title=plan.title,
            researcher=plan.researcher.name if plan.researcher else "",
            signer_key=signer,
            signature=asdict(signature) if signature else None,
            plan_json=canonical_json(plan).decode(),
            approved_by=actor,
            approved_at=_now(),
            note=note,
        )
        with self._locked() as records:
            records[digest] = record
        return record

    def revoke(self, prefix: str, *, actor: str) -> Approval:
        """Withdraw an approval; later rounds of that plan are refused."""
        target = self.find(prefix)
        with self._locked() as records:
            record = records[target.plan_hash]
            if record.revoked:
                raise ApprovalError(f"plan {record.plan_hash[:12]} is already revoked")
            record.revoked_by, record.revoked_at = actor, _now()
        return record


def approve_plan(
    root: Path,
    plan: TrainingPlan,
    signature: PlanSignature | None = None,
    *,
    actor: str | None = None,
    note: str = "",
    check_policy: bool = True,
) -> Approval:
    """Approve a plan at the silo home ``root``: check it against the policy, record, audit.

    Raises PlanRefused when the plan is out of the site's policy (change the policy first), and
    PlanSignatureError when its signature does not verify.
    """
    from silo_client.governance.audit import audit
    from silo_client.governance.policy import load_policy

    actor = actor or default_actor()
    signer = verify_plan_signature(plan, signature) if signature else None
    if check_policy:
        problems = load_policy(root).violations(plan, signer)
        if problems:
            raise PlanRefused(
                f"plan is out of this site's policy: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + "; change the policy ('silo policy edit') or ask the researcher"
            )
    record = ApprovalStore(root).approve(plan, signature, actor=actor, note=note)
    audit(
        root,
        "plan-approved",
        plan_hash=record.plan_hash,
        title=record.title,
        researcher=record.researcher,
        signer_key=signer,
        actor=actor,
    )
    return record


def revoke_plan(root: Path, prefix: str, *, actor: str | None = None) -> Approval:
    """Revoke an approval by (a prefix of) its plan hash, and audit it."""
    from silo_client.governance.audit import audit

    actor = actor or default_actor()
    record = ApprovalStore(root).revoke(prefix, actor=actor)
    audit(root, "plan-revoked", plan_hash=record.plan_hash, actor=actor)
    return record
