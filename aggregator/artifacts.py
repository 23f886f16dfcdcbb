"""What a run leaves on the consortium's disk: per-round models, an event log, the final model.

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo_base.atomic_files import PRIVATE, atomic_path


def save_model(
    path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Save float arrays as safetensors, atomically."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_path(path, mode=PRIVATE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_model(path: Path) -> dict[str, np.ndarray]:
    """Load a safetensors model as float arrays."""
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


class EventLog:
    """Append-only JSON lines of what the run did, read by `fedsilo demo` to show progress.

    ``listeners`` (e.g. aggregator.tracking.RunTracking) get each event as written, after it is
    on disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        """Append one event with a timestamp; flushed and fsynced so readers see whole lines."""
        line = json.dumps({"event": event, "time": time.time(), **fields}, sort_keys=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for listener in self.listeners:
            listener(json.loads(line))


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events of a log (a partly written last line is ignored)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
