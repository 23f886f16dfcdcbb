"""A foreign ClientApp a tampered bundle points at. If a silo ever imported it, it would leave a
marker (only inside a silo's processes, recognised by their FLWR_HOME; `flwr run` may import it
on the submitting side to validate the bundle, which is not the silo)."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.clientapp import ClientApp

_home = os.environ.get("FLWR_HOME", "")
if "runner-" in _home or "supernode-" in _home:
    Path(os.environ.get("FEDSILO_E2E_MARKER", "/nonexistent/x")).write_text("ran at a silo")

app = ClientApp()
