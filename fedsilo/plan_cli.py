"""`fedsilo plan new|keygen|sign|submit|status|results`: the researcher's side of a plan.

(`validate`, `show` and `hash` live in fedsilo.cli beside them; all are on `fedsilo plan`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from fedsilo_base.home_folder import CONSORTIUM_HOME
from training_plan import load_plan, plan_hash
from training_plan.errors import PlanError

console = Console(soft_wrap=True)

TEMPLATE = """\
# A fedsilo training plan (schema version 2). Check it with: fedsilo plan validate {name}
schema_version: 2
title: {title}
purpose: >-
  Say why, for whom, and what the consortium will do with the model.
researcher:
  name: Your Name
  organisation: Your Institute
  email: you@example.org
  # public_key: paste the line of your .pub file ('fedsilo plan keygen') to pin your key
dataset: default               # tag of the registered local dataset at each silo
task: {task}
{task_sections}
federation:
  rounds: 5
  min_silos: 3
  strategy: fedavg
  on_refusal: continue         # or stop
secure_aggregation:
  enabled: true
  max_weight: 2000
evaluation:
  metrics: {metrics}
"""

# What differs between the tasks a plan can ask for: model, preprocessing, training, metrics.
TASK_SECTIONS = {
    "classification": (
        """\
model:
  name: resnet10               # resnet10/18/34, efficientnet-b0/b1, densenet121
preprocessing:
  input_size: 64
  augmentations: []            # allow-list: flip-horizontal, flip-vertical, rotate-90, ...
training:
  optimizer: adam
  learning_rate: 0.001
  local_epochs: 1
  batch_size: 8""",
        "[loss, accuracy]",
    ),
    "segmentation": (
        """\
model:
  name: unet                   # MONAI UNet on 3-D series (masks: DICOM SEG or NIfTI)
preprocessing:
  input_size: 32               # each series resampled to a cube of this side
  window: {center: 40, width: 400}
  augmentations: []            # allow-list: flip-horizontal, flip-vertical, rotate-90, ...
training:
  optimizer: adam
  learning_rate: 0.01
  local_epochs: 2
  batch_size: 4
  loss: dice""",
        "[loss, dice, hd95]",
    ),
}


def _consortium_option() -> Path:
    return CONSORTIUM_HOME.option(
        "--consortium", help_text="The consortium's home as its operator exposes it."
    )


def plan_new(
    out: Path = typer.Argument(Path("plan.yaml"), help="Where to write the new plan."),
    task: str = typer.Option(
        "classification", "--task", help=f"One of: {', '.join(TASK_SECTIONS)}."
    ),
    title: str = typer.Option("My federated study", "--title"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a plan template with every section, ready to edit."""
    if task not in TASK_SECTIONS:
        raise PlanError(f"task '{task}' is not known (use one of: {', '.join(TASK_SECTIONS)})")
    if out.exists() and not force:
        raise PlanError(f"{out} exists; pass --force to overwrite it")
    from fedsilo_base.atomic_files import write_atomic

    sections, metrics = TASK_SECTIONS[task]
    text = TEMPLATE.format(
        name=out, title=title, task=task, task_sections=sections, metrics=metrics
    )
    write_atomic(out, text.encode(), mode=0o644)
    load_plan(out)
    console.print(f"wrote {out}; edit it, then 'fedsilo plan validate {out}'")


def plan_keygen(
    stem: Path = typer.Argument(Path("researcher"), help="Writes STEM.key (0600) and STEM.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key."),
) -> None:
    """Make an Ed25519 researcher key pair; send the .pub line to the hospitals' IT."""
    from training_plan.signing import fingerprint, generate_keypair

    key, pub = generate_keypair(stem, overwrite=force)
    console.print(f"private key {key} (keep it secret), public key {pub}")
    console.print(f"fingerprint {fingerprint(pub.read_text().strip())}")


def plan_sign(
    path: Path = typer.Argument(..., help="Plan YAML."),
    key: Path = typer.Option(..., "--key", help="Your private key (STEM.key)."),
) -> None:
    """Sign the plan's hash; writes PLAN.sig next to it."""
    from training_plan.signing import load_private_key, sign_plan, write_signature

    plan = load_plan(path)
    sig_path = write_signature(path, sign_plan(plan, load_private_key(key)))
    console.print(f"signed plan {plan_hash(plan)} -> {sig_path}")


def plan_submit(
    path: Path = typer.Argument(..., help="Signed plan YAML (PLAN.sig next to it)."),
    consortium: Path = _consortium_option(),
) -> None:
    """Submit a signed plan to the consortium's registry."""
    from aggregator.registry import Registry
    from training_plan.signing import read_signature

    plan = load_plan(path)
    entry = Registry(consortium).submit(plan, read_signature(path))
    console.print(f"submitted plan {entry.plan_hash} ('{entry.title}'): {entry.status}")


def plan_status(
    digest: str = typer.Argument(..., metavar="HASH", help="Plan hash (8+ hex digits)."),
    consortium: Path = _consortium_option(),
) -> None:
    """Show a submitted plan's status and runs."""
    from aggregator.registry import Registry

    registry = Registry(consortium)
    registry.refresh()
    entry = registry.plan(digest)
    console.print(
        f"plan {entry.plan_hash} '{entry.title}': {entry.status}"
        + (f" ({entry.approvals})" if entry.approvals else ""),
        markup=False,
    )
    for run in registry.runs(entry.plan_hash):
        console.print(f"  run {run.run_id}: {run.status} (started {run.started_at})", markup=False)


def plan_results(
    digest: str = typer.Argument(..., metavar="HASH", help="Plan hash (8+ hex digits)."),
    consortium: Path = _consortium_option(),
) -> None:
    """Print the results of a plan's runs (aggregates only), as JSON."""
    from aggregator.registry import Registry

    registry = Registry(consortium)
    entry = registry.plan(digest)
    runs = registry.runs(entry.plan_hash)
    print(
        json.dumps(
            {
                "plan_hash": entry.plan_hash,
                "status": entry.status,
                "runs": [{"run_id": r.run_id, "status": r.status, **r.result} for r in runs],
            },
            indent=2,
        )
    )


def register(plan_app: typer.Typer) -> None:
    """Mount the researcher commands on `fedsilo plan`."""
    plan_app.command("new")(plan_new)
    plan_app.command("keygen")(plan_keygen)
    plan_app.command("sign")(plan_sign)
    plan_app.command("submit")(plan_submit)
    plan_app.command("status")(plan_status)
    plan_app.command("results")(plan_results)
