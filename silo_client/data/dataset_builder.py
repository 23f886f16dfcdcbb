"""Build the training dataset of a hospital's data folder (:func:`build_dataset`).

Layout of a plain dataset folder::

    <folder>/dicom/...        DICOM files, any depth, any file names
    <folder>/labels.csv       StudyInstanceUID,label  (one row per study)

Each image is scanned (:mod:`~silo_client.data.folder_scan`), matched to its label
(:mod:`~silo_client.data.labels_csv`), preprocessed (:mod:`~silo_client.data.preprocessing`)
and stacked into a cached :class:`~silo_client.data.local_dataset.LocalDataset`. A folder
registered with ``silo data add`` is built from the catalogue instead
(:mod:`~silo_client.data.catalogued`). Bad input raises
:class:`~silo_client.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from silo_client.data import cache as _cache
from silo_client.data.catalogued import build_catalogued_dataset
from silo_client.data.folder_scan import SkippedFile, _iter_scan
from silo_client.data.ingest import MARKER_FILE
from silo_client.data.labels_csv import read_study_labels
from silo_client.data.local_dataset import (
    _CACHE_FIELDS,
    LocalDataset,
    _from_cache,
    finish_dataset,
    refuse_misfits,
)
from silo_client.data.preprocessing import Preprocessing, preprocess_pixels
from silo_client.errors import DataError

__all__ = ["build_dataset"]

log = logging.getLogger(__name__)


def build_dataset(
    folder: Path,
    preprocessing: Preprocessing,
    cache_dir: Path | None = None,
    labels_csv: Path | None = None,
) -> LocalDataset:
    """Build the preprocessed dataset of ``folder`` (``dicom/`` + ``labels.csv``).

    A folder registered with ``silo data add`` (it holds the catalogue marker) is built from
    the catalogue instead: its usable files and their resolved labels.

    With ``cache_dir``, tensors are reused when neither the files (paths, sizes, mtimes),
    ``labels.csv`` nor the preprocessing changed: then no DICOM is decoded. Images whose
    study has no label are skipped ("no label in labels.csv"); label rows matching no study
    become ``warnings``. Raises DataError when the folder is missing, holds no DICOM, or
    no image has a label.
    """
    folder = Path(folder)
    if labels_csv is None and (folder / MARKER_FILE).is_file():
        return build_catalogued_dataset(folder, preprocessing, cache_dir)
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; register the hospital's data folder "
            "(with dicom/ and labels.csv) using 'silo init --dataset DIR'"
        )
    dicom_dir = folder / "dicom"
    if not dicom_dir.is_dir():
        raise DataError(
            f"data folder {folder} has no dicom/ subfolder; put the DICOM files in {dicom_dir}"
        )
    labels_path = Path(labels_csv) if labels_csv is not None else folder / "labels.csv"
    labels = read_study_labels(labels_path)  # validates first: errors before any decoding

    version = _cache.dataset_version(dicom_dir, labels_path)
    entry_path = None
    if cache_dir is not None:
        entry_path = _cache.cache_path(Path(cache_dir), version, preprocessing.fingerprint())
        entry = _cache.load_entry(entry_path, _CACHE_FIELDS)
        if entry is not None:
            cached = _from_cache(entry, version)
            if cached is not None:
                log.debug("data cache hit %s", entry_path.name)
                return cached

    spatial = preprocessing.spatial_transform()
    images: list[torch.Tensor] = []
    ys: list[int] = []
    study_uids: list[str] = []
    paths: list[str] = []
    groups: list[str] = []
    skipped: list[SkippedFile] = []
    misfits: list[SkippedFile] = []
    studies_seen: set[str] = set()
    n_files = 0
    for rel, decoded, reason in _iter_scan(dicom_dir):
        n_files += 1
        if decoded is None:
            skipped.append(SkippedFile(rel, str(reason)))
            continue
        uid = decoded.instance.study_instance_uid
        studies_seen.add(uid)
        if uid not in labels:
            skipped.append(SkippedFile(rel, f"no label in labels.csv (StudyInstanceUID {uid})"))
            continue
        misfit = preprocessing.misfit(decoded.instance.photometric_interpretation)
        if misfit:
            misfits.append(SkippedFile(rel, misfit))
            continue
        images.append(
            preprocess_pixels(
                decoded.pixels, decoded.window,
                decoded.instance.photometric_interpretation, preprocessing, spatial,
            )
        )  # fmt: skip
        ys.append(labels[uid][0])
        study_uids.append(uid)
        paths.append(rel)
        groups.append(decoded.group)

    if n_files == 0:
        raise DataError(
            f"no DICOM files in {dicom_dir}; copy the hospital's exported DICOM files there"
        )
    skipped.extend(misfits)
    refuse_misfits(f"folder {folder}", misfits, len(images), preprocessing)
    n_images = len(images) + sum(1 for s in skipped if s.reason.startswith("no label in"))
    if n_images == 0:
        example = skipped[0]
        raise DataError(
            f"none of the {n_files} file(s) in {dicom_dir} is a usable DICOM image "
            f"(e.g. {example.path}: {example.reason}); check the export"
        )
    if not images:
        raise DataError(
            f"none of the {n_images} DICOM image(s) in {dicom_dir} has a label in {labels_path}; "
            "its StudyInstanceUID column must hold the studies' StudyInstanceUID values"
        )
    warnings = [
        f"{labels_path.name} line {line}: StudyInstanceUID {uid} matches no DICOM study "
        f"in {dicom_dir.name}/"
        for uid, (_, line) in sorted(labels.items(), key=lambda kv: kv[1][1])
        if uid not in studies_seen
    ]
    for w in warnings[:20]:
        log.warning("%s", w)
    if len(warnings) > 20:
        log.warning("... and %d more label rows matching no study", len(warnings) - 20)

    return finish_dataset(
        images, ys, study_uids, paths, groups, skipped, warnings, version, entry_path
    )
