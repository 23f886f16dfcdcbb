"""Canonical SHA-256 hash of a plan: what a silo approves, and what every round is bound to."""

from __future__ import annotations

import hashlib
import json

from training_plan.schema import TrainingPlan


def canonical_json(plan: TrainingPlan) -> bytes:
    """The plan as canonical JSON: every field (defaults made explicit), sorted keys, no spaces.

    Two YAML files that mean the same plan (key order, comments, omitted defaults) give the same
    bytes, and so the same hash.
    """
    data = plan.model_dump(mode="json")
    if data.get("privacy") is None:
        # plans without a privacy section keep the hash they had before the section existed
        data.pop("privacy", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def plan_hash(plan: TrainingPlan) -> str:
    """Hex SHA-256 of the canonical JSON of the plan."""
    return hashlib.sha256(canonical_json(plan)).hexdigest()
