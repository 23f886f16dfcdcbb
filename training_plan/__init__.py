"""The contract between researchers, the consortium and the silos: the training plan.

`load_plan` / `parse_plan` validate YAML, `plan_hash` gives the canonical hash silos approve,
`build_model` turns the plan's model entry into a MONAI network.
"""

from training_plan.errors import PlanError, PlanValidationError, UnknownModelError
from training_plan.hashing import canonical_json, plan_hash
from training_plan.loader import load_plan, parse_plan
from training_plan.schema import SCHEMA_VERSION, TrainingPlan

__all__ = [
    "SCHEMA_VERSION",
    "PlanError",
    "PlanValidationError",
    "TrainingPlan",
    "UnknownModelError",
    "canonical_json",
    "load_plan",
    "parse_plan",
    "plan_hash",
]
