"""One machine playing a whole consortium: every hospital's IT, the researcher, the scorer.

Shared by `fedsilo demo` (real Flower processes) and `bench/accuracy.py` (in process): pinning
the roster, approving a signed plan at every silo, training a model alone for a federated run's
budget, and scoring a model on a pooled held-out test set. In a real consortium each of these
steps belongs to a different person at a different site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from silo_client.local_data import plan_preprocessing
from training_plan import TrainingPlan

if TYPE_CHECKING:
    import torch

    from fedsilo.synthetic import HospitalSpec
    from silo_client.home import SiloHome


def adjust_plan(plan: TrainingPlan, **sections: dict) -> TrainingPlan:
    """A copy of ``plan`` with fields of its sections replaced, validated again.

    ``adjust_plan(plan, training={"seed": 1}, federation={"rounds": 6})``.
    """
    changes = {
        name: getattr(plan, name).model_copy(update=update) for name, update in sections.items()
    }
    return TrainingPlan.model_validate(plan.model_copy(update=changes).model_dump())


def generate_consortium_data(
    out: Path,
    *,
    hospitals: int,
    images_per_hospital: int,
    test_images: int,
    seed: int,
    difficulty: float,
    image_size: int,
) -> tuple[list[HospitalSpec], Path]:
    """Synthetic hospitals in ``out/hospitals/<name>`` and a pooled held-out test set.

    The test set (``out/pooled-test``) is drawn from every hospital's distribution with its own
    seed, so no image of it is in any hospital's data. Returns the specs and the test folder.
    """
    from fedsilo.synthetic import generate_hospitals, generate_test_set

    specs = generate_hospitals(
        out / "hospitals",
        hospitals=hospitals,
        images_per_hospital=images_per_hospital,
        seed=seed,
        difficulty=difficulty,
        image_size=image_size,
    )
    test_dir = out / "pooled-test"
    generate_test_set(
        test_dir,
        n=test_images,
        seed=seed + 10_000,
        hospitals=hospitals,
        difficulty=difficulty,
        image_size=image_size,
    )
    return specs, test_dir


def generate_segmentation_consortium(
    out: Path,
    *,
    hospitals: int,
    cases_per_hospital: int,
    test_cases_per_hospital: int,
    size: int,
    slices: tuple[int, int],
    seed: int,
) -> tuple[list[Path], list[Path]]:
    """Synthetic CT hospitals in ``out/hospitals/<name>`` and a pooled held-out set of cases
    from the same scanners (another seed) in ``out/pooled-test/<name>``."""
    from fedsilo.synthetic import generate_segmentation_hospitals

    def generate(folder: str, cases: int, data_seed: int) -> list[Path]:
        return generate_segmentation_hospitals(
            out / folder,
            n_hospitals=hospitals,
            cases_per_hospital=cases,
            size=size,
            slices=slices,
            seed=data_seed,
        )

    return (
        generate("hospitals", cases_per_hospital, seed),
        generate("pooled-test", test_cases_per_hospital, seed + 10_000),
    )


def pin_roster(homes: list[SiloHome]) -> None:
    """Give each silo an identity key and its own pinned copy of the roster of all silos.

    In a real consortium this is `silo init` + `aggregator enroll` + `silo join`.
    """
    from secure_agg.keys import Roster
    from silo_client.identity import ensure_identity, save_roster

    roster = Roster()
    for home in homes:
        roster.add(home.name, ensure_identity(home).public_bytes)
    for home in homes:
        save_roster(home, roster)


def approve_everywhere(
    homes: list[SiloHome],
    plans: list[TrainingPlan],
    workdir: Path,
    *,
    secure_aggregation_required: bool = True,
) -> None:
    """A researcher signs the plans; each hospital's IT allows that researcher and approves them.

    In a real consortium: `fedsilo plan keygen/sign/submit`, then `silo policy edit` and
    `silo plan review/approve` at each hospital. ``secure_aggregation_required=False`` is the
    site policy that lets a plan with secure aggregation off run (a benchmark's plain arm).
    """
    from silo_client.governance.approvals import approve_plan
    from silo_client.governance.policy import AllowedResearcher, SitePolicy, save_policy
    from training_plan.signing import generate_keypair, load_private_key, sign_plan

    key_path, pub_path = generate_keypair(workdir / "researcher" / "demo", overwrite=True)
    key = load_private_key(key_path)
    researcher = AllowedResearcher(name="Demo Researcher", public_key=pub_path.read_text().strip())
    policy = SitePolicy(
        allowed_researchers=[researcher], secure_aggregation_required=secure_aggregation_required
    )
    for home in homes:
        save_policy(home.root, policy, actor="demo IT")
        for plan in plans:
            approve_plan(home.root, plan, sign_plan(plan, key), actor="demo IT")


@dataclass(frozen=True)
class ModelScore:
    """A model's figures on a held-out test set."""

    auc: float
    accuracy: float
    loss: float


def score_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> ModelScore:
    """AUC, accuracy (threshold 0.5) and mean cross-entropy of ``model`` on (images, labels)."""
    import torch

    from silo_client.training import auc, predict_scores

    # One forward pass without autograd (the demo scores 25 models on 300 images; this was two
    # passes with a graph each). Loss and accuracy as silo_client.training.evaluate_sums has them.
    with torch.inference_mode():
        scores = predict_scores(model, images)
    truth = labels.numpy().astype(bool)
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    loss_sum = float(-(truth * np.log(clipped) + (~truth) * np.log(1 - clipped)).sum())
    correct = int(((scores >= 0.5) == truth).sum())
    return ModelScore(
        auc=auc(scores, labels.numpy()),
        accuracy=correct / max(len(truth), 1),
        loss=loss_sum / max(len(truth), 1),
    )


def score_arrays(
    plan: TrainingPlan, arrays: dict[str, np.ndarray], images: torch.Tensor, labels: torch.Tensor
) -> ModelScore:
    """Score the plan's network carrying ``arrays`` (a checkpoint's weights)."""
    from silo_client.local_model import build_global_model

    return score_model(build_global_model(plan, arrays), images, labels)


def train_alone(
    plan: TrainingPlan,
    images: torch.Tensor,
    labels: torch.Tensor,
    name: str,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    every_round: bool = True,
) -> tuple[dict[str, np.ndarray], list[ModelScore]]:
    """Train one model on (images, labels) alone with a federated run's budget.

    Same initial weights as the federated run (the plan's seed), then ``rounds`` calls of the
    silo's own ``train_local`` with ``local_epochs`` each (a fresh optimizer per call, as in a
    federated round), seeded as silo ``name`` would be. Returns the final float state and the
    test-set score after each 'round' (``every_round=False``: after the last one only).
    """
    import torch

    from silo_client.local_model import silo_seed
    from silo_client.training import float_state, train_local
    from training_plan.models import build_plan_model

    torch.manual_seed(plan.training.seed)
    model = build_plan_model(plan.model, plan.preprocessing.channels)
    scores = []
    rounds = plan.federation.rounds
    for server_round in range(1, rounds + 1):
        train_local(model, images, labels, plan.training, silo_seed(plan, name, server_round))
        if every_round or server_round == rounds:
            scores.append(score_model(model, test_images, test_labels))
    return float_state(model), scores


@dataclass
class SegmentationCases:
    """Preprocessed 3-D cases: volumes (N,1,D,H,W), 0/1 masks of the same shape, and each
    case's voxel size in mm (N,3, the volume's axis order; HD95 needs it)."""

    images: torch.Tensor
    masks: torch.Tensor
    spacing_mm: np.ndarray


def load_segmentation_cases(
    folders: list[Path], plan: TrainingPlan, cache_dir: Path
) -> SegmentationCases:
    """Every case of ``folders`` (e.g. a pooled held-out set), preprocessed as the plan asks."""
    import torch

    from silo_client.data.segmentation_dataset import build_segmentation_dataset

    prep = plan_preprocessing(plan)
    parts = [build_segmentation_dataset(f, prep, cache_dir=cache_dir) for f in folders]
    return SegmentationCases(
        torch.cat([p.images for p in parts]),
        torch.cat([p.masks for p in parts]),
        np.concatenate([p.spacing_mm.numpy() for p in parts]).astype(np.float64),
    )


def score_segmentation(
    plan: TrainingPlan, model: torch.nn.Module, cases: SegmentationCases
) -> dict[str, float]:
    """The plan's segmentation metrics (loss, dice, dice-case, hd95 when asked) of ``model`` on
    ``cases``: the silo's own counters, summed as the secure sums would be."""
    from silo_client.training import segmentation_counters
    from training_plan.metrics import metrics_from_sums

    counters = segmentation_counters(model, cases.images, cases.masks, cases.spacing_mm, plan)
    return metrics_from_sums(plan, counters)


def train_segmentation_alone(
    plan: TrainingPlan,
    images: torch.Tensor,
    masks: torch.Tensor,
    name: str,
    test: SegmentationCases,
    *,
    every_round: bool = True,
) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    """Train one segmentation model on (images, masks) alone with a federated run's budget.

    As :func:`train_alone`: the run's initial weights, then ``rounds`` calls of the silo's own
    training loop for the plan's task (a fresh optimizer per call), seeded as silo ``name``.
    Returns the final float state and the metrics on ``test`` after each 'round'
    (``every_round=False``: after the last one only).
    """
    import torch

    from silo_client.local_model import local_trainer, silo_seed
    from silo_client.training import float_state
    from training_plan.models import build_plan_model

    torch.manual_seed(plan.training.seed)
    model = build_plan_model(plan.model, plan.preprocessing.channels)
    train = local_trainer(plan)
    scores = []
    rounds = plan.federation.rounds
    for server_round in range(1, rounds + 1):
        train(model, images, masks, plan.training, seed=silo_seed(plan, name, server_round))
        if every_round or server_round == rounds:
            scores.append(score_segmentation(plan, model, test))
    return float_state(model), scores


__all__ = [
    "ModelScore",
    "SegmentationCases",
    "adjust_plan",
    "approve_everywhere",
    "generate_consortium_data",
    "generate_segmentation_consortium",
    "load_segmentation_cases",
    "pin_roster",
    "plan_preprocessing",
    "score_arrays",
    "score_model",
    "score_segmentation",
    "train_alone",
    "train_segmentation_alone",
]
