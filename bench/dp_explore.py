"""Try settings of bench/accuracy.py's DP arm, judged on the silos' VALIDATION splits only.

    python bench/dp_explore.py WORKDIR CANDIDATE [CANDIDATE ...]

    CANDIDATE = NAME=OPTIMIZER:LEARNING_RATE:SAMPLING_RATE:EPSILON[:WIDEN[:STRATEGY[:EPOCHS]]]
    e.g. A=adam:0.001:0.25:8  or  M=adam:0.003:0.25:8:0.0625:fedavg:6

Builds the bench's classification setup once (the demo's hospitals, seed 0, in WORKDIR, which
must not exist), then runs the secure federated arm with patient-level DP-SGD for each
candidate (defaults: width 0.375, FedAvgM as the bench, 2 local epochs) and prints its AUC on
the 94 pooled validation images of the three silos, never on the test set. This is how the DP
candidates in docs/measurements.md were judged; a driver around the bench's functions, not a
measurement of its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULTS = ["0.375", "fedavgm", "2"]


def candidate_plan(base: dict[str, Any], fields: list[str]) -> Any:
    """The bench's secure plan with one candidate's DP settings."""
    from training_plan import TrainingPlan

    optimizer, lr, rate, epsilon = fields[:4]
    widen, strategy, epochs = (fields[4:] + DEFAULTS[len(fields) - 4 :])[:3]
    base = dict(base)
    model_args = {**base["model"]["args"], "widen_factor": float(widen)}
    base["model"] = {**base["model"], "args": model_args}
    base["training"] = {
        **base["training"],
        "optimizer": optimizer,
        "learning_rate": float(lr),
        "local_epochs": int(epochs),
    }
    if strategy != "fedavgm":
        base["federation"] = {**base["federation"], "strategy": strategy, "strategy_args": {}}
    base["privacy"] = {
        "target_epsilon": float(epsilon),
        "target_delta": 1e-5,
        "sampling_rate": float(rate),
    }
    return TrainingPlan.model_validate(base)


def main(argv: list[str]) -> int:
    """Prepare once, then run and score every candidate."""
    import torch

    from bench.accuracy import (
        TASK_DEFAULTS,
        BenchConfig,
        arm_federated_dp,
        prepare_classification,
    )
    from fedsilo.local_consortium import approve_everywhere, score_arrays
    from silo_client.local_data import load_local_data

    work = Path(argv[0])
    cfg = BenchConfig(task="classification", threads=2, **TASK_DEFAULTS["classification"])
    setup = prepare_classification(cfg, work)
    splits = [load_local_data(home, setup.plan) for home in setup.homes]
    images = torch.cat([s.val_images for s in splits])
    labels = torch.cat([s.val_labels for s in splits])
    print(f"validation images: {len(labels)}", flush=True)

    def on_validation(plan: Any, arrays: dict) -> dict[str, float]:
        score = score_arrays(plan, arrays, images, labels)
        return {"auc": score.auc, "accuracy": score.accuracy, "loss": score.loss}

    setup.score = on_validation
    for candidate in argv[1:]:
        name, spec = candidate.split("=", 1)
        plan = candidate_plan(setup.plan.model_dump(), spec.split(":"))
        approve_everywhere(setup.homes, [plan], work)
        epsilon = plan.privacy.target_epsilon
        setup.dp_plans[epsilon] = plan
        started = time.monotonic()
        metrics = arm_federated_dp(setup, epsilon).metrics
        shown = {k: round(v, 3) for k, v in metrics.items()}
        print(f"{name} {spec} validation {shown} {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
