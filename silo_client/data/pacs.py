"""Pull a dataset from the hospital's PACS: DICOMweb (QIDO-RS + WADO-RS) or DIMSE (C-FIND + C-GET).

A pull lists the matching instances, skips those already in the dataset's managed folder
(so a re-run or an interrupted pull fetches only what is missing), retrieves the rest series
by series, and writes each instance atomically (temporary file, then rename) as
``<managed folder>/dicom/<digest of SOPInstanceUID>.dcm`` (no identifier in file names). The
ingest then catalogues those files like any folder.

Errors are one line with what, where and how to fix: wrong credentials, an unreachable PACS,
a rejected association, a query that matches nothing. Credentials are never stored or printed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydicom.datadict import tag_for_keyword

from silo_client.data.catalogue import Catalogue
from silo_client.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "PacsAuth",
    "dicomweb_puller",
    "dimse_puller",
    "instance_filename",
    "parse_query",
    "public_url",
]

_PAGE = 1000
_MAX_PAGES = 10_000  # bounds the QIDO paging loop (10 million instances)
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PacsAuth:
    """Credentials for DICOMweb: HTTP basic (user + password) or a bearer token."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    def check(self) -> None:
        """DataError when the combination is incomplete or ambiguous."""
        if self.token and (self.user or self.password):
            raise DataError("pass either --user/--password or --token, not both")
        if bool(self.user) != bool(self.password):
            raise DataError(
                "--user and --password go together (or set FEDSILO_PACS_PASSWORD); "
                "pass both, or --token"
            )


def public_url(url: str) -> str:
    """The URL without any user:password part (what the catalogue may record)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def parse_query(query: str) -> dict[str, str]:
    """``'Modality=CT&StudyDate=20200101-20241231'`` -> {keyword: value}; checks keywords."""
    out: dict[str, str] = {}
    for key, value in parse_qsl(query or "", keep_blank_values=True, strict_parsing=False):
        key = key.strip()
        if tag_for_keyword(key) is None:
            raise DataError(
                f"--query: {key!r} is not a DICOM attribute keyword; use e.g. "
                "'Modality=CT&StudyDate=20200101-20241231'"
            )
        out[key] = value.strip()
    return out


def instance_filename(sop_uid: str) -> str:
    """File name of a pulled instance: a digest, so no UID or PHI appears in paths."""
    return hashlib.sha256(f"fedsilo-sop\0{sop_uid}".encode()).hexdigest()[:32] + ".dcm"


def _write_atomic(dest: Path, name: str, data: bytes) -> None:
    partial = dest.parent / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=partial, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _missing(dest: Path, catalogue: Catalogue, name: str, sops: Iterable[str]) -> list[str]:
    have = set(catalogue.ok_sops(name))
    return [s for s in sops if s not in have and not (dest / instance_filename(s)).exists()]


# ---------------------------------------------------------------------------------- DICOMweb


def _http_error(exc: Exception, url: str) -> DataError:
    import requests

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return DataError(
                f"the PACS at {url} refused the credentials (HTTP {code}); check --user/--password "
                "or --token"
            )
        return DataError(
            f"the PACS at {url} answered HTTP {code} ({exc.response.reason}); check the DICOMweb "
            "URL (it usually ends in /dicom-web) and the query"
        )
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return DataError(
            f"cannot reach the PACS at {url} ({type(exc).__name__}); check the URL and that the "
            "PACS is running and reachable from this machine"
        )
    return DataError(f"DICOMweb request to {url} failed ({type(exc).__name__}: {exc})")


def _uid(item: dict[str, Any], tag: str) -> str | None:
    try:
        return str(item[tag]["Value"][0])
    except (KeyError, IndexError, TypeError):
        return None


def dicomweb_puller(
    url: str, auth: PacsAuth, query: str, dest: Path
) -> Callable[[Catalogue], int]:
    """A pull step for :func:`~silo_client.data.ingest.register_dataset` over DICOMweb.

    The returned callable lists matching instances (QIDO-RS, paged), retrieves the missing
    ones series by series (WADO-RS, original transfer syntax) into ``dest`` and returns
    how many it wrote.
    """
    auth.check()
    filters = parse_query(query)
    where = public_url(url)

    def pull(catalogue: Catalogue) -> int:
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.trust_env = False  # no proxies from the environment: talk to the PACS directly
        if auth.user:
            session.auth = (auth.user, auth.password or "")
        headers = {"Authorization": f"Bearer {auth.token}"} if auth.token else None
        client = DICOMwebClient(url=url, session=session, headers=headers, timeout=_TIMEOUT_S)
        dataset_name = _dataset_of(catalogue, dest)
        found: dict[str, tuple[str, str]] = {}
        try:
            for page in range(_MAX_PAGES):
                items = client.search_for_instances(
                    search_filters=dict(filters),
                    fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
                    limit=_PAGE,
                    offset=page * _PAGE,
                )
                for item in items:
                    sop = _uid(item, "00080018")
                    study, series = _uid(item, "0020000D"), _uid(item, "0020000E")
                    if sop and study and series:
                        found[sop] = (study, series)
                if len(items) < _PAGE:
                    break
            if not found:
                raise DataError(
                    f"the query {query or '(none)'!r} matched no instances on the PACS at "
                    f"{where}; widen --query or check the PACS holds the studies"
                )
            dest.mkdir(parents=True, exist_ok=True)
            missing = set(_missing(dest, catalogue, dataset_name, found))
            by_series: dict[tuple[str, str], list[str]] = {}
            for sop in sorted(missing):
                by_series.setdefault(found[sop], []).append(sop)
            written = 0
            media = (("application/dicom", "*"),)
            for study, series in sorted(by_series):
                for ds in client.iter_series(study, series, media_types=media):
                    sop = str(ds.get("SOPInstanceUID", ""))
                    if sop not in missing:
                        continue
                    _write_atomic(dest, instance_filename(sop), _encode(ds))
                    written += 1
            return written
        except DataError:
            raise
        except Exception as exc:
            raise _http_error(exc, where) from None

    return pull


def _encode(ds: Any) -> bytes:
    from io import BytesIO

    import pydicom

    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def _dataset_of(catalogue: Catalogue, dest: Path) -> str:
    """The dataset whose managed folder ``dest`` belongs to (``.../datasets/<name>/dicom``)."""
    return dest.parent.name


# ---------------------------------------------------------------------------------- DIMSE

_STORAGE_CLASSES = (
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "SecondaryCaptureImageStorage", "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage", "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage", "XRayAngiographicImageStorage",
    "PositronEmissionTomographyImageStorage", "NuclearMedicineImageStorage",
    "BasicTextSRStorage", "EnhancedSRStorage", "ComprehensiveSRStorage",
    "GrayscaleSoftcopyPresentationStateStorage", "KeyObjectSelectionDocumentStorage",
    "RTPlanStorage", "SegmentationStorage",
)  # fmt: skip


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise DataError(f"--dimse {address!r} is not HOST:PORT; pass e.g. --dimse pacs.local:104")
    return host, number


def dimse_puller(
    address: str, aet: str, called_aet: str, query: str, dest: Path
) -> Callable[[Catalogue], int]:
    """A pull step over DIMSE: C-FIND (study root, series then image level) and C-GET.

    Nagle's algorithm is turned off on the association socket (TCP_NODELAY): with it on, the
    small PDUs of each C-GET sub-operation wait for delayed ACKs and transfers crawl.
    """
    host, port = _split_address(address)
    filters = parse_query(query)

    def pull(catalogue: Catalogue) -> int:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
        from pynetdicom import sop_class as sc
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelFind as Find,
        )
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelGet as Get,
        )

        try:
            with socket.create_connection((host, port), timeout=5.0):
                pass
        except OSError as exc:
            raise DataError(
                f"cannot reach the PACS at {host}:{port} ({exc.strerror or exc}); check --dimse "
                "and that the PACS accepts DICOM connections from this machine"
            ) from None
        dataset_name = _dataset_of(catalogue, dest)
        dest.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
        ae.add_requested_context(Find)
        ae.add_requested_context(Get)
        roles = []
        for name in _STORAGE_CLASSES:
            uid = getattr(sc, name)
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES[:])
            roles.append(build_role(uid, scp_role=True))
        written = [0]
        wanted: set[str] = set()
        received: set[str] = set()
        where: dict[str, tuple[str, str]] = {}

        def on_store(event: Any) -> int:
            sop = str(event.request.AffectedSOPInstanceUID)
            if sop in wanted and sop not in received:
                _write_atomic(dest, instance_filename(sop), event.encoded_dataset())
                received.add(sop)
                written[0] += 1
            return 0x0000

        assoc = ae.associate(
            host, port, ae_title=called_aet, ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )  # fmt: skip
        if not assoc.is_established:
            raise DataError(
                f"the PACS at {host}:{port} refused the DICOM association (calling AE {aet!r}, "
                f"called AE {called_aet!r}); register our AE title on the PACS or fix --aet/"
                "--called-aet"
            )
        try:
            sock = assoc.dul.socket.socket if assoc.dul.socket else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keys = ["StudyInstanceUID", "SeriesInstanceUID"]
            series = _find(assoc, Find, "SERIES", filters, keys)
            if not series:
                raise DataError(
                    f"the query {query or '(none)'!r} matched no series on the PACS at "
                    f"{host}:{port}; widen --query or check the PACS holds the studies"
                )
            for item in series:
                study, ser = item["StudyInstanceUID"], item["SeriesInstanceUID"]
                images = _find(
                    assoc, Find, "IMAGE",
                    {"StudyInstanceUID": study, "SeriesInstanceUID": ser}, ["SOPInstanceUID"],
                )  # fmt: skip
                sops = [i["SOPInstanceUID"] for i in images if i.get("SOPInstanceUID")]
                missing = _missing(dest, catalogue, dataset_name, sops)
                if not missing:
                    continue
                wanted.update(missing)
                where.update(dict.fromkeys(missing, (study, ser)))
                if len(missing) == len(sops):
                    _get(assoc, Get, "SERIES", {"StudyInstanceUID": study,
                                                "SeriesInstanceUID": ser})  # fmt: skip
                else:
                    for sop in missing:
                        _get(assoc, Get, "IMAGE", {"StudyInstanceUID": study,
                                                   "SeriesInstanceUID": ser,
                                                   "SOPInstanceUID": sop})  # fmt: skip
            # A sub-operation the PACS reported as failed is asked for once more, one by one;
            # what still fails is fetched by the next 'silo data add' (it resumes).
            for sop in sorted(wanted - received):
                study, ser = where[sop]
                _get(assoc, Get, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": ser,
                                           "SOPInstanceUID": sop})  # fmt: skip
            left = len(wanted - received)
            if left:
                log.warning("%d instance(s) not retrieved; run 'silo data add' again", left)
        finally:
            assoc.release()
        return written[0]

    return pull


def _identifier(level: str, keys: dict[str, str], wanted: list[str]) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in wanted:
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(
    assoc: Any, model: Any, level: str, keys: dict[str, str], wanted: list[str]
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for status, ident in assoc.send_c_find(_identifier(level, keys, wanted), model):
        if status is None or "Status" not in status:
            raise DataError("the PACS stopped answering the C-FIND (timeout or abort); retry later")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and ident is not None:
            out.append({k: str(ident.get(k, "") or "") for k in wanted})
        elif code not in (0x0000, 0xFF00, 0xFF01):
            raise DataError(
                f"the PACS refused the C-FIND at {level} level (status 0x{code:04X}); "
                "check --query and the PACS's query permissions for our AE title"
            )
    return out


def _get(assoc: Any, model: Any, level: str, keys: dict[str, str]) -> None:
    for status, _ in assoc.send_c_get(_identifier(level, keys, []), model):
        if status is None or "Status" not in status:
            raise DataError(
                "the PACS stopped answering the C-GET (timeout or abort); run 'silo data add' "
                "again to fetch the rest"
            )
        code = int(status.Status)
        if code == 0xB000:
            log.debug("C-GET %s: %s sub-operation(s) failed", level,
                      status.get("NumberOfFailedSuboperations"))  # fmt: skip
        if code not in (0x0000, 0xFF00, 0xB000):
            raise DataError(
                f"the PACS refused the C-GET at {level} level (status 0x{code:04X}); check that "
                "it allows C-GET for our AE title"
            )
