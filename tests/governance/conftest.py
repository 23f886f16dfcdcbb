"""tests/governance checks the real gate: undo the session-wide auto-approval of tests/conftest."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _real_governance_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    from silo_client.governance import enforcement

    real = getattr(enforcement.check_plan, "__wrapped__", enforcement.check_plan)
    monkeypatch.setattr(enforcement, "check_plan", real)
