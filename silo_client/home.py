"""The silo's home folder: where its configuration, registered datasets, cache and logs live.

Layout (everything the silo keeps stays here; nothing here ever leaves the hospital)::

    <home>/silo.json          name of the site and its registered datasets
    <home>/cache/             preprocessed tensors, per (dataset version, preprocessing hash)
    <home>/secagg/            ephemeral secure-aggregation state, 0600, wiped every round
    <home>/logs/
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo_base.atomic_files import write_atomic
from fedsilo_base.home_folder import SILO_HOME
from silo_client.errors import SiloConfigError

CONFIG_FILE = "silo.json"


@dataclass
class SiloHome:
    """A silo's home folder and its configuration."""

    root: Path
    name: str
    datasets: dict[str, str] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        """Folder of preprocessed-tensor caches."""
        return self.root / "cache"

    @property
    def secagg_dir(self) -> Path:
        """Folder of per-round secure-aggregation state (wiped at the end of every round)."""
        return self.root / "secagg"

    @property
    def logs_dir(self) -> Path:
        """Folder of the silo's logs."""
        return self.root / "logs"

    def dataset_folder(self, name: str = "default") -> Path:
        """Folder of a registered dataset (DICOM under dicom/ plus labels.csv)."""
        try:
            return Path(self.datasets[name])
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise SiloConfigError(
                f"silo '{self.name}' has no dataset named '{name}' (registered: {known}); "
                f"register it with 'silo init --home {self.root} --dataset DIR'"
            ) from None

    def save(self) -> None:
        """Write silo.json atomically."""
        payload = {"name": self.name, "datasets": self.datasets}
        write_atomic(self.root / CONFIG_FILE, json.dumps(payload, indent=2).encode(), mode=0o644)

    @classmethod
    def open(cls, root: Path | str) -> SiloHome:
        """Open an existing silo home; a missing or broken one is a SiloConfigError."""
        root = Path(root).expanduser()
        config = root / CONFIG_FILE
        if not config.is_file():
            raise SiloConfigError(SILO_HOME.missing_message(root, CONFIG_FILE))
        try:
            payload = json.loads(config.read_text())
            name = str(payload["name"])
            datasets = {str(k): str(v) for k, v in dict(payload.get("datasets", {})).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise SiloConfigError(
                f"{config} is damaged ({exc}); restore it or run 'silo init'"
            ) from None
        return cls(root=root, name=name, datasets=datasets)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiloHome:
        """Open the home named by the SuperNode's node-config key ``home``."""
        home = node_config.get("home") or os.environ.get(SILO_HOME.envvar)
        if not home:
            raise SiloConfigError(
                "the SuperNode was started without a silo home: pass "
                f"--node-config 'home=\"/path/to/silo-home\"' (or set {SILO_HOME.envvar})"
            )
        return cls.open(str(home))


def init_silo_home(root: Path | str, name: str, dataset: Path | str | None = None) -> SiloHome:
    """Create (or update) a silo home; an existing dataset registration is kept.

    The name is checked first, so a name the consortium would refuse writes nothing here.
    """
    from secure_agg.errors import SecureAggError
    from secure_agg.keys import check_name

    try:
        check_name(name)
    except SecureAggError as exc:
        raise SiloConfigError(
            f"{exc}; this is the name the consortium will know the hospital by (--name)"
        ) from None
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        home = SiloHome.open(root)
        home.name = name
    except SiloConfigError:
        home = SiloHome(root=root, name=name)
    if dataset is not None:
        home.datasets["default"] = str(Path(dataset).expanduser().resolve())
    for folder in (home.cache_dir, home.secagg_dir, home.logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    os.chmod(home.secagg_dir, 0o700)
    home.save()
    return home
