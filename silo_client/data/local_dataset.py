"""A silo's preprocessed images as a MONAI dataset (:class:`LocalDataset`): how one is
assembled from preprocessed tensors and cached (:func:`finish_dataset`), read back from the
cache, split by patient, and refused when no image fits the plan (:func:`refuse_misfits`).

Preprocessed tensors are cached (see :mod:`silo_client.data.cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai.data
import numpy as np
import torch

from silo_client.data import cache as _cache
from silo_client.data.folder_scan import SkippedFile
from silo_client.data.preprocessing import Preprocessing
from silo_client.errors import DataError

__all__ = ["LocalDataset", "finish_dataset", "refuse_misfits"]


class _Items(Sequence):  # type: ignore[type-arg]
    """Lazy ``{"image", "label"}`` view over the tensors (what monai.data.Dataset indexes)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._images, self._labels = images, labels

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"image": self._images[index], "label": int(self._labels[index])}


class LocalDataset(monai.data.Dataset):
    """A silo's preprocessed images: a MONAI dataset of ``{"image": [1,H,W], "label": int}``.

    Attributes: ``images`` (N x 1 x H x W float32 in [0, 1]), ``labels`` (N, int64),
    ``study_uids`` and ``paths`` (per item), ``skipped`` (relative path, reason) of the
    source folder, ``warnings`` (e.g. labels matching no study), ``cache_hit``, ``version``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        study_uids: list[str] | None = None,
        paths: list[str] | None = None,
        groups: list[str] | None = None,
        skipped: list[SkippedFile] | None = None,
        warnings: list[str] | None = None,
        transform: Any = None,
        cache_hit: bool = False,
        version: str = "",
    ) -> None:
        """Wrap preprocessed tensors; ``transform`` (e.g. augmentation) applies per item."""
        n = int(labels.shape[0])
        if images.shape[0] != n:
            raise DataError(f"images ({images.shape[0]}) and labels ({n}) differ in length")
        self.images = images
        self.labels = labels
        self.study_uids = list(study_uids) if study_uids is not None else [""] * n
        self.paths = list(paths) if paths is not None else [""] * n
        self.groups = list(groups) if groups is not None else [f"item:{i}" for i in range(n)]
        self.skipped = list(skipped or [])
        self.warnings = list(warnings or [])
        self.cache_hit = cache_hit
        self.version = version
        super().__init__(data=_Items(images, labels), transform=transform)

    @property
    def n_skipped(self) -> int:
        """Number of files of the source folder that are not used."""
        return len(self.skipped)

    def subset(self, indices: Sequence[int]) -> LocalDataset:
        """A LocalDataset of the given items (sharing provenance, skips and warnings)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        pick = [int(i) for i in idx]
        return LocalDataset(
            self.images[idx],
            self.labels[idx],
            study_uids=[self.study_uids[i] for i in pick],
            paths=[self.paths[i] for i in pick],
            groups=[self.groups[i] for i in pick],
            skipped=self.skipped,
            warnings=self.warnings,
            transform=self.transform,
            cache_hit=self.cache_hit,
            version=self.version,
        )

    def split(self, val_fraction: float, seed: int = 0) -> tuple[LocalDataset, LocalDataset]:
        """Deterministic stratified split into (train, val).

        Items of the same patient (hashed PatientID; else the study) stay on one side, so no
        patient leaks across. Groups are stratified by their (max) label; each class with at
        least 2 groups puts at least one in val when ``val_fraction > 0``.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        group_label: dict[str, int] = {}
        for g, y in zip(self.groups, self.labels.tolist(), strict=True):
            group_label[g] = max(group_label.get(g, y), y)
        rng = np.random.default_rng(seed)
        val_groups: set[str] = set()
        for cls in sorted(set(group_label.values())):
            members = sorted(g for g, y in group_label.items() if y == cls)
            order = [members[i] for i in rng.permutation(len(members))]
            n_val = round(len(members) * val_fraction)
            if val_fraction > 0 and len(members) >= 2:
                n_val = min(max(n_val, 1), len(members) - 1)
            val_groups.update(order[:n_val])
        train_idx = [i for i, g in enumerate(self.groups) if g not in val_groups]
        val_idx = [i for i, g in enumerate(self.groups) if g in val_groups]
        return self.subset(train_idx), self.subset(val_idx)

    def summary(self) -> str:
        """One line: items, class counts, skipped files."""
        counts = torch.bincount(self.labels).tolist() if len(self.labels) else []
        per_class = ", ".join(f"{c}: {n}" for c, n in enumerate(counts))
        return f"{len(self)} images ({per_class}), {self.n_skipped} files skipped"


_CACHE_FIELDS: dict[str, type] = {
    "images": torch.Tensor,
    "labels": torch.Tensor,
    "study_uids": list,
    "paths": list,
    "groups": list,
    "skipped": list,
    "warnings": list,
}


def _from_cache(entry: dict[str, Any], version: str) -> LocalDataset | None:
    images, labels = entry["images"], entry["labels"]
    n = int(labels.shape[0])
    if (
        images.dtype != torch.float32
        or labels.dtype != torch.int64
        or images.ndim != 4
        or images.shape[0] != n
        or not len(entry["study_uids"]) == len(entry["paths"]) == len(entry["groups"]) == n
    ):
        return None
    return LocalDataset(
        images,
        labels,
        study_uids=[str(s) for s in entry["study_uids"]],
        paths=[str(p) for p in entry["paths"]],
        groups=[str(g) for g in entry["groups"]],
        skipped=[SkippedFile(str(p), str(r)) for p, r in entry["skipped"]],
        warnings=[str(w) for w in entry["warnings"]],
        cache_hit=True,
        version=version,
    )


def refuse_misfits(
    name: str, misfits: Sequence[SkippedFile], n_fitting: int, preprocessing: Preprocessing
) -> None:
    """DataError when no image of a dataset fits the plan's channels, saying why."""
    if n_fitting or not misfits:
        return
    kinds: dict[str, int] = {}
    for item in misfits:
        kind = item.reason.split("(", 1)[1].split(")", 1)[0] if "(" in item.reason else "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    if preprocessing.channels == 3:
        fix = "use a plan with preprocessing.channels: 1 for these images"
        wants = "colour images (preprocessing.channels: 3)"
    else:
        fix = "use a plan with preprocessing.channels: 3, or to_grayscale: true"
        wants = "grayscale images (preprocessing.channels: 1)"
    raise DataError(
        f"dataset {name} does not fit the plan: it holds {found} image(s) and the plan takes "
        f"{wants}; {fix}"
    )


def finish_dataset(
    images: list[torch.Tensor],
    ys: list[int],
    study_uids: list[str],
    paths: list[str],
    groups: list[str],
    skipped: list[SkippedFile],
    warnings: list[str],
    version: str,
    entry_path: Path | None,
) -> LocalDataset:
    """Stack the preprocessed images into a LocalDataset and cache it (folder or catalogue)."""
    dataset = LocalDataset(
        torch.stack(images).contiguous(),
        torch.tensor(ys, dtype=torch.int64),
        study_uids=study_uids,
        paths=paths,
        groups=groups,
        skipped=skipped,
        warnings=warnings,
        cache_hit=False,
        version=version,
    )
    if entry_path is not None:
        _cache.save_entry(
            entry_path,
            {
                "images": dataset.images,
                "labels": dataset.labels,
                "study_uids": study_uids,
                "paths": paths,
                "groups": groups,
                "skipped": [[s.path, s.reason] for s in skipped],
                "warnings": warnings,
            },
        )
    return dataset
