"""`fedsilo demo`: a three-hospital consortium on this machine, with real Flower processes.

Synthetic hospitals (real DICOM files) -> silo homes -> a CA and TLS certificate -> a SuperLink
and one SuperNode per hospital on 127.0.0.1 -> the example plan through `flwr run` -> per-round
evaluation on a held-out pooled test set, beside each hospital training alone for the same budget.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.artifacts import load_model, read_events
from aggregator.control import write_flower_app
from aggregator.pki import make_tls
from fedsilo.flower_processes import ClusterError, FlowerCluster
from fedsilo.local_consortium import (
    adjust_plan,
    approve_everywhere,
    generate_consortium_data,
    pin_roster,
    plan_preprocessing,
    score_arrays,
    train_alone,
)
from fedsilo_base.errors import UserError
from silo_client.home import init_silo_home
from training_plan import TrainingPlan, load_plan

EXAMPLE_PLAN = Path(__file__).resolve().parent / "plans" / "demo-classification.yaml"


class DemoError(RuntimeError, UserError):
    """The demo could not run; the message says why."""


@dataclass
class DemoSettings:
    """What `fedsilo demo` was asked to do."""

    out: Path
    hospitals: int = 3
    images_per_hospital: int = 160
    rounds: int | None = None
    seed: int = 0
    difficulty: float = 0.55
    plan_path: Path = EXAMPLE_PLAN
    test_images: int = 300
    timeout: float = 1200.0


def fresh_workdir(out: Path) -> tuple[Path, Path]:
    """(``out`` resolved, an emptied ``out/work``): a demo never mixes with a previous run."""
    out = out.resolve()
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return out, work


def plan_for_demo(settings, workdir: Path) -> tuple[TrainingPlan, Path]:
    """The settings' plan for this many hospitals (min_silos), rounds and seed, written to
    ``workdir/plan.yaml`` (what the ServerApp is given). Any demo's settings object with
    ``plan_path``, ``hospitals``, ``rounds`` and ``seed`` will do."""
    federation = {"min_silos": settings.hospitals}
    if settings.rounds:
        federation["rounds"] = settings.rounds
    plan = adjust_plan(
        load_plan(settings.plan_path), federation=federation, training={"seed": settings.seed}
    )
    import yaml

    path = workdir / "plan.yaml"
    path.write_text(yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False))
    return plan, path


def _all_local_only(plan_json: str, home_roots: list[str], test_dir: str, cache_dir: str) -> dict:
    """Each hospital alone (runs in a worker process while the federation runs)."""
    import torch

    from silo_client.data.dataset_builder import build_dataset
    from silo_client.home import SiloHome
    from silo_client.local_data import load_local_data

    torch.set_num_threads(1)
    plan = TrainingPlan.model_validate_json(plan_json)
    test = build_dataset(Path(test_dir), plan_preprocessing(plan), cache_dir=Path(cache_dir))
    curves = {}
    for root in home_roots:
        home = SiloHome.open(root)
        data = load_local_data(home, plan)
        _, scores = train_alone(
            plan, data.train_images, data.train_labels, home.name, test.images, test.labels
        )
        curves[home.name] = [score.auc for score in scores]
    return curves


def run_demo(settings: DemoSettings, console=None) -> dict:
    """Run the whole demo; returns the summary also written to summary.json."""
    from rich.console import Console

    console = console or Console()
    started = time.monotonic()
    out, work = fresh_workdir(settings.out)
    plan, plan_path = plan_for_demo(settings, work)

    with console.status("Generating synthetic hospitals (DICOM)..."):
        specs, test_dir = generate_consortium_data(
            work,
            hospitals=settings.hospitals,
            images_per_hospital=settings.images_per_hospital,
            test_images=settings.test_images,
            seed=settings.seed,
            difficulty=settings.difficulty,
            image_size=max(64, plan.preprocessing.input_size),
        )
    homes = [
        init_silo_home(work / "silos" / spec.name, spec.name, work / "hospitals" / spec.name)
        for spec in specs
    ]
    pin_roster(homes)
    approve_everywhere(homes, [plan], work)
    console.print(
        f"[bold]{len(specs)} hospitals[/]: "
        + ", ".join(
            f"{s.name} ({s.n_images} images, {s.positive_fraction:.0%} positive)" for s in specs
        )
    )
    # The baselines train in one single-threaded worker while the federation runs: Flower's
    # exchanges leave the cores idle most of each round, so this shortens the demo's wall time.
    import multiprocessing

    baseline_pool = multiprocessing.get_context("spawn").Pool(1)
    baselines = baseline_pool.apply_async(
        _all_local_only,
        (
            plan.model_dump_json(),
            [str(home.root) for home in homes],
            str(test_dir),
            str(work / "baseline-test-cache"),
        ),
    )
    try:
        return _run_federation_and_report(
            settings,
            console,
            plan,
            plan_path,
            homes,
            specs,
            work,
            out,
            test_dir,
            started,
            baselines,
        )
    finally:
        baseline_pool.terminate()
        baseline_pool.join()


def _run_federation_and_report(
    settings, console, plan, plan_path, homes, specs, work, out, test_dir, started, baselines
) -> dict:
    from silo_client.data.dataset_builder import build_dataset
    from silo_client.training import limit_threads

    out_run = out / "run"
    run_federation(console, plan, plan_path, homes, work, out_run, f"demo-{settings.seed}",
                   settings.timeout)  # fmt: skip
    federated_seconds = time.monotonic() - started

    limit_threads()
    import torch

    torch.set_num_threads(2)
    test = build_dataset(test_dir, plan_preprocessing(plan), cache_dir=work / "test-cache")
    rows = []
    with console.status("Evaluating each round's global model on the pooled test set..."):
        for server_round in range(0, plan.federation.rounds + 1):
            arrays = load_model(out_run / "rounds" / f"round-{server_round:03d}.safetensors")
            score = score_arrays(plan, arrays, test.images, test.labels)
            rows.append(
                {"round": server_round, "federated_auc": score.auc, "federated_loss": score.loss}
            )
    with console.status("Waiting for the local-only baselines..."):
        local_curves: dict[str, list[float]] = baselines.get(timeout=settings.timeout)
    for row in rows[1:]:
        for name, curve in local_curves.items():
            row[f"local_auc_{name}"] = curve[row["round"] - 1]

    final_auc = rows[-1]["federated_auc"]
    local_final = {name: curve[-1] for name, curve in local_curves.items()}
    mean_local = float(np.mean(list(local_final.values())))
    summary = {
        "federated_auc": final_auc,
        "local_only_auc": local_final,
        "mean_local_only_auc": mean_local,
        "federated_beats_mean_local": bool(final_auc > mean_local),
        "federated_beats_every_local": bool(all(final_auc > v for v in local_final.values())),
        "rounds": plan.federation.rounds,
        "hospitals": [s.name for s in specs],
        "images_per_hospital": {s.name: s.n_images for s in specs},
        "test_images": len(test.labels),
        "model": plan.model.name,
        "secure_aggregation": plan.secure_aggregation.enabled,
        "federated_seconds": round(federated_seconds, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "seed": settings.seed,
    }
    write_outputs(
        out, rows, out_run, "auc", local_curves,
        secure=plan.secure_aggregation.enabled,
        ylabel="AUC on pooled held-out test set",
        ylim=(0.4, 1.0),
        title="fedsilo demo: federated vs each hospital alone",
    )  # fmt: skip
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_table(console, rows, local_final, summary)
    return summary


def _progress_text(event: dict) -> str:
    """One line for the progress bar: the round's validation metrics, else its training loss."""
    ev = event.get("evaluate", {})
    if "eval-dice" in ev:
        return f"val Dice {ev['eval-dice']:.3f} loss {ev.get('eval-loss', float('nan')):.3f}"
    if ev:
        return (
            f"val loss {ev.get('eval-loss', float('nan')):.3f} "
            f"acc {ev.get('eval-accuracy', float('nan')):.3f}"
        )
    return f"train loss {event.get('train', {}).get('train-loss', float('nan')):.3f}"


def run_federation(
    console,
    plan: TrainingPlan,
    plan_path: Path,
    homes: list,
    work: Path,
    out_run: Path,
    run_id: str,
    timeout: float,
) -> None:
    """Start a TLS SuperLink and one SuperNode per silo home on 127.0.0.1, submit the plan
    through `flwr run`, show progress from the run's events, and stop every process at the end
    (or on any error). Raises DemoError when the run fails or overruns ``timeout``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    tls = make_tls(work / "tls", "fedsilo-demo", ["127.0.0.1", "localhost"])
    if out_run.exists():
        shutil.rmtree(out_run)
    cluster = FlowerCluster(work, tls)
    with cluster:
        with console.status("Starting SuperLink and SuperNodes (TLS on 127.0.0.1)..."):
            cluster.start_superlink()
            for home in homes:
                cluster.start_supernode(home.name, {"home": str(home.root)})
            app_dir = write_flower_app(
                work / "app", {"plan-path": "", "out-dir": "", "run-id": "", "node-wait": 180}
            )
            cluster.submit(
                app_dir, {"plan-path": str(plan_path), "out-dir": str(out_run), "run-id": run_id}
            )
        console.print(
            f"SuperLink at {cluster.address} (TLS), {len(homes)} SuperNodes, "
            f"run '{run_id}' submitted"
        )
        events_path = out_run / "events.jsonl"
        secure = "secure sum" if plan.secure_aggregation.enabled else "plain"
        with Progress(
            TextColumn("[bold]federated training"),
            BarColumn(),
            TextColumn("round {task.completed}/{task.total}"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("waiting for silos", total=plan.federation.rounds)
            deadline = time.monotonic() + timeout
            while True:
                events = read_events(events_path)
                finished = [e for e in events if e["event"] == "round-finished"]
                if finished:
                    last = finished[-1]
                    progress.update(
                        task,
                        completed=len(finished),
                        description=(
                            f"{_progress_text(last)} ({last.get('participants')} silos, {secure})"
                        ),
                    )
                elif any(e["event"] == "run-started" for e in events):
                    progress.update(task, description="round 1 running")
                failed = [e for e in events if e["event"] in ("run-failed", "round-failed")]
                if failed:
                    raise DemoError(
                        f"the federated run failed: {failed[-1].get('reason', failed[-1])}"
                    )
                if any(e["event"] == "run-finished" for e in events):
                    break
                cluster.check_alive()
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"the federated run did not finish within {timeout:.0f} s; "
                        f"see the logs in {work / 'logs'}"
                    )
                time.sleep(0.5)


def write_outputs(
    out: Path,
    rows: list[dict],
    out_run: Path,
    metric: str,
    local_curves: dict[str, list[float]],
    *,
    secure: bool,
    ylabel: str,
    ylim: tuple[float, float],
    title: str,
) -> None:
    """What a demo leaves in ``out``: metrics.csv (a row per round), final_model.safetensors, and
    metrics.png with the federated ``federated_<metric>`` per round beside each hospital alone."""
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "round", k))
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    shutil.copyfile(out_run / "final_model.safetensors", out / "final_model.safetensors")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(
        [r["round"] for r in rows],
        [r[f"federated_{metric}"] for r in rows],
        "o-",
        lw=2.5,
        label="federated (secure aggregation)" if secure else "federated",
    )
    for name, curve in local_curves.items():
        ax.plot(range(1, len(curve) + 1), curve, "--", alpha=0.8, label=f"{name} alone")
    ax.set_xticks([r["round"] for r in rows])
    ax.set_xlabel("round (local-only: same number of local epochs)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "metrics.png")
    plt.close(fig)


def _print_table(console, rows: list[dict], local_final: dict, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="Federated training (pooled held-out test set)")
    table.add_column("round", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("AUC", justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]), f"{row['federated_loss']:.4f}", f"{row['federated_auc']:.3f}"
        )
    side = Table(title="Each hospital alone (same budget)")
    side.add_column("hospital")
    side.add_column("AUC", justify="right")
    for name, value in local_final.items():
        side.add_row(name, f"{value:.3f}")
    side.add_row("[bold]mean", f"[bold]{summary['mean_local_only_auc']:.3f}")
    from rich.columns import Columns

    console.print(Columns([table, side]))
    if summary["federated_beats_every_local"]:
        verdict = f"above every hospital alone (best {max(local_final.values()):.3f})"
    elif summary["federated_beats_mean_local"]:
        verdict = (
            f"above the mean local-only AUC {summary['mean_local_only_auc']:.3f}, "
            f"NOT above every hospital alone (best {max(local_final.values()):.3f})"
        )
    else:
        verdict = f"NOT above the mean local-only AUC {summary['mean_local_only_auc']:.3f}"
    console.print(
        f"Federated AUC {summary['federated_auc']:.3f} is {verdict}. "
        f"Wall time {summary['wall_seconds']:.0f} s."
    )


__all__ = ["ClusterError", "DemoError", "DemoSettings", "run_demo"]
