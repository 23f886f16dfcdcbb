"""Augmentations named in a plan run at the silo: reproducible, masks follow their images,
intensity jitter leaves masks alone, and a plan without augmentations trains as before."""

from __future__ import annotations

import pytest
import torch

from silo_client.augment import Augmenter
from silo_client.governance.policy import SitePolicy
from silo_client.training import train_local
from training_plan import parse_plan
from training_plan.models import build_plan_model

ALL = ("flip-horizontal", "flip-vertical", "rotate-90", "intensity-jitter")


def _batch(n: int = 16, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, 1) + (4,) * (dims - 2) + (8, 8)
    masks = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    return 0.25 + 0.5 * masks, masks  # image = a function of its mask, voxel by voxel


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_augmentations_move_masks_with_images(dims: int) -> None:
    images, masks = _batch(dims=dims)
    augment = Augmenter(("flip-horizontal", "flip-vertical", "rotate-90"), seed=3)
    out_images, out_masks = augment(images, masks, spatial_targets=True)
    assert out_images.shape == images.shape
    assert not torch.equal(out_images, images)  # 16 examples: some were flipped or turned
    assert torch.equal(out_images, 0.25 + 0.5 * out_masks)  # still aligned voxel by voxel
    if dims == 3:  # slices stay in order: each slice's content moves within its own plane
        assert torch.equal(out_masks.sum(dim=(-2, -1)), masks.sum(dim=(-2, -1)))


def test_intensity_jitter_changes_images_only_and_stays_in_range() -> None:
    images, masks = _batch()
    out_images, out_masks = Augmenter(("intensity-jitter",), seed=0)(images, masks, True)
    assert torch.equal(out_masks, masks)
    assert not torch.allclose(out_images, images)
    assert float(out_images.min()) >= 0.0 and float(out_images.max()) <= 1.0
    ratio = (out_images - images).abs().max()
    assert float(ratio) <= 0.75 * 0.1 + 0.05 + 1e-6  # scale +-10% of at most 0.75, shift +-0.05


def test_labels_of_classification_are_never_transformed() -> None:
    images, _ = _batch()
    labels = torch.arange(16).float()
    _, out_labels = Augmenter(ALL, seed=5)(images, labels, spatial_targets=False)
    assert torch.equal(out_labels, labels)


def test_augmentations_are_reproducible_per_seed() -> None:
    images, masks = _batch()
    first = Augmenter(ALL, seed=7)(images, masks, True)
    again = Augmenter(ALL, seed=7)(images, masks, True)
    other = Augmenter(ALL, seed=8)(images, masks, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_unknown_augmentation_is_refused() -> None:
    with pytest.raises(ValueError, match="not run by this silo"):
        Augmenter(("elastic",), seed=0)


def _trained(plan_text: str) -> list[torch.Tensor]:
    plan = parse_plan(plan_text)
    images = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 6)
    torch.manual_seed(0)
    model = build_plan_model(plan.model)
    from silo_client.local_model import local_trainer

    local_trainer(plan)(model, images, labels, plan.training, seed=2)
    return [p.detach().clone() for p in model.parameters()]


def test_plan_augmentations_change_training_and_none_changes_nothing() -> None:
    base = "title: t\nmodel: {name: resnet10}\npreprocessing: {input_size: 32%s}\n"
    base += "training: {batch_size: 4}\n"
    plain = _trained(base % "")
    again = _trained(base % ", augmentations: []")
    augmented = _trained(base % ", augmentations: [flip-horizontal, rotate-90]")
    # without augmentations the loop is the classification loop called directly
    torch.manual_seed(0)
    plan = parse_plan(base % "")
    model = build_plan_model(plan.model)
    images = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    train_local(model, images, torch.tensor([0, 1] * 6), plan.training, seed=2)
    direct = [p.detach() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, direct, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(plain, augmented, strict=True))


def test_site_policy_accepts_plans_with_augmentations() -> None:
    plan = parse_plan(
        "title: t\nmodel: {name: resnet10}\npreprocessing: {augmentations: [flip-vertical]}\n"
    )
    problems = SitePolicy().violations(plan, signer=None)
    assert not any("augmentation" in p for p in problems)
