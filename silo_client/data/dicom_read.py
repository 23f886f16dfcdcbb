"""Reading DICOM files the way real exports need it, without importing torch or MONAI.

Tolerates a missing preamble/file meta (forced read, accepted only when the tags parsed look
like an image dataset) and reports precisely why a file is not DICOM. Decodes pixels of every
transfer syntax an installed decoder handles, grayscale as stored values and colour (RGB,
YBR_*, PALETTE COLOR) as RGB, and says which codec is missing when none can. pydicom's
warnings about a file are collected (:class:`LibraryMessages`), never printed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset as DicomDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from silo_client.data.file_probe import dicom_prefix, truncation

__all__ = [
    "COLOUR",
    "GRAYSCALE",
    "DecodedPixels",
    "LibraryMessages",
    "decode_failure",
    "decode_pixels",
    "is_colour",
    "misfit",
    "photometric_of",
    "read_dicom",
]

_NOT_DICOM = "not a DICOM file (no 'DICM' marker and no parseable DICOM image tags)"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _looks_like_dicom(ds: DicomDataset) -> bool:
    """After a forced read: does this look like a DICOM dataset and not random bytes?"""
    try:
        tags = list(ds.keys())
        if len(tags) < 3:
            return False
        standard = sum(1 for t in tags if t.group % 2 == 0 and 0x0008 <= t.group <= 0x7FE0)
        has_image_tags = ("Rows" in ds and "Columns" in ds) or "SOPClassUID" in ds
        return has_image_tags and standard >= 0.9 * len(tags)
    except Exception:
        return False


def _read_dicom(path: Path) -> tuple[DicomDataset | None, str | None]:
    """Read a file; tolerate a missing preamble / file meta, reject non-DICOM bytes."""
    # Decided from the first bytes: a large non-DICOM file costs one small read, not a
    # forced parse of all its bytes.
    try:
        prefix = dicom_prefix(path)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    if prefix == "no":
        return None, _NOT_DICOM
    if prefix == "dicm":
        try:
            return pydicom.dcmread(path), None
        except InvalidDicomError:
            pass
        except Exception as exc:
            return None, truncation(path) or f"unreadable DICOM ({_one_line(exc)})"
    # No 128-byte preamble + 'DICM': real exports sometimes omit it. Try a forced read, but
    # only accept it when every tag parsed is a plausible image-dataset tag.
    try:
        ds = pydicom.dcmread(path, force=True)
        if not _looks_like_dicom(ds):
            return None, truncation(path) or _NOT_DICOM
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit, little = ds.original_encoding
            if implicit:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            elif little:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            else:
                ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        return ds, None
    except Exception:
        return None, truncation(path) or _NOT_DICOM


def read_dicom(path: Path) -> tuple[DicomDataset | None, str | None]:
    """Read a file: (dataset, None), or (None, why it is not a usable DICOM file)."""
    return _read_dicom(path)


# ------------------------------------------------------------------------------ library messages


_LIBRARY_LOGGERS = ("pydicom", "pylibjpeg", "libjpeg", "openjpeg", "jpeg_ls", "rle")
"""Loggers of pydicom and its decoder plugins: their records are a file's messages too (and a
logger without a handler would reach the terminal through logging's last resort)."""


class LibraryMessages(contextlib.AbstractContextManager["LibraryMessages"]):
    """Collect what pydicom (and its decoder plugins) warn about while one file is read.

    Real files trip pydicom's UserWarnings (excess padding, an implicit/explicit VR mismatch,
    odd values): they belong in the ingest log and the file's catalogue entry, not on the
    operator's terminal. Inside the block, ``warnings.warn`` calls and WARNING+ records of the
    libraries' loggers are captured (deduplicated, in order) instead of printed.
    """

    def __init__(self) -> None:
        """An empty collector; enter it to start capturing."""
        self.messages: list[str] = []
        self._catch = warnings.catch_warnings(record=True)
        self._records: list[warnings.WarningMessage] = []
        self._logged: list[tuple[str, str, str]] = []
        self._token: contextvars.Token | None = None
        self._propagate: list[bool] = []

    def add(self, text: str) -> None:
        """Record one message (first line, trimmed) unless it is already recorded."""
        line = _one_line_text(text)
        if line and line not in self.messages:
            self.messages.append(line)

    def __enter__(self) -> LibraryMessages:
        self._records = self._catch.__enter__()  # type: ignore[assignment]
        warnings.simplefilter("always")
        loggers = _library_loggers()
        self._propagate = [logger.propagate for logger in loggers]
        for logger in loggers:
            logger.propagate = False
        self._token = _COLLECTING.set(self._logged)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _COLLECTING.reset(self._token)
        for logger, propagate in zip(_library_loggers(), self._propagate, strict=True):
            logger.propagate = propagate
        warned = set()
        for record in self._records:
            warned.add(_one_line_text(str(record.message)))
            self.add(f"{record.category.__name__}: {record.message}")
        for name, level, message in self._logged:
            # pydicom's warn_and_log sends each warning to its logger too: keep one copy.
            if _one_line_text(message) not in warned:
                self.add(f"{name} {level.lower()}: {message}")
        self._catch.__exit__(*exc)  # type: ignore[arg-type]

    def text(self) -> str | None:
        """All messages as one ``; ``-separated string (None when there were none)."""
        return "; ".join(self.messages) if self.messages else None


_COLLECTING: contextvars.ContextVar[list[tuple[str, str, str]] | None] = contextvars.ContextVar(
    "fedsilo_library_messages", default=None
)


class _CollectingHandler(logging.Handler):
    """Installed once on each library logger: hands records to the active collector, if any
    (adding and removing a handler per file would cost more than the capture itself)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        sink = _COLLECTING.get()
        if sink is not None:
            sink.append((record.name.split(".")[0], record.levelname, record.getMessage()))


@functools.cache
def _library_loggers() -> tuple[logging.Logger, ...]:
    handler = _CollectingHandler()
    loggers = tuple(logging.getLogger(name) for name in _LIBRARY_LOGGERS)
    for logger in loggers:
        logger.addHandler(handler)
    return loggers


def _one_line_text(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return msg if len(msg) <= 200 else msg[:197] + "..."


# ------------------------------------------------------------------------------------ pixels

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
"""Photometric interpretations of single-channel images (windowed, MONOCHROME1 inverted)."""
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420",
          "PALETTE COLOR")  # fmt: skip
"""Photometric interpretations decoded to RGB: YBR converted (by pydicom or, for JPEG and
JPEG 2000, by the decoder's colour transform) and PALETTE COLOR looked up in its LUTs."""


@dataclass(frozen=True)
class DecodedPixels:
    """The decoded frames of one image object.

    ``frames`` is ``[F, H, W]`` stored values for grayscale, ``[F, H, W, 3]`` RGB for colour;
    ``full_scale`` is the RGB value meaning full intensity (0 for grayscale, which is windowed
    instead).
    """

    frames: np.ndarray
    photometric: str
    full_scale: float = 0.0

    @property
    def colour(self) -> bool:
        """True for RGB frames."""
        return self.frames.ndim == 4


def is_colour(photometric: str | None) -> bool:
    """Does this PhotometricInterpretation decode to RGB?"""
    return (photometric or "").strip().upper() in COLOUR


def misfit(photometric: str, channels: int, to_grayscale: bool) -> str | None:
    """Why an image of this PhotometricInterpretation does not fit a plan taking ``channels``
    channels (converting colour to grayscale when ``to_grayscale``), or None when it fits."""
    colour = is_colour(photometric)
    if channels == 3 and not colour:
        return (
            f"grayscale image ({photometric}) but the plan takes colour images "
            "(preprocessing.channels: 3)"
        )
    if channels == 1 and colour and not to_grayscale:
        return (
            f"colour image ({photometric}) but the plan takes grayscale images "
            "(preprocessing.channels: 1; to_grayscale: true would convert it)"
        )
    return None


def photometric_of(ds: DicomDataset) -> tuple[str | None, str | None]:
    """(PhotometricInterpretation, None) or (None, why the image cannot be used).

    A missing value on a one-sample image means MONOCHROME2 (a common omission of grayscale
    exports) and is written back into ``ds`` so pydicom decodes it.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if not photometric:
        if samples != 1:
            return None, "no PhotometricInterpretation and SamplesPerPixel != 1"
        ds.PhotometricInterpretation = "MONOCHROME2"
        return "MONOCHROME2", None
    if photometric not in GRAYSCALE + COLOUR:
        return None, (
            f"unsupported PhotometricInterpretation '{photometric}' (grayscale MONOCHROME1/2 "
            "and colour RGB, YBR_*, PALETTE COLOR are used)"
        )
    expected = 3 if photometric in COLOUR and photometric != "PALETTE COLOR" else 1
    if samples != expected:
        return None, (
            f"PhotometricInterpretation '{photometric}' needs SamplesPerPixel {expected}, "
            f"the file says {samples}"
        )
    return photometric, None


def decode_pixels(ds: DicomDataset) -> tuple[DecodedPixels | None, str | None]:
    """Decode every frame of an image object: (pixels, None) or (None, why not).

    Colour comes out as RGB; a file no installed decoder can read names the transfer syntax
    and the package that would decode it.
    """
    photometric, reason = photometric_of(ds)
    if photometric is None:
        return None, reason
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        raw = _decode(ds)
    except Exception as exc:
        return None, decode_failure(syntax, exc)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(raw, ds)
        except Exception as exc:
            return None, f"PALETTE COLOR lookup tables cannot be applied ({_one_line(exc)})"
        bits = 16 if rgb.dtype.itemsize > 1 else 8
        stack = rgb if rgb.ndim == 4 else rgb[None]
        return _checked(stack, photometric, float(2**bits - 1))
    if photometric in COLOUR:
        if raw.ndim == 3 and raw.shape[-1] == 3:
            raw = raw[None]
        if raw.ndim != 4 or raw.shape[-1] != 3:
            return None, f"pixel data has shape {raw.shape}, expected RGB frames"
        bits = int(ds.get("BitsStored", 8) or 8)
        return _checked(raw, photometric, float(2**bits - 1))
    if frames > 1 and raw.ndim == 3:
        stack = raw
    elif raw.ndim == 2:
        stack = raw[None]
    else:
        return None, f"pixel data has shape {raw.shape}, expected grayscale frames"
    return _checked(stack, photometric, 0.0)


def _checked(
    stack: np.ndarray, photometric: str, full_scale: float
) -> tuple[DecodedPixels | None, str | None]:
    if stack.size == 0:
        return None, "pixel data is empty"
    return DecodedPixels(stack, photometric, full_scale), None


def _decode(ds: DicomDataset) -> np.ndarray:
    """``ds.pixel_array`` (YBR -> RGB), retrying a sequential JPEG whose scan header says
    Se=0 (some encoders write it; libjpeg rejects it, GDCM and viewers read it)."""
    try:
        return ds.pixel_array
    except Exception as first:
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if syntax not in (JPEGBaseline8Bit, JPEGExtended12Bit) or "scan stop" not in str(first):
            raise
        fixed = _fix_sequential_jpeg_scan(ds)
        if fixed is None:
            raise
        warnings.warn(
            "repaired a sequential JPEG scan header (spectral selection end 0, must be 63)",
            UserWarning,
            stacklevel=2,
        )
        return fixed


def _fix_sequential_jpeg_scan(ds: DicomDataset) -> np.ndarray | None:
    from pydicom.encaps import encapsulate, generate_frames

    n = int(ds.get("NumberOfFrames", 1) or 1)
    patched = []
    for frame in generate_frames(ds.PixelData, number_of_frames=n):
        data = bytearray(frame)
        at = _sos_offset(data)
        if at is None:
            return None
        ns = data[at + 4]
        se = at + 5 + 2 * ns + 1  # Ss, then Se
        if data[se - 1] != 0 or data[se] not in (0, 63):
            return None
        data[se] = 63
        patched.append(bytes(data))
    copy = pydicom.Dataset(ds)
    copy.file_meta = ds.file_meta
    copy.PixelData = encapsulate(patched)
    return copy.pixel_array


def _sos_offset(data: bytearray) -> int | None:
    """Offset of the first start-of-scan marker, walking the marker segments."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xDA:
            return i
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_failure(syntax: object, exc: BaseException) -> str:
    """Why pixel data did not decode: the missing codec when no decoder is installed for the
    transfer syntax, else what each decoder said (on one line)."""
    if not syntax:
        return f"pixel data cannot be decoded ({_one_line(exc)})"
    uid = UID(str(syntax))
    name = uid.name
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
    except NotImplementedError:
        return (
            f"pixel data in {name} ({uid}) cannot be decoded: no decoder exists for it in "
            "pydicom or its plugins (convert the file to another transfer syntax)"
        )
    except Exception:
        decoder = None
    if decoder is not None and not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        return f"pixel data in {name} cannot be decoded: codec missing ({missing})"
    # pydicom puts each plugin's own cause on the lines after its first: keep them all.
    detail = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    plugin_lines = detail[1:]
    why = "; ".join(plugin_lines) if plugin_lines else (detail[0] if detail else "")
    why = why or type(exc).__name__
    why = why if len(why) <= 400 else why[:397] + "..."
    return f"pixel data in {name} cannot be decoded ({why})"
