"""``flower-supernode`` with short waits: the one place fedsilo changes the SuperNode's loop.

Flower 1.42's SuperNode main loop (``flwr.supernode.start_client_internal.start_client_internal``)
sleeps a hard-coded 3 s whenever the SuperLink had no message for it, and 0.5 s between checks
of its own in-memory state for a finished reply (and for a reply's objects); none of it is
configurable. Every message of a round therefore waited 1.5 s on average before the silo even
saw it, and every reply up to 0.5 s before it left. ``python -m silo_client.supernode_launch
ARGS`` runs the unchanged ``flower-supernode ARGS`` with that module's ``time.sleep`` replaced
by a :class:`Pacer`:

- the idle poll of the SuperLink starts at 0.02 s after each message (the next message of a
  round follows within a second) and grows 1.5x per empty poll up to
  ``FEDSILO_SUPERNODE_POLL_INTERVAL`` seconds (default 0.2; ``3`` restores Flower's behaviour,
  and with it every other Flower wait): a busy round is followed closely, an idle silo asks the
  SuperLink five times a second;
- the local waits (Flower's 0.5 s) take 0.01 s: they only read the SuperNode's own state.

Only the ``time`` and ``_pull_and_store_message`` names *inside that one module* are replaced;
the patch applies to the Flower version it was written for (:data:`WRITTEN_FOR`) and is skipped,
with a warning, on any other (the SuperNode then runs with Flower's own polling: slower, never
broken).
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
FIRST_IDLE_POLL = 0.02
"""Seconds of the first idle poll after a message; each empty poll waits 1.5x longer."""
LOCAL_WAIT = 0.01
"""Seconds between checks of the SuperNode's own state (Flower 1.42: 0.5)."""
IDLE_SLEEP_AT_LEAST = 1.0
"""Flower's sleeps of this length or more are its idle poll (3 s); shorter ones are local."""


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


class Pacer:
    """Replaces the sleeps of Flower's SuperNode loop (see the module's docstring).

    ``cap`` is the longest idle poll; with ``cap >= 3`` every sleep is Flower's own.
    """

    def __init__(self, cap: float) -> None:
        self.cap = float(cap)
        self.next_idle = min(FIRST_IDLE_POLL, self.cap)

    def activity(self) -> None:
        """A message arrived: poll closely again for the next one."""
        self.next_idle = min(FIRST_IDLE_POLL, self.cap)

    def seconds(self, asked: float) -> float:
        """How long to sleep when Flower asks for ``asked`` seconds."""
        asked = float(asked)
        if self.cap >= 3.0:
            return asked
        if asked < IDLE_SLEEP_AT_LEAST:
            return min(asked, LOCAL_WAIT)
        wait = self.next_idle
        self.next_idle = min(self.cap, self.next_idle * 1.5)
        return min(asked, wait)

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` for Flower's loop module."""
        time.sleep(self.seconds(seconds))

    def time_module(self) -> types.SimpleNamespace:
        """A stand-in for the ``time`` module whose ``sleep`` is :meth:`sleep`."""
        names = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
        names["sleep"] = self.sleep
        return types.SimpleNamespace(**names)


def shorten_supernode_poll(cap: float, version: str | None = None) -> Pacer | None:
    """Pace the sleeps of Flower's SuperNode loop (idle polls up to ``cap`` seconds); None (and
    nothing changed) when the installed Flower is not the version this was written for."""
    from flwr.supercore.version import package_version
    from flwr.supernode import start_client_internal as loop

    version = version or package_version
    pull = getattr(loop, "_pull_and_store_message", None)
    if not version.startswith(WRITTEN_FOR) or not hasattr(loop, "time") or pull is None:
        print(
            f"fedsilo: SuperNode poll left at Flower's default: written for flwr {WRITTEN_FOR}x, "
            f"found {version}",
            file=sys.stderr,
        )
        return None
    pacer = Pacer(cap)

    def pull_and_store_message(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pacer.activity()
        return run_id

    loop.time = pacer.time_module()
    loop._pull_and_store_message = pull_and_store_message
    return pacer


def main() -> int:
    """Run ``flower-supernode`` (arguments as given) with fedsilo's waits."""
    from secure_agg.flower import object_pull_mode, shorten_object_pull_backoff

    try:
        cap = poll_interval()
        object_pull_mode()
    except (SupernodeLaunchError, ValueError) as exc:
        print(f"fedsilo: {exc}", file=sys.stderr)
        return 2
    shorten_supernode_poll(cap)
    shorten_object_pull_backoff()  # a message's objects are pulled again after 0.02 s, not 1 s
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
