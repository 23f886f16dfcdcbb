"""The model registry: each finished run exports its final model, plan, metrics and a model card.

A run's export lives in ``RUN_DIR/model/``: ``model.safetensors``, ``plan.yaml``, ``metrics.json``
and ``MODEL_CARD.md``. Data provenance is given as counts only (silos per round, rounds), never
as a per-silo value.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.artifacts import read_events, save_model
from aggregator.errors import AggregatorError
from fedsilo_base.atomic_files import PRIVATE, atomic_path, write_atomic
from training_plan import TrainingPlan, plan_hash

EXPORT = "model"
FILES = ("model.safetensors", "plan.yaml", "metrics.json", "MODEL_CARD.md")


@dataclass(frozen=True)
class RegisteredModel:
    """One exported model, as listed by `aggregator models`."""

    run_dir: Path
    run_id: str
    title: str
    plan_hash: str
    rounds: int
    final_metrics: dict[str, float]


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"), mode=PRIVATE)


def model_card(
    plan: TrainingPlan,
    run_id: str,
    rounds: list[dict[str, Any]],
    test: dict[str, float] | None = None,
) -> str:
    """Markdown model card: task, data provenance as counts, metrics (validation of the last
    round, and the held-out test splits when the plan has them), privacy settings."""
    sa = plan.secure_aggregation
    participants = [int(r.get("participants", 0)) for r in rounds]
    last = rounds[-1].get("evaluate", {}) if rounds else {}
    metrics = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in sorted(last.items())) or "| - | - |"
    privacy = (
        f"secure aggregation on (clip {sa.clip}, {sa.fractional_bits} fractional bits, "
        f"{sa.field_bits}-bit field, threshold {sa.threshold or 'default 2n/3+1'}); the server "
        "learned only sums of the silos' updates and evaluation counters"
        if sa.enabled
        else "secure aggregation OFF: the server saw each silo's update"
    )
    from training_plan.privacy import released_guarantee

    dp = released_guarantee(plan, len(rounds))
    args = ", ".join(f"{k}={v}" for k, v in sorted(plan.federation.strategy_args.items()))
    return (
        f"# Model card: {plan.title}\n\n"
        f"- run: `{run_id}`, plan `{plan_hash(plan)[:16]}`\n"
        f"- purpose: {plan.purpose or '-'}\n"
        f"- researcher: {plan.researcher.name if plan.researcher else '-'}\n\n"
        "## Task\n\n"
        f"{plan.task} with `{plan.model.name}` ({plan.model.norm} norm), input "
        f"{plan.preprocessing.input_size} px, dataset tag `{plan.dataset}`.\n"
        f"Server strategy `{plan.federation.strategy}`{f' ({args})' if args else ''}; local "
        f"{plan.training.optimizer} lr {plan.training.learning_rate}, "
        f"{plan.training.local_epochs} epoch(s) per round, seed {plan.training.seed}.\n\n"
        "## Data provenance (counts only)\n\n"
        f"- rounds trained: {len(rounds)}\n"
        f"- silos contributing per round: min {min(participants, default=0)}, "
        f"max {max(participants, default=0)}\n"
        "- no per-silo count, name or record left any silo for this card\n\n"
        "## Metrics (federated validation, last round, summed over silos)\n\n"
        "| metric | value |\n|---|---|\n"
        f"{metrics}\n\n"
        f"{_test_section(plan, test)}"
        "## Privacy settings\n\n"
        f"{privacy}.\n\n"
        "## Differential privacy (as the plan states it)\n\n"
        f"{dp}.\n"
    )


def _test_section(plan: TrainingPlan, test: dict[str, float] | None) -> str:
    if not test:
        return ""
    rows = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in sorted(test.items()))
    return (
        f"## Metrics (held-out test splits, {plan.training.test_fraction:.0%} of each silo's "
        "patients, final model, summed over silos)\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
    )


def export_run(
    run_dir: Path, plan: TrainingPlan, run_id: str, final_arrays: dict[str, np.ndarray]
) -> Path:
    """Write RUN_DIR/model/ for a finished run; return that folder."""
    import yaml

    run_dir = Path(run_dir)
    folder = run_dir / EXPORT
    events = read_events(run_dir / "events.jsonl")
    rounds = [e for e in events if e["event"] == "round-finished"]
    test = next((e.get("test", {}) for e in events if e["event"] == "test-evaluated"), {})
    save_model(folder / "model.safetensors", final_arrays, {"plan_hash": plan_hash(plan)})
    _write_text(folder / "plan.yaml", yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False))
    metrics = {
        "run_id": run_id,
        "plan_hash": plan_hash(plan),
        "title": plan.title,
        "rounds": [
            {
                "round": r["round"],
                "train": r.get("train", {}),
                "evaluate": r.get("evaluate", {}),
                "participants": r.get("participants", 0),
            }
            for r in rounds
        ],
        "test": test,
    }
    _write_text(folder / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    _write_text(folder / "MODEL_CARD.md", model_card(plan, run_id, rounds, test))
    return folder


def list_models(runs_root: Path) -> list[RegisteredModel]:
    """Every exported model under a folder of runs (each RUN/model/metrics.json)."""
    models = []
    for metrics_path in sorted(Path(runs_root).glob(f"*/{EXPORT}/metrics.json")):
        data = json.loads(metrics_path.read_text(encoding="utf-8"))
        last = data["rounds"][-1]["evaluate"] if data["rounds"] else {}
        models.append(
            RegisteredModel(
                run_dir=metrics_path.parent.parent,
                run_id=data["run_id"],
                title=data["title"],
                plan_hash=data["plan_hash"],
                rounds=len(data["rounds"]),
                final_metrics={k: float(v) for k, v in last.items()},
            )
        )
    return models


def copy_export(run_dir: Path, to: Path) -> list[Path]:
    """Copy a run's exported model files into ``to`` (created; existing files are not replaced)."""
    source = Path(run_dir) / EXPORT
    missing = [name for name in FILES if not (source / name).exists()]
    if missing:
        raise AggregatorError(
            f"{run_dir} has no complete model export (missing {', '.join(missing)}); only a "
            "finished run exports its model"
        )
    to = Path(to)
    clashes = [name for name in FILES if (to / name).exists()]
    if clashes:
        raise AggregatorError(f"{to} already holds {', '.join(clashes)}; choose an empty folder")
    written = []
    for name in FILES:
        with atomic_path(to / name, mode=PRIVATE) as tmp:
            shutil.copyfile(source / name, tmp)
        written.append(to / name)
    return written
