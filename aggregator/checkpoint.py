"""Per-round checkpoints of a run, so that `aggregator resume RUN_DIR` continues where it stopped.

One checkpoint is one file, ``RUN_DIR/checkpoint.pkl``, replaced atomically after each finished
round: the global model (as sent on the wire), the Flower strategy's state (FedOpt's m_t, v_t and
current_arrays, FedAvgM's momentum, SCAFFOLD's control variate, ...), the round, the RNG states
(python, numpy, torch) and the run's round records. A readable ``checkpoint.json`` beside it
says which round it holds.

The pickle is the aggregator's own file on the aggregator's own disk (never received from a
silo); it is read only by `aggregator resume` on a run directory the operator names.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from aggregator.errors import AggregatorError
from fedsilo_base.atomic_files import PRIVATE, write_atomic

CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_INFO = "checkpoint.json"
FORMAT = 1


class CheckpointError(AggregatorError):
    """A run directory holds no usable checkpoint."""


@dataclass
class Checkpoint:
    """Everything needed to continue a run after its last finished round."""

    round: int
    run_id: str
    plan_hash: str
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    rng: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    format: int = FORMAT


# ------------------------------------------------------------------------------ strategy state
_ARRAYRECORD = "__arrayrecord__"


def _plain(value: Any) -> Any:
    """ArrayRecords become tagged dicts of numpy arrays; everything else is kept as is."""
    if isinstance(value, ArrayRecord):
        return {_ARRAYRECORD: {k: v.numpy().copy() for k, v in value.items()}}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _revive(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_ARRAYRECORD}:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in value[_ARRAYRECORD].items()})
    if isinstance(value, dict):
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy object's data attributes (hyperparameters and optimizer state).

    Callables (metric aggregation functions) are configuration the code rebuilds, not state.
    """
    state = {}
    for name, value in vars(strategy).items():
        if callable(value):
            continue
        state[name] = _plain(value)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put saved attributes back on a freshly built strategy of the same plan."""
    for name, value in state.items():
        setattr(strategy, name, _revive(value))


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch global RNG states."""
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().numpy().copy(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs back to a saved state."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))


# ------------------------------------------------------------------------------ files
def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint atomically (a crash leaves the previous one whole)."""
    run_dir = Path(run_dir)
    payload = pickle.dumps(asdict(checkpoint), protocol=pickle.HIGHEST_PROTOCOL)
    write_atomic(run_dir / CHECKPOINT, payload, mode=PRIVATE)
    info = {
        "round": checkpoint.round,
        "run_id": checkpoint.run_id,
        "plan_hash": checkpoint.plan_hash,
        "format": checkpoint.format,
    }
    write_atomic(
        run_dir / CHECKPOINT_INFO, (json.dumps(info, indent=2) + "\n").encode(), mode=PRIVATE
    )


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The run's last checkpoint; CheckpointError with what to do when there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise CheckpointError(
            f"{run_dir} holds no checkpoint ({CHECKPOINT}); a run writes one after each "
            "finished round, so this run finished none (start it again instead)"
        )
    try:
        data = pickle.loads(path.read_bytes())  # our own file, see module doc
        checkpoint = Checkpoint(**data)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from None
    if checkpoint.format != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.format}, not {FORMAT}")
    return checkpoint
