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
import os
import shutil
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
from silo_client.data.ingest import PullResult
from silo_client.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "PacsAuth",
    "PullResult",
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


def _missing(dest: Path, sops: Iterable[str]) -> list[str]:
    """The SOPs of ``sops`` whose file is not in ``dest`` yet (a re-run fetches only those)."""
    return [s for s in sops if not (dest / instance_filename(s)).exists()]


def keep_only_selected(dest: Path, selected: Iterable[str]) -> int:
    """Delete from ``dest`` every file the current query does not select, and stale
    temporary files; returns how many files were deleted.

    A pull's files belong to that pull's query only: what an earlier pull with another query
    (or a failed one) left in the dataset's managed folder is never adopted by this one.
    """
    names = {instance_filename(s) for s in selected}
    dropped = 0
    if dest.is_dir():
        for entry in os.scandir(dest):
            if entry.name in names:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            dropped += 1
    shutil.rmtree(dest.parent / ".partial", ignore_errors=True)  # a killed pull's temp files
    if dropped:
        log.info("%d file(s) in %s not selected by this query deleted", dropped, dest)
    return dropped


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
) -> Callable[[Catalogue], PullResult]:
    """A pull step for :func:`~silo_client.data.ingest.register_dataset` over DICOMweb.

    The returned callable lists matching instances (QIDO-RS, paged), deletes from ``dest``
    what the query does not select (an earlier pull's leftovers are never adopted), retrieves
    the missing ones (WADO-RS, original transfer syntax, ``workers`` requests at once: whole
    series, or single instances where most of a series is already here) into ``dest`` as the
    bytes arrive (no decode and re-encode). Every listed instance is accounted for: what a
    first pass did not deliver is asked for once more, one by one, and what is still missing
    is returned as undelivered with the reason (the ingest records it; the rest is used).
    An unreachable PACS or refused credentials are a DataError (the files written are kept:
    a re-run resumes).
    """
    auth.check()
    filters = parse_query(query)
    where = public_url(url)
    base = url.rstrip("/")

    def pull(catalogue: Catalogue) -> PullResult:
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(url=url, session=_session(auth), timeout=_TIMEOUT_S)
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
            keep_only_selected(dest, found)
            missing = set(_missing(dest, found))
            if not missing:
                return PullResult(0, [], len(found))
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
            written, why = _wado_fetch(jobs, auth, dest, workers)
            left = sorted(missing - written)
            if left:  # once more, one instance per request
                retry = [(_instance_url(base, *found[s], s), {s}) for s in left]
                again, why_again = _wado_fetch(retry, auth, dest, workers)
                written |= again
                why.update(why_again)
            undelivered = [
                (s, why.get(s, "not in the PACS's WADO-RS answers (asked twice)"))
                for s in sorted(missing - written)
            ]
            return PullResult(len(written), undelivered, len(found))
        except DataError:
            raise
        except Exception as exc:
            raise _http_error(exc, where) from None

    return pull


def _instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def _wado_fetch(
    jobs: list[tuple[str, set[str]]], auth: PacsAuth, dest: Path, workers: int
) -> tuple[set[str], dict[str, str]]:
    """Run WADO-RS retrieves (url, SOPs wanted from it) on a few threads: (SOPs written,
    {SOP: why it was not} for answers that refused an instance or a series).

    A few requests at once hide the PACS's per-request latency; each thread has its own
    HTTP session (requests' sessions are not thread-safe). A refused request (an HTTP error
    other than refused credentials) is recorded for its instances and the others go on; a
    connection error or refused credentials stop the pull.
    """
    local = threading.local()
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

    def fetch(url: str, wanted: set[str]) -> tuple[set[str], dict[str, str]]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = _session(auth)
        got: set[str] = set()
        with session.get(url, headers={"Accept": accept}, stream=True,
                         timeout=_TIMEOUT_S) as response:  # fmt: skip
            code = response.status_code
            if code >= 400 and code not in (401, 403):
                # the QIDO-RS on this root answered: not a bad URL but this resource
                gone = " (deleted on the PACS since it was listed?)" if code == 404 else ""
                why = f"the PACS answered HTTP {code} {response.reason} to its WADO-RS{gone}"
                return got, dict.fromkeys(wanted, why)
            response.raise_for_status()
            for part in _multipart_parts(response):
                # an instance URL answers that one instance; a series answer is read for its UIDs
                sop = url.rsplit("/", 1)[-1] if "/instances/" in url else _sop_of(part)
                if sop in wanted and sop not in got:
                    _write_atomic(dest, instance_filename(sop), part)
                    got.add(sop)
        return got, {}

    written: set[str] = set()
    why: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch, url, wanted) for url, wanted in jobs]
        try:
            for future in as_completed(futures):
                got, refused = future.result()
                written |= got
                why.update(refused)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return written, why


# ---------------------------------------------------------------------------------- DIMSE

# Classes proposed when the PACS's C-FIND does not say which SOP classes the instances have:
# images, and the objects a hospital's PACS holds beside them (RT, ECG, SR, ...), which then
# arrive and are recorded with their reason instead of never arriving at all.
_DEFAULT_CLASSES = (
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "SecondaryCaptureImageStorage", "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage", "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage", "XRayAngiographicImageStorage",
    "PositronEmissionTomographyImageStorage", "NuclearMedicineImageStorage",
    "BasicTextSRStorage", "EnhancedSRStorage", "ComprehensiveSRStorage",
    "GrayscaleSoftcopyPresentationStateStorage", "KeyObjectSelectionDocumentStorage",
    "RTPlanStorage", "RTIonPlanStorage", "RTDoseStorage", "RTStructureSetStorage",
    "RTImageStorage", "TwelveLeadECGWaveformStorage", "GeneralECGWaveformStorage",
    "SegmentationStorage", "VLPhotographicImageStorage", "EncapsulatedPDFStorage",
)  # fmt: skip

# Offered for every SOP class the query lists, one presentation context per syntax: with one
# context holding them all, the PACS accepts a single syntax per class (Orthanc: Explicit VR
# Little Endian) and then cannot send a JPEG 2000 (or JPEG-LS, ...) instance as it is stored.
_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
# An association holds at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1-255); one
# is the C-GET model's. More classes than fit are fetched over more associations.
_MAX_CONTEXTS = 128
_CLASSES_PER_ASSOCIATION = (_MAX_CONTEXTS - 1) // len(_TRANSFER_SYNTAXES)
# SOPInstanceUIDs per C-GET (a list of UIDs at IMAGE level, PS3.4 C.4.3.1.3.1): one request
# instead of one per series; 200 UIDs of 64 characters stay well inside a UI element.
_GET_BATCH = 200


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

    def watch(self, assoc: Any) -> None:
        """Stand in for the reactor's abort handling while it is parked: when the PACS goes
        away (connection closed, A-ABORT), wake the request waiting for its answer at once
        (its status is then None: a one-line error), not after the DIMSE timeout."""

        def run() -> None:
            while not self.wait(0.1):
                try:
                    gone = assoc.acse.is_aborted() or not assoc.dul.is_alive()
                except Exception:  # pynetdicom changed shape: the DIMSE timeout still applies
                    return
                if gone:
                    assoc.dimse.msg_queue.put((None, None))
                    return

        threading.Thread(target=run, name="fedsilo-assoc-watch", daemon=True).start()


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
    parked.watch(assoc)
    return parked


class _GetRefused(DataError):
    """The PACS answered a C-GET with a refusal status (not: stopped answering)."""


@dataclass
class _GetOutcome:
    """What one C-GET did: the PACS's final counts and the instances that arrived."""

    status: int
    completed: int
    failed: int
    warning: int
    arrived: int
    failed_uids: list[str]


@dataclass(frozen=True)
class _Listed:
    """Where a listed instance lives and what it is (SOP class '' when the PACS did not say)."""

    study: str
    series: str
    sop_class: str


def dimse_puller(
    address: str, aet: str, called_aet: str, query: str, dest: Path
) -> Callable[[Catalogue], PullResult]:
    """A pull step over DIMSE: C-FIND (study root) and C-GET.

    Lists the query's instances with their SOP classes (one IMAGE-level C-FIND, checked per
    series against the SERIES-level NumberOfSeriesRelatedInstances; a series listed short is
    listed again on its own), deletes from ``dest`` what the query does not select, then
    fetches the missing instances with C-GETs of up to :data:`_GET_BATCH` SOPInstanceUIDs
    each, on associations that propose every listed SOP class with one presentation context
    per transfer syntax (at most 128 contexts an association; more classes, more
    associations). What a C-GET did not deliver is asked for once more, one by one; what
    still fails is returned as undelivered with the reason, and the rest is used.

    Nagle's algorithm is turned off on the association sockets (TCP_NODELAY): with it on, the
    small PDUs of each C-GET sub-operation wait for delayed ACKs and transfers crawl.
    """
    host, port = _split_address(address)
    filters = parse_query(query)

    def pull(catalogue: Catalogue) -> PullResult:
        try:
            with socket.create_connection((host, port), timeout=5.0):
                pass
        except OSError as exc:
            raise DataError(
                f"cannot reach the PACS at {host}:{port} ({exc.strerror or exc}); check --dimse "
                "and that the PACS accepts DICOM connections from this machine"
            ) from None
        listing, short = _list_instances(host, port, aet, called_aet, filters, query)
        dest.mkdir(parents=True, exist_ok=True)
        keep_only_selected(dest, listing)
        missing = _missing(dest, sorted(listing))
        if not missing and not short:
            return PullResult(0, [], len(listing))
        classes = sorted({listing[s].sop_class for s in missing} | {c for _, c in short})
        known = [c for c in classes if c]
        groups = [known[i : i + _CLASSES_PER_ASSOCIATION]
                  for i in range(0, len(known), _CLASSES_PER_ASSOCIATION)]  # fmt: skip
        written: set[str] = set()
        why: dict[str, str] = {}
        plans: list[tuple[list[str], bool]] = [(g, False) for g in groups]
        if "" in classes:  # the PACS did not say: propose the usual classes, all syntaxes each
            plans.append((list(_DEFAULT_CLASSES), True))
        for group, by_name in plans:
            wanted = [s for s in missing if listing[s].sop_class in (group if not by_name else
                                                                     ("",))]  # fmt: skip
            series = [key for key, c in short if c in group or (by_name and not c)]
            if wanted or series:
                _retrieve(host, port, aet, called_aet, group, by_name, wanted, series, listing,
                          dest, written, why)  # fmt: skip
        names = {s: listing[s].sop_class for s in missing}
        undelivered = [(s, why.get(s) or _not_sent(names[s])) for s in missing if s not in written]
        return PullResult(len(written), undelivered, len(listing) + len(written - listing.keys()))

    return pull


def _not_sent(sop_class: str) -> str:
    from pydicom.uid import UID

    name = UID(sop_class).name if sop_class else "unknown SOP class"
    return (f"the PACS listed it but did not send it over C-GET ({name}), asked twice; "
            "check the PACS's log")  # fmt: skip


def _associate(
    host: str,
    port: int,
    aet: str,
    called_aet: str,
    contexts: list[tuple[str, list[str]]],
    roles: list[Any],
    handlers: list[Any],
) -> tuple[Any, _ParkedReactor | None]:
    """An established association (reactor parked, TCP_NODELAY) or a one-line DataError."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate(host, port, ae_title=called_aet, ext_neg=roles or None,
                         evt_handlers=handlers or None)  # fmt: skip
    if not assoc.is_established:
        raise DataError(
            f"the PACS at {host}:{port} refused the DICOM association (calling AE {aet!r}, "
            f"called AE {called_aet!r}); register our AE title on the PACS or fix --aet/"
            "--called-aet"
        )
    parked = _park_reactor(assoc)
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc, parked


def _release(assoc: Any, parked: _ParkedReactor | None) -> None:
    try:
        assoc.release()
    finally:
        if parked is not None:
            parked.free()


def _list_instances(
    host: str, port: int, aet: str, called_aet: str, filters: dict[str, str], query: str
) -> tuple[dict[str, _Listed], list[tuple[tuple[str, str], str]]]:
    """The query's instances {SOPInstanceUID: _Listed}, and the series still listed short of
    their NumberOfSeriesRelatedInstances after asking twice ((study, series), a SOP class)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

    assoc, parked = _associate(host, port, aet, called_aet, [(Find, list(_TRANSFER_SYNTAXES[:2]))],
                               [], [])  # fmt: skip
    try:
        keys = ["StudyInstanceUID", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"]
        series = _find(assoc, Find, "SERIES", filters, keys)
        if not series:
            raise DataError(
                f"the query {query or '(none)'!r} matched no series on the PACS at "
                f"{host}:{port}; widen --query or check the PACS holds the studies"
            )
        image_keys = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
        try:  # one listing of every instance (a PACS that insists on a hierarchical query
            # refuses it; then each series is listed on its own below)
            flat = _find(assoc, Find, "IMAGE", filters, image_keys)
        except DataError:
            flat = []
        listing: dict[str, _Listed] = {}
        per_series: dict[tuple[str, str], set[str]] = {}
        for item in flat:
            if item["SOPInstanceUID"] and item["SeriesInstanceUID"]:
                key = (item["StudyInstanceUID"], item["SeriesInstanceUID"])
                listing[item["SOPInstanceUID"]] = _Listed(*key, item["SOPClassUID"])
                per_series.setdefault(key, set()).add(item["SOPInstanceUID"])
        short: list[tuple[tuple[str, str], str]] = []
        for item in series:
            key = (item["StudyInstanceUID"], item["SeriesInstanceUID"])
            count = _int_or_none(item.get("NumberOfSeriesRelatedInstances"))
            have = per_series.get(key, set())
            for _ in range(2):  # a listing shorter than the series' count is asked again
                # no count from the PACS: a series always holds an instance
                if (len(have) >= count) if count is not None else bool(have):
                    break
                uids = {"StudyInstanceUID": key[0], "SeriesInstanceUID": key[1]}
                for i in _find(assoc, Find, "IMAGE", uids, ["SOPInstanceUID", "SOPClassUID"]):
                    if i["SOPInstanceUID"]:
                        listing[i["SOPInstanceUID"]] = _Listed(*key, i["SOPClassUID"])
                        have.add(i["SOPInstanceUID"])
            if not ((len(have) >= count) if count is not None else bool(have)):
                classes = {listing[s].sop_class for s in have} or {""}
                short.append((key, sorted(classes)[0]))
        return listing, short
    finally:
        _release(assoc, parked)


def _retrieve(
    host: str,
    port: int,
    aet: str,
    called_aet: str,
    classes: list[str],
    by_name: bool,
    wanted: list[str],
    short_series: list[tuple[str, str]],
    listing: dict[str, _Listed],
    dest: Path,
    written: set[str],
    why: dict[str, str],
) -> None:
    """C-GET ``wanted`` (and, whole, the series listed short) over one association proposing
    ``classes`` (UIDs, or pynetdicom names when ``by_name``); fills ``written`` and ``why``."""
    from pynetdicom import build_role, evt
    from pynetdicom import sop_class as sc
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

    uids = [str(getattr(sc, c)) for c in classes] if by_name else classes
    contexts: list[tuple[str, list[str]]] = [(Get, [_TRANSFER_SYNTAXES[0], _TRANSFER_SYNTAXES[1]])]
    for uid in uids:
        if by_name:  # classes the PACS did not name: one context each, every syntax in it
            contexts.append((uid, list(_TRANSFER_SYNTAXES)))
        else:
            contexts.extend((uid, [ts]) for ts in _TRANSFER_SYNTAXES)
    contexts = contexts[:_MAX_CONTEXTS]
    log.info("C-GET association: %d SOP class(es), %d presentation contexts, %d instance(s)",
             len(uids), len(contexts), len(wanted))  # fmt: skip
    roles = [build_role(uid, scp_role=True) for uid in uids]
    selected = set(wanted)
    whole = [False]  # during a SERIES-level C-GET every instance sent is of that series

    def on_store(event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        if sop in selected or whole[0]:
            name = instance_filename(sop)
            if not (dest / name).exists():
                _write_atomic(dest, name, event.encoded_dataset())
            written.add(sop)
        return 0x0000  # acknowledged; what was not asked for is not written

    assoc, parked = _associate(host, port, aet, called_aet, contexts, roles,
                               [(evt.EVT_C_STORE, on_store)])  # fmt: skip
    try:
        for i in range(0, len(wanted), _GET_BATCH):
            batch = wanted[i : i + _GET_BATCH]
            try:
                _get(assoc, Get, "IMAGE", {"SOPInstanceUID": batch if len(batch) > 1 else batch[0]})
            except _GetRefused:  # a PACS that takes one UID per C-GET: the retry below does
                log.info("C-GET of %d UIDs refused; asking one by one", len(batch))
        for study, series in short_series:
            whole[0] = True
            try:
                _get(assoc, Get, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series})
            finally:
                whole[0] = False
        for sop in wanted:  # once more, one by one: the reason of what still fails is kept
            if sop in written:
                continue
            where = listing[sop]
            keys = {"StudyInstanceUID": where.study, "SeriesInstanceUID": where.series,
                    "SOPInstanceUID": sop}  # fmt: skip
            try:
                outcome = _get(assoc, Get, "IMAGE", keys)
            except _GetRefused as exc:
                why[sop] = str(exc)
                continue
            if sop not in written and outcome.failed:
                from pydicom.uid import UID

                name = UID(where.sop_class).name if where.sop_class else "unknown SOP class"
                why[sop] = (
                    f"the PACS could not send it (C-GET sub-operation failed, status "
                    f"0x{outcome.status:04X}, {name}: e.g. no presentation context of ours "
                    "fits how it is stored); check the PACS's log"
                )
    finally:
        _release(assoc, parked)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _identifier(level: str, keys: dict[str, str | list[str]], wanted: list[str]) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in wanted:
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(
    assoc: Any, model: Any, level: str, keys: dict[str, str | list[str]], wanted: list[str]
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


def _get(assoc: Any, model: Any, level: str, keys: dict[str, str | list[str]]) -> _GetOutcome:
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
            raise _GetRefused(
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
