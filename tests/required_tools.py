"""Tools some tests need beyond Python (Orthanc, chromium, systemd-analyze, node + schemas).

On a developer's machine a missing tool skips its tests with the command that installs it. In
CI (``CI`` set to true, as .ci/run does) a missing tool FAILS the run: CI that skips the PACS
tests passes without having tested the PACS.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when the tests run in CI (``CI=true``, ``1`` or ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def tool_missing(reason: str) -> NoReturn:
    """Skip (developer machine) or fail (CI) because a tool the test needs is not installed."""
    if in_ci():
        pytest.fail(f"{reason}; in CI every tool must be installed (.ci/run)", pytrace=False)
    pytest.skip(reason)
