"""Build the training dataset of a dataset registered in the catalogue (``silo data add``).

The catalogue says which files are usable and what their label is; this module decodes them
(every frame of a multi-frame image becomes one item), preprocesses them exactly like
:func:`silo_client.data.dataset_builder.build_dataset`, and caches the tensors keyed by
(catalogue version of the dataset, preprocessing hash).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from silo_client.data import cache as _cache
from silo_client.data.catalogue import Catalogue
from silo_client.data.folder_scan import SkippedFile
from silo_client.data.ingest import MARKER_FILE, load_frames
from silo_client.data.local_dataset import (
    _CACHE_FIELDS,
    LocalDataset,
    _from_cache,
    finish_dataset,
    refuse_misfits,
)
from silo_client.data.preprocessing import Preprocessing, preprocess_pixels
from silo_client.errors import DataError

__all__ = ["build_catalogued_dataset", "registered_catalogue"]

log = logging.getLogger(__name__)


def registered_catalogue(folder: Path) -> tuple[Path, str]:
    """The catalogue and dataset name a managed dataset folder (``silo data add``) belongs to,
    from its marker file; DataError when the marker is damaged or the catalogue is gone."""
    marker = Path(folder) / MARKER_FILE
    try:
        payload = json.loads(marker.read_text())
        db_path, name = Path(payload["catalogue"]), str(payload["name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{marker} is damaged ({exc}); run 'silo data add' for this dataset again"
        ) from None
    if not db_path.is_file():
        raise DataError(
            f"data catalogue {db_path} of dataset '{name}' is missing; register the dataset "
            f"again with 'silo data add {name} ...'"
        )
    return db_path, name


def build_catalogued_dataset(
    folder: Path, preprocessing: Preprocessing, cache_dir: Path | None = None
) -> LocalDataset:
    """Preprocessed tensors of the catalogued dataset whose managed folder is ``folder``.

    Unlabelled images and files the catalogue skipped are listed in ``skipped``; label rows
    matching nothing become ``warnings``. Raises DataError when no labelled image remains.
    """
    db_path, name = registered_catalogue(Path(folder))
    with Catalogue(db_path) as catalogue:
        record = catalogue.require(name)
        rows = catalogue.usable(name)
        skipped_rows = catalogue.skipped(name)
        unmatched = catalogue.unmatched_labels(name)
        version = "catalogue:" + catalogue.version(name)
    root = Path(record.files_root)
    labels_name = Path(record.labels_csv).name if record.labels_csv else "a labels file"

    entry_path = None
    if cache_dir is not None:
        entry_path = _cache.cache_path(Path(cache_dir), version, preprocessing.fingerprint())
        entry = _cache.load_entry(entry_path, _CACHE_FIELDS)
        if entry is not None:
            cached = _from_cache(entry, version)
            if cached is not None:
                return cached

    spatial = preprocessing.spatial_transform()
    images: list[torch.Tensor] = []
    ys: list[int] = []
    study_uids: list[str] = []
    paths: list[str] = []
    groups: list[str] = []
    skipped = [SkippedFile(p, r) for p, r in skipped_rows]
    # Which images fit the plan's channels is known from the catalogue: decide before decoding.
    misfits: list[SkippedFile] = []
    fitting = []
    for row in rows:
        rel = row["path"]
        if row["label"] is None:
            skipped.append(SkippedFile(rel, f"no label in {labels_name} ({record.key_tag})"))
            continue
        misfit = preprocessing.misfit(row["photometric"] or "MONOCHROME2")
        if misfit:
            misfits.append(SkippedFile(rel, misfit))
        else:
            fitting.append(row)
    skipped.extend(misfits)
    refuse_misfits(f"'{name}'", misfits, len(fitting), preprocessing)
    for row in fitting:
        rel = row["path"]
        try:
            frames, window, photometric = load_frames(root / rel)
            if preprocessing.misfit(photometric):
                raise DataError(f"{rel}: now a {photometric} image")
        except DataError as exc:
            reason = str(exc).split(": ", 1)[-1]
            skipped.append(SkippedFile(rel, f"changed since ingest: {reason}"))
            continue
        for frame in frames:
            images.append(preprocess_pixels(frame, window, photometric, preprocessing, spatial))
            ys.append(int(row["label"]))
            study_uids.append(row["study_uid"])
            paths.append(rel)
            groups.append(row["patient_group"] or f"study:{row['study_uid']}")
    if not images:
        raise DataError(
            f"dataset '{name}' has no labelled, usable image ({len(rows)} usable file(s), "
            f"{len(skipped_rows)} skipped); see 'silo data show {name}' and pass --labels"
        )
    warnings = [
        f"{labels_name} line {line}: {record.key_tag} matches no usable image" for line in unmatched
    ]
    return finish_dataset(
        images, ys, study_uids, paths, groups, skipped, warnings, version, entry_path
    )
