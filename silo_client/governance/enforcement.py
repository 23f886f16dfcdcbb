"""The gate every plan passes at the silo before any data is loaded, and the audit of replies.

``check_plan`` is called by the ClientApp's plain ``train``/``evaluate`` handlers and by every
secure-aggregation stage, right after ``plan_from_wire`` (which refuses an altered plan: content
not matching the claimed hash). It refuses, with one line that names nothing local, a plan that is

- unknown or unapproved here, or whose approval was revoked;
- signed by a key the current policy does not allow (or unsigned where signatures are required),
  re-checked against the signature recorded at approval, so a policy change applies at once;
- out of the current site policy (dataset, model, rounds, epochs, secure aggregation, threshold);
- asking for a dataset tag this silo has not registered.

Each refusal is an audit entry; the first accepted message of a run is a ``run-started`` entry.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from silo_client.errors import PlanRefused
from silo_client.governance.approvals import Approval, ApprovalStore
from silo_client.governance.audit import audit
from silo_client.governance.policy import load_policy
from silo_client.home import SiloHome
from training_plan import TrainingPlan
from training_plan.signing import PlanSignatureError, verify_plan_signature

log = logging.getLogger("fedsilo.silo")


def _refuse(home: SiloHome, digest: str, run_id: str, stage: str, reason: str) -> PlanRefused:
    audit(home.root, "plan-refused", plan_hash=digest, run_id=run_id, stage=stage, reason=reason)
    return PlanRefused(reason)


def check_plan(
    home: SiloHome, plan: TrainingPlan, digest: str, *, run_id: str, stage: str
) -> Approval:
    """Return the plan's approval, or raise PlanRefused (audited) saying why it cannot run."""
    short = digest[:12]
    approval = ApprovalStore(home.root).get(digest)
    if approval is None:
        raise _refuse(home, digest, run_id, stage, f"plan {short} is not approved at this site")
    if approval.revoked:
        raise _refuse(
            home, digest, run_id, stage, f"the approval of plan {short} was revoked at this site"
        )
    signer = None
    signature = approval.plan_signature()
    if signature is not None:
        try:
            signer = verify_plan_signature(plan, signature)
        except PlanSignatureError as exc:
            raise _refuse(home, digest, run_id, stage, f"plan signature: {exc}") from None
    problems = load_policy(home.root).violations(plan, signer)
    if problems:
        raise _refuse(
            home, digest, run_id, stage, f"plan {short} is out of this site's policy: {problems[0]}"
        )
    if plan.dataset != "default":
        # local_round still loads the 'default' registration: never train on another tag's data
        raise _refuse(
            home,
            digest,
            run_id,
            stage,
            f"dataset '{plan.dataset}': this silo's fedsilo trains only on its 'default' dataset",
        )
    if plan.dataset not in home.datasets:
        raise _refuse(
            home,
            digest,
            run_id,
            stage,
            f"dataset '{plan.dataset}' is not registered at this site",
        )
    misfit = _images_misfit(home, plan)
    if misfit:
        raise _refuse(home, digest, run_id, stage, misfit)
    _note_run_started(home, approval, run_id, signer)
    return approval


def _images_misfit(home: SiloHome, plan: TrainingPlan) -> str | None:
    """A dataset (catalogued or plain folder) none of whose images fit the plan's channels."""
    if plan.task != "classification":
        return None
    from silo_client.data.plan_fit import dataset_fit_problem

    spec = plan.preprocessing
    folder = Path(home.dataset_folder(plan.dataset))
    # the gate's own memory, beside its run markers: the data cache stays empty until a round
    # that passed the gate loads the dataset
    memory = home.root / "governance" / "plan-fit"
    return dataset_fit_problem(folder, spec.channels, spec.to_grayscale, memory)


def _note_run_started(home: SiloHome, approval: Approval, run_id: str, signer: str | None) -> None:
    marker_dir = home.root / "governance" / "runs"
    marker = marker_dir / hashlib.sha256(f"{run_id}\0{approval.plan_hash}".encode()).hexdigest()
    if marker.exists():
        return
    marker_dir.mkdir(parents=True, exist_ok=True)
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    audit(
        home.root,
        "run-started",
        run_id=run_id,
        plan_hash=approval.plan_hash,
        title=approval.title,
        researcher=approval.researcher,
        signer_key=signer,
        approved_by=approval.approved_by,
        approved_at=approval.approved_at,
    )


def check_min_examples(home: SiloHome, examples: int, *, run_id: str, digest: str) -> None:
    """Refuse to send anything computed on fewer examples than the site's minimum."""
    minimum = load_policy(home.root).min_local_examples
    if examples < minimum:
        raise _refuse(
            home,
            digest,
            run_id,
            "examples",
            "this site's minimum number of local examples per round is not met",
        )


SENT_KINDS = {
    "train": "plain-update",
    "evaluate": "plain-metrics",
    "train.sa_mask": "masked-update",
    "evaluate.sa_mask": "masked-metrics",
}


def record_reply(
    root: Path, message_type: str, run_id: str, reply_error: str | None, size: int
) -> None:
    """Audit what left the silo for one message: its kind and size, never its values."""
    if reply_error is not None:
        audit(root, "reply-refused", run_id=run_id, message_type=message_type, reason=reply_error)
        return
    kind = SENT_KINDS.get(message_type, "secure-aggregation-protocol")
    audit(root, "sent", run_id=run_id, message_type=message_type, kind=kind, bytes=size)
