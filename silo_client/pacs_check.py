"""`silo doctor`'s PACS echo: C-ECHO for a DIMSE source, a QIDO-RS ping for a DICOMweb source.

The PACS sources are the datasets registered with ``silo data add --dimse/--dicomweb`` (the
catalogue keeps the kind and the address or credential-free URL). Credentials are never stored,
so a DICOMweb ping uses ``FEDSILO_PACS_USER``/``FEDSILO_PACS_PASSWORD`` or ``FEDSILO_PACS_TOKEN``
from the environment when set. Each check returns ``(ok, one line)``: ok, or what to do.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from silo_client.data.pacs import PacsAuth

ECHO_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PacsSource:
    """One PACS a dataset is pulled from: kind (dimse or dicomweb) and address or URL."""

    kind: str
    address: str
    datasets: tuple[str, ...]


def pacs_sources(home_root: Path) -> list[PacsSource]:
    """The distinct PACS sources of the silo's registered datasets (none: empty list)."""
    from silo_client.data.catalogue import CATALOGUE_FILE, Catalogue

    if not (Path(home_root) / CATALOGUE_FILE).exists():  # no dataset yet: create nothing
        return []
    found: dict[tuple[str, str], list[str]] = {}
    with Catalogue.of_home(home_root) as catalogue:
        for record in catalogue.datasets():
            if record.source_kind in ("dimse", "dicomweb"):
                found.setdefault((record.source_kind, record.source), []).append(record.name)
    return [PacsSource(k, a, tuple(sorted(n))) for (k, a), n in sorted(found.items())]


def env_auth() -> PacsAuth:
    """DICOMweb credentials from the environment (the same variables `silo data add` reads)."""
    return PacsAuth(
        user=os.environ.get("FEDSILO_PACS_USER") or None,
        password=os.environ.get("FEDSILO_PACS_PASSWORD") or None,
        token=os.environ.get("FEDSILO_PACS_TOKEN") or None,
    )


def dimse_echo(address: str, aet: str = "FEDSILO", called_aet: str = "ORTHANC") -> tuple[bool, str]:
    """C-ECHO (Verification SOP class) to a DIMSE PACS at HOST:PORT."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        return False, f"PACS address {address!r} is not HOST:PORT; re-add the dataset"
    port = int(port_text)
    try:
        with socket.create_connection((host, port), timeout=ECHO_TIMEOUT_S):
            pass
    except OSError as exc:
        return False, (
            f"DIMSE PACS {address} unreachable ({exc.strerror or exc}); check that the PACS runs "
            f"and accepts DICOM connections from this machine"
        )
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT_S
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if assoc.is_rejected or assoc.is_aborted or not assoc.is_established:
        return False, (
            f"DIMSE PACS {address} refused the association (calling AE {aet}, called AE "
            f"{called_aet}); check both AE titles with the PACS administrators "
            f"(silo doctor --aet/--called-aet)"
        )
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        shown = "no answer" if code is None else f"status 0x{code:04X}"
        return False, f"DIMSE PACS {address} answered C-ECHO with {shown}; ask its administrators"
    return True, f"DIMSE PACS {address} answers C-ECHO (AE {called_aet})"


def dicomweb_ping(url: str, auth: PacsAuth | None = None) -> tuple[bool, str]:
    """QIDO-RS ``GET {url}/studies?limit=1``: the PACS answers the query API with credentials."""
    import requests

    auth = auth or env_auth()
    try:
        auth.check()
    except Exception as exc:  # DataError: incomplete credentials in the environment
        return False, f"DICOMweb credentials in the environment: {exc}"
    headers = {"Accept": "application/dicom+json"}
    basic = None
    if auth.token:
        headers["Authorization"] = f"Bearer {auth.token}"
    elif auth.user:
        basic = (auth.user, auth.password or "")
    try:
        with requests.Session() as session:
            session.trust_env = False  # a proxy in the environment must not see PACS traffic
            answer = session.get(
                f"{url.rstrip('/')}/studies",
                params={"limit": "1"},
                headers=headers,
                auth=basic,
                timeout=ECHO_TIMEOUT_S,
            )
    except requests.RequestException as exc:
        return False, (
            f"DICOMweb PACS {url} unreachable ({type(exc).__name__}); check the URL and that "
            f"the PACS accepts HTTP connections from this machine"
        )
    if answer.status_code in (401, 403):
        given = (
            "the credentials given were refused"
            if (auth.user or auth.token)
            else ("it needs credentials")
        )
        return False, (
            f"DICOMweb PACS {url} answers HTTP {answer.status_code}: {given}; set "
            f"FEDSILO_PACS_USER and FEDSILO_PACS_PASSWORD (or FEDSILO_PACS_TOKEN)"
        )
    if answer.status_code not in (200, 204):
        return False, (
            f"DICOMweb PACS {url} answers QIDO-RS with HTTP {answer.status_code}; check that the "
            f"URL is the DICOMweb root (e.g. .../dicom-web)"
        )
    return True, f"DICOMweb PACS {url} answers QIDO-RS"


def check_pacs(
    source: PacsSource, aet: str = "FEDSILO", called_aet: str = "ORTHANC"
) -> tuple[bool, str]:
    """Echo one PACS source; the line names the datasets that depend on it."""
    if source.kind == "dimse":
        ok, line = dimse_echo(source.address, aet, called_aet)
    else:
        ok, line = dicomweb_ping(source.address)
    return ok, f"{line} (datasets: {', '.join(source.datasets)})"
