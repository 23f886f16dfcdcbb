"""One silo's side of a round, free of Flower: check the plan, load data, train, evaluate.

The ClientApp (Flower) and the secure-aggregation handler both call these functions; tests call
them directly too.
"""

from __future__ import annotations

import logging
import zlib
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

    from silo_client.training import EvalSums, TrainResult

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
    """The silo's preprocessed training and validation tensors for one plan."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor


def load_local_data(home: SiloHome, plan: TrainingPlan, dataset: str | None = None) -> LocalData:
    """Load (from the preprocessed cache when possible) and split the dataset the plan selects."""
    from silo_client.data.dicom_dataset import Preprocessing, build_dataset

    dataset = dataset or plan.dataset
    folder = home.dataset_folder(dataset)
    window = plan.preprocessing.window
    preprocessing = Preprocessing(
        input_size=plan.preprocessing.input_size,
        window_center=window.center if window else None,
        window_width=window.width if window else None,
    )
    data = build_dataset(Path(folder), preprocessing, cache_dir=home.cache_dir)
    if len(data.labels) < 2:
        raise DataError(
            f"dataset '{dataset}' of silo '{home.name}' has {len(data.labels)} usable image(s); "
            "a round needs at least 2 (see 'silo data show')"
        )
    train, val = data.split(plan.training.validation_fraction, seed=plan.training.seed)
    return LocalData(train.images, train.labels, val.images, val.labels)


def silo_seed(plan: TrainingPlan, silo_name: str, server_round: int) -> int:
    """A per-silo, per-round seed: reproducible runs without silos sharing their shuffles."""
    return (
        plan.training.seed * 1_000_003 + server_round * 7919 + zlib.crc32(silo_name.encode())
    ) % (2**31)


def build_global_model(plan: TrainingPlan, global_arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    """The plan's network with the global weights loaded."""
    from silo_client.training import load_float_state
    from training_plan.models import build_plan_model

    model = build_plan_model(plan.model)
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
    from silo_client.training import float_state, limit_threads, train_local

    if plan.federation.strategy == "scaffold":
        from silo_client.scaffold import scaffold_round

        return scaffold_round(home, plan, global_arrays, server_round, run_id)

    limit_threads()
    data = load_local_data(home, plan)
    model = build_global_model(plan, global_arrays)
    result = train_local(
        model,
        data.train_images,
        data.train_labels,
        plan.training,
        seed=silo_seed(plan, home.name, server_round),
        proximal_mu=plan.federation.proximal_mu,  # FedProx: from the approved plan, not the config
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


def evaluate_round(
    home: SiloHome, plan: TrainingPlan, global_arrays: dict[str, np.ndarray]
) -> EvalSums:
    """Evaluate the global model on the silo's validation split, as sums."""
    from silo_client.training import evaluate_sums, limit_threads

    limit_threads()
    data = load_local_data(home, plan)
    model = build_global_model(plan, global_arrays)
    return evaluate_sums(model, data.val_images, data.val_labels)
