"""Load a hospital's DICOM folder into preprocessed tensors for training.

Layout of a registered dataset folder::

    <folder>/dicom/...        DICOM files, any depth, any file names
    <folder>/labels.csv       StudyInstanceUID,label  (one row per study)

Pipeline per image: read with pydicom, apply the modality LUT (RescaleSlope/Intercept, a
missing slope counts as 1 and a missing intercept as 0), window to [0, 1] (the plan's window,
else the file's WindowCenter/Width, else the image's min/max), invert MONOCHROME1, pad to a
square and resize to ``input_size`` with anti-aliasing (a MONAI ``Compose``). Colour images
(RGB, YBR_*, PALETTE COLOR) are decoded to RGB and scaled by their full range; the plan's
``channels`` keeps them as RGB (3) or takes their luma (1, with ``to_grayscale``).

Files that cannot be used are skipped with a precise reason (``LocalDataset.skipped``);
nothing is dropped silently. Bad input raises :class:`~silo_client.errors.DataError` with a
one-line message. Preprocessed tensors are cached (see :mod:`silo_client.data.cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import monai.data
import numpy as np
import torch
from monai.transforms import Compose, EnsureType, ScaleIntensityRange
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import (
    UID,
)

from silo_client.data import cache as _cache
from silo_client.data.dicom_read import (  # noqa: F401
    GRAYSCALE,
    LibraryMessages,
    _looks_like_dicom,
    _read_dicom,
    decode_pixels,
    misfit,
    photometric_of,
)
from silo_client.data.labels_csv import LabelFileWording, read_label_csv
from silo_client.errors import DataError

__all__ = [
    "PREPROCESSING_VERSION",
    "DicomInstance",
    "LocalDataset",
    "Preprocessing",
    "ScanResult",
    "SkippedFile",
    "build_dataset",
    "load_labels",
    "preprocess_pixels",
    "refuse_misfits",
    "scan_dicom_folder",
]

log = logging.getLogger(__name__)

#: Bumped whenever the preprocessing code changes its output; part of the cache key.
PREPROCESSING_VERSION = "3"

_LABEL_COLUMNS = ("StudyInstanceUID", "label")


# --------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How a DICOM image becomes a ``[channels, input_size, input_size]`` float32 tensor in
    [0, 1].

    ``window_center``/``window_width`` are in modality-LUT units (HU for CT); both ``None``
    means: use each file's WindowCenter/WindowWidth, falling back to the image's min/max.
    Colour images are not windowed: RGB is scaled by its full range. ``channels`` 1 takes
    grayscale images (colour ones too when ``to_grayscale``: their luma); 3 takes colour
    images as RGB. An image that does not fit is skipped with the reason (:meth:`misfit`).
    """

    input_size: int = 64
    window_center: float | None = None
    window_width: float | None = None
    channels: int = 1
    to_grayscale: bool = False

    def __post_init__(self) -> None:
        """Validate the fields (DataError with a fix hint)."""
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise DataError(f"preprocessing input_size must be an integer, got {self.input_size!r}")
        if not 8 <= self.input_size <= 4096:
            raise DataError(
                f"preprocessing input_size must be in [8, 4096] pixels, got {self.input_size}"
            )
        if (self.window_center is None) != (self.window_width is None):
            raise DataError(
                "preprocessing window needs both window_center and window_width "
                f"(got center={self.window_center}, width={self.window_width}); set both or neither"
            )
        if self.window_width is not None and not (
            math.isfinite(self.window_width) and self.window_width > 0
        ):
            raise DataError(f"preprocessing window_width must be > 0, got {self.window_width}")
        if self.window_center is not None and not math.isfinite(self.window_center):
            raise DataError(f"preprocessing window_center must be finite, got {self.window_center}")
        if self.channels not in (1, 3):
            raise DataError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if self.to_grayscale and self.channels != 1:
            raise DataError("preprocessing to_grayscale needs channels 1 (3 keeps RGB)")

    def misfit(self, photometric: str) -> str | None:
        """Why an image of this PhotometricInterpretation does not fit, or None when it does."""
        return misfit(photometric, self.channels, self.to_grayscale)

    def fingerprint(self) -> str:
        """Stable hash of the preprocessing (fields + code version), used as a cache key."""
        fields = {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        text = json.dumps({"version": PREPROCESSING_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def spatial_transform(self) -> Compose:
        """MONAI transform: pad a ``[1, H, W]`` image to a square, resize, float32 tensor."""
        size = self.input_size
        return Compose(
            [
                _pad_to_square,
                _Resize(size),
                _clip_unit,
                EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
            ]
        )

    def intensity_transform(self, lower: float, upper: float, invert: bool) -> Compose:
        """MONAI transform: window ``[lower, upper]`` to [0, 1] (clipped), inverted if asked."""
        steps: list[Any] = [
            ScaleIntensityRange(a_min=lower, a_max=upper, b_min=0.0, b_max=1.0, clip=True)
        ]
        if invert:
            steps.append(_invert_unit)
        return Compose(steps)


def _pad_to_square(img: torch.Tensor) -> torch.Tensor:
    """Zero-pad (black after windowing) a ``[C, H, W]`` image to a centred square."""
    h, w = int(img.shape[-2]), int(img.shape[-1])
    if h == w:
        return img
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = (left, side - w - left, top, side - h - top)
    return torch.nn.functional.pad(img, pad, value=0.0)


class _Resize:
    """Bilinear resize of a ``[C, H, W]`` tensor with anti-aliasing when shrinking.

    ``torch.nn.functional.interpolate(antialias=True)`` (a separable triangle filter) is
    several times faster than MONAI ``Resize(anti_aliasing=True)``'s Gaussian convolution.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) == (self.size, self.size):
            return img
        return torch.nn.functional.interpolate(
            img[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
            antialias=True,
        )[0]  # fmt: skip


def _clip_unit(img: torch.Tensor) -> torch.Tensor:
    return torch.clamp(img, 0.0, 1.0)


def _invert_unit(img: torch.Tensor) -> torch.Tensor:
    return 1.0 - img


# --------------------------------------------------------------------------------------------
# Scanning


class SkippedFile(NamedTuple):
    """A file that is not used, with the reason (path relative to the scanned folder)."""

    path: str
    reason: str


@dataclass(frozen=True)
class DicomInstance:
    """A readable single-frame grayscale DICOM image found by :func:`scan_dicom_folder`."""

    path: str
    study_instance_uid: str
    sop_instance_uid: str
    modality: str
    rows: int
    columns: int
    photometric_interpretation: str


@dataclass
class ScanResult:
    """Readable image instances of a folder, and every other file with the reason it is skipped."""

    folder: Path
    instances: list[DicomInstance] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        """Number of files looked at."""
        return len(self.instances) + len(self.skipped)


@dataclass
class _Decoded:
    instance: DicomInstance
    pixels: np.ndarray  # float64, after the modality LUT
    window: tuple[float, float]  # [lower, upper] from the file (or min/max)
    group: str  # hashed PatientID (never the ID itself)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _float_tag(ds: DicomDataset, keyword: str, default: float | None) -> float | None:
    """First value of a numeric tag as float; default when absent/empty; ValueError if bad."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            return default
        value = value[0]
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{keyword} is {value!r}")
    return out


def _file_window(ds: DicomDataset, pixels: np.ndarray) -> tuple[float, float]:
    """The file's VOI window as [lower, upper]; falls back to the image's min/max."""
    try:
        center = _float_tag(ds, "WindowCenter", None)
        width = _float_tag(ds, "WindowWidth", None)
    except (TypeError, ValueError):
        center = width = None
    if center is not None and width is not None and width > 0:
        return center - width / 2.0, center + width / 2.0
    return float(pixels.min()), float(pixels.max())


def _examine(path: Path, rel: str) -> tuple[_Decoded | None, str | None]:
    """Read, validate and decode one file; exactly one of the results is None. What pydicom
    warns about goes to the debug log, not the terminal."""
    with LibraryMessages() as messages:
        result = _examine_quietly(path, rel)
    for message in messages.messages:
        log.debug("%s: %s", rel, message)
    return result


def _examine_quietly(path: Path, rel: str) -> tuple[_Decoded | None, str | None]:
    ds, reason = _read_dicom(path)
    if ds is None:
        return None, reason
    try:
        sop_class = str(
            ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")
        )
        if sop_class:
            name = UID(sop_class).name
            if name != sop_class and "Image" not in name:
                return None, f"non-image SOP class '{name}' ({sop_class})"
        if "PixelData" not in ds:
            other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
            if other:
                return None, f"unsupported {other[0]} (only integer PixelData is used)"
            return None, "no pixel data (tag (7FE0,0010) PixelData is absent)"
        study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        if not study_uid:
            return None, "no StudyInstanceUID (needed to match labels.csv)"
        photometric, reason = photometric_of(ds)
        if photometric is None:
            return None, reason
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            return None, f"multi-frame image ({frames} frames) is not supported"
        try:
            slope = _float_tag(ds, "RescaleSlope", 1.0)
            intercept = _float_tag(ds, "RescaleIntercept", 0.0)
        except (TypeError, ValueError) as exc:
            return None, f"invalid RescaleSlope/RescaleIntercept ({_one_line(exc)})"
        if slope == 0 and photometric in GRAYSCALE:
            return None, "invalid RescaleSlope 0"
        decoded, reason = decode_pixels(ds)
        if decoded is None:
            return None, reason
        raw = decoded.frames[0]
        if raw.size == 0:
            return None, f"pixel data has shape {raw.shape}, expected a 2-D image"
        if decoded.colour:
            pixels = raw.astype(np.float64)
            window = (0.0, decoded.full_scale)
        else:
            pixels = raw.astype(np.float64) * float(slope) + float(intercept)  # type: ignore[arg-type]
            if not np.isfinite(pixels).all():
                return None, "pixel values are not finite after RescaleSlope/Intercept"
            window = _file_window(ds, pixels)
        patient = str(ds.get("PatientID", "") or "").strip()
        group_src = f"patient:{patient}" if patient else f"study:{study_uid}"
        group = hashlib.sha256(f"fedsilo-group\0{group_src}".encode()).hexdigest()[:16]
        instance = DicomInstance(
            path=rel,
            study_instance_uid=study_uid,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            rows=int(raw.shape[0]),
            columns=int(raw.shape[1]),
            photometric_interpretation=photometric,
        )
        return _Decoded(instance, pixels, window, group), None
    except Exception as exc:  # malformed element values, odd VRs, ...
        return None, f"unreadable DICOM ({_one_line(exc)})"


def _iter_files(folder: Path) -> Iterator[tuple[Path, str]]:
    paths = [p for p in folder.rglob("*") if p.is_file()]
    for path in sorted(paths, key=lambda p: p.relative_to(folder).as_posix()):
        yield path, path.relative_to(folder).as_posix()


def _iter_scan(folder: Path) -> Iterator[tuple[str, _Decoded | None, str | None]]:
    seen: dict[str, str] = {}
    for path, rel in _iter_files(folder):
        decoded, reason = _examine(path, rel)
        if decoded is not None:
            sop = decoded.instance.sop_instance_uid
            if sop and sop in seen:
                decoded, reason = None, f"duplicate of {seen[sop]} (same SOPInstanceUID)"
            elif sop:
                seen[sop] = rel
        yield rel, decoded, reason


def scan_dicom_folder(folder: Path) -> ScanResult:
    """List the usable DICOM images under ``folder`` (recursively) and why others are skipped.

    Colour images are instances too. Skip reasons include: not a DICOM file, unreadable DICOM,
    non-image SOP class, no pixel data, unsupported PhotometricInterpretation, multi-frame,
    undecodable pixel data (naming a missing codec), duplicate SOPInstanceUID. Raises DataError
    if ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"DICOM folder {folder} does not exist; pass the folder with the DICOM files"
        )
    result = ScanResult(folder=folder)
    for rel, decoded, reason in _iter_scan(folder):
        if decoded is not None:
            result.instances.append(decoded.instance)
        else:
            result.skipped.append(SkippedFile(rel, str(reason)))
    return result


# --------------------------------------------------------------------------------------------
# Labels


_LABEL_WORDING = LabelFileWording(
    create="create it with a header 'StudyInstanceUID,label' and one row per study",
    fix_header="the header must be 'StudyInstanceUID,label'",
    label_form="(use 0 = no lesion, 1 = lesion)",
    row_unit="study",
    name_duplicates=True,
)


def _read_labels(csv_path: Path) -> dict[str, tuple[int, int]]:
    """StudyInstanceUID -> (label, line number)."""
    return read_label_csv(
        csv_path, key_column=_LABEL_COLUMNS[0], label_column=_LABEL_COLUMNS[1],
        key=str.strip, wording=_LABEL_WORDING,
    )  # fmt: skip


def load_labels(csv_path: Path) -> dict[str, int]:
    """Read ``labels.csv`` (columns ``StudyInstanceUID,label``) into {StudyInstanceUID: label}.

    Raises DataError naming the file and line for: missing file, missing column, a short row,
    an empty UID, a non-integer or negative label, a duplicated StudyInstanceUID.
    """
    return {uid: label for uid, (label, _) in _read_labels(Path(csv_path)).items()}


# --------------------------------------------------------------------------------------------
# Dataset


class _Items(Sequence):  # type: ignore[type-arg]
    """Lazy ``{"image", "label"}`` view over the tensors (what monai.data.Dataset indexes)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._images, self._labels = images, labels

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"image": self._images[index], "label": int(self._labels[index])}


class LocalDataset(monai.data.Dataset):
    """A silo's preprocessed images: a MONAI dataset of ``{"image": [1,H,W], "label": int}``.

    Attributes: ``images`` (N x 1 x H x W float32 in [0, 1]), ``labels`` (N, int64),
    ``study_uids`` and ``paths`` (per item), ``skipped`` (relative path, reason) of the
    source folder, ``warnings`` (e.g. labels matching no study), ``cache_hit``, ``version``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        study_uids: list[str] | None = None,
        paths: list[str] | None = None,
        groups: list[str] | None = None,
        skipped: list[SkippedFile] | None = None,
        warnings: list[str] | None = None,
        transform: Any = None,
        cache_hit: bool = False,
        version: str = "",
    ) -> None:
        """Wrap preprocessed tensors; ``transform`` (e.g. augmentation) applies per item."""
        n = int(labels.shape[0])
        if images.shape[0] != n:
            raise DataError(f"images ({images.shape[0]}) and labels ({n}) differ in length")
        self.images = images
        self.labels = labels
        self.study_uids = list(study_uids) if study_uids is not None else [""] * n
        self.paths = list(paths) if paths is not None else [""] * n
        self.groups = list(groups) if groups is not None else [f"item:{i}" for i in range(n)]
        self.skipped = list(skipped or [])
        self.warnings = list(warnings or [])
        self.cache_hit = cache_hit
        self.version = version
        super().__init__(data=_Items(images, labels), transform=transform)

    @property
    def n_skipped(self) -> int:
        """Number of files of the source folder that are not used."""
        return len(self.skipped)

    def subset(self, indices: Sequence[int]) -> LocalDataset:
        """A LocalDataset of the given items (sharing provenance, skips and warnings)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        pick = [int(i) for i in idx]
        return LocalDataset(
            self.images[idx],
            self.labels[idx],
            study_uids=[self.study_uids[i] for i in pick],
            paths=[self.paths[i] for i in pick],
            groups=[self.groups[i] for i in pick],
            skipped=self.skipped,
            warnings=self.warnings,
            transform=self.transform,
            cache_hit=self.cache_hit,
            version=self.version,
        )

    def split(self, val_fraction: float, seed: int = 0) -> tuple[LocalDataset, LocalDataset]:
        """Deterministic stratified split into (train, val).

        Items of the same patient (hashed PatientID; else the study) stay on one side, so no
        patient leaks across. Groups are stratified by their (max) label; each class with at
        least 2 groups puts at least one in val when ``val_fraction > 0``.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        group_label: dict[str, int] = {}
        for g, y in zip(self.groups, self.labels.tolist(), strict=True):
            group_label[g] = max(group_label.get(g, y), y)
        rng = np.random.default_rng(seed)
        val_groups: set[str] = set()
        for cls in sorted(set(group_label.values())):
            members = sorted(g for g, y in group_label.items() if y == cls)
            order = [members[i] for i in rng.permutation(len(members))]
            n_val = round(len(members) * val_fraction)
            if val_fraction > 0 and len(members) >= 2:
                n_val = min(max(n_val, 1), len(members) - 1)
            val_groups.update(order[:n_val])
        train_idx = [i for i, g in enumerate(self.groups) if g not in val_groups]
        val_idx = [i for i, g in enumerate(self.groups) if g in val_groups]
        return self.subset(train_idx), self.subset(val_idx)

    def summary(self) -> str:
        """One line: items, class counts, skipped files."""
        counts = torch.bincount(self.labels).tolist() if len(self.labels) else []
        per_class = ", ".join(f"{c}: {n}" for c, n in enumerate(counts))
        return f"{len(self)} images ({per_class}), {self.n_skipped} files skipped"


_CACHE_FIELDS: dict[str, type] = {
    "images": torch.Tensor,
    "labels": torch.Tensor,
    "study_uids": list,
    "paths": list,
    "groups": list,
    "skipped": list,
    "warnings": list,
}


def _from_cache(entry: dict[str, Any], version: str) -> LocalDataset | None:
    images, labels = entry["images"], entry["labels"]
    n = int(labels.shape[0])
    if (
        images.dtype != torch.float32
        or labels.dtype != torch.int64
        or images.ndim != 4
        or images.shape[0] != n
        or not len(entry["study_uids"]) == len(entry["paths"]) == len(entry["groups"]) == n
    ):
        return None
    return LocalDataset(
        images,
        labels,
        study_uids=[str(s) for s in entry["study_uids"]],
        paths=[str(p) for p in entry["paths"]],
        groups=[str(g) for g in entry["groups"]],
        skipped=[SkippedFile(str(p), str(r)) for p, r in entry["skipped"]],
        warnings=[str(w) for w in entry["warnings"]],
        cache_hit=True,
        version=version,
    )


def preprocess_pixels(
    pixels: np.ndarray,
    file_window: tuple[float, float],
    photometric: str,
    preprocessing: Preprocessing,
    spatial: Compose | None = None,
) -> torch.Tensor:
    """One image -> ``[channels, S, S]`` float32 tensor in [0, 1].

    Grayscale ``[H, W]`` (modality-LUT units) is windowed; colour ``[H, W, 3]`` RGB is scaled
    by ``file_window`` = [0, full scale] and, for a one-channel plan, turned into its luma
    (ITU-R BT.601). DataError when the image does not fit the plan's channels.
    """
    reason = preprocessing.misfit(photometric)
    if reason:
        raise DataError(reason)
    spatial = spatial if spatial is not None else preprocessing.spatial_transform()
    if pixels.ndim == 3:
        lower, upper = file_window
        scaled = (pixels.astype(np.float32) - lower) / max(upper - lower, 1e-6)
        img = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))
        if preprocessing.channels == 1:
            img = torch.tensordot(_LUMA, img, dims=([0], [0]))[None]
        img = torch.clamp(img, 0.0, 1.0)
        return torch.as_tensor(spatial(img)).as_subclass(torch.Tensor)
    if preprocessing.window_center is not None and preprocessing.window_width is not None:
        half = preprocessing.window_width / 2.0
        lower, upper = preprocessing.window_center - half, preprocessing.window_center + half
    else:
        lower, upper = file_window
    if upper <= lower:
        upper = lower + 1.0
    invert = photometric == "MONOCHROME1"
    img = torch.from_numpy(pixels.astype(np.float32))[None]
    img = preprocessing.intensity_transform(lower, upper, invert)(img)
    return torch.as_tensor(spatial(img)).as_subclass(torch.Tensor)


_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
"""ITU-R BT.601 luma weights: a colour image seen by a one-channel plan."""


def refuse_misfits(
    name: str, misfits: Sequence[SkippedFile], n_fitting: int, preprocessing: Preprocessing
) -> None:
    """DataError when no image of a dataset fits the plan's channels, saying why."""
    if n_fitting or not misfits:
        return
    kinds: dict[str, int] = {}
    for item in misfits:
        kind = item.reason.split("(", 1)[1].split(")", 1)[0] if "(" in item.reason else "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    if preprocessing.channels == 3:
        fix = "use a plan with preprocessing.channels: 1 for these images"
        wants = "colour images (preprocessing.channels: 3)"
    else:
        fix = "use a plan with preprocessing.channels: 3, or to_grayscale: true"
        wants = "grayscale images (preprocessing.channels: 1)"
    raise DataError(
        f"dataset {name} does not fit the plan: it holds {found} image(s) and the plan takes "
        f"{wants}; {fix}"
    )


def finish_dataset(
    images: list[torch.Tensor],
    ys: list[int],
    study_uids: list[str],
    paths: list[str],
    groups: list[str],
    skipped: list[SkippedFile],
    warnings: list[str],
    version: str,
    entry_path: Path | None,
) -> LocalDataset:
    """Stack the preprocessed images into a LocalDataset and cache it (folder or catalogue)."""
    dataset = LocalDataset(
        torch.stack(images).contiguous(),
        torch.tensor(ys, dtype=torch.int64),
        study_uids=study_uids,
        paths=paths,
        groups=groups,
        skipped=skipped,
        warnings=warnings,
        cache_hit=False,
        version=version,
    )
    if entry_path is not None:
        _cache.save_entry(
            entry_path,
            {
                "images": dataset.images,
                "labels": dataset.labels,
                "study_uids": study_uids,
                "paths": paths,
                "groups": groups,
                "skipped": [[s.path, s.reason] for s in skipped],
                "warnings": warnings,
            },
        )
    return dataset


def build_dataset(
    folder: Path,
    preprocessing: Preprocessing,
    cache_dir: Path | None = None,
    labels_csv: Path | None = None,
) -> LocalDataset:
    """Build the preprocessed dataset of ``folder`` (``dicom/`` + ``labels.csv``).

    A folder registered with ``silo data add`` (it holds the catalogue marker) is built from
    the catalogue instead: its usable files and their resolved labels.

    With ``cache_dir``, tensors are reused when neither the files (paths, sizes, mtimes),
    ``labels.csv`` nor the preprocessing changed: then no DICOM is decoded. Images whose
    study has no label are skipped ("no label in labels.csv"); label rows matching no study
    become ``warnings``. Raises DataError when the folder is missing, holds no DICOM, or
    no image has a label.
    """
    folder = Path(folder)
    from silo_client.data.ingest import MARKER_FILE

    if labels_csv is None and (folder / MARKER_FILE).is_file():
        from silo_client.data.catalogued import build_catalogued_dataset

        return build_catalogued_dataset(folder, preprocessing, cache_dir)
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; register the hospital's data folder "
            "(with dicom/ and labels.csv) using 'silo init --dataset DIR'"
        )
    dicom_dir = folder / "dicom"
    if not dicom_dir.is_dir():
        raise DataError(
            f"data folder {folder} has no dicom/ subfolder; put the DICOM files in {dicom_dir}"
        )
    labels_path = Path(labels_csv) if labels_csv is not None else folder / "labels.csv"
    labels = _read_labels(labels_path)  # validates first: errors before any decoding

    version = _cache.dataset_version(dicom_dir, labels_path)
    entry_path = None
    if cache_dir is not None:
        entry_path = _cache.cache_path(Path(cache_dir), version, preprocessing.fingerprint())
        entry = _cache.load_entry(entry_path, _CACHE_FIELDS)
        if entry is not None:
            cached = _from_cache(entry, version)
            if cached is not None:
                log.debug("data cache hit %s", entry_path.name)
                return cached

    spatial = preprocessing.spatial_transform()
    images: list[torch.Tensor] = []
    ys: list[int] = []
    study_uids: list[str] = []
    paths: list[str] = []
    groups: list[str] = []
    skipped: list[SkippedFile] = []
    misfits: list[SkippedFile] = []
    studies_seen: set[str] = set()
    n_files = 0
    for rel, decoded, reason in _iter_scan(dicom_dir):
        n_files += 1
        if decoded is None:
            skipped.append(SkippedFile(rel, str(reason)))
            continue
        uid = decoded.instance.study_instance_uid
        studies_seen.add(uid)
        if uid not in labels:
            skipped.append(SkippedFile(rel, f"no label in labels.csv (StudyInstanceUID {uid})"))
            continue
        misfit = preprocessing.misfit(decoded.instance.photometric_interpretation)
        if misfit:
            misfits.append(SkippedFile(rel, misfit))
            continue
        images.append(
            preprocess_pixels(
                decoded.pixels, decoded.window,
                decoded.instance.photometric_interpretation, preprocessing, spatial,
            )
        )  # fmt: skip
        ys.append(labels[uid][0])
        study_uids.append(uid)
        paths.append(rel)
        groups.append(decoded.group)

    if n_files == 0:
        raise DataError(
            f"no DICOM files in {dicom_dir}; copy the hospital's exported DICOM files there"
        )
    skipped.extend(misfits)
    refuse_misfits(f"folder {folder}", misfits, len(images), preprocessing)
    n_images = len(images) + sum(1 for s in skipped if s.reason.startswith("no label in"))
    if n_images == 0:
        example = skipped[0]
        raise DataError(
            f"none of the {n_files} file(s) in {dicom_dir} is a usable DICOM image "
            f"(e.g. {example.path}: {example.reason}); check the export"
        )
    if not images:
        raise DataError(
            f"none of the {n_images} DICOM image(s) in {dicom_dir} has a label in {labels_path}; "
            "its StudyInstanceUID column must hold the studies' StudyInstanceUID values"
        )
    warnings = [
        f"{labels_path.name} line {line}: StudyInstanceUID {uid} matches no DICOM study "
        f"in {dicom_dir.name}/"
        for uid, (_, line) in sorted(labels.items(), key=lambda kv: kv[1][1])
        if uid not in studies_seen
    ]
    for w in warnings[:20]:
        log.warning("%s", w)
    if len(warnings) > 20:
        log.warning("... and %d more label rows matching no study", len(warnings) - 20)

    return finish_dataset(
        images, ys, study_uids, paths, groups, skipped, warnings, version, entry_path
    )
