"""`silo data check`: warnings a hospital should see before its data is trained on."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from silo_client.data.catalogue import Catalogue
from silo_client.data.dicom_read import is_colour
from silo_client.data.volume import VolumeError, check_series_geometry, slice_header

__all__ = ["DataWarning", "check_dataset", "check_series"]

#: A class holding less than this share of the labelled images is called imbalanced.
MIN_CLASS_SHARE = 0.2
#: Largest/smallest pixel spacing above this ratio is called a spacing spread.
MAX_SPACING_RATIO = 1.5
#: Largest/smallest slice thickness (or slice spacing) across series above this ratio is a spread.
MAX_SLICE_RATIO = 1.5


@dataclass(frozen=True)
class DataWarning:
    """One finding: a short code and a one-line explanation with what to do."""

    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return asdict(self)


def check_dataset(catalogue: Catalogue, name: str, min_images: int = 10) -> list[DataWarning]:
    """Warnings for dataset ``name``: label imbalance, mixed modalities, grayscale mixed with
    colour, spacing spread, too
    few images for the site policy (``min_images``), unlabelled images, unmatched label rows,
    many skipped files, mixed image sizes."""
    summary = catalogue.summary(name)
    rows = catalogue.usable(name)
    out: list[DataWarning] = []
    labelled = {k: v for k, v in summary["labels"].items() if k != "unlabelled"}
    n_labelled = sum(labelled.values())
    if n_labelled < min_images:
        out.append(DataWarning(
            "too-few-images",
            f"{n_labelled} labelled image(s), the site policy asks for at least {min_images}; "
            "add data or lower min_local_examples in the policy",
        ))  # fmt: skip
    if len(labelled) == 1:
        out.append(DataWarning(
            "single-class",
            f"every labelled image has label {next(iter(labelled))}; a classifier needs 2+ classes",
        ))  # fmt: skip
    elif n_labelled:
        for label, n in sorted(labelled.items()):
            if n / n_labelled < MIN_CLASS_SHARE:
                out.append(DataWarning(
                    "label-imbalance",
                    f"label {label} has {n} of {n_labelled} labelled images "
                    f"({100 * n / n_labelled:.0f}% < {100 * MIN_CLASS_SHARE:.0f}%)",
                ))  # fmt: skip
    if len(summary["modalities"]) > 1:
        mods = ", ".join(f"{m}: {n}" for m, n in summary["modalities"].items())
        out.append(DataWarning("mixed-modalities", f"images of several modalities ({mods})"))
    kinds = summary["photometric"]
    colour = sum(n for p, n in kinds.items() if is_colour(p))
    if colour and colour < sum(kinds.values()):
        found = ", ".join(f"{p}: {n}" for p, n in kinds.items())
        out.append(DataWarning(
            "mixed-colour",
            f"grayscale and colour images ({found}); a plan trains on one kind "
            "(preprocessing.channels 1 or 3) and skips the other",
        ))  # fmt: skip
    spacings = [float(r["spacing_row"]) for r in rows if r["spacing_row"]]
    if spacings and max(spacings) / min(spacings) > MAX_SPACING_RATIO:
        out.append(DataWarning(
            "spacing-spread",
            f"pixel spacing ranges from {min(spacings):.3g} to {max(spacings):.3g} mm "
            f"(ratio > {MAX_SPACING_RATIO}); consider resampling or separate datasets",
        ))  # fmt: skip
    if len(summary["dimensions"]) > 1:
        out.append(DataWarning(
            "mixed-sizes",
            f"{len(summary['dimensions'])} different image sizes; all are resized to the "
            "plan's input_size",
        ))  # fmt: skip
    unlabelled = summary["labels"].get("unlabelled", 0)
    if unlabelled:
        out.append(DataWarning(
            "unlabelled",
            f"{unlabelled} usable image(s) have no label and will not be trained on; "
            "check the labels file and --key",
        ))  # fmt: skip
    if summary["unmatched_label_lines"]:
        lines = summary["unmatched_label_lines"]
        shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
        out.append(DataWarning(
            "unmatched-labels",
            f"{len(lines)} labels-file row(s) match no usable image (lines {shown})",
        ))  # fmt: skip
    out.extend(check_series(catalogue, name, rows))
    if summary["files"] and summary["skipped"] / summary["files"] > 0.5:
        out.append(DataWarning(
            "many-skipped",
            f"{summary['skipped']} of {summary['files']} files are skipped; "
            f"see 'silo data show {name}' for the reasons",
        ))  # fmt: skip
    return out


def _ratio_warning(code: str, what: str, values: list[float], n_series: int) -> DataWarning | None:
    if len(values) < 2 or min(values) <= 0 or max(values) / min(values) <= MAX_SLICE_RATIO:
        return None
    return DataWarning(
        code,
        f"{what} ranges from {min(values):.3g} to {max(values):.3g} mm across {n_series} series "
        f"(ratio > {MAX_SLICE_RATIO}); volumes are resampled to one grid, so thin and thick "
        "series look different to the model: consider resampling or separate datasets",
    )


def check_series(
    catalogue: Catalogue, name: str, rows: list[sqlite3.Row] | None = None
) -> list[DataWarning]:
    """Warnings about the dataset's multi-slice series as volumes: slice-thickness spread and
    slice-spacing spread across series, and series with missing or duplicate slices, uneven
    spacing, mixed orientations (see :func:`silo_client.data.volume.check_series_geometry`).

    Reads the headers (no pixels) of the files of every series with two or more single-frame
    slices; series of one image (2-D data) cost nothing.
    """
    record = catalogue.require(name)
    root = Path(record.files_root)
    rows = catalogue.usable(name) if rows is None else rows
    series: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        if int(row["frames"] or 1) == 1 and row["series_uid"]:
            series.setdefault(row["series_uid"], []).append(row)
    stacks = {uid: files for uid, files in series.items() if len(files) >= 2}
    thickness = [
        float(np.median(t))
        for files in stacks.values()
        if (t := [float(r["slice_thickness"]) for r in files if r["slice_thickness"]])
    ]
    spacing: list[float] = []
    problems: list[str] = []
    uneven: list[str] = []
    for uid, files in sorted(stacks.items()):
        headers = []
        try:
            for r in files:
                ds = pydicom.dcmread(root / r["path"], stop_before_pixels=True, force=True)
                headers.append(slice_header(ds, r["path"]))
            geometry = check_series_geometry(headers, min_slices=2, label=f"series {uid}")
        except VolumeError as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:  # a file changed or vanished since the ingest
            problems.append(f"series {uid}: a file cannot be read any more ({type(exc).__name__})")
            continue
        spacing.append(geometry.spacing[0])
        uneven.extend(geometry.warnings)
    out: list[DataWarning] = []
    for warning in (
        _ratio_warning("slice-thickness-spread", "SliceThickness", thickness, len(stacks)),
        _ratio_warning("slice-spacing-spread", "slice spacing", spacing, len(stacks)),
    ):
        if warning is not None:
            out.append(warning)
    if problems:
        out.append(DataWarning(
            "series-geometry",
            f"{len(problems)} of {len(stacks)} series cannot be used as volumes "
            f"(first: {problems[0]})",
        ))  # fmt: skip
    if uneven:
        out.append(DataWarning(
            "uneven-slices",
            f"{len(uneven)} series have uneven slice spacing or sheared stacks "
            f"(first: {uneven[0]})",
        ))  # fmt: skip
    return out
