"""``flower-supernode`` with a short idle poll: the one place fedsilo changes it.

Flower 1.42's SuperNode main loop (``flwr.supernode.start_client_internal.start_client_internal``)
sleeps a hard-coded 3 s whenever the SuperLink had no message for it, and 0.5 s between checks
for a finished reply; neither is configurable. Every message of a round therefore waited 1.5 s on
average before the silo even saw it. ``python -m silo_client.supernode_launch ARGS`` runs the
unchanged ``flower-supernode ARGS`` with that module's ``time.sleep`` capped at
``FEDSILO_SUPERNODE_POLL_INTERVAL`` seconds (default 0.2; ``3`` restores Flower's behaviour).

Only the ``time`` name *inside that one module* is replaced; the patch applies to the Flower
version it was written for (:data:`WRITTEN_FOR`) and is skipped, with a warning, on any other
(the SuperNode then runs with Flower's own polling: slower, never broken).
"""

from __future__ import annotations

import os
import sys
import time
import types

WRITTEN_FOR = "1.42."
"""Flower release series whose ``start_client_internal`` this patch was read against."""
POLL_ENV = "FEDSILO_SUPERNODE_POLL_INTERVAL"
DEFAULT_POLL = 0.2


class SupernodeLaunchError(RuntimeError):
    """The poll interval setting is unusable."""


def poll_interval() -> float:
    """Seconds the SuperNode may sleep between polls, from FEDSILO_SUPERNODE_POLL_INTERVAL."""
    raw = os.environ.get(POLL_ENV, "").strip()
    if not raw:
        return DEFAULT_POLL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 60.0:
        raise SupernodeLaunchError(
            f"{POLL_ENV}={raw!r} is not a number of seconds between 0.01 and 60; "
            "unset it for fedsilo's default"
        )
    return value


def capped_time(cap: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never sleeps longer than ``cap``."""

    def sleep(seconds: float) -> None:
        time.sleep(min(float(seconds), cap))

    names = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
    names["sleep"] = sleep
    return types.SimpleNamespace(**names)


def shorten_supernode_poll(cap: float, version: str | None = None) -> bool:
    """Cap the sleeps of Flower's SuperNode loop at ``cap`` seconds; False (and nothing changed)
    when the installed Flower is not the version this was written for."""
    from flwr.supercore.version import package_version
    from flwr.supernode import start_client_internal as loop

    version = version or package_version
    if not version.startswith(WRITTEN_FOR) or not hasattr(loop, "time"):
        print(
            f"fedsilo: SuperNode poll left at Flower's default: written for flwr {WRITTEN_FOR}x, "
            f"found {version}",
            file=sys.stderr,
        )
        return False
    loop.time = capped_time(cap)
    return True


def main() -> int:
    """Run ``flower-supernode`` (arguments as given) with the shortened poll."""
    try:
        cap = poll_interval()
    except SupernodeLaunchError as exc:
        print(f"fedsilo: {exc}", file=sys.stderr)
        return 2
    shorten_supernode_poll(cap)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
