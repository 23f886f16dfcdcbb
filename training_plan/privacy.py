"""Patient-level differential privacy of a plan: the accountant both sides read from the plan.

A plan's ``privacy`` section fixes everything the accountant needs, none of it local: the noise
multiplier (given, or derived from the target), the Poisson sampling rate of patients per step,
and the steps per round (``local_epochs * ceil(1 / sampling_rate)``). So every silo and the
consortium compute the same epsilon for the same number of trained rounds, and a silo can check
its budget before it touches any data.

The accounting itself is Opacus' (RDP, or PRV for tighter numbers): we never re-derive it.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training_plan.schema import PrivacySpec, TrainingPlan

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants a plan may name."""


def steps_per_round(plan: TrainingPlan) -> int:
    """DP-SGD steps one silo takes in one round: local_epochs passes of 1/sampling_rate steps."""
    if plan.privacy is None:
        raise ValueError("the plan asks for no differential privacy")
    return plan.training.local_epochs * math.ceil(1.0 / plan.privacy.sampling_rate)


@functools.lru_cache(maxsize=256)
def epsilon_spent(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at ``delta`` (Opacus' accountant)."""
    if steps <= 0:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant '{accountant}' (known: {', '.join(ACCOUNTANTS)})")
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(noise_multiplier), float(sampling_rate), int(steps))]
    with warnings.catch_warnings():  # Opacus warns when the best RDP order is at the grid's edge
        warnings.simplefilter("ignore")
        if accountant == "prv":
            return float(acc.get_epsilon(delta=delta, eps_error=0.01))
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def noise_for_target(
    target_epsilon: float, delta: float, sampling_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus' precision) whose epsilon after ``steps`` is at
    most ``target_epsilon`` (Opacus' ``get_noise_multiplier``)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sampling_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    return float(sigma)


@dataclass(frozen=True)
class PrivacyBudget:
    """What a DP plan spends per silo dataset: its parameters and the epsilon after k rounds."""

    target_epsilon: float
    delta: float
    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    steps_per_round: int
    rounds: int
    accountant: str

    def epsilon_after(self, rounds_trained: int) -> float:
        """Epsilon spent on one silo's patients after it trained ``rounds_trained`` rounds."""
        return epsilon_spent(
            self.noise_multiplier,
            self.sampling_rate,
            self.steps_per_round * rounds_trained,
            self.delta,
            self.accountant,
        )

    @property
    def planned_epsilon(self) -> float:
        """Epsilon after every round of the plan (at most the target)."""
        return self.epsilon_after(self.rounds)

    def statement(self, rounds_trained: int | None = None) -> str:
        """The guarantee in one line, as a report or model card states it."""
        rounds = self.rounds if rounds_trained is None else rounds_trained
        return (
            f"patient-level ({self.epsilon_after(rounds):.2f}, {self.delta:g})-differential "
            f"privacy per silo dataset after {rounds} round(s) of DP-SGD (clip {self.clip_norm:g}, "
            f"noise multiplier {self.noise_multiplier:.3f}, patient sampling rate "
            f"{self.sampling_rate:g}, {self.accountant.upper()} accountant)"
        )


def plan_budget(plan: TrainingPlan) -> PrivacyBudget:
    """The plan's privacy budget, with the noise multiplier derived from the target when the
    plan gives none."""
    spec: PrivacySpec | None = plan.privacy
    if spec is None:
        raise ValueError("the plan asks for no differential privacy")
    steps = steps_per_round(plan)
    rounds = plan.federation.rounds
    sigma = spec.noise_multiplier
    if sigma is None:
        sigma = noise_for_target(
            spec.target_epsilon,
            spec.target_delta,
            spec.sampling_rate,
            steps * rounds,
            spec.accountant,
        )
    return PrivacyBudget(
        target_epsilon=spec.target_epsilon,
        delta=spec.target_delta,
        clip_norm=spec.clip_norm,
        noise_multiplier=float(sigma),
        sampling_rate=spec.sampling_rate,
        steps_per_round=steps,
        rounds=rounds,
        accountant=spec.accountant,
    )


def released_guarantee(plan: TrainingPlan, rounds_trained: int) -> str:
    """The released model's guarantee as the plan states it, for reports and model cards.

    Computed from the plan alone (the consortium knows nothing else): a silo that skipped rounds
    spent less, and its own ledger (``silo privacy show``) holds what it actually spent.
    """
    if plan.privacy is None:
        return (
            "no differential-privacy guarantee (the plan has no privacy section): the model "
            "may reveal whether a patient was in a silo's training data"
        )
    budget = plan_budget(plan)
    return (
        budget.statement(rounds_trained)
        + f"; the plan's target was epsilon {budget.target_epsilon:g} over {budget.rounds} "
        "round(s). The guarantee covers the model weights; the securely summed counters "
        "(examples, loss, evaluation metrics) carry no DP noise"
    )
