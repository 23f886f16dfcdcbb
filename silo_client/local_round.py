"""One silo's side of a round, free of Flower: check the plan, load data, train, evaluate.

The ClientApp (Flower) and the secure-aggregation handler both call these functions; tests call
them directly too.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from silo_client.errors import DataError, PlanRefused
from silo_client.home import SiloHome
from training_plan import TrainingPlan, plan_hash, wire
from training_plan.errors import PlanError

if TYPE_CHECKING:
    import torch

    from silo_client.data.preprocessing import Preprocessing
    from silo_client.data.segmentation_dataset import VolumePreprocessing
    from silo_client.training import TrainResult
    from training_plan.privacy import PrivacyBudget

log = logging.getLogger("fedsilo.silo")


def plan_from_wire(plan_json: str, claimed_hash: str) -> TrainingPlan:
    """Validate the plan the server sent and check it hashes to what the server claims.

    A plan whose content does not match its hash was altered on the way: refused before any data
    is read.
    """
    try:
        plan = TrainingPlan.model_validate_json(plan_json)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise PlanRefused(f"the server sent a plan that does not validate ({first})") from None
    actual = plan_hash(plan)
    if actual != claimed_hash:
        raise PlanRefused(
            f"plan altered: its content hashes to {actual[:12]}, "
            f"the server claims {claimed_hash[:12]}"
        )
    return plan


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


def silo_seed(plan: TrainingPlan, silo_name: str, server_round: int) -> int:
    """A per-silo, per-round seed: reproducible runs without silos sharing their shuffles."""
    return (
        plan.training.seed * 1_000_003 + server_round * 7919 + zlib.crc32(silo_name.encode())
    ) % (2**31)


def build_global_model(plan: TrainingPlan, global_arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    """The plan's network with the global weights loaded."""
    from silo_client.training import load_float_state
    from training_plan.models import build_plan_model

    model = build_plan_model(plan.model, plan.preprocessing.channels)
    if set(global_arrays) == {wire.MODEL}:
        try:
            global_arrays = wire.unpack(global_arrays[wire.MODEL], model_layout(model))
        except ValueError as exc:
            raise PlanError(
                f"the global model does not fit the plan's {plan.model.name}: {exc}"
            ) from None
    try:
        load_float_state(model, global_arrays)
    except ValueError as exc:
        raise PlanError(
            f"the global model does not fit the plan's {plan.model.name}: {exc}"
        ) from None
    return model


def model_layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Order and shapes of the network's float tensors: how a packed model vector is laid out."""
    return [
        (key, tuple(value.shape))
        for key, value in model.state_dict().items()
        if value.is_floating_point()
    ]


def train_round(
    home: SiloHome,
    plan: TrainingPlan,
    global_arrays: dict[str, np.ndarray],
    server_round: int,
    run_id: str = "",
) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Train locally from the global weights; return the update d = w_local - w_global.

    The update comes back in the form the global model came in: packed ({"model": vector}) or
    named tensors. A SCAFFOLD plan trains in silo_client.scaffold (its control variate is kept
    per ``run_id``).
    """
    from silo_client.training import float_state, limit_threads

    if plan.federation.strategy == "scaffold":
        from silo_client.scaffold import scaffold_round

        return scaffold_round(home, plan, global_arrays, server_round, run_id)

    budget = charge_privacy_round(home, plan, server_round, run_id)  # before any data is read
    limit_threads()
    data = load_local_data(home, plan)
    model = build_global_model(plan, global_arrays)
    if budget is not None:
        result = private_trainer(plan, budget)(
            model,
            data.train_images,
            data.train_labels,
            data.train_groups or [],
            seed=silo_seed(plan, home.name, server_round),
            proximal_mu=plan.federation.proximal_mu,
        )
    else:
        result = local_trainer(plan)(
            model,
            data.train_images,
            data.train_labels,
            plan.training,
            seed=silo_seed(plan, home.name, server_round),
            proximal_mu=plan.federation.proximal_mu,  # FedProx: from the approved plan
        )
    local = float_state(model)
    if set(global_arrays) == {wire.MODEL}:
        update = {wire.MODEL: wire.pack(local, model_layout(model)) - global_arrays[wire.MODEL]}
    else:
        update = {key: local[key] - global_arrays[key] for key in local}
    log.info(
        "round %d: trained %d steps on %d examples, mean loss %.4f",
        server_round,
        result.steps,
        result.num_examples,
        result.mean_loss,
    )
    return update, result


def charge_privacy_round(
    home: SiloHome, plan: TrainingPlan, server_round: int, run_id: str
) -> PrivacyBudget | None:
    """For a DP plan: record this round in the privacy ledger, or refuse it (PlanRefused) when
    it would exceed the plan's budget or the site's per-dataset maximum. Reads no data."""
    if plan.privacy is None:
        return None
    from silo_client.governance.policy import load_policy
    from silo_client.governance.privacy_ledger import PrivacyLedger
    from training_plan.privacy import plan_budget

    budget = plan_budget(plan)
    PrivacyLedger(home.root).charge_round(
        dataset=plan.dataset,
        run_id=run_id or "(no run id)",
        plan_hash=plan_hash(plan),
        budget=budget,
        server_round=server_round,
        max_epsilon=load_policy(home.root).max_epsilon_for(plan.dataset),
    )
    return budget


def private_trainer(plan: TrainingPlan, budget: PrivacyBudget) -> Callable[..., TrainResult]:
    """Patient-level DP-SGD with the task's loss (silo_client.dp_training)."""
    from silo_client import training
    from silo_client.augment import Augmenter
    from silo_client.dp_training import train_private

    if plan.task == "segmentation":
        loss_fn = training.segmentation_loss(plan.loss_name)
    else:
        bce = training.nn.BCEWithLogitsLoss()

        def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return bce(outputs.squeeze(1), targets)

    def run(model, images, labels, groups, *, seed: int, proximal_mu: float) -> TrainResult:
        return train_private(
            model,
            images,
            labels,
            groups,
            plan.training,
            budget,
            seed,
            loss_fn,
            proximal_mu=proximal_mu,
            augment=Augmenter(tuple(plan.preprocessing.augmentations), seed),
            spatial_targets=plan.task == "segmentation",
        )

    return run


def local_trainer(plan: TrainingPlan) -> Callable[..., TrainResult]:
    """The training loop of the plan's task (classification: BCE on one logit, unchanged;
    segmentation: the plan's Dice loss on one logit per voxel); same arguments for both."""
    from silo_client import training

    augmentations = tuple(plan.preprocessing.augmentations)
    if plan.task == "segmentation":
        return functools.partial(
            training.train_segmentation, loss=plan.loss_name, augmentations=augmentations
        )
    return functools.partial(training.train_local, augmentations=augmentations)


def check_split(plan: TrainingPlan, split: str, server_round: int | None) -> None:
    """Refuse to evaluate on anything but the validation split, or the test split once after
    the last round (a test set evaluated each round would be tuned on). ``server_round`` None
    (a local evaluation, no server) skips the round check."""
    from training_plan.metrics import SPLITS

    if split not in SPLITS:
        raise PlanRefused(
            f"the server asks to evaluate on split '{split}'; a silo evaluates only on "
            f"{' or '.join(SPLITS)}"
        )
    if split == "test":
        if plan.training.test_fraction == 0:
            raise PlanRefused(
                "the server asks for the test split, but the plan holds none out "
                "(training.test_fraction is 0)"
            )
        if server_round is not None and server_round != plan.federation.rounds:
            raise PlanRefused(
                f"the test split is evaluated once, after the last round "
                f"({plan.federation.rounds}); the server asked in round {server_round}"
            )


def evaluate_round(
    home: SiloHome,
    plan: TrainingPlan,
    global_arrays: dict[str, np.ndarray],
    split: str = "validation",
    server_round: int | None = None,
) -> dict[str, float]:
    """Evaluate the global model on the silo's validation (or test) split: the plan's
    evaluation counters (training_plan.metrics), to be summed over silos."""
    from silo_client.training import (
        classification_counters,
        limit_threads,
        segmentation_counters,
    )

    check_split(plan, split, server_round)
    limit_threads()
    data = load_local_data(home, plan)
    images, labels, spacing = data.split(split)
    model = build_global_model(plan, global_arrays)
    if plan.task == "segmentation":
        return segmentation_counters(
            model, images, labels, spacing, plan, batch_size=plan.training.batch_size
        )
    return classification_counters(model, images, labels, plan)
