"""Local training and evaluation on the silo's own data (the only place data is ever read)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from silo_client.augment import Augmenter
from training_plan.schema import TrainingSpec

if TYPE_CHECKING:
    from training_plan.schema import TrainingPlan


def limit_threads() -> None:
    """Keep a ClientApp from oversubscribing the hospital server's cores.

    FEDSILO_TORCH_THREADS (default: 1 per ClientApp process) sets the intra-op pool; several silos
    on one machine (the demo) otherwise fight over the same cores.
    """
    torch.set_num_threads(max(1, int(os.environ.get("FEDSILO_TORCH_THREADS", "1"))))


def float_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's floating-point state (weights and BatchNorm statistics) as float32 arrays.

    Integer buffers (BatchNorm's num_batches_tracked) are bookkeeping, not parameters: they are
    neither averaged nor sent.
    """
    return {
        key: value.detach().cpu().numpy().astype(np.float32, copy=True)
        for key, value in model.state_dict().items()
        if value.is_floating_point()
    }


def load_float_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load float32 arrays (as produced by float_state) into the model, checking every key."""
    state = model.state_dict()
    expected = {k for k, v in state.items() if v.is_floating_point()}
    missing, unexpected = expected - set(arrays), set(arrays) - expected
    if missing or unexpected:
        raise ValueError(
            f"model arrays do not match the plan's network (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    for key in expected:
        if tuple(arrays[key].shape) != tuple(state[key].shape):
            raise ValueError(
                f"array '{key}' has shape {arrays[key].shape}, the network expects "
                f"{tuple(state[key].shape)}"
            )
        state[key] = torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)).to(
            state[key].dtype
        )
    model.load_state_dict(state)


SGD_MOMENTUM = 0.9
"""Momentum of the plan's 'sgd' optimizer (SCAFFOLD's control-variate update depends on it)."""


def make_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    """The plan's optimizer over the model's parameters."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=SGD_MOMENTUM)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    return torch.optim.Adam(model.parameters(), lr=spec.learning_rate)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did (counts only, no data)."""

    num_examples: int
    steps: int
    mean_loss: float


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainingSpec,
    seed: int,
    *,
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    gradient_correction: list[torch.Tensor] | None = None,
    augmentations: Sequence[str] = (),
) -> TrainResult:
    """Train in place for spec.local_epochs epochs with binary cross-entropy on one logit.

    With ``proximal_mu`` > 0 (FedProx) the loss gains mu/2 * ||w - w_global||^2 over the
    trainable parameters; ``global_params`` are the global weights in ``model.parameters()``
    order (default: the model's weights when training starts, i.e. the global model).
    ``gradient_correction`` (SCAFFOLD: c - c_i, in ``model.parameters()`` order) is added to every
    gradient before each optimizer step. ``augmentations`` are the plan's (silo_client.augment).
    """
    bce = nn.BCEWithLogitsLoss()
    return _train_loop(
        model,
        images,
        labels,
        spec,
        seed,
        lambda outputs, targets: bce(outputs.squeeze(1), targets),
        proximal_mu=proximal_mu,
        global_params=global_params,
        gradient_correction=gradient_correction,
        augment=Augmenter(augmentations, seed),
        spatial_targets=False,
    )


def _train_loop(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    spec: TrainingSpec,
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    proximal_mu: float,
    global_params: list[torch.Tensor] | None,
    gradient_correction: list[torch.Tensor] | None,
    augment: Augmenter,
    spatial_targets: bool,
) -> TrainResult:
    """The one local training loop of every task: seeded shuffling, the plan's optimizer, the
    FedProx term and the SCAFFOLD gradient correction; only the loss differs per task."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(inputs, targets.float()),
        batch_size=spec.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(targets) > spec.batch_size,
    )
    optimizer = make_optimizer(model, spec)
    if proximal_mu > 0 and global_params is None:
        global_params = [p.detach().clone() for p in model.parameters()]
    model.train()
    steps, loss_total = 0, 0.0
    for _ in range(spec.local_epochs):
        for batch_inputs, batch_targets in loader:
            if augment:
                batch_inputs, batch_targets = augment(batch_inputs, batch_targets, spatial_targets)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch_inputs), batch_targets)
            fit_loss = loss
            if proximal_mu > 0 and global_params is not None:
                proximal = sum(
                    ((p - g) ** 2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                fit_loss = loss + 0.5 * proximal_mu * proximal
            fit_loss.backward()
            if gradient_correction is not None:
                for p, correction in zip(model.parameters(), gradient_correction, strict=True):
                    if p.grad is not None:
                        p.grad.add_(correction)
            optimizer.step()
            steps += 1
            loss_total += float(loss.detach())
    return TrainResult(num_examples=len(targets), steps=steps, mean_loss=loss_total / max(steps, 1))


@dataclass(frozen=True)
class EvalSums:
    """Evaluation as sums, so that silos' results add up (and can go through secure sums)."""

    num_examples: int
    loss_sum: float
    true_pos: int
    false_pos: int
    true_neg: int
    false_neg: int

    @property
    def accuracy(self) -> float:
        """Fraction of correct decisions at threshold 0.5."""
        return (self.true_pos + self.true_neg) / max(self.num_examples, 1)

    @property
    def mean_loss(self) -> float:
        """Mean binary cross-entropy."""
        return self.loss_sum / max(self.num_examples, 1)


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Probabilities of the positive class for each image."""
    model.eval()
    scores = [
        torch.sigmoid(model(images[i : i + batch_size]).squeeze(1))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


def evaluate_sums(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """Loss sum and confusion cells of the model on (images, labels)."""
    scores = predict_scores(model, images)
    truth = labels.numpy().astype(bool)
    eps = 1e-7
    clipped = np.clip(scores, eps, 1 - eps)
    loss_sum = float(-(truth * np.log(clipped) + (~truth) * np.log(1 - clipped)).sum())
    decided = scores >= 0.5
    return EvalSums(
        num_examples=len(truth),
        loss_sum=loss_sum,
        true_pos=int((decided & truth).sum()),
        false_pos=int((decided & ~truth).sum()),
        true_neg=int((~decided & ~truth).sum()),
        false_neg=int((~decided & truth).sum()),
    )


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC (NaN when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth).astype(int)
    if truth.min(initial=0) == truth.max(initial=0):
        return float("nan")
    return float(roc_auc_score(truth, scores))


# ------------------------------------------------------------------ evaluation as counters
def classification_counters(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, plan: TrainingPlan
) -> dict[str, float]:
    """The plan's evaluation counters of the model on (images, labels) (training_plan.metrics)."""
    from training_plan.metrics import classification_counters as counters_from_scores

    scores = predict_scores(model, images)
    return counters_from_scores(plan, scores, labels.numpy())


# ------------------------------------------------------------------ segmentation (3D)
def segmentation_loss(name: str) -> nn.Module:
    """The plan's segmentation loss on one logit per voxel: MONAI Dice (or Dice + BCE)."""
    from monai.losses import DiceCELoss, DiceLoss

    if name == "dice-ce":
        return DiceCELoss(sigmoid=True)
    if name == "dice":
        return DiceLoss(sigmoid=True)
    raise ValueError(f"'{name}' is not a segmentation loss (use dice or dice-ce)")


def train_segmentation(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    spec: TrainingSpec,
    seed: int,
    *,
    loss: str = "dice",
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    gradient_correction: list[torch.Tensor] | None = None,
    augmentations: Sequence[str] = (),
) -> TrainResult:
    """Train a segmentation network in place on volumes (N,1,D,H,W) and 0/1 masks of the same
    shape, for spec.local_epochs epochs with the plan's Dice loss.

    Same loop, seeding, batching, FedProx term and SCAFFOLD correction as :func:`train_local`.
    """
    return _train_loop(
        model,
        images,
        masks,
        spec,
        seed,
        segmentation_loss(loss),
        proximal_mu=proximal_mu,
        global_params=global_params,
        gradient_correction=gradient_correction,
        augment=Augmenter(augmentations, seed),
        spatial_targets=True,
    )


def hd95_mm(predicted: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> float:
    """95th-percentile Hausdorff distance in mm between two 3D masks (MONAI's surface distance
    with the voxel spacing); NaN when either mask is empty (the distance is undefined)."""
    from monai.metrics import compute_hausdorff_distance

    if not predicted.any() or not target.any():
        return float("nan")
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            torch.as_tensor(predicted[None, None]),
            torch.as_tensor(target[None, None]),
            include_background=True,  # one channel: the lesion itself
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


@torch.no_grad()
def segmentation_counters(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    spacing_mm: np.ndarray,
    plan: TrainingPlan,
    batch_size: int = 2,
) -> dict[str, float]:
    """The plan's evaluation counters (Dice sums, HD95 sums) of the model on volumes and masks;
    ``spacing_mm`` is (N, 3), the voxel size of each case in the volume's axis order."""
    from training_plan.metrics import segmentation_counters as counters_from_cases

    model.eval()
    loss_fn = segmentation_loss(plan.loss_name)
    want_hd95 = "hd95" in plan.evaluation.metrics
    losses, inter, pred_sizes, target_sizes, hd = [], [], [], [], []
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        targets = masks[start : start + batch_size].float()
        for i in range(len(logits)):
            losses.append(float(loss_fn(logits[i : i + 1], targets[i : i + 1])))
            predicted = (torch.sigmoid(logits[i, 0]) >= 0.5).numpy()
            target = targets[i, 0].numpy() > 0.5
            inter.append(float((predicted & target).sum()))
            pred_sizes.append(float(predicted.sum()))
            target_sizes.append(float(target.sum()))
            if want_hd95:
                hd.append(hd95_mm(predicted, target, np.asarray(spacing_mm[start + i])))
    return counters_from_cases(
        plan,
        loss=losses,
        intersection=inter,
        predicted=pred_sizes,
        target=target_sizes,
        hd95_mm=hd,
    )
