"""A silo's local data for one plan: preprocessing from the plan, loading (from the cache when
possible) and the deterministic train / validation / test split by patient."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from silo_client.errors import DataError
from silo_client.home import SiloHome
from training_plan import TrainingPlan

if TYPE_CHECKING:
    import torch

    from silo_client.data.preprocessing import Preprocessing
    from silo_client.data.segmentation_dataset import VolumePreprocessing


@dataclass
class LocalData:
    """The silo's preprocessed tensors for one plan, split into train, validation and test.

    For classification the labels are (N,) class indices; for segmentation they are the masks
    (N,1,D,H,W) and ``*_spacing`` the voxel size of each case in mm (N,3). The test split is
    empty when the plan holds none out (training.test_fraction = 0).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    train_spacing: np.ndarray | None = None
    val_spacing: np.ndarray | None = None
    test_spacing: np.ndarray | None = None
    train_groups: list[str] | None = None
    """Hashed patient (else study) of each training item: the unit of patient-level DP."""

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """(images, labels or masks, spacing) of the 'validation' or 'test' split."""
        if name == "test":
            if self.test_images is None or self.test_labels is None:
                raise DataError("this silo holds out no test split for the plan")
            return self.test_images, self.test_labels, self.test_spacing
        return self.val_images, self.val_labels, self.val_spacing


TEST_SEED_OFFSET = 104_729
"""The test split draws with seed + this, so it differs from the validation draw of the same
seed (and a plan changing only validation_fraction keeps the same test patients)."""


def plan_preprocessing(plan: TrainingPlan) -> Preprocessing | VolumePreprocessing:
    """The preprocessing the plan asks for, as its task's dataset builder takes it: 2-D images
    (``Preprocessing``) for classification, volumes (``VolumePreprocessing``) for segmentation."""
    window = plan.preprocessing.window
    args = {
        "input_size": plan.preprocessing.input_size,
        "window_center": window.center if window else None,
        "window_width": window.width if window else None,
    }
    if plan.task == "segmentation":
        from silo_client.data.segmentation_dataset import VolumePreprocessing

        return VolumePreprocessing(**args)
    from silo_client.data.preprocessing import Preprocessing

    return Preprocessing(
        **args,
        channels=plan.preprocessing.channels,
        to_grayscale=plan.preprocessing.to_grayscale,
    )


def load_local_data(home: SiloHome, plan: TrainingPlan, dataset: str | None = None) -> LocalData:
    """Load (from the preprocessed cache when possible) and split the dataset the plan selects.

    The test split (training.test_fraction of the patients) is drawn first and never depends
    on validation_fraction; validation is then drawn from the rest. With test_fraction = 0 the
    split is exactly the one of plans written before the test split existed.
    """
    if plan.task == "segmentation":
        return _load_segmentation_data(home, plan, dataset)
    from silo_client.data.dataset_builder import build_dataset

    dataset = dataset or plan.dataset
    folder = home.dataset_folder(dataset)
    data = build_dataset(Path(folder), plan_preprocessing(plan), cache_dir=home.cache_dir)
    if len(data.labels) < 2:
        raise DataError(
            f"dataset '{dataset}' of silo '{home.name}' has {len(data.labels)} usable image(s); "
            "a round needs at least 2 (see 'silo data show')"
        )
    spec = plan.training
    if spec.test_fraction == 0:
        train, val = data.split(spec.validation_fraction, seed=spec.seed)
        return LocalData(
            train.images, train.labels, val.images, val.labels, train_groups=list(train.groups)
        )
    rest, test = data.split(spec.test_fraction, seed=spec.seed + TEST_SEED_OFFSET)
    train, val = rest.split(_rest_fraction(plan), seed=spec.seed)
    return LocalData(
        train.images,
        train.labels,
        val.images,
        val.labels,
        test.images,
        test.labels,
        train_groups=list(train.groups),
    )


def _rest_fraction(plan: TrainingPlan) -> float:
    """validation_fraction of the whole dataset, as a fraction of what the test split left."""
    spec = plan.training
    return spec.validation_fraction / (1.0 - spec.test_fraction)


def group_split(groups: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split of items into (kept, held out) by group (patient or study): a
    group's items stay on one side. Holds out round(fraction * groups) groups, at least one
    (and never all) when fraction > 0 and there are two groups or more."""
    unique = sorted(set(groups))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n_held = round(len(unique) * fraction)
    if fraction > 0 and len(unique) >= 2:
        n_held = min(max(n_held, 1), len(unique) - 1)
    held = set(order[:n_held])
    kept_idx = [i for i, g in enumerate(groups) if g not in held]
    held_idx = [i for i, g in enumerate(groups) if g in held]
    return kept_idx, held_idx


def _load_segmentation_data(
    home: SiloHome, plan: TrainingPlan, dataset: str | None = None
) -> LocalData:
    """Volumes and masks of a segmentation dataset, split by patient (or case) like 2D data."""
    from silo_client.data.segmentation_dataset import build_segmentation_dataset

    dataset = dataset or plan.dataset
    folder = home.dataset_folder(dataset)
    data = build_segmentation_dataset(
        Path(folder), plan_preprocessing(plan), cache_dir=home.cache_dir
    )
    n = len(data)
    if n < 2:
        raise DataError(
            f"dataset '{dataset}' of silo '{home.name}' has {n} usable volume(s) with a mask; "
            "a round needs at least 2 (see 'silo data show')"
        )
    groups = list(getattr(data, "groups", None) or [f"case:{i}" for i in range(n)])
    spec = plan.training
    rest = list(range(n))
    test_idx: list[int] = []
    if spec.test_fraction > 0:
        kept, held = group_split(groups, spec.test_fraction, spec.seed + TEST_SEED_OFFSET)
        rest, test_idx = kept, held
    kept, held = group_split([groups[i] for i in rest], _rest_fraction(plan), spec.seed)
    train_idx, val_idx = [rest[i] for i in kept], [rest[i] for i in held]

    def part(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        import torch

        picked = data.subset(indices)
        return (
            torch.as_tensor(np.asarray(picked.images, dtype=np.float32)),
            torch.as_tensor(np.asarray(picked.masks, dtype=np.uint8)),
            np.asarray(picked.spacing_mm, dtype=np.float64).reshape(-1, 3),
        )

    train, val = part(train_idx), part(val_idx)
    test = part(test_idx) if spec.test_fraction > 0 else (None, None, None)
    return LocalData(
        train[0],
        train[1],
        val[0],
        val[1],
        test[0],
        test[1],
        train[2],
        val[2],
        test[2],
        train_groups=[groups[i] for i in train_idx],
    )
