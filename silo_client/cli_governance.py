"""`silo plan ...`, `silo policy ...`, `silo audit ...`: what hospital IT decides and can show.

Mounted on the `silo` CLI by silo_client.cli. Every command takes ``--home`` (env FEDSILO_HOME).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from fedsilo_base.home_folder import SILO_HOME
from silo_client.errors import SiloError
from silo_client.home import SiloHome
from training_plan import TrainingPlan, load_plan, plan_hash

if TYPE_CHECKING:
    from silo_client.governance.policy import SitePolicy

console = Console(soft_wrap=True)

plan_app = typer.Typer(help="Review, approve and revoke training plans.", no_args_is_help=True)
policy_app = typer.Typer(help="The site policy: what this hospital allows.", no_args_is_help=True)
audit_app = typer.Typer(help="The append-only audit log of this silo.", no_args_is_help=True)
privacy_app = typer.Typer(
    help="The privacy-budget ledger: epsilon spent per dataset.", no_args_is_help=True
)


def _plan_and_signature(path: Path):
    from training_plan.signing import read_signature

    plan = load_plan(path)
    return plan, read_signature(path)


def review_text(
    plan: TrainingPlan,
    signer: str | None,
    policy_problems: list[str],
    policy: SitePolicy | None = None,
) -> str:
    """A summary of a plan for a hospital's IT and data-protection officer (``policy``: the
    site's, for the collusion bound; the defaults when None)."""
    from training_plan.signing import fingerprint

    r = plan.researcher
    who = f"{r.name}" + (f", {r.organisation}" if r and r.organisation else "") if r else "unnamed"
    if r and r.email:
        who += f" <{r.email}>"
    sa = plan.secure_aggregation
    if sa.enabled:
        leaves = (
            "each round: the model update, clipped, weighted and MASKED (secure aggregation): "
            "the consortium learns only the sum over at least "
            f"{sa.threshold or 'the default (2n/3+1)'} silos; the number of local examples, "
            "the loss and evaluation counts travel inside the same masked vector (sums only)"
        )
    else:
        leaves = (
            "each round: this silo's model update IN THE CLEAR and its number of local "
            "examples and metrics (secure aggregation is OFF)"
        )
    lines = [
        f"Plan          {plan.title}",
        f"Hash          {plan_hash(plan)}",
        f"Asked by      {who}",
        "Signed by     "
        + (
            f"key {fingerprint(signer)}" if signer else "NOT SIGNED (no .sig file next to the plan)"
        ),
        f"Purpose       {plan.purpose or '(none given)'}",
        f"Local data    dataset tag '{plan.dataset}', task {plan.task}",
        f"Model         {plan.model.name} {dict(plan.model.args) or ''}".rstrip(),
        f"Input         {plan.preprocessing.input_size} px"
        + (
            f", window {plan.preprocessing.window.center}/{plan.preprocessing.window.width}"
            if plan.preprocessing.window
            else ""
        )
        + (
            f", augmentations {plan.preprocessing.augmentations}"
            if plan.preprocessing.augmentations
            else ""
        ),
        f"Training      {plan.training.optimizer}, lr {plan.training.learning_rate}, "
        f"{plan.training.local_epochs} local epoch(s), batch {plan.training.batch_size}",
        f"Federation    {plan.federation.rounds} round(s), {plan.federation.strategy}, at least "
        f"{plan.federation.min_silos} silos; if a silo refuses: {plan.federation.on_refusal}",
        f"What leaves   {leaves}",
        f"Evaluation    {', '.join(plan.evaluation.metrics)} (summed over silos)"
        + _metric_disclosure(plan),
        f"Privacy       secure aggregation {'ON' if sa.enabled else 'OFF'}, clip {sa.clip}, "
        f"max weight {sa.max_weight}; no images, labels, paths or identifiers leave the site",
        "DP            "
        + (
            f"patient-level DP-SGD, target epsilon {plan.privacy.target_epsilon:g}, delta "
            f"{plan.privacy.target_delta:g} per dataset over the plan's rounds"
            if plan.privacy is not None
            else "none (no privacy section): the model carries no differential-privacy guarantee"
        ),
    ]
    if sa.enabled:
        lines.append(collusion_text(plan, policy))
    if policy_problems:
        lines.append("Site policy   OUT OF POLICY: " + "; ".join(policy_problems))
    else:
        lines.append("Site policy   within this site's policy")
    return "\n".join(lines)


def collusion_text(plan: TrainingPlan, policy: SitePolicy | None = None) -> str:
    """The collusion bound of the smallest round this site would join under ``plan``
    (docs/secure_agg.md, threat model), and the threshold the site's policy derives."""
    from secure_agg.protocol import default_threshold
    from silo_client.governance.policy import SitePolicy

    policy = policy or SitePolicy()
    n = policy.min_round_silos(plan)
    threshold = plan.secure_aggregation.threshold
    t = threshold if threshold is not None else default_threshold(n)
    k, needed = policy.tolerated_colluders, policy.min_threshold(n)
    text = (
        f"Collusion     in a round of n={n} silos with threshold t={t}, the server plus "
        f"2t-n={2 * t - n} colluding silo(s) can recover one silo's update (two survivor sets "
        f"shown to two groups); this site tolerates {k}, so it requires t >= {needed} at n={n} "
        f"(floor((n+{k})/2)+1 for n silos) and at least {n} silos in every sum"
    )
    if t < needed:
        text += "; THIS PLAN'S THRESHOLD IS TOO LOW: this silo will refuse its rounds"
    return text


def _metric_disclosure(plan: TrainingPlan) -> str:
    """What the chosen metrics reveal beyond plain counts (AUC and ECE need histograms)."""
    notes = []
    if "auc" in plan.evaluation.metrics:
        notes.append(
            f"auc: a {plan.evaluation.auc_bins}-bin histogram of the model's scores per class, "
            "pooled over silos"
        )
    if "ece" in plan.evaluation.metrics:
        notes.append(f"ece: {plan.evaluation.ece_bins} confidence bins, pooled over silos")
    return ("; reveals " + "; ".join(notes)) if notes else ""


@plan_app.command("review")
def plan_review(
    path: Path = typer.Argument(..., help="Plan YAML (its signature is read from PATH.sig)."),
    home: Path = SILO_HOME.option(),
) -> None:
    """Show who asks, for what, which data and model, and what leaves the site."""
    from silo_client.governance.policy import load_policy
    from training_plan.signing import verify_plan_signature

    silo = SiloHome.open(home)
    plan, signature = _plan_and_signature(path)
    signer = verify_plan_signature(plan, signature) if signature else None
    policy = load_policy(silo.root)
    problems = policy.violations(plan, signer)
    text = review_text(plan, signer, problems, policy)
    if plan.privacy is not None:
        from silo_client.governance.privacy_ledger import PrivacyLedger, review_lines
        from training_plan.privacy import plan_budget

        lines = review_lines(
            PrivacyLedger(silo.root),
            plan.dataset,
            plan_budget(plan),
            policy.max_epsilon_for(plan.dataset),
        )
        text += "\n" + "\n".join(lines)
    console.print(text, markup=False, highlight=False)


@plan_app.command("approve")
def plan_approve(
    path: Path = typer.Argument(..., help="Plan YAML (its signature is read from PATH.sig)."),
    home: Path = SILO_HOME.option(),
    actor: str = typer.Option(None, "--as", help="Who approves (default: your login name)."),
    note: str = typer.Option("", "--note", help="A note kept with the approval."),
) -> None:
    """Approve a plan by its hash (it must be within the site policy)."""
    from silo_client.governance.approvals import approve_plan

    silo = SiloHome.open(home)
    plan, signature = _plan_and_signature(path)
    record = approve_plan(silo.root, plan, signature, actor=actor, note=note)
    console.print(f"approved plan {record.plan_hash} ('{record.title}') as {record.approved_by}")


@plan_app.command("revoke")
def plan_revoke(
    plan_hash_prefix: str = typer.Argument(..., metavar="HASH", help="Plan hash (8+ hex digits)."),
    home: Path = SILO_HOME.option(),
    actor: str = typer.Option(None, "--as", help="Who revokes (default: your login name)."),
) -> None:
    """Withdraw an approval: the silo refuses the plan from its next message on."""
    from silo_client.governance.approvals import revoke_plan

    silo = SiloHome.open(home)
    record = revoke_plan(silo.root, plan_hash_prefix, actor=actor)
    console.print(f"revoked plan {record.plan_hash} ('{record.title}') as {record.revoked_by}")


@plan_app.command("list")
def plan_list(
    home: Path = SILO_HOME.option(), as_json: bool = typer.Option(False, "--json")
) -> None:
    """List approved (and revoked) plans with who and when."""
    from dataclasses import asdict

    from silo_client.governance.approvals import ApprovalStore

    silo = SiloHome.open(home)
    records = ApprovalStore(silo.root).all()
    if as_json:
        fields = ("plan_hash", "title", "researcher", "approved_by", "approved_at", "revoked_at")
        print(json.dumps([{k: asdict(r)[k] for k in fields} for r in records], indent=2))
        return
    if not records:
        console.print("no plan approved yet ('silo plan approve PLAN.yaml')")
    for r in records:
        state = f"REVOKED {r.revoked_at} by {r.revoked_by}" if r.revoked else "approved"
        console.print(
            f"{r.plan_hash[:16]}  {r.title!r} by {r.researcher or '?'}: approved {r.approved_at} "
            f"by {r.approved_by}; {state}",
            markup=False,
        )


@policy_app.command("show")
def policy_show(home: Path = SILO_HOME.option()) -> None:
    """Print the site policy with every default made explicit."""
    from silo_client.governance.policy import load_policy, policy_path, policy_yaml

    silo = SiloHome.open(home)
    if not policy_path(silo.root).exists():
        console.print("# no policy.yaml yet: these defaults apply ('silo policy edit')")
    console.print(policy_yaml(load_policy(silo.root)), markup=False, highlight=False)


@policy_app.command("check")
def policy_check(
    home: Path = SILO_HOME.option(),
    file: Path = typer.Option(None, "--file", help="Check this policy file instead."),
    plan_path: Path = typer.Option(None, "--plan", help="Also check a plan against the policy."),
) -> None:
    """Validate the policy (one line per problem, exit 2), optionally against a plan."""
    from silo_client.errors import PlanRefused
    from silo_client.governance.policy import load_policy, parse_policy
    from training_plan.signing import verify_plan_signature

    if file is not None:
        try:
            policy = parse_policy(file.read_text(encoding="utf-8"), source=str(file))
        except FileNotFoundError:
            raise SiloError(f"{file}: policy file not found") from None
    else:
        policy = load_policy(SiloHome.open(home).root)
    console.print("policy is valid")
    if plan_path is not None:
        plan, signature = _plan_and_signature(plan_path)
        signer = verify_plan_signature(plan, signature) if signature else None
        problems = policy.violations(plan, signer)
        if problems:
            raise PlanRefused(f"{plan_path}: out of policy: " + "; ".join(problems))
        console.print(f"{plan_path}: within the policy")


@policy_app.command("edit")
def policy_edit(
    home: Path = SILO_HOME.option(),
    source: Path = typer.Option(
        None, "--from", help="Take the new policy from this file instead of opening $EDITOR."
    ),
    actor: str = typer.Option(None, "--as", help="Who changes it (default: your login name)."),
) -> None:
    """Change the policy (validated before it replaces the old one; the change is audited)."""
    from silo_client.governance.approvals import default_actor
    from silo_client.governance.policy import load_policy, parse_policy, policy_yaml, save_policy

    silo = SiloHome.open(home)
    if source is not None:
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SiloError(f"{source}: policy file not found") from None
        label = str(source)
    else:
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            handle.write(policy_yaml(load_policy(silo.root)))
        try:
            subprocess.run([editor, handle.name], check=False)
            text = Path(handle.name).read_text(encoding="utf-8")
        finally:
            Path(handle.name).unlink(missing_ok=True)
        label = "edited policy"
    policy = parse_policy(text, source=label)
    save_policy(silo.root, policy, actor=actor or default_actor())
    console.print("policy saved (change recorded in the audit log)")


@audit_app.command("show")
def audit_show(
    home: Path = SILO_HOME.option(),
    run: str = typer.Option(None, "--run", help="Only entries of this run id."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Show the audit log (optionally one run's entries)."""
    from silo_client.governance.audit import AuditLog

    silo = SiloHome.open(home)
    for entry in AuditLog.of_home(silo.root).entries():
        if run and run not in (str(entry.get("run_id")), str(entry.get("flower_run"))):
            continue
        if as_json:
            print(json.dumps(entry, sort_keys=True))
            continue
        skip = {"seq", "time", "event", "prev", "hash"}
        rest = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in skip and v is not None)
        console.print(
            f"{entry.get('seq'):>5} {entry.get('time')} {entry.get('event')}: {rest}",
            markup=False,
            highlight=False,
        )


@audit_app.command("verify")
def audit_verify(home: Path = SILO_HOME.option()) -> None:
    """Check the hash chain: detects an edited, removed or reordered line (exit 2)."""
    from silo_client.governance.audit import AuditError, AuditLog

    silo = SiloHome.open(home)
    result = AuditLog.of_home(silo.root).verify()
    if not result.ok:
        raise AuditError(f"audit log damaged after {result.entries} good entries: {result.problem}")
    console.print(f"audit log intact: {result.entries} entries, head {result.head}")


@audit_app.command("export")
def audit_export(
    home: Path = SILO_HOME.option(),
    out: Path = typer.Option(None, "--out", help="Write here (default: stdout)."),
) -> None:
    """Export the verified log as JSON lines for security monitoring; prints the head hash."""
    from silo_client.governance.audit import AuditError, AuditLog

    silo = SiloHome.open(home)
    log = AuditLog.of_home(silo.root)
    result = log.verify()
    if not result.ok:
        raise AuditError(f"refusing to export a damaged audit log: {result.problem}")
    lines = [json.dumps(e, sort_keys=True) for e in log.entries()]
    body = "".join(line + "\n" for line in lines)
    if out is None:
        print(body, end="")
    else:
        from fedsilo_base.atomic_files import write_atomic

        write_atomic(out, body.encode(), mode=0o600)
        console.print(f"exported {result.entries} entries to {out}; head hash {result.head}")


@privacy_app.command("show")
def privacy_show(
    home: Path = SILO_HOME.option(),
    dataset: str = typer.Option(None, "--dataset", help="Only this dataset tag."),
    as_json: bool = typer.Option(False, "--json", help="Totals and every run as JSON."),
) -> None:
    """Per dataset: the epsilon every DP run spent, the total and what the site policy allows."""
    from silo_client.governance.policy import load_policy
    from silo_client.governance.privacy_ledger import PrivacyLedger

    silo = SiloHome.open(home)
    policy = load_policy(silo.root)
    ledger = PrivacyLedger(silo.root)
    spends = ledger.spends(dataset)
    datasets = sorted({s.dataset for s in spends} | ({dataset} if dataset else set(silo.datasets)))
    totals = [ledger.total(name, policy.max_epsilon_for(name)) for name in datasets]
    if as_json:
        print(
            json.dumps(
                {
                    "datasets": [
                        {
                            "dataset": t.dataset,
                            "epsilon_spent": t.epsilon,
                            "delta_spent": t.delta,
                            "runs": t.runs,
                            "max_epsilon": t.max_epsilon,
                            "epsilon_remaining": t.remaining,
                        }
                        for t in totals
                    ],
                    "runs": [s.as_dict() for s in spends],
                },
                indent=2,
            )
        )
        return
    for t in totals:
        allowed = (
            f"of this site's maximum {t.max_epsilon:g}, {t.remaining:.3f} remain"
            if t.max_epsilon is not None
            else "(this site sets no maximum: policy privacy_max_epsilon)"
        )
        console.print(
            f"dataset '{t.dataset}': epsilon {t.epsilon:.3f} (delta {t.delta:g}) spent in "
            f"{t.runs} DP run(s) {allowed}",
            markup=False,
            highlight=False,
        )
        for s in (s for s in spends if s.dataset == t.dataset):
            console.print(
                f"  run {s.run_id} plan {s.plan_hash[:12]}: {s.rounds_trained} round(s), "
                f"epsilon {s.epsilon:.3f} of target {s.target_epsilon:g}, delta {s.delta:g}, "
                f"noise {s.noise_multiplier:.3f}, rate {s.sampling_rate:g}, "
                f"{s.accountant.upper()}; last {s.updated_at}",
                markup=False,
                highlight=False,
            )
