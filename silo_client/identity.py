"""The silo's secure-aggregation identity: its Ed25519 key and its own pinned roster.

Layout in the silo home::

    <home>/identity/secagg_ed25519.pem   private identity key, 0600 (never leaves the silo)
    <home>/identity/roster.json          the consortium's silo names -> public keys, as this
                                         silo pinned them ('silo join'); the only keys it trusts

Missing or unusable files are a :class:`SiloConfigError` telling the operator what to run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from silo_client.errors import SiloConfigError

if TYPE_CHECKING:
    from secure_agg import IdentityKey, Roster
    from silo_client.home import SiloHome

IDENTITY_DIR = "identity"
KEY_FILE = "secagg_ed25519.pem"
ROSTER_FILE = "roster.json"


def identity_dir(home: SiloHome) -> Path:
    """Folder of the identity key and roster."""
    return Path(home.root) / IDENTITY_DIR


def key_path(home: SiloHome) -> Path:
    """Path of the silo's Ed25519 identity key."""
    return identity_dir(home) / KEY_FILE


def roster_path(home: SiloHome) -> Path:
    """Path of the silo's pinned roster."""
    return identity_dir(home) / ROSTER_FILE


def load_identity(home: SiloHome) -> IdentityKey:
    """The silo's identity key; SiloConfigError if it is missing, unreadable or too open."""
    from secure_agg import IdentityKey, SecureAggError

    path = key_path(home)
    if not path.is_file():
        raise SiloConfigError(
            f"silo '{home.name}' has no secure-aggregation identity key; run 'silo join' "
            f"on its home to create it and pin the consortium roster"
        )
    try:
        return IdentityKey.load(path)
    except (SecureAggError, ValueError, OSError) as exc:
        raise SiloConfigError(
            f"the identity key of silo '{home.name}' is unusable ({type(exc).__name__}); fix "
            f"its mode (0600) or run 'silo join' again"
        ) from None


def load_roster(home: SiloHome) -> Roster:
    """The silo's pinned roster; SiloConfigError if missing or damaged."""
    from secure_agg import Roster, SecureAggError

    path = roster_path(home)
    if not path.is_file():
        raise SiloConfigError(
            f"silo '{home.name}' has no consortium roster; run 'silo join' on its home with "
            f"the roster file the consortium distributed"
        )
    try:
        return Roster.load(path)
    except (SecureAggError, OSError) as exc:
        raise SiloConfigError(
            f"the roster of silo '{home.name}' is unusable ({type(exc).__name__}); run "
            f"'silo join' again"
        ) from None


def ensure_identity(home: SiloHome) -> IdentityKey:
    """Load the identity key, creating a fresh one (0600, in a 0700 folder) if there is none."""
    from secure_agg import IdentityKey

    path = key_path(home)
    if path.exists():
        return load_identity(home)
    folder = identity_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    key = IdentityKey.generate()
    key.save(path)
    return key


def save_roster(home: SiloHome, roster: Roster) -> Path:
    """Pin ``roster`` as this silo's roster (atomic write); returns its path."""
    path = roster_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    roster.save(path)
    return path
