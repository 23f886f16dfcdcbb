"""One silo's side of a round, free of Flower: check the plan, load data, train, evaluate.

The ClientApp (Flower) and the secure-aggregation handler both call these functions; tests call
them directly too. Data loading and splitting live in :mod:`silo_client.local_data`, the model
and training-loop choice in :mod:`silo_client.local_model`, SCAFFOLD in :mod:`silo_client.scaffold`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from silo_client.errors import PlanRefused
from silo_client.home import SiloHome
from silo_client.local_data import load_local_data
from silo_client.local_model import (
    build_global_model,
    local_trainer,
    model_layout,
    private_trainer,
    silo_seed,
)
from silo_client.scaffold import scaffold_round
from training_plan import TrainingPlan, plan_hash, wire

if TYPE_CHECKING:
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
