"""`silo data ...`: register the data a silo trains on and look at what it holds.

Everything here runs inside the hospital and prints to the local operator only; nothing is
sent anywhere. Every command takes ``--json`` for machine-readable output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsilo_base.home_folder import SILO_HOME
from silo_client.errors import DataError
from silo_client.home import SiloHome

data_app = typer.Typer(
    name="data",
    help="Register DICOM data (folders, DICOMweb, DIMSE) and inspect the catalogue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)

_KEYS = "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, AccessionNumber or PatientID"


def _json_option() -> bool:
    return typer.Option(False, "--json", help="Print JSON instead of text.")


def _emit(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=False))


def _progress(enabled: bool) -> tuple[Progress | None, Any]:
    """A progress bar on stderr (only where stderr is a terminal: rich draws nothing else)."""
    if not enabled:
        return None, None
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
        TextColumn("left"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = progress.add_task("listing files", total=None, rate="")

    def update(done: int, total: int) -> None:
        speed = progress.tasks[0].speed
        rate = f"{speed:.0f} files/s" if speed else ""
        progress.update(task, description="reading DICOM", completed=done, total=total, rate=rate)

    return progress, update


def _has_catalogue(silo: SiloHome) -> bool:
    """Reading commands never create the catalogue: none yet means nothing is registered."""
    from silo_client.data.catalogue import CATALOGUE_FILE

    return (silo.root / CATALOGUE_FILE).is_file()


def _require_catalogue(silo: SiloHome, name: str) -> None:
    if not _has_catalogue(silo):
        raise DataError(
            f"silo '{silo.name}' has no dataset named '{name}' (none registered yet); register "
            f"it with 'silo data add {name} --dicom-dir PATH'"
        )


def _audit(home: SiloHome, event: str, **fields: Any) -> None:
    try:
        from silo_client.governance.audit import audit
    except ImportError:  # governance not installed in this build
        return
    audit(home.root, event, actor="silo data", **fields)


@data_app.command("add")
def add(
    name: str = typer.Argument(..., help="Dataset name (letters, digits, - _ .)."),
    dicom_dir: Path = typer.Option(None, "--dicom-dir", help="Folder of DICOM files (any depth)."),
    dicomweb: str = typer.Option(None, "--dicomweb", help="DICOMweb base URL of the PACS."),
    dimse: str = typer.Option(None, "--dimse", help="PACS DIMSE address HOST:PORT."),
    query: str = typer.Option("", "--query", help="e.g. 'Modality=CT&StudyDate=20200101-'."),
    user: str = typer.Option(None, "--user", help="PACS user (HTTP basic auth)."),
    password: str = typer.Option(
        None, "--password", envvar="FEDSILO_PACS_PASSWORD", help="PACS password."
    ),
    token: str = typer.Option(None, "--token", envvar="FEDSILO_PACS_TOKEN", help="Bearer token."),
    aet: str = typer.Option("FEDSILO", "--aet", help="Our AE title (DIMSE)."),
    called_aet: str = typer.Option("ORTHANC", "--called-aet", help="The PACS's AE title."),
    labels: Path = typer.Option(None, "--labels", help="Labels CSV."),
    label_column: str = typer.Option("label", "--label-column", help="Column with the label."),
    key: str = typer.Option("StudyInstanceUID", "--key", help=f"Column/tag to match: {_KEYS}."),
    home: Path = SILO_HOME.option(),
    as_json: bool = _json_option(),
) -> None:
    """Register a dataset, or ingest what is new in it (resumes an interrupted ingest)."""
    from silo_client.data.ingest import INGEST_LOG, managed_folder, register_dataset

    sources = [s for s in (dicom_dir, dicomweb, dimse) if s]
    if len(sources) != 1:
        raise DataError(
            "pass exactly one source: --dicom-dir PATH, --dicomweb URL or --dimse HOST:PORT"
        )
    silo = SiloHome.open(home)
    pull = None
    if dicom_dir is not None:
        root = Path(dicom_dir).expanduser()
        # A fedsilo-style dataset folder (dicom/ + labels.csv): take both.
        if (root / "dicom").is_dir() and (root / "labels.csv").is_file():
            labels = labels if labels is not None else root / "labels.csv"
            root = root / "dicom"
        kind, source, files_root = "dicom-dir", str(root.resolve()), root
    else:
        from silo_client.data import pacs

        files_root = managed_folder(silo.root, name) / "dicom"
        if dicomweb:
            auth = pacs.PacsAuth(user=user, password=password, token=token)
            kind, source = "dicomweb", pacs.public_url(dicomweb)
            pull = pacs.dicomweb_puller(dicomweb, auth, query, files_root)
        else:
            kind, source = "dimse", dimse
            pull = pacs.dimse_puller(dimse, aet, called_aet, query, files_root)
    progress, update = _progress(not as_json)
    if progress is not None:
        progress.start()
    try:
        summary = register_dataset(
            silo, name, source_kind=kind, source=source, files_root=files_root,
            labels_csv=labels, label_column=label_column, key_tag=key, query=query,
            progress=update, pull=pull,
        )  # fmt: skip
    finally:
        if progress is not None:
            progress.stop()
    cat = summary.catalogue
    _audit(silo, "dataset-registered", dataset=name, source_kind=kind, ok=cat["ok"],
           skipped=cat["skipped"])  # fmt: skip
    if as_json:
        _emit(summary.to_dict())
        return
    new = summary.new_ok + summary.new_skipped
    console.print(
        f"dataset '{name}': {summary.files} files looked at, {new} new "
        f"({summary.new_ok} ok, {summary.new_skipped} skipped), {summary.unchanged} unchanged"
        + (f", {summary.removed} gone" if summary.removed else "")
        + (f", {summary.pulled} pulled from the PACS" if summary.pulled else "")
        + f" in {summary.seconds:.1f}s"
    )
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        console.print(f"  skipped {n}: {reason}", markup=False)
    if summary.warned:
        log_path = managed_folder(silo.root, name) / INGEST_LOG
        console.print(
            f"  {summary.warned} new file(s) with DICOM reader warnings (kept in {log_path} and "
            f"'silo data show {name} --files')",
            markup=False,
        )
    if summary.undelivered:
        console.print(
            f"[yellow]warning[/] the PACS did not deliver {len(summary.undelivered)} of the "
            "instances the query selects; the rest is registered and usable (run the same "
            f"'silo data add' again to ask for them once more; 'silo data show {name} --files' "
            "lists them):"
        )
        for sop, why in summary.undelivered[:10]:
            console.print(f"  {sop}: {why}", markup=False)
        if len(summary.undelivered) > 10:
            console.print(f"  ... and {len(summary.undelivered) - 10} more")
    console.print(
        f"catalogue: {cat['ok']} usable ("
        + ", ".join(f"{k}: {v}" for k, v in cat["photometric"].items())
        + f"), {cat['skipped']} skipped; labels "
        + ", ".join(f"{k}: {v}" for k, v in cat["labels"].items()),
        markup=False,
    )


@data_app.command("list")
def list_(home: Path = SILO_HOME.option(), as_json: bool = _json_option()) -> None:
    """List the registered datasets."""
    from silo_client.data.catalogue import Catalogue

    silo = SiloHome.open(home)
    out = []
    if _has_catalogue(silo):
        with Catalogue.of_home(silo.root) as catalogue:
            for record in catalogue.datasets():
                s = catalogue.summary(record.name)
                out.append({"name": record.name, "source_kind": record.source_kind,
                            "source": record.source, "state": record.state, "ok": s["ok"],
                            "skipped": s["skipped"], "labels": s["labels"]})  # fmt: skip
    names = {d["name"] for d in out}
    for key, folder in sorted(silo.datasets.items()):
        if key not in names:
            out.append({"name": key, "source_kind": "folder (not catalogued)", "source": folder,
                        "state": "-", "ok": None, "skipped": None, "labels": {}})  # fmt: skip
    if as_json:
        _emit(out)
        return
    if not out:
        console.print("no datasets; register one with 'silo data add NAME --dicom-dir PATH'")
    for d in out:
        counts = "" if d["ok"] is None else f"  {d['ok']} ok, {d['skipped']} skipped"
        line = f"{d['name']}  ({d['source_kind']}) {d['source']}  {d['state']}{counts}"
        console.print(line, markup=False)


@data_app.command("show")
def show(
    name: str = typer.Argument(...),
    home: Path = SILO_HOME.option(),
    files: bool = typer.Option(False, "--files", help="List every skipped file."),
    as_json: bool = _json_option(),
) -> None:
    """Counts per modality and label, sizes, and skipped files with reasons."""
    from silo_client.data.catalogue import Catalogue

    silo = SiloHome.open(home)
    _require_catalogue(silo, name)
    with Catalogue.of_home(silo.root) as catalogue:
        summary = catalogue.summary(name)
        skipped = catalogue.skipped(name)
        warned = catalogue.warned(name)
        undelivered = catalogue.undelivered(name)
    if as_json:
        _emit(
            {
                **summary,
                "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
                "warned_files": [{"path": p, "warnings": w} for p, w in warned],
                "undelivered_instances": [{"sop_uid": u, "reason": r} for u, r in undelivered],
            }
        )
        return
    s = summary
    head = f"dataset '{name}' ({s['source_kind']}) {s['source']} ({s['state']})"
    console.print(head, markup=False)
    console.print(
        f"  {s['files']} files: {s['ok']} usable ({s['studies']} studies, {s['series']} series, "
        f"{s['frames']} frames, {s['bytes'] / 1e6:.1f} MB), {s['skipped']} skipped"
    )
    sections = (("modalities", "modalities"), ("labels", "labels"), ("sizes", "dimensions"),
                ("transfer syntaxes", "transfer_syntaxes"),
                ("photometric interpretations", "photometric"))  # fmt: skip
    for title, key in sections:
        console.print(f"  {title}: " + ", ".join(f"{k}: {v}" for k, v in s[key].items()))
    if s["files_with_warnings"]:
        console.print(
            f"  {s['files_with_warnings']} file(s) with DICOM reader warnings"
            + ("" if files else " (--files lists them)")
        )
    for reason, n in s["skip_reasons"].items():
        console.print(f"  skipped {n}: {reason}")
    if s["unmatched_label_lines"]:
        console.print(f"  label rows matching nothing: lines {s['unmatched_label_lines'][:20]}")
    if undelivered:
        console.print(f"  not delivered by the PACS: {len(undelivered)} instance(s)")
    if files:
        for path, reason in skipped:
            console.print(f"    {path}: {reason}", markup=False)
        for path, text in warned:
            console.print(f"    {path}: warning: {text}", markup=False)
        for sop, reason in undelivered:
            console.print(f"    (not delivered) {sop}: {reason}", markup=False)


@data_app.command("check")
def check(
    name: str = typer.Argument(...),
    home: Path = SILO_HOME.option(),
    min_images: int = typer.Option(None, "--min-images", help="Default: the site policy's."),
    as_json: bool = _json_option(),
) -> None:
    """Warnings: label imbalance, mixed modalities, spacing spread, too few images."""
    from silo_client.data.catalogue import Catalogue
    from silo_client.data.checks import check_dataset

    silo = SiloHome.open(home)
    _require_catalogue(silo, name)
    if min_images is None:
        try:
            from silo_client.governance.policy import load_policy

            min_images = int(load_policy(silo.root).min_local_examples)
        except ImportError:
            min_images = 10
    with Catalogue.of_home(silo.root) as catalogue:
        warnings = check_dataset(catalogue, name, min_images)
    if as_json:
        _emit({"name": name, "warnings": [w.to_dict() for w in warnings]})
        return
    if not warnings:
        console.print(f"dataset '{name}': no warnings")
    for w in warnings:
        console.print(f"[yellow]warning[/] {w.code}: {w.message}")


@data_app.command("remove")
def remove(
    name: str = typer.Argument(...), home: Path = SILO_HOME.option(), as_json: bool = _json_option()
) -> None:
    """Forget a dataset (the hospital's own DICOM folder is never touched)."""
    from silo_client.data.ingest import remove_dataset

    silo = SiloHome.open(home)
    n = remove_dataset(silo, name)
    _audit(silo, "dataset-removed", dataset=name)
    if as_json:
        _emit({"name": name, "removed_file_records": n})
        return
    console.print(f"dataset '{name}' removed ({n} catalogue records)")


@data_app.command("audit")
def audit_cmd(
    name: str = typer.Argument(...), home: Path = SILO_HOME.option(), as_json: bool = _json_option()
) -> None:
    """Which PS3.15 basic-profile attributes the dataset's files carry, and burned-in text."""
    from silo_client.data.deid_audit import audit_dataset

    silo = SiloHome.open(home)
    _require_catalogue(silo, name)
    report = audit_dataset(silo.root, name)
    if as_json:
        _emit(report)
        return
    console.print(
        f"dataset '{name}': {report['files']} usable files audited against the DICOM PS3.15 "
        "basic application level confidentiality profile"
    )
    for item in report["attributes"]:
        what = f"{item['keyword']} {item['tag']} ({item['action']})"
        console.print(f"  {what}: {item['files']} files", markup=False)
    b = report["burned_in_annotation"]
    console.print(
        f"  BurnedInAnnotation: YES {b['YES']}, NO {b['NO']}, absent {b['absent']}"
        + ("  [red]some images may show identifying text[/]" if b["YES"] else "")
    )
    console.print(f"  private tags in {report['files_with_private_tags']} files")
