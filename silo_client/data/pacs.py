"""Pull a dataset from the hospital's PACS: DICOMweb (QIDO-RS + WADO-RS) or DIMSE (C-FIND + C-GET).

A pull lists the matching instances, skips those already in the dataset's managed folder
(so a re-run or an interrupted pull fetches only what is missing), retrieves the rest series
by series, and writes each instance atomically (temporary file, then rename) as
``<managed folder>/dicom/<digest of SOPInstanceUID>.dcm`` (no identifier in file names). The
ingest then catalogues those files like any folder.

Every listed instance is accounted for: what did not arrive is asked for once more, one by
one, and what is still missing is a DataError, never a silently short dataset.

Errors are one line with what, where and how to fix: wrong credentials, an unreachable PACS,
a rejected association, a query that matches nothing. Credentials are never stored or printed.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydicom.datadict import tag_for_keyword

from fedsilo_base.atomic_files import PRIVATE, write_atomic
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
_CHUNK = 1 << 16  # bytes read at a time from a WADO-RS answer
# Concurrent WADO-RS requests: enough to hide the PACS's per-request latency (a series of one
# instance, as CR/DX often are, is one request), few enough not to crowd a hospital's PACS.
_WADO_WORKERS = 3


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
    # half-received instances wait in .partial/, outside the folder the ingest scans
    write_atomic(dest / name, data, mode=PRIVATE, staging_dir=dest.parent / ".partial")


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


def _session(auth: PacsAuth) -> Any:
    import requests

    session = requests.Session()
    session.trust_env = False  # no proxies from the environment: talk to the PACS directly
    if auth.user:
        session.auth = (auth.user, auth.password or "")
    if auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    return session


def _multipart_parts(response: Any) -> Iterator[bytes]:
    """The bodies of a ``multipart/related`` answer, as they arrive (one part in memory)."""
    content_type = response.headers.get("content-type", "")
    media, *params = [p.strip() for p in content_type.split(";")]
    boundary = next(
        (v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)
         if k.strip().lower() == "boundary"),
        None,
    )  # fmt: skip
    if media.lower() != "multipart/related" or not boundary:
        raise DataError(
            f"the PACS answered a WADO-RS retrieve with {content_type or 'no content type'!r}, "
            "not multipart/related; check that the URL is the PACS's DICOMweb root"
        )
    delimiter = b"\r\n--" + boundary.encode()
    buf = bytearray(b"\r\n")  # so the first boundary line matches the delimiter too
    first, search = True, 0
    for chunk in response.iter_content(chunk_size=_CHUNK):
        buf += chunk
        while (at := buf.find(delimiter, search)) >= 0:
            part = bytes(buf[:at])
            del buf[: at + len(delimiter)]
            search = 0
            if first:  # the preamble before the first boundary
                first = False
                continue
            head_end = part.find(b"\r\n\r\n")
            if head_end >= 0:
                yield part[head_end + 4 :]
        search = max(0, len(buf) - len(delimiter) + 1)
    # whatever follows the closing delimiter ('--' and an epilogue) is not a part


def _sop_of(part: bytes) -> str:
    """SOPInstanceUID of a retrieved instance, read from its header only."""
    import pydicom

    ds = pydicom.dcmread(
        BytesIO(part), force=True, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
    )
    return str(ds.get("SOPInstanceUID", "") or "")


def dicomweb_puller(
    url: str, auth: PacsAuth, query: str, dest: Path, workers: int = _WADO_WORKERS
) -> Callable[[Catalogue], int]:
    """A pull step for :func:`~silo_client.data.ingest.register_dataset` over DICOMweb.

    The returned callable lists matching instances (QIDO-RS, paged), retrieves the missing
    ones (WADO-RS, original transfer syntax, ``workers`` requests at once: whole series, or
    single instances where most of a series is already here) into ``dest`` as the bytes
    arrive (no decode and re-encode) and returns how many it wrote. Every listed instance is
    accounted for: what a first pass did not deliver is asked for once more, one by one, and
    what is still missing is a DataError (the files written are kept; a re-run resumes).
    """
    auth.check()
    filters = parse_query(query)
    where = public_url(url)
    base = url.rstrip("/")

    def pull(catalogue: Catalogue) -> int:
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(url=url, session=_session(auth), timeout=_TIMEOUT_S)
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
            if not missing:
                return 0
            in_series: dict[tuple[str, str], list[str]] = {}
            for sop, key in found.items():
                in_series.setdefault(key, []).append(sop)
            jobs: list[tuple[str, set[str]]] = []
            for (study, series), sops in sorted(in_series.items()):
                todo = {s for s in sops if s in missing}
                # a whole series in one answer, unless most of it is already here
                if 2 * len(todo) >= len(sops):
                    jobs.append((f"{base}/studies/{study}/series/{series}", todo))
                else:
                    jobs.extend((_instance_url(base, study, series, s), {s}) for s in sorted(todo))
            written = _wado_fetch(jobs, auth, dest, workers)
            left = sorted(missing - written)
            if left:  # once more, one instance per request
                retry = [(_instance_url(base, *found[s], s), {s}) for s in left]
                written |= _wado_fetch(retry, auth, dest, workers)
            short = len(missing - written)
            if short:
                raise DataError(
                    f"the PACS at {where} listed {len(missing)} new instance(s) but delivered "
                    f"only {len(missing) - short} (asked twice); the files retrieved are kept: "
                    "run 'silo data add' again to fetch the rest, or check the PACS's log"
                )
            return len(written)
        except DataError:
            raise
        except Exception as exc:
            raise _http_error(exc, where) from None

    return pull


def _instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def _wado_fetch(
    jobs: list[tuple[str, set[str]]], auth: PacsAuth, dest: Path, workers: int
) -> set[str]:
    """Run WADO-RS retrieves (url, SOPs wanted from it) on a few threads; SOPs written.

    A few requests at once hide the PACS's per-request latency; each thread has its own
    HTTP session (requests' sessions are not thread-safe). The first error stops the rest.
    """
    local = threading.local()
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

    def fetch(url: str, wanted: set[str]) -> set[str]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = _session(auth)
        got: set[str] = set()
        with session.get(url, headers={"Accept": accept}, stream=True,
                         timeout=_TIMEOUT_S) as response:  # fmt: skip
            if response.status_code == 404:  # the QIDO-RS on this root answered: not a bad URL
                return got  # gone from the PACS since it was listed: counted as not delivered
            response.raise_for_status()
            for part in _multipart_parts(response):
                # an instance URL answers that one instance; a series answer is read for its UIDs
                sop = url.rsplit("/", 1)[-1] if "/instances/" in url else _sop_of(part)
                if sop in wanted and sop not in got:
                    _write_atomic(dest, instance_filename(sop), part)
                    got.add(sop)
        return got

    written: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch, url, wanted) for url, wanted in jobs]
        try:
            for future in as_completed(futures):
                written |= future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return written


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


class _ParkedReactor(threading.Event):
    """Stand-in for pynetdicom's reactor checkpoint that stays cleared until :meth:`free`.

    pynetdicom's association thread (the "reactor") polls for incoming DIMSE messages between
    our requests; each ``send_c_*`` pauses it first, but the pause can be seen as done while
    the reactor is already past its checkpoint, and it then takes the first answer off the
    queue and drops it ("Received unexpected C-FIND service message", pynetdicom issue #875).
    A C-FIND then silently misses its first match (here: a series, or the one instance of a
    series), so a pull came back a few instances short under CPU load. A pull only ever
    speaks first, so the reactor has nothing to do: it is parked for the whole association.
    """

    def set(self) -> None:
        """Ignored: ``send_c_*`` would restart the reactor after every request."""

    def free(self) -> None:
        """Let the reactor run again (so its thread ends with the association)."""
        super().set()


def _park_reactor(assoc: Any) -> _ParkedReactor | None:
    """Park ``assoc``'s reactor before any request is sent; None if pynetdicom changed shape."""
    if not hasattr(assoc, "_reactor_checkpoint") or not hasattr(assoc, "_is_paused"):
        return None  # the count checks in the pull still catch what goes missing
    parked = _ParkedReactor()
    assoc._reactor_checkpoint = parked
    # The reactor sets _is_paused just before it waits on the checkpoint; once it has set it
    # again after our reset, its next wait is on the parked event. Nothing is in flight yet.
    assoc._is_paused = False
    deadline = time.monotonic() + 5.0
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0005)
    return parked


@dataclass
class _GetOutcome:
    """What one C-GET did: the PACS's final counts and the instances that arrived."""

    status: int
    completed: int
    failed: int
    warning: int
    arrived: int
    failed_uids: list[str]


def dimse_puller(
    address: str, aet: str, called_aet: str, query: str, dest: Path
) -> Callable[[Catalogue], int]:
    """A pull step over DIMSE: C-FIND (study root, series then image level) and C-GET.

    Every instance is accounted for: the image-level C-FIND of a series is repeated when it
    lists fewer instances than the series-level answer's NumberOfSeriesRelatedInstances,
    each C-GET's final counts (completed, failed, warning) are compared with the C-STOREs
    that arrived, failed sub-operations are asked for once more one by one, and an instance
    still missing is a DataError (the files written are kept; a re-run resumes).

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
        catalogued = set(catalogue.ok_sops(dataset_name))
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
        ae.add_requested_context(Find)
        ae.add_requested_context(Get)
        roles = []
        for name in _STORAGE_CLASSES:
            uid = getattr(sc, name)
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES[:])
            roles.append(build_role(uid, scp_role=True))
        received: set[str] = set()
        stores = [0]  # C-STORE sub-operations answered during the current C-GET

        def have(sop: str) -> bool:
            return sop in received or sop in catalogued or (dest / instance_filename(sop)).exists()

        def on_store(event: Any) -> int:
            # Everything a C-GET of a matching series sends is wanted; what is already here
            # is acknowledged and not written again.
            stores[0] += 1
            sop = str(event.request.AffectedSOPInstanceUID)
            if not have(sop):
                _write_atomic(dest, instance_filename(sop), event.encoded_dataset())
                received.add(sop)
            return 0x0000

        def get(level: str, keys: dict[str, str]) -> _GetOutcome:
            stores[0] = 0
            outcome = _get(assoc, Get, level, keys)
            outcome.arrived = stores[0]
            if outcome.completed + outcome.warning > outcome.arrived:
                raise DataError(
                    f"the PACS at {host}:{port} reports {outcome.completed + outcome.warning} "
                    f"C-GET sub-operation(s) done at {level} level but {outcome.arrived} "
                    "instance(s) arrived; run 'silo data add' again, or check the PACS's log"
                )
            return outcome

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
        parked = _park_reactor(assoc)
        expected: dict[str, tuple[str, str]] = {}
        try:
            sock = assoc.dul.socket.socket if assoc.dul.socket else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keys = ["StudyInstanceUID", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"]
            series = _find(assoc, Find, "SERIES", filters, keys)
            if not series:
                raise DataError(
                    f"the query {query or '(none)'!r} matched no series on the PACS at "
                    f"{host}:{port}; widen --query or check the PACS holds the studies"
                )
            for item in series:
                study, ser = item["StudyInstanceUID"], item["SeriesInstanceUID"]
                uids = {"StudyInstanceUID": study, "SeriesInstanceUID": ser}
                count = _int_or_none(item.get("NumberOfSeriesRelatedInstances"))
                sops: set[str] = set()
                for _ in range(2):  # a listing shorter than the series' count is asked again
                    images = _find(assoc, Find, "IMAGE", uids, ["SOPInstanceUID"])
                    sops |= {i["SOPInstanceUID"] for i in images if i.get("SOPInstanceUID")}
                    if count is None or len(sops) >= count:
                        break
                expected.update(dict.fromkeys(sops, (study, ser)))
                missing = [s for s in sorted(sops) if not have(s)]
                # no count from the PACS: a series always holds an instance, so none listed
                # means the listing lost it
                listed_all = len(sops) >= count if count is not None else bool(sops)
                if not missing and listed_all:
                    continue
                if len(missing) == len(sops) or not listed_all:
                    outcome = get("SERIES", uids)
                    expected.update(dict.fromkeys(outcome.failed_uids, (study, ser)))
                else:
                    for sop in missing:
                        get("IMAGE", {**uids, "SOPInstanceUID": sop})
            # Failed sub-operations (and anything listed that did not arrive) are asked for
            # once more, one by one; what still fails is a loud error, never a short dataset.
            for sop in sorted(s for s in expected if not have(s)):
                study, ser = expected[sop]
                get("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": ser,
                              "SOPInstanceUID": sop})  # fmt: skip
            left = [s for s in expected if not have(s)]
            if left:
                raise DataError(
                    f"the PACS at {host}:{port} did not deliver {len(left)} of the "
                    f"{len(expected)} instance(s) it listed (C-GET sub-operations failed, "
                    "asked twice); the files retrieved are kept: run 'silo data add' again to "
                    "fetch the rest, or check the PACS's log"
                )
        finally:
            try:
                assoc.release()
            finally:
                if parked is not None:
                    parked.free()
        return len(received)

    return pull


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


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


def _get(assoc: Any, model: Any, level: str, keys: dict[str, str]) -> _GetOutcome:
    final: Any = None
    failed_uids: list[str] = []
    for status, ident in assoc.send_c_get(_identifier(level, keys, []), model):
        if status is None or "Status" not in status:
            raise DataError(
                "the PACS stopped answering the C-GET (timeout or abort); run 'silo data add' "
                "again to fetch the rest"
            )
        code = int(status.Status)
        if code == 0xFF00:
            continue
        # 0xB000: some sub-operations failed; 0xA702: all of them did; a failure status with
        # failed sub-operations (Orthanc stops at the first it cannot send): the counts are
        # kept and the missing instances retried. Anything else refuses the C-GET itself.
        failed = _int_or_none(status.get("NumberOfFailedSuboperations")) or 0
        if code not in (0x0000, 0xB000, 0xA702) and not (failed and code >= 0xA000):
            raise DataError(
                f"the PACS refused the C-GET at {level} level (status 0x{code:04X}); check that "
                "it allows C-GET for our AE title"
            )
        final = status
        if ident is not None and "FailedSOPInstanceUIDList" in ident:
            value = ident.FailedSOPInstanceUIDList
            failed_uids = [str(v) for v in (value if isinstance(value, list) else [value]) if v]
    if final is None:
        raise DataError(
            f"the PACS ended the C-GET at {level} level without a final status; run "
            "'silo data add' again to fetch the rest"
        )

    def count(keyword: str) -> int:
        return _int_or_none(final.get(keyword)) or 0

    outcome = _GetOutcome(
        status=int(final.Status),
        completed=count("NumberOfCompletedSuboperations"),
        failed=count("NumberOfFailedSuboperations"),
        warning=count("NumberOfWarningSuboperations"),
        arrived=0,
        failed_uids=failed_uids,
    )
    if outcome.failed:
        log.info("C-GET %s: %d sub-operation(s) failed", level, outcome.failed)
    return outcome
