"""`silo`: what hospital IT runs. Set up the silo home and look at what it holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from fedsilo_base.cli_runner import new_cli, run_cli
from fedsilo_base.home_folder import SILO_HOME
from silo_client.data_cli import data_app
from silo_client.errors import SiloError
from silo_client.home import SiloHome, init_silo_home

app = new_cli("silo", "Hospital side of fedsilo: the silo home, its data, its SuperNode.")
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)


def _mount_governance() -> None:
    from silo_client.cli_governance import audit_app, plan_app, policy_app, privacy_app

    app.add_typer(plan_app, name="plan")
    app.add_typer(policy_app, name="policy")
    app.add_typer(audit_app, name="audit")
    app.add_typer(privacy_app, name="privacy")


_mount_governance()

from silo_client.cli_enroll import register as _register_enrollment  # noqa: E402

_register_enrollment(app)


@app.command()
def init(
    name: str = typer.Option(..., "--name", help="The hospital's name in the consortium."),
    dataset: Path = typer.Option(None, "--dataset", help="Folder with dicom/ and labels.csv."),
    home: Path = SILO_HOME.option(),
) -> None:
    """Create the silo home (or update its name and default dataset)."""
    if dataset is not None and not dataset.is_dir():
        raise SiloError(f"dataset folder {dataset} does not exist; pass the folder holding dicom/")
    from silo_client.cli_enroll import report_enrollment
    from silo_client.identity import ensure_identity

    silo = init_silo_home(home, name, dataset)
    ensure_identity(silo)
    console.print(f"silo '{silo.name}' ready in {silo.root}")
    report_enrollment(silo)


@app.command()
def show(home: Path = SILO_HOME.option(), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show the silo's name and registered datasets."""
    silo = SiloHome.open(home)
    if as_json:
        print(json.dumps({"name": silo.name, "home": str(silo.root), "datasets": silo.datasets}))
        return
    console.print(f"silo '{silo.name}' in {silo.root}")
    for key, folder in silo.datasets.items():
        console.print(f"  dataset {key}: {folder}")


def main() -> None:
    """Console entry point of `silo`."""
    run_cli(app)
