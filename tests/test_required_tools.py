"""A tool the tests need skips its tests on a laptop and fails them in CI."""

from __future__ import annotations

import pytest

from tests.required_tools import in_ci, tool_missing


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE"])
def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="Orthanc not installed; in CI every tool"):
        tool_missing("Orthanc not installed")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_tool_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="Orthanc not installed"):
        tool_missing("Orthanc not installed")
