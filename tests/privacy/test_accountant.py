"""The plan's accountant (Opacus RDP / PRV) against an independent library (Google's
dp-accounting), and the plan-level budget: sigma derived from the target, hash stability."""

from __future__ import annotations

import logging

import pytest

from training_plan import parse_plan, plan_hash
from training_plan.privacy import epsilon_spent, noise_for_target, plan_budget, steps_per_round

SETTINGS = [  # (noise multiplier, patient sampling rate, steps, delta)
    (1.1, 0.01, 1000, 1e-5),
    (0.8, 0.1, 120, 1e-5),
    (2.0, 0.25, 30, 1e-6),
    (1.0, 1.0, 5, 1e-5),
]
BASE = (
    "title: dp\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "training: {local_epochs: 2}\nfederation: {rounds: 3, min_silos: 3}\n"
)


def _dp_accounting_event(sigma: float, rate: float, steps: int):
    import dp_accounting

    logging.getLogger().setLevel(logging.ERROR)  # dp-accounting logs skipped RDP orders
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps
    )


@pytest.mark.parametrize(("sigma", "rate", "steps", "delta"), SETTINGS)
def test_rdp_epsilon_matches_dp_accounting(sigma, rate, steps, delta) -> None:
    from dp_accounting import rdp

    reference = rdp.RdpAccountant()
    reference.compose(_dp_accounting_event(sigma, rate, steps))
    ours = epsilon_spent(sigma, rate, steps, delta, "rdp")
    # the two libraries use different grids of RDP orders: within 1%
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize(("sigma", "rate", "steps", "delta"), SETTINGS)
def test_prv_epsilon_matches_dp_accounting_pld(sigma, rate, steps, delta) -> None:
    from dp_accounting import pld

    reference = pld.PLDAccountant(value_discretization_interval=1e-3)
    reference.compose(_dp_accounting_event(sigma, rate, steps))
    ours = epsilon_spent(sigma, rate, steps, delta, "prv")
    # both are numerical (near-)exact accountants of the same mechanism; PRV is an upper bound
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=0.015)
    assert ours <= epsilon_spent(sigma, rate, steps, delta, "rdp")  # tighter than RDP


def test_epsilon_grows_with_rounds_and_zero_steps_spend_nothing() -> None:
    assert epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
    values = [epsilon_spent(1.0, 0.1, steps, 1e-5) for steps in (10, 20, 40)]
    assert values == sorted(values) and values[0] > 0


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_derived_from_target_meets_it_closely(target: float) -> None:
    sigma = noise_for_target(target, 1e-5, 0.25, 48)
    spent = epsilon_spent(sigma, 0.25, 48, 1e-5)
    assert spent <= target * 1.0001
    assert spent >= target * 0.97  # not wastefully noisy


def test_plan_budget_is_the_plan_alone() -> None:
    plan = parse_plan(BASE + "privacy: {target_epsilon: 3, sampling_rate: 0.25}\n")
    budget = plan_budget(plan)
    assert steps_per_round(plan) == 2 * 4 == budget.steps_per_round
    assert budget.rounds == 3
    assert budget.planned_epsilon <= 3.0 * 1.0001
    assert budget.epsilon_after(1) < budget.epsilon_after(2) < budget.planned_epsilon
    assert budget.epsilon_after(3) == pytest.approx(
        epsilon_spent(budget.noise_multiplier, 0.25, 24, 1e-5)
    )
    assert "patient-level" in budget.statement() and "RDP" in budget.statement()


def test_plan_hash_without_privacy_is_unchanged() -> None:
    """BASE's hash as main computed it before the privacy section existed."""
    assert plan_hash(parse_plan(BASE)) == (
        "8a3abf3c0f8e7b201950bb8fa0a7e7c52f853567fccd88a09cfd451b1b0b4690"
    )
    with_dp = parse_plan(BASE + "privacy: {target_epsilon: 3}\n")
    assert plan_hash(with_dp) != plan_hash(parse_plan(BASE))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("model: {name: resnet10, norm: batch}\n", "model.norm batch cannot train with privacy"),
        (
            "federation: {rounds: 3, min_silos: 3, strategy: scaffold}\n"
            "training: {optimizer: sgd}\n",
            "scaffold is not supported with privacy",
        ),
        ("", "spends epsilon"),
    ],
)
def test_plans_dp_cannot_keep_are_refused(extra: str, message: str) -> None:
    from training_plan.errors import PlanValidationError

    text = (
        "title: dp\npreprocessing: {input_size: 32}\n"
        + (extra if "model:" in extra else "model: {name: resnet10}\n")
        + (extra if "model:" not in extra else "")
        + ("federation: {rounds: 3, min_silos: 3}\n" if "federation" not in extra else "")
    )
    privacy = (
        "privacy: {target_epsilon: 1, noise_multiplier: 0.3}\n"
        if not extra
        else "privacy: {target_epsilon: 3}\n"
    )
    with pytest.raises(PlanValidationError, match=message):
        parse_plan(text + privacy)
