"""Patient-level DP-SGD (silo_client/dp_training.py): the patient is clipped as one unit, the
noise has the calibrated scale and comes from an unseeded secure source, BatchNorm is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from silo_client.dp_training import (
    PrivacyTrainingError,
    SecureRandom,
    patient_index,
    refuse_batch_norm,
    train_private,
)
from training_plan.privacy import PrivacyBudget
from training_plan.schema import TrainingSpec

SGD = TrainingSpec(optimizer="sgd", learning_rate=1.0, batch_size=4, local_epochs=1)


def _budget(sigma: float, rate: float = 1.0, clip: float = 1.0) -> PrivacyBudget:
    return PrivacyBudget(
        target_epsilon=100.0,
        delta=1e-5,
        clip_norm=clip,
        noise_multiplier=sigma,
        sampling_rate=rate,
        steps_per_round=1,
        rounds=1,
        accountant="rdp",
    )


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs.squeeze(1) - targets) ** 2).mean()


def test_each_patient_is_clipped_as_one_unit() -> None:
    """One step, every patient sampled, negligible noise: the SGD step equals -lr times the mean
    over PATIENTS of each patient's clipped gradient (not over images)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    start = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(7, 3) * 5
    y = torch.randn(7)
    groups = ["a"] * 5 + ["b"] + ["c"]  # patient a has five images
    clip = 0.5
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for rows in patient_index(groups):
        model.zero_grad()
        _mse(model(x[rows]), y[rows]).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        for acc, p in zip(expected, model.parameters(), strict=True):
            acc += p.grad * min(1.0, clip / float(norm))
    model.zero_grad()
    spec = SGD.model_copy(update={"optimizer": "sgd"})
    result = train_private(model, x, y, groups, spec, _budget(1e-9, clip=clip), 0, _mse)
    assert result.steps == 1
    for p, p0, acc in zip(model.parameters(), start, expected, strict=True):
        # SGD with momentum: the first step is plain -lr * grad
        assert torch.allclose(p.detach() - p0, -acc / 3, atol=1e-6)
    total = torch.sqrt(
        sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start, strict=True))
    )
    assert float(total) <= clip + 1e-5  # three patients, each at most clip, averaged


def test_noise_has_the_calibrated_scale() -> None:
    """Zero gradients: the step is pure noise of std sigma * clip / expected patients."""
    model = nn.Linear(4000, 1, bias=False)
    nn.init.zeros_(model.weight)
    x = torch.zeros(10, 4000)
    y = torch.zeros(10)
    groups = [f"p{i}" for i in range(10)]
    sigma, clip, rate = 2.0, 3.0, 0.5

    def zero_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.sum() * 0.0

    train_private(model, x, y, groups, SGD, _budget(sigma, rate=rate, clip=clip), 0, zero_loss)
    step = model.weight.detach().numpy().ravel()
    assert np.std(step) == pytest.approx(sigma * clip / (rate * 10), rel=0.05)
    assert abs(np.mean(step)) < 0.1


def test_noise_is_not_reproducible_from_the_seed() -> None:
    """Same seed, same data: different noise (it comes from os.urandom, not the plan's seed)."""
    steps = []
    for _ in range(2):
        model = nn.Linear(50, 1)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        train_private(
            model,
            torch.ones(4, 50),
            torch.ones(4),
            ["a", "a", "b", "c"],
            SGD,
            _budget(1.0),
            123,
            _mse,
        )
        steps.append(model.weight.detach().clone())
    assert not torch.allclose(steps[0], steps[1])


def test_secure_random_is_standard_normal() -> None:
    z = SecureRandom().normal(200_001)
    assert len(z) == 200_001
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, rel=0.01)
    u = SecureRandom().uniform(100_000)
    assert u.min() > 0 and u.max() < 1


def test_batch_norm_is_refused_with_a_clear_message() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(1))
    with pytest.raises(PrivacyTrainingError, match=r"layer .1. is BatchNorm.*model.norm instance"):
        refuse_batch_norm(model)
    with pytest.raises(PrivacyTrainingError, match="BatchNorm"):
        train_private(
            model, torch.zeros(2, 1, 8, 8), torch.zeros(2), ["a", "b"], SGD, _budget(1.0), 0, _mse
        )


def test_plan_models_without_batch_norm_train() -> None:
    """The registry's networks with instance or group norm carry no BatchNorm at all."""
    from training_plan.models import build_model

    for norm in ("instance", "group"):
        refuse_batch_norm(build_model("resnet10", norm=norm))


def test_segmentation_network_trains_per_patient() -> None:
    """The plan's 3-D UNet with the Dice loss: one DP round over patients' volumes."""
    from monai.networks.nets import UNet

    from silo_client.training import segmentation_loss

    torch.manual_seed(1)
    model = UNet(3, 1, 1, channels=(8, 16), strides=(2,), norm="instance")
    volumes = torch.rand(5, 1, 16, 16, 16)
    masks = (volumes > 0.7).float()
    budget = _budget(1.0, rate=0.5).__class__(
        **{**_budget(1.0, rate=0.5).__dict__, "steps_per_round": 2}
    )
    before = [p.detach().clone() for p in model.parameters()]
    result = train_private(
        model,
        volumes,
        masks,
        ["a", "a", "b", "c", "c"],
        SGD.model_copy(update={"learning_rate": 0.01}),
        budget,
        0,
        segmentation_loss("dice"),
        spatial_targets=True,
    )
    assert result.steps == 2 and np.isfinite(result.mean_loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
