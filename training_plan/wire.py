"""Names on the wire between the consortium's ServerApp and the silos' ClientApp.

Both sides import these constants (training_plan is the contract both depend on), so a renamed key
is a compile-time change on both ends, never a silent mismatch.
"""

from __future__ import annotations

ARRAYS = "arrays"
"""ArrayRecord: global model (server -> silo) or the update d = w_local - w_global (silo -> server)."""
CONFIG = "config"
"""ConfigRecord with the run's binding: plan, plan hash, run id, round."""
METRICS = "metrics"
"""MetricRecord of a reply."""

PLAN_JSON = "plan-json"
PLAN_HASH = "plan-hash"
RUN_ID = "fedsilo-run-id"
ROUND = "server-round"
PHASE = "phase"
"""'validation' each round, 'final' after the last round."""

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
