"""The app-bundle check: a run's Flower app bundle (FAB) may carry configuration, never code.

fedsilo's runs ship a FAB holding only ``pyproject.toml`` (plus Flower's ``.info/CONTENT`` list),
whose components name the fedsilo apps the silo's IT installed. Anything else (an extra ``.py``,
a package that would shadow ``silo_client`` on ``sys.path``, a ``clientapp`` component pointing
elsewhere, dependencies to install) means the run wants to execute code the silo never installed:
``check_bundle`` refuses it. It only *reads* the zip; nothing in it is imported or installed.
"""

from __future__ import annotations

import io
import tomllib
import zipfile

from silo_client.errors import PlanRefused

CLIENTAPP = "silo_client.client_app:app"
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
ALLOWED_APP_KEYS = frozenset({"publisher", "components", "config", "federations"})


class BundleRefused(PlanRefused):
    """The run's app bundle carries code or components other than the installed fedsilo apps."""


def check_bundle(fab_content: bytes) -> dict:
    """Validate FAB bytes; returns the parsed pyproject, or raises BundleRefused (one line)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab_content))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError):
        raise BundleRefused("app bundle refused: it is not a Flower app bundle") from None
    extra = sorted(set(names) - ALLOWED_FILES)
    if extra:
        shown = ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else "")
        raise BundleRefused(
            f"app bundle refused: it carries files other than pyproject.toml ({shown}); this "
            "silo runs only the fedsilo apps its IT installed"
        )
    if "pyproject.toml" not in names:
        raise BundleRefused("app bundle refused: it has no pyproject.toml")
    try:
        config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        app = config["tool"]["flwr"]["app"]
        components = dict(app["components"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise BundleRefused("app bundle refused: its pyproject.toml names no Flower app") from None
    if components.get("clientapp") != CLIENTAPP:
        raise BundleRefused(
            f"app bundle refused: its clientapp is {components.get('clientapp')!r}, this silo "
            f"runs only {CLIENTAPP!r}"
        )
    unexpected = sorted(set(components) - {"clientapp", "serverapp"})
    if unexpected:
        # the serverapp runs at the consortium, not here: only the clientapp is ours to pin
        raise BundleRefused(f"app bundle refused: it declares other components {unexpected}")
    odd = sorted(set(app) - ALLOWED_APP_KEYS)
    if odd:
        raise BundleRefused(f"app bundle refused: unexpected [tool.flwr.app] keys {odd}")
    if config.get("project", {}).get("dependencies"):
        raise BundleRefused("app bundle refused: it asks for dependencies to be installed")
    return config
