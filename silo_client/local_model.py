"""The plan's network on a silo: built with the global weights, its packed-vector layout, the
per-silo seed and the training loop the plan's task (and privacy section) asks for."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from training_plan import TrainingPlan, wire
from training_plan.errors import PlanError

if TYPE_CHECKING:
    import torch

    from silo_client.training import TrainResult
    from training_plan.privacy import PrivacyBudget


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
