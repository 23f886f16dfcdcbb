"""Do a dataset's images fit a plan's channels? Answered from the catalogue, before any pixel
is decoded, so a silo refuses a plan it cannot train at the gate (``check_plan``) instead of
failing in the middle of a secure-aggregation round. Imports neither torch nor MONAI."""

from __future__ import annotations

import json
from pathlib import Path

from silo_client.data.dicom_read import is_colour, misfit

__all__ = ["catalogue_fit_problem"]


def catalogue_fit_problem(folder: Path, channels: int, to_grayscale: bool) -> str | None:
    """Why none of the usable images of the catalogued dataset in ``folder`` fit the plan, or
    None when some do (or when ``folder`` is not a catalogued dataset: a plain folder is
    checked when it is built). The reason names no path and no count: it may leave the silo."""
    from silo_client.data.catalogue import Catalogue
    from silo_client.data.ingest import MARKER_FILE

    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
        db_path, name = Path(marker["catalogue"]), str(marker["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not catalogued, or damaged: the dataset builder says which precisely
    if not db_path.is_file():
        return None
    with Catalogue(db_path) as catalogue:
        counts = catalogue.photometric_counts(name)
    if not counts:
        return None  # nothing usable at all: the dataset builder says so precisely
    if any(misfit(p, channels, to_grayscale) is None for p in counts):
        return None
    kinds = sorted(counts)
    what = "colour" if all(is_colour(p) for p in kinds) else "grayscale"
    wants = (
        "colour images (preprocessing.channels: 3)"
        if channels == 3
        else ("grayscale images (preprocessing.channels: 1)")
    )
    return (
        f"none of this site's images fit the plan: they are {what} ({', '.join(kinds)}) and the "
        f"plan takes {wants}"
    )
