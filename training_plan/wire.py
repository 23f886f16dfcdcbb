"""Names on the wire between the consortium's ServerApp and the silos' ClientApp.

Both sides import these constants (training_plan is the contract both depend on), so a renamed key
is a compile-time change on both ends, never a silent mismatch.
"""

from __future__ import annotations

ARRAYS = "arrays"
"""ArrayRecord: the global model (server -> silo) or the update d = w_local - w_global."""
SCAFFOLD_CONTROL = "scaffold-control"
"""SCAFFOLD only: the second array of the ArrayRecord next to MODEL, laid out like it. Server ->
silo: the global control variate c; silo -> server: the silo's change of its own control variate
(delta c_i), masked in the same vector as the model update. See silo_client/scaffold.py."""
CONFIG = "config"
"""ConfigRecord with the run's binding: plan, plan hash, run id, round."""
METRICS = "metrics"
"""MetricRecord of a reply."""

PLAN_JSON = "plan-json"
PLAN_HASH = "plan-hash"
RUN_ID = "fedsilo-run-id"
ROUND = "server-round"
PHASE = "phase"
"""'train', 'validation' each round, 'test' once after the last round (for logs)."""
SPLIT = "eval-split"
"""Which local split an evaluate message asks for: 'validation' (each round) or 'test' (once,
after the last round). Silos refuse any other value; absent means 'validation'."""
COUNTER = "sum-"
"""Prefix of the evaluation counters in a PLAIN evaluate reply (``sum-true_pos``, ...; names in
training_plan.metrics). Under secure aggregation they ride in the masked vector instead."""

NUM_EXAMPLES = "num-examples"
"""The weight of a reply; Flower's strategies read it under this key."""

# Error codes of refusal replies (Flower's own codes are small integers; ours start at 4000).
ERROR_REFUSED = 4001
"""The silo refuses the plan (unknown, altered, out of policy); it loaded no data."""
ERROR_DATA = 4002
"""The silo cannot use its local data (missing, empty, unlabeled)."""
ERROR_CONFIG = 4003
"""The silo's home or SuperNode configuration is wrong."""
ERROR_SECURE_AGG = 4004
"""The silo aborted secure aggregation (a protocol check failed)."""
ERROR_INTERNAL = 4099
"""Anything else; details stay in the silo's own log."""

MODEL = "model"
"""The one array of an ArrayRecord on the wire: every float tensor of the network, concatenated.

Flower sends each Array of a record as its own object; a MONAI network has hundreds of tensors,
and one flat vector crosses the SuperLink several times faster. Both sides derive the layout
(order and shapes) from the plan's network, so only the vector travels.
"""


def pack(arrays: dict, layout: list[tuple[str, tuple[int, ...]]] | None = None):
    """Concatenate named float arrays (layout order, default dict order) into one vector."""
    import numpy as np

    keys = [k for k, _ in layout] if layout is not None else list(arrays)
    if not keys:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in keys])


def unpack(vector, layout: list[tuple[str, tuple[int, ...]]]) -> dict:
    """Split a flat vector back into named arrays; raises ValueError when the sizes differ."""
    import numpy as np

    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
    if int(vector.size) != sum(sizes):
        raise ValueError(f"model vector has {vector.size} values, the network has {sum(sizes)}")
    out, start = {}, 0
    for (key, shape), size in zip(layout, sizes, strict=True):
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out
