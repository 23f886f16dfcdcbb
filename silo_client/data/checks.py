"""`silo data check`: warnings a hospital should see before its data is trained on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from silo_client.data.catalogue import Catalogue

__all__ = ["DataWarning", "check_dataset"]

#: A class holding less than this share of the labelled images is called imbalanced.
MIN_CLASS_SHARE = 0.2
#: Largest/smallest pixel spacing above this ratio is called a spacing spread.
MAX_SPACING_RATIO = 1.5


@dataclass(frozen=True)
class DataWarning:
    """One finding: a short code and a one-line explanation with what to do."""

    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return asdict(self)


def check_dataset(catalogue: Catalogue, name: str, min_images: int = 10) -> list[DataWarning]:
    """Warnings for dataset ``name``: label imbalance, mixed modalities, spacing spread, too
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
    if summary["files"] and summary["skipped"] / summary["files"] > 0.5:
        out.append(DataWarning(
            "many-skipped",
            f"{summary['skipped']} of {summary['files']} files are skipped; "
            f"see 'silo data show {name}' for the reasons",
        ))  # fmt: skip
    return out
