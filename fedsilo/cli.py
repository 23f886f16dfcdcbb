"""`fedsilo`: the front door. Mounts the silo and aggregator CLIs; plan tools, synth, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from fedsilo_base.cli_runner import new_cli, run_cli
from training_plan import load_plan, plan_hash

app = new_cli(
    "fedsilo", "Cross-silo federated learning for hospitals (Flower + MONAI + secure aggregation)."
)
plan_app = typer.Typer(help="Write, check and inspect training plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")

from fedsilo.plan_cli import register as _register_plan_cli  # noqa: E402

_register_plan_cli(plan_app)
console = Console(soft_wrap=True)
err = Console(stderr=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("fedsilo-demo"), "--out", help="Output folder."),
    rounds: int = typer.Option(None, "--rounds", min=1, help="Rounds (default: the plan's)."),
    hospitals: int = typer.Option(3, "--hospitals", min=3, max=10, help="Number of hospitals."),
    images_per_hospital: int = typer.Option(160, "--images-per-hospital", min=20, max=5000),
    seed: int = typer.Option(0, "--seed", help="Seed for data, model and training."),
    timeout: float = typer.Option(1200.0, "--timeout", help="Give up after this many seconds."),
    plan: Path = typer.Option(None, "--plan", help="Plan YAML (default: the bundled demo plan)."),
    task: str = typer.Option(
        "classification",
        "--task",
        help="classification (2-D slices, AUC) or segmentation (3-D CT series, UNet, Dice).",
    ),
    cases_per_hospital: int = typer.Option(
        40, "--cases-per-hospital", min=20, max=500, help="CT series per hospital (segmentation)."
    ),
) -> None:
    """Run a whole consortium on this machine: synthetic hospitals, real Flower processes."""
    from fedsilo.demo import DemoSettings, run_demo

    if task not in ("classification", "segmentation"):
        raise typer.BadParameter(
            f"'{task}' is not a demo task; use classification or segmentation", param_hint="--task"
        )
    if task == "segmentation":
        from fedsilo.demo_segmentation import SegmentationDemoSettings, run_segmentation_demo

        run_segmentation_demo(
            SegmentationDemoSettings(
                out=out,
                hospitals=hospitals,
                cases_per_hospital=cases_per_hospital,
                rounds=rounds,
                seed=seed,
                timeout=timeout,
                **({"plan_path": plan} if plan else {}),
            ),
            console=console,
        )
        console.print(
            f"Wrote {out}/summary.json, metrics.csv, metrics.png and final_model.safetensors"
        )
        return
    summary = run_demo(
        DemoSettings(
            out=out,
            hospitals=hospitals,
            images_per_hospital=images_per_hospital,
            rounds=rounds,
            seed=seed,
            timeout=timeout,
            **({"plan_path": plan} if plan else {}),
        ),
        console=console,
    )
    console.print(f"Wrote {out}/summary.json, metrics.csv, metrics.png and final_model.safetensors")
    if not summary["federated_beats_mean_local"]:
        console.print(
            "[yellow]Note: this run's federated AUC did not beat the mean local-only AUC."
        )


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write hospital-*/ folders into."),
    task: str = typer.Option(
        "classification",
        "--task",
        help=(
            "classification (2-D grayscale images + labels.csv), colour (RGB skin-lesion "
            "photographs + labels.csv) or segmentation (3-D CT series + masks)."
        ),
    ),
    hospitals: int = typer.Option(3, "--hospitals", min=1, max=50),
    images_per_hospital: int = typer.Option(120, "--images-per-hospital", min=4, max=100_000),
    cases_per_hospital: int = typer.Option(
        16, "--cases-per-hospital", min=2, max=10_000, help="Segmentation: CT series per hospital."
    ),
    seed: int = typer.Option(0, "--seed"),
    difficulty: float = typer.Option(0.55, "--difficulty", min=0.0, max=1.0),
    image_size: int = typer.Option(64, "--image-size", min=16, max=1024),
) -> None:
    """Generate synthetic hospitals: real DICOM files plus labels.csv (classification) or
    lesion masks as DICOM SEG / NIfTI (segmentation) per hospital."""
    if task == "segmentation":
        from fedsilo.synthetic import generate_segmentation_hospitals

        folders = generate_segmentation_hospitals(
            out, n_hospitals=hospitals, cases_per_hospital=cases_per_hospital,
            size=min(image_size, 512), seed=seed,
        )  # fmt: skip
        for folder in folders:
            spec = json.loads((folder / "spec.json").read_text())
            masks = "DICOM SEG in dicom/seg/" if spec["mask_format"] == "seg" else "NIfTI in masks/"
            console.print(
                f"{folder}: {spec['n_cases']} CT series of {spec['size']}x{spec['size']}, "
                f"{spec['slice_spacing']} mm slices, lesion masks as {masks}"
            )
        return
    if task == "colour":
        from fedsilo.synthetic import generate_colour_hospitals

        colour_specs = generate_colour_hospitals(
            out, hospitals=hospitals, images_per_hospital=images_per_hospital, seed=seed,
            image_size=image_size,
        )  # fmt: skip
        for cspec in colour_specs:
            console.print(
                f"{out / cspec.name}: {cspec.n_images} colour photographs ({cspec.storage}), "
                f"{cspec.positive_fraction:.0%} suspicious"
            )
        return
    if task != "classification":
        from silo_client.errors import DataError

        raise DataError(f"--task {task!r} is not known; use classification, colour or segmentation")
    from fedsilo.synthetic import generate_hospitals

    specs = generate_hospitals(
        out,
        hospitals=hospitals,
        images_per_hospital=images_per_hospital,
        seed=seed,
        difficulty=difficulty,
        image_size=image_size,
    )
    for spec in specs:
        console.print(
            f"{out / spec.name}: {spec.n_images} images, {spec.positive_fraction:.0%} with lesion"
        )


@plan_app.command("validate")
def plan_validate(path: Path = typer.Argument(..., help="Plan YAML file.")) -> None:
    """Check a plan; prints its hash, or one line saying which key is wrong (exit 2)."""
    plan = load_plan(path)
    console.print(f"{path}: valid plan '{plan.title}', sha256 {plan_hash(plan)}")


@plan_app.command("show")
def plan_show(
    path: Path = typer.Argument(..., help="Plan YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the canonical JSON."),
) -> None:
    """Show a plan with every default made explicit."""
    plan = load_plan(path)
    payload = plan.model_dump(mode="json")
    if as_json:
        print(json.dumps({"plan_hash": plan_hash(plan), "plan": payload}, indent=2))
    else:
        import yaml

        console.print(f"# sha256 {plan_hash(plan)}")
        console.print(yaml.safe_dump(payload, sort_keys=False), markup=False)


@plan_app.command("hash")
def plan_hash_cmd(path: Path = typer.Argument(..., help="Plan YAML file.")) -> None:
    """Print the canonical SHA-256 of a plan (what silos approve)."""
    print(plan_hash(load_plan(path)))


def _mount_role_clis() -> None:
    from aggregator.cli import app as aggregator_app
    from silo_client.cli import app as silo_app

    app.add_typer(silo_app, name="silo", help="Hospital IT: the silo (same as the `silo` command).")
    app.add_typer(
        aggregator_app, name="aggregator", help="Consortium: the aggregator (same as `aggregator`)."
    )


_mount_role_clis()


def main() -> None:
    """Console entry point of `fedsilo`."""
    run_cli(app)
