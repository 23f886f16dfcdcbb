"""`fedsilo demo --task segmentation`: 3-D lesion segmentation across three synthetic hospitals.

Synthetic CT hospitals (real DICOM series; lesion masks as DICOM SEG at some hospitals, NIfTI at
others) -> silo homes -> the same real Flower processes as the classification demo -> the
segmentation plan (MONAI UNet, Dice loss, secure aggregation) -> each round's global model scored
on a pooled held-out set of cases, beside each hospital training alone for the same budget, and
the silos' own test splits evaluated once at the end through secure sums (Dice, HD95).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.artifacts import load_model, read_events
from fedsilo.demo import DemoError, fresh_workdir, plan_for_demo, run_federation, write_outputs
from fedsilo.local_consortium import (
    SegmentationCases,
    approve_everywhere,
    generate_segmentation_consortium,
    load_segmentation_cases,
    pin_roster,
    score_segmentation,
    train_segmentation_alone,
)
from silo_client.home import init_silo_home
from training_plan import TrainingPlan

SEGMENTATION_PLAN = Path(__file__).resolve().parent / "plans" / "demo-segmentation.yaml"
CASE_SIZE = 48
"""In-plane size of the synthetic CT slices (the plan resamples each series to its cube)."""
SLICES = (20, 28)


@dataclass
class SegmentationDemoSettings:
    """What `fedsilo demo --task segmentation` was asked to do."""

    out: Path
    hospitals: int = 3
    cases_per_hospital: int = 40
    test_cases_per_hospital: int = 6
    rounds: int | None = None
    seed: int = 0
    plan_path: Path = SEGMENTATION_PLAN
    timeout: float = 1200.0


def _alone(plan: TrainingPlan, home, test: SegmentationCases) -> list[dict[str, float]]:
    """One hospital training alone on its own training split, the federated run's budget."""
    from silo_client.local_data import load_local_data

    data = load_local_data(home, plan)
    _, curve = train_segmentation_alone(plan, data.train_images, data.train_labels, home.name, test)
    return curve


def run_segmentation_demo(settings: SegmentationDemoSettings, console=None) -> dict:
    """Run the segmentation demo; returns the summary also written to summary.json."""
    from rich.console import Console

    console = console or Console()
    started = time.monotonic()
    out, work = fresh_workdir(settings.out)
    plan, plan_path = plan_for_demo(settings, work)
    if plan.task != "segmentation":
        raise DemoError(f"{settings.plan_path} is a {plan.task} plan; pass a segmentation plan")

    with console.status("Generating synthetic CT hospitals (DICOM series, SEG and NIfTI)..."):
        folders, test_folders = generate_segmentation_consortium(
            work,
            hospitals=settings.hospitals,
            cases_per_hospital=settings.cases_per_hospital,
            test_cases_per_hospital=settings.test_cases_per_hospital,
            size=CASE_SIZE,
            slices=SLICES,
            seed=settings.seed,
        )
    homes = [init_silo_home(work / "silos" / f.name, f.name, f) for f in folders]
    pin_roster(homes)
    approve_everywhere(homes, [plan], work)
    console.print(
        f"[bold]{len(homes)} hospitals[/], {settings.cases_per_hospital} CT series each "
        f"(masks as DICOM SEG or NIfTI), plan '{plan.title}'"
    )
    out_run = out / "run"
    run_federation(
        console, plan, plan_path, homes, work, out_run, f"seg-demo-{settings.seed}",
        settings.timeout,
    )  # fmt: skip
    federated_seconds = time.monotonic() - started

    import torch

    from silo_client.local_model import build_global_model
    from silo_client.training import limit_threads

    limit_threads()
    torch.set_num_threads(2)
    with console.status("Scoring each round's global model and each hospital alone..."):
        test = load_segmentation_cases(test_folders, plan, work / "test-cache")
        rows = []
        for server_round in range(plan.federation.rounds + 1):
            arrays = load_model(out_run / "rounds" / f"round-{server_round:03d}.safetensors")
            scores = score_segmentation(plan, build_global_model(plan, arrays), test)
            rows.append({"round": server_round, **{f"federated_{k}": v for k, v in scores.items()}})
        alone = {home.name: _alone(plan, home, test) for home in homes}
    for row in rows[1:]:
        for name, curve in alone.items():
            row[f"local_dice_{name}"] = curve[row["round"] - 1]["dice"]
    events = read_events(out_run / "events.jsonl")
    test_events = [e for e in events if e["event"] == "test-evaluated"]
    silo_test = test_events[-1]["test"] if test_events else {}
    local_final = {name: curve[-1]["dice"] for name, curve in alone.items()}
    final = rows[-1]
    summary = {
        "task": "segmentation",
        "federated_dice": final["federated_dice"],
        "federated_hd95_mm": final.get("federated_hd95"),
        "local_only_dice": local_final,
        "mean_local_only_dice": float(np.mean(list(local_final.values()))),
        "federated_beats_mean_local": bool(
            final["federated_dice"] > np.mean(list(local_final.values()))
        ),
        "silo_test_splits": {
            "dice": silo_test.get("test-dice"),
            "hd95_mm": silo_test.get("test-hd95"),
            "aggregated": "secure sums over the silos' held-out test splits",
        },
        "rounds": plan.federation.rounds,
        "hospitals": [h.name for h in homes],
        "pooled_test_cases": len(test.images),
        "model": plan.model.name,
        "secure_aggregation": plan.secure_aggregation.enabled,
        "federated_seconds": round(federated_seconds, 1),
        "seed": settings.seed,
    }
    write_outputs(
        out, rows, out_run, "dice",
        {name: [c["dice"] for c in curve] for name, curve in alone.items()},
        secure=plan.secure_aggregation.enabled,
        ylabel="Dice on pooled held-out cases",
        ylim=(0.0, 1.0),
        title="fedsilo demo: 3-D lesion segmentation",
    )  # fmt: skip
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_table(console, rows, local_final, summary)
    return summary


def _print_table(console, rows: list[dict], local_final: dict, summary: dict) -> None:
    from rich.columns import Columns
    from rich.table import Table

    table = Table(title="Federated segmentation (pooled held-out cases)")
    table.add_column("round", justify="right")
    table.add_column("Dice", justify="right")
    table.add_column("HD95 mm", justify="right")
    for row in rows:
        hd95 = row.get("federated_hd95")
        table.add_row(
            str(row["round"]),
            f"{row['federated_dice']:.3f}",
            "-" if hd95 is None else f"{hd95:.1f}",
        )
    side = Table(title="Each hospital alone (same budget)")
    side.add_column("hospital")
    side.add_column("Dice", justify="right")
    for name, value in local_final.items():
        side.add_row(name, f"{value:.3f}")
    side.add_row("[bold]mean", f"[bold]{summary['mean_local_only_dice']:.3f}")
    console.print(Columns([table, side]))
    silo = summary["silo_test_splits"]
    if silo["dice"] is not None:
        console.print(
            f"Silos' own test splits (secure sums): Dice {silo['dice']:.3f}"
            + (f", HD95 {silo['hd95_mm']:.1f} mm" if silo["hd95_mm"] is not None else "")
        )
    verdict = "above" if summary["federated_beats_mean_local"] else "NOT above"
    console.print(
        f"Federated Dice {summary['federated_dice']:.3f} is {verdict} the mean local-only Dice "
        f"{summary['mean_local_only_dice']:.3f}. Wall time {summary['wall_seconds']:.0f} s."
    )


__all__ = ["SEGMENTATION_PLAN", "SegmentationDemoSettings", "run_segmentation_demo"]
