"""Join bundles: what the consortium sends each member after enrollment or a roster change.

Format ``fedsilo-join-bundle/1`` (JSON; the silo side reads the same documented schema without
importing this module; see docs/operators/consortium.md)::

    {"format": ..., "consortium": NAME, "superlink": "HOST:PORT", "ca_cert": PEM text (two
     certificates, old then new, while a CA rotation is in progress), "ca_fingerprint": of the
     first, "ca_fingerprints": [of each], "ca_rotation": null | "begun" | "switched",
     "roster": <roster JSON object>, "member": NAME,
     "members": {NAME: {"secagg_fingerprint": ..., "node_auth_fingerprint": ...}},
     "issued": ISO-8601}
"""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.consortium_home import ConsortiumHome, now_iso
from aggregator.pki import certificate_fingerprint, load_certificate
from fedsilo_base.atomic_files import PUBLIC, write_atomic

BUNDLE_FORMAT = "fedsilo-join-bundle/1"


def write_bundle(home: ConsortiumHome, member: str) -> Path:
    """Write the join bundle for member (CA cert, roster, SuperLink address)."""
    members = home.members()
    rotation = home.rotation()
    cas = [home.ca_cert, home.next_ca_cert] if rotation else [home.ca_cert]
    bundle = {
        "format": BUNDLE_FORMAT,
        "consortium": home.name,
        "superlink": home.address,
        # mid-rotation: both PEM certificates, old first; silos trust either
        "ca_cert": home.trust_pem(),
        "ca_fingerprint": certificate_fingerprint(load_certificate(home.ca_cert)),
        "ca_fingerprints": [certificate_fingerprint(load_certificate(p)) for p in cas],
        "ca_rotation": rotation["stage"] if rotation else None,
        "roster": json.loads(home.roster().to_json()),
        "member": member,
        "members": {
            name: {
                "secagg_fingerprint": rec["secagg_fingerprint"],
                "node_auth_fingerprint": rec["node_auth_fingerprint"],
            }
            for name, rec in sorted(members.items())
        },
        "issued": now_iso(),
    }
    path = home.bundles_dir / f"{member}.join.json"
    write_atomic(path, (json.dumps(bundle, indent=2) + "\n").encode(), mode=PUBLIC)
    return path

def write_all_bundles(home: ConsortiumHome) -> list[Path]:
    """Refresh every member's join bundle (after the roster changed)."""
    return [write_bundle(home, name) for name in sorted(home.members())]

