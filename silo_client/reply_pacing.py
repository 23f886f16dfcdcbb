"""When a silo sends its masked upload: on a coarse grid of times, not when training ends.

The mask stage trains (or evaluates) and then replies. Its reply leaves the silo at a time
the server sees (Flower's reply metadata carries ``created_at``; the SuperLink sees the push)
and training time grows with the example count, which secure aggregation otherwise hides.
So the silo holds its reply until the next point of a geometric grid measured from the moment
the stage started: ``base * ratio^k`` seconds, the first one not before the work is done. The
server then learns only which interval ``[base * ratio^(k-1), base * ratio^k)`` the work fell
in (with ratio 2: the training time to within a factor of 2, i.e. roughly the order of
magnitude of the example count), instead of the time to the millisecond. It costs at most
``ratio - 1`` of the stage's time (with ratio 2, up to doubling it). Hiding the interval too
would mean padding every silo to a public worst-case time; see docs/secure_agg.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

PACE_BASE_SECONDS = 0.5
"""First grid point: work shorter than this is sent at this time."""
PACE_RATIO = 2.0
"""Grid points grow by this factor."""


def paced_seconds(
    elapsed: float, base: float = PACE_BASE_SECONDS, ratio: float = PACE_RATIO
) -> float:
    """The first grid point ``base * ratio^k`` (k >= 0) at or after ``elapsed`` seconds."""
    if not (base > 0 and ratio > 1 and math.isfinite(elapsed)):
        raise ValueError(f"pacing needs base > 0, ratio > 1, finite elapsed: {base}, {ratio}")
    if elapsed <= base:
        return base
    k = math.ceil(math.log(elapsed / base, ratio) - 1e-12)
    point = base * ratio**k
    return point if point >= elapsed else base * ratio ** (k + 1)


def hold_until_grid_point(
    started: float,
    *,
    base: float = PACE_BASE_SECONDS,
    ratio: float = PACE_RATIO,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Sleep until the grid point after the work begun at ``started`` (a ``clock`` reading);
    return the paced duration."""
    target = paced_seconds(clock() - started, base, ratio)
    while (left := started + target - clock()) > 0:
        sleep(left)
    return target
