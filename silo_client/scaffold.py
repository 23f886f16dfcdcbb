"""SCAFFOLD on the silo (Karimireddy et al. 2020, "option II" control-variate update).

The server sends the global model w and the global control variate c (``wire.SCAFFOLD_CONTROL``,
laid out like the packed model). The silo keeps its own control variate c_i in its home, trains
with every gradient corrected to g - c_i + c, and then sets

    c_i+ = c_i - c + (w - y) / (lr * S)

where y is the trained model and S the number of SGD steps, counted as the distance SGD with the
plan's momentum travels under a constant gradient (S = K without momentum). It replies with
(y - w, c_i+ - c_i) under the two keys; under secure aggregation both are masked in the SAME
vector, so the server learns only the weighted mean of the control changes, never one silo's.

Only parameters get a control variate: the entries of float buffers (BatchNorm statistics) stay 0.

The control variate lives in ``<home>/scaffold/<run>.npz`` (0600, written atomically), keyed by
the consortium's run id and by round: training round r starts from the newest c_i of a round
before r, so a round the server retries (after a failed round or ``aggregator resume``) starts
from the same c_i as the first attempt. A missing or unreadable file (a new silo, a wiped home)
means c_i = 0, as at the start of a run; the server's c then no longer equals the mean of the
silos' c_i (see docs/training.md).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsilo_base.atomic_files import write_atomic
from silo_client.home import SiloHome
from silo_client.local_data import load_local_data
from silo_client.local_model import build_global_model, local_trainer, model_layout, silo_seed
from training_plan import TrainingPlan, wire
from training_plan.errors import PlanError

if TYPE_CHECKING:
    from silo_client.training import TrainResult

log = logging.getLogger("fedsilo.silo")

_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


def sgd_distance(steps: int, momentum: float) -> float:
    """How many learning rates SGD with ``momentum`` moves in ``steps`` steps of a constant
    gradient: sum over t = 1..steps of (1 - momentum^t) / (1 - momentum); ``steps`` without it."""
    if momentum == 0.0:
        return float(steps)
    return float(sum((1.0 - momentum**t) / (1.0 - momentum) for t in range(1, steps + 1)))


class ControlStore:
    """The silo's control variates of one run, by round (the newest two are kept)."""

    def __init__(self, home: SiloHome, run_id: str) -> None:
        if not run_id:
            raise PlanError("a SCAFFOLD round needs the run id the server sent; it sent none")
        name = run_id if _SAFE.match(run_id) else hashlib.sha256(run_id.encode()).hexdigest()[:24]
        self.path = Path(home.root) / "scaffold" / f"{name}.npz"

    def _read(self) -> dict[int, np.ndarray]:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return {int(key.removeprefix("round-")): data[key] for key in data.files}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("SCAFFOLD control variate store unreadable (%s); starting from zeros", exc)
            return {}

    def load(self, server_round: int, size: int) -> np.ndarray:
        """c_i as it stood before ``server_round`` (zeros when there is none that fits)."""
        earlier = {r: c for r, c in self._read().items() if r < server_round}
        if not earlier:
            return np.zeros(size, dtype=np.float32)
        newest = earlier[max(earlier)]
        if newest.shape != (size,) or newest.dtype != np.float32:
            log.warning("SCAFFOLD control variate does not fit the model; starting from zeros")
            return np.zeros(size, dtype=np.float32)
        return newest

    def save(self, server_round: int, control: np.ndarray) -> None:
        """Store c_i after ``server_round``; keep it and the newest earlier one, drop the rest."""
        kept = {r: c for r, c in self._read().items() if r < server_round}
        kept = {r: kept[r] for r in sorted(kept)[-1:]}
        kept[server_round] = np.asarray(control, dtype=np.float32)
        buf = io.BytesIO()
        np.savez(buf, **{f"round-{r}": c for r, c in kept.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)
        write_atomic(self.path, buf.getvalue(), mode=0o600)


def parameter_mask(model) -> np.ndarray:
    """True where the packed model vector holds a trainable parameter (not a float buffer)."""
    params = {name for name, p in model.named_parameters() if p.requires_grad}
    parts = [
        np.full(int(np.prod(shape, dtype=np.int64)), key in params, dtype=bool)
        for key, shape in model_layout(model)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _corrections(model, vector: np.ndarray) -> list:
    """A packed vector (c - c_i) as one tensor per ``model.parameters()`` entry."""
    import torch

    named = wire.unpack(vector, model_layout(model))
    return [torch.from_numpy(np.array(named[name])) for name, _ in model.named_parameters()]


def scaffold_round(
    home: SiloHome,
    plan: TrainingPlan,
    global_arrays: dict[str, np.ndarray],
    server_round: int,
    run_id: str,
) -> tuple[dict[str, np.ndarray], TrainResult]:
    """One SCAFFOLD round: train with corrected gradients; return (delta w, delta c_i)."""
    from silo_client.training import SGD_MOMENTUM, float_state, limit_threads

    if set(global_arrays) != {wire.MODEL, wire.SCAFFOLD_CONTROL}:
        raise PlanError(
            f"a SCAFFOLD round needs the arrays '{wire.MODEL}' and '{wire.SCAFFOLD_CONTROL}'; "
            f"the server sent {sorted(global_arrays)}"
        )
    weights = np.asarray(global_arrays[wire.MODEL], dtype=np.float32)
    control = np.asarray(global_arrays[wire.SCAFFOLD_CONTROL], dtype=np.float32)
    if control.shape != weights.shape:
        raise PlanError(
            f"the server's SCAFFOLD control variate has {control.size} values, the model "
            f"{weights.size}"
        )
    limit_threads()
    store = ControlStore(home, run_id)
    data = load_local_data(home, plan)
    model = build_global_model(plan, {wire.MODEL: weights})
    mine = store.load(server_round, weights.size)
    result = local_trainer(plan)(
        model,
        data.train_images,
        data.train_labels,
        plan.training,
        seed=silo_seed(plan, home.name, server_round),
        gradient_correction=_corrections(model, control - mine),
    )
    trained = wire.pack(float_state(model), model_layout(model))
    distance = plan.training.learning_rate * sgd_distance(result.steps, SGD_MOMENTUM)
    updated = np.where(
        parameter_mask(model), mine - control + (weights - trained) / distance, 0.0
    ).astype(np.float32)
    store.save(server_round, updated)
    log.info(
        "round %d: SCAFFOLD trained %d steps on %d examples, mean loss %.4f",
        server_round,
        result.steps,
        result.num_examples,
        result.mean_loss,
    )
    return {wire.MODEL: trained - weights, wire.SCAFFOLD_CONTROL: updated - mine}, result
