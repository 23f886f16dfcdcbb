"""The segmentation task: MONAI UNet/BasicUNet trained with Dice loss on 3D volumes (spheres in
noise made here), evaluated as Dice/HD95 sums, and federated through the real round loop and
ClientApp (plain and secure) with the metrics of both paths equal.

The federated test runs on the synthetic CT hospitals (DICOM series with SEG or NIfTI masks)
through the silo's real volume loader (``silo_client.data.segmentation_dataset``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from silo_client.training import segmentation_counters, train_segmentation
from training_plan import parse_plan
from training_plan.metrics import metrics_from_sums
from training_plan.models import build_plan_model

SEG = (
    "title: seg\ntask: segmentation\nmodel: {name: unet}\npreprocessing: {input_size: 16}\n"
    "training: {batch_size: 4, local_epochs: 8, learning_rate: 0.01, seed: 1}\n"
    "evaluation: {metrics: [loss, dice, hd95]}\nfederation: {rounds: 1, min_silos: 3}\n"
)


def spheres(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Volumes (n,1,S,S,S) with one bright ball each in noise, its mask, and spacing (n,3)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3)
    images, masks = [], []
    for _ in range(n):
        scale = size / 16
        center, radius = rng.uniform(5, size - 5, 3), scale * rng.uniform(2.5, 4.5)
        mask = sum((grid[i] - center[i]) ** 2 for i in range(3)) <= radius**2
        images.append(0.6 * mask + rng.normal(0, 0.25, mask.shape))
        masks.append(mask)
    spacing = np.tile(rng.uniform(0.7, 1.5, 3), (n, 1))
    return (
        np.stack(images)[:, None].astype(np.float32),
        np.stack(masks)[:, None].astype(np.uint8),
        spacing,
    )


def _metrics(model, plan, images, masks, spacing) -> dict[str, float]:
    counters = segmentation_counters(
        model, torch.as_tensor(images), torch.as_tensor(masks), spacing, plan
    )
    return metrics_from_sums(plan, counters)


@pytest.mark.parametrize("name", ["unet", "basicunet"])
def test_dice_training_segments_spheres(name: str) -> None:
    size = 16 if name == "unet" else 32
    plan = parse_plan(SEG.replace("unet", name).replace("input_size: 16", f"input_size: {size}"))
    torch.set_num_threads(1)
    train = spheres(12, seed=0, size=size)
    val = spheres(6, seed=1, size=size)
    torch.manual_seed(0)
    model = build_plan_model(plan.model)
    before = _metrics(model, plan, *val)
    spec = plan.training
    result = train_segmentation(
        model, torch.as_tensor(train[0]), torch.as_tensor(train[1]), spec, seed=1
    )
    after = _metrics(model, plan, *val)
    assert result.num_examples == 12 and result.steps == spec.local_epochs * 3
    assert after["dice"] > before["dice"] + 0.2, (before, after)
    assert after["loss"] < before["loss"]
    if name == "unet":
        assert after["dice"] > 0.5 and after["hd95"] < before["hd95"]


def test_segmentation_training_is_reproducible_and_takes_fedprox_and_dice_ce() -> None:
    plan = parse_plan(SEG.replace("local_epochs: 8", "local_epochs: 2"))
    volumes, labels, _ = spheres(8, seed=2)
    images, masks = torch.as_tensor(volumes), torch.as_tensor(labels)

    def trained(**kwargs) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_plan_model(plan.model)
        train_segmentation(model, images, masks, plan.training, seed=4, **kwargs)
        return [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    start = [p.detach().clone() for p in build_plan_model(plan.model).parameters()]
    first, again = trained(), trained()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    dice_ce = trained(loss="dice-ce")
    assert any(not torch.equal(a, b) for a, b in zip(first, dice_ce, strict=True))

    def moved(params: list[torch.Tensor]) -> float:
        return float(sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True)))

    assert moved(trained(proximal_mu=50.0)) < moved(first)
    # SCAFFOLD's gradient correction goes through the same loop: zero changes nothing, a
    # constant pull moves every weight
    zeros = [torch.zeros_like(p) for p in start]
    assert all(
        torch.equal(a, b) for a, b in zip(first, trained(gradient_correction=zeros), strict=True)
    )
    pulled = trained(gradient_correction=[torch.full_like(p, 0.5) for p in start])
    assert moved(pulled) > moved(first)
    with pytest.raises(ValueError, match="not a segmentation loss"):
        trained(loss="bce")


# ------------------------------------------------------------------ federated, in process
@pytest.fixture
def seg_hospitals(tmp_path: Path) -> list[Path]:
    """Three synthetic CT hospitals (real DICOM series, SEG and NIfTI masks), read by the
    silo's own volume loader."""
    from fedsilo.synthetic import generate_segmentation_hospitals

    return generate_segmentation_hospitals(
        tmp_path / "hospitals", n_hospitals=3, cases_per_hospital=6, size=32, slices=(12, 16),
        seed=3,
    )  # fmt: skip


def test_federated_segmentation_plain_and_secure_agree(
    seg_hospitals: list[Path], tmp_path: Path
) -> None:
    from aggregator.aggregation import PlainAggregation
    from aggregator.artifacts import read_events
    from aggregator.federated_run import FederatedRun
    from tests.test_secure_flower import grid_for, make_silos

    plan_text = SEG.replace("rounds: 1", "rounds: 2").replace("local_epochs: 8", "local_epochs: 2")
    plan_text = plan_text.replace("seed: 1}", "seed: 1, test_fraction: 0.2}")
    secure_plan = parse_plan(plan_text + "secure_aggregation: {max_weight: 20}\n")
    plain_plan = parse_plan(plan_text + "secure_aggregation: {enabled: false, max_weight: 20}\n")
    results = {}
    for label, plan in (("secure", secure_plan), ("plain", plain_plan)):
        homes = make_silos(tmp_path / label, seg_hospitals, identities=label == "secure")
        aggregation = PlainAggregation() if label == "plain" else None
        results[label] = FederatedRun(
            plan, tmp_path / f"run-{label}", "seg-1", aggregation=aggregation
        ).run(grid_for(homes))
    secure, plain = results["secure"], results["plain"]
    assert secure.status == plain.status == "done"
    for s_round, p_round in zip(secure.rounds, plain.rounds, strict=True):
        assert s_round.participants == p_round.participants == 3
        for key in ("eval-dice", "eval-dice-case", "eval-hd95", "eval-loss"):
            # same counters; the models differ only within the secure codec's bound
            assert s_round.eval_metrics[key] == pytest.approx(
                p_round.eval_metrics[key], rel=1e-2, abs=1e-2
            ), key
    for result, label in ((secure, "secure"), (plain, "plain")):
        assert {"test-dice", "test-dice-case", "test-loss"} <= set(result.test_metrics)
        events = read_events(tmp_path / f"run-{label}" / "events.jsonl")
        assert [e["event"] for e in events][-2:] == ["test-evaluated", "run-finished"]
