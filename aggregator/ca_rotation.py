"""Staged rotation of the consortium CA: begin, switch, finish. Never a surprise for a silo.

1. ``begin``: a new CA is made in ``pki/next/``; every join bundle carries BOTH CA certificates
   (old first), so a silo that runs ``silo join`` trusts either. The SuperLink keeps its
   certificate from the old CA: nothing breaks for silos that have not joined yet.
2. ``switch``: the SuperLink certificate is reissued under the new CA (restart
   ``aggregator start``). Silos with the two-CA bundle go on; a silo still on the old bundle
   now fails TLS with "not signed by the consortium CA" until it runs ``silo join``.
3. ``finish``: the new CA becomes ``pki/ca.pem``; the old one moves to ``pki/retired/``;
   bundles carry only the new CA, and members run ``silo join`` once more.

Each stage refuses when called out of order, with the one step to run instead. The stage lives
in ``pki/rotation.json``; ``aggregator doctor`` reports it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass

from aggregator.consortium_home import ConsortiumError, ConsortiumHome, now_iso
from aggregator.join_bundle import write_all_bundles
from aggregator.pki import (
    certificate_fingerprint,
    create_ca,
    issue_server_certificate,
    load_certificate,
    superlink_hosts,
)
from fedsilo_base.atomic_files import PUBLIC, write_atomic

STAGES = ("begun", "switched")
NEXT_STEP = {
    None: "'aggregator rotate-ca begin'",
    "begun": "'aggregator rotate-ca switch' once every member has run 'silo join' with its "
    "two-CA bundle",
    "switched": "'aggregator rotate-ca finish' once the SuperLink serves the new certificate "
    "(restart 'aggregator start')",
}


@dataclass(frozen=True)
class RotationStep:
    """What a stage did: the new stage, the bundles refreshed, what silos and operator do next."""

    stage: str
    bundles: int
    silos_do: str
    operator_next: str


def _refuse(home: ConsortiumHome, wanted: str | None, command: str) -> dict | None:
    rotation = home.rotation()
    stage = rotation["stage"] if rotation else None
    if stage == wanted:
        return rotation
    now = "no CA rotation is in progress" if stage is None else f"the CA rotation is at '{stage}'"
    raise ConsortiumError(
        f"'aggregator rotate-ca {command}' refused: {now}; next step is {NEXT_STEP[stage]}"
    )


def _save(home: ConsortiumHome, record: dict) -> None:
    write_atomic(home.rotation_path, (json.dumps(record, indent=2) + "\n").encode(), mode=PUBLIC)


def begin(home: ConsortiumHome, days: int = 3650) -> RotationStep:
    """Stage 1: make the new CA; bundles carry old + new; the SuperLink keeps the old chain."""
    _refuse(home, None, "begin")
    if home.next_ca_cert.exists() or home.next_ca_key.exists():
        raise ConsortiumError(
            f"{home.next_ca_dir} holds a CA but no rotation is recorded; move it away (it is "
            f"the left-over of an interrupted 'rotate-ca begin'), then run begin again"
        )
    home.next_ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(home.next_ca_dir, 0o700)
    create_ca(home.next_ca_dir, home.name, days=days, overwrite=False)
    _save(
        home,
        {
            "stage": "begun",
            "began": now_iso(),
            "old_ca_fingerprint": certificate_fingerprint(load_certificate(home.ca_cert)),
            "new_ca_fingerprint": certificate_fingerprint(load_certificate(home.next_ca_cert)),
        },
    )
    bundles = write_all_bundles(home)
    return RotationStep(
        "begun",
        len(bundles),
        "each member runs 'silo join' with its refreshed bundle (it now trusts the old and "
        "the new CA)",
        NEXT_STEP["begun"],
    )


def switch(home: ConsortiumHome, days: int = 397) -> RotationStep:
    """Stage 2: reissue the SuperLink certificate under the new CA."""
    rotation = _refuse(home, "begun", "switch")
    assert rotation is not None
    issue_server_certificate(
        home.pki_dir, home.next_ca_cert, home.next_ca_key, superlink_hosts(home.address), days=days
    )
    rotation.update(stage="switched", switched=now_iso())
    _save(home, rotation)
    bundles = write_all_bundles(home)
    return RotationStep(
        "switched",
        len(bundles),
        "nothing for members that ran 'silo join' after begin; any other member now fails TLS "
        "('not signed by the consortium CA') and runs 'silo join' with its bundle",
        "restart 'aggregator start' so the SuperLink serves the new certificate; when every "
        "member runs on it, 'aggregator rotate-ca finish'",
    )


def finish(home: ConsortiumHome) -> RotationStep:
    """Stage 3: the new CA becomes the CA; the old one is retired; bundles carry only the new."""
    _refuse(home, "switched", "finish")
    retired = home.pki_dir / "retired"
    retired.mkdir(exist_ok=True)
    os.chmod(retired, 0o700)
    # resumable: each move happens once; a re-run after a crash completes the rest
    if home.next_ca_cert.exists():
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        shutil.copy2(home.ca_cert, retired / f"ca-{stamp}.pem")
        shutil.copy2(home.ca_key, retired / f"ca-{stamp}.key")  # keeps 0600
        os.replace(home.next_ca_cert, home.ca_cert)
    if home.next_ca_key.exists():
        os.replace(home.next_ca_key, home.ca_key)
    home.rotation_path.unlink()
    home.next_ca_dir.rmdir()
    bundles = write_all_bundles(home)
    return RotationStep(
        "finished",
        len(bundles),
        "each member runs 'silo join' with its refreshed bundle (the old CA is dropped)",
        f"the old CA is in {retired}; destroy its key once no silo needs it",
    )


def rotation_status(home: ConsortiumHome) -> tuple[bool, str]:
    """(ok, one line) for doctor: the rotation stage and the next step."""
    try:
        rotation = home.rotation()
    except ConsortiumError as exc:
        return False, str(exc)
    if rotation is None:
        return True, "no CA rotation in progress"
    stage = rotation["stage"]
    since = rotation.get("switched" if stage == "switched" else "began", "?")
    number = STAGES.index(stage) + 1
    line = f"CA rotation at stage {number}/3 '{stage}' since {since}; next: {NEXT_STEP[stage]}"
    return True, line
