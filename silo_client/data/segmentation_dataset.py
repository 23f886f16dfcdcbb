"""Load a hospital's CT series and their lesion masks into tensors for 3-D segmentation.

Layout of a segmentation dataset folder::

    <folder>/dicom/...                         CT series (any depth, any file names) and the
                                               DICOM SEG objects labelling them
    <folder>/masks/<SeriesInstanceUID>.nii.gz  optional NIfTI masks, one per series

A folder registered with ``silo data add NAME --dicom-dir DIR`` (it holds the catalogue marker)
is read from the registered DIR: DIR itself when it has a ``dicom/`` subfolder, else DIR is the
DICOM folder and the masks are in ``DIR/masks`` or ``DIR/../masks``.

Per series (see :mod:`silo_client.data.volume` and :mod:`silo_client.data.masks`): slices
ordered by position and checked, HU from RescaleSlope/Intercept, the mask from its SEG or
NIfTI. Then both are resampled to a ``S x S x S`` cube with ``torch.nn.functional.interpolate``
(the image trilinear, ``align_corners=False``; the mask ``nearest-exact``, so labels stay 0/1),
each axis stretched independently: ``spacing_mm`` holds the resulting voxel size per case
(extent / S along slice, row and column) for distances in mm (HD95). The image is then
windowed to [0, 1] (clipped) with the preprocessing's window, by default a soft-tissue window
of center 40 HU, width 400 HU (:data:`DEFAULT_WINDOW`).

Series without a mask, series whose geometry or mask is wrong, non-image objects and unreadable
files are listed in ``skipped`` with the reason; nothing is dropped silently. Tensors are cached
per (dataset version, preprocessing fingerprint) with :mod:`silo_client.data.cache`: a warm
build reads no DICOM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pydicom.dataset import Dataset as DicomDataset
from pydicom.uid import UID

from silo_client.data import cache as _cache
from silo_client.data.dicom_read import read_dicom
from silo_client.data.masks import (
    MaskError,
    MaskSource,
    is_seg,
    mask_from_nifti,
    mask_from_seg,
    match_masks,
    seg_referenced_series,
)
from silo_client.data.volume import (
    SliceHeader,
    Volume,
    VolumeError,
    build_volume,
    check_series_geometry,
    slice_header,
)
from silo_client.errors import DataError

__all__ = [
    "DEFAULT_WINDOW",
    "SEGMENTATION_PREPROCESSING_VERSION",
    "SegmentationData",
    "SkippedItem",
    "VolumePreprocessing",
    "build_segmentation_dataset",
    "preprocess_volume",
]

log = logging.getLogger(__name__)

#: Bumped whenever the preprocessing code changes its output; part of the cache key.
SEGMENTATION_PREPROCESSING_VERSION = "1"
#: Soft-tissue window (center, width) in HU used when the preprocessing gives none.
DEFAULT_WINDOW = (40.0, 400.0)
_SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class VolumePreprocessing:
    """How a CT series and its mask become ``[1, S, S, S]`` tensors (S = ``input_size``).

    ``window_center``/``window_width`` in HU; both None means the soft-tissue default
    :data:`DEFAULT_WINDOW` (center 40, width 400). ``segment`` picks one segment (a DICOM SEG
    SegmentLabel or number, a NIfTI label value); None labels every voxel > 0.
    """

    input_size: int
    window_center: float | None = None
    window_width: float | None = None
    segment: str | None = None

    def __post_init__(self) -> None:
        """Validate the fields (DataError with a fix hint)."""
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise DataError(f"volume input_size must be an integer, got {self.input_size!r}")
        if not 8 <= self.input_size <= 512:
            raise DataError(f"volume input_size must be in [8, 512] voxels, got {self.input_size}")
        if (self.window_center is None) != (self.window_width is None):
            raise DataError(
                "volume window needs both window_center and window_width "
                f"(got center={self.window_center}, width={self.window_width}); set both or neither"
            )
        if self.window_width is not None and not (
            math.isfinite(self.window_width) and self.window_width > 0
        ):
            raise DataError(f"volume window_width must be > 0 HU, got {self.window_width}")
        if self.window_center is not None and not math.isfinite(self.window_center):
            raise DataError(f"volume window_center must be finite, got {self.window_center}")
        if self.segment is not None and not str(self.segment).strip():
            raise DataError("volume segment must be a segment label or number, got ''")

    @property
    def window(self) -> tuple[float, float]:
        """The (lower, upper) HU bounds mapped to 0 and 1."""
        center, width = (
            (self.window_center, self.window_width)
            if self.window_center is not None and self.window_width is not None
            else DEFAULT_WINDOW
        )
        return center - width / 2.0, center + width / 2.0

    def fingerprint(self) -> str:
        """Stable hash of the preprocessing (fields + code version), used as a cache key."""
        fields = {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        payload = {"task": "segmentation", "version": SEGMENTATION_PREPROCESSING_VERSION, **fields}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class SkippedItem(NamedTuple):
    """A file or series that is not used (``item``: relative path or ``series <UID>``)."""

    item: str
    reason: str


@dataclass
class SegmentationData:
    """A silo's preprocessed segmentation cases.

    ``images`` ``(N, 1, S, S, S)`` float32 in [0, 1]; ``masks`` ``(N, 1, S, S, S)`` uint8 in
    {0, 1}; ``spacing_mm`` ``(N, 3)`` float32 voxel size after resampling (slice, row,
    column); ``series_uids`` per case (they never leave the silo); ``skipped`` files and series
    with reasons; ``warnings`` (empty masks, uneven spacing, ...).
    """

    images: torch.Tensor
    masks: torch.Tensor
    spacing_mm: torch.Tensor
    series_uids: list[str]
    skipped: list[SkippedItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cache_hit: bool = False
    version: str = ""

    def __post_init__(self) -> None:
        """Check that the per-case fields agree in length."""
        n = int(self.images.shape[0])
        if not (self.masks.shape[0] == self.spacing_mm.shape[0] == len(self.series_uids) == n):
            raise DataError(
                f"segmentation data fields differ in length (images {n}, masks "
                f"{self.masks.shape[0]}, spacing {self.spacing_mm.shape[0]}, "
                f"series {len(self.series_uids)})"
            )

    def __len__(self) -> int:
        """Number of cases."""
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One case as MONAI-style ``{"image", "label", "spacing"}``."""
        return {
            "image": self.images[index],
            "label": self.masks[index],
            "spacing": self.spacing_mm[index],
        }

    def subset(self, indices: Sequence[int]) -> SegmentationData:
        """The given cases (sharing ``skipped`` and ``warnings``)."""
        pick = [int(i) for i in indices]
        idx = torch.as_tensor(pick, dtype=torch.long)
        return SegmentationData(
            images=self.images[idx],
            masks=self.masks[idx],
            spacing_mm=self.spacing_mm[idx],
            series_uids=[self.series_uids[i] for i in pick],
            skipped=list(self.skipped),
            warnings=list(self.warnings),
            cache_hit=self.cache_hit,
            version=self.version,
        )


def preprocess_volume(
    volume: Volume, mask: np.ndarray, preprocessing: VolumePreprocessing
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample a volume (trilinear) and its mask (nearest) to ``S^3`` and window the image.

    Returns (image ``[1, S, S, S]`` float32 in [0, 1], mask ``[1, S, S, S]`` uint8, spacing
    ``[3]`` float32 mm after resampling).
    """
    s = preprocessing.input_size
    if mask.shape != volume.shape:
        raise MaskError(f"mask shape {mask.shape} differs from the volume's {volume.shape}")
    hu = torch.from_numpy(np.ascontiguousarray(volume.voxels, dtype=np.float32))[None, None]
    image = torch.nn.functional.interpolate(
        hu, size=(s, s, s), mode="trilinear", align_corners=False
    )[0]
    lower, upper = preprocessing.window
    image = torch.clamp((image - lower) / (upper - lower), 0.0, 1.0).contiguous()
    m = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))[None, None]
    label = torch.nn.functional.interpolate(m, size=(s, s, s), mode="nearest-exact")[0]
    label = (label > 0.5).to(torch.uint8).contiguous()
    spacing = torch.tensor(
        [n * sp / s for n, sp in zip(volume.shape, volume.spacing, strict=True)],
        dtype=torch.float32,
    )
    return image, label, spacing


# --------------------------------------------------------------------------------------------
# Folder layout and version


def _layout(folder: Path) -> tuple[Path, Path | None, Path]:
    """(DICOM folder, masks folder or None, folder paths are shown relative to)."""
    from silo_client.data.ingest import MARKER_FILE

    marker = folder / MARKER_FILE
    if marker.is_file():
        root = _registered_root(marker)
        if (root / "dicom").is_dir():
            folder = root
        else:
            for masks in (root / "masks", root.parent / "masks"):
                if masks.is_dir():
                    return root, masks, root.parent
            return root, None, root.parent
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; register the hospital's segmentation folder "
            "(with dicom/ and optionally masks/)"
        )
    dicom_dir = folder / "dicom"
    if not dicom_dir.is_dir():
        raise DataError(
            f"data folder {folder} has no dicom/ subfolder; put the CT series and DICOM SEG "
            f"files in {dicom_dir}"
        )
    masks_dir = folder / "masks"
    return dicom_dir, (masks_dir if masks_dir.is_dir() else None), folder


def _registered_root(marker: Path) -> Path:
    from silo_client.data.catalogue import Catalogue
    from silo_client.data.catalogued import registered_catalogue

    db_path, name = registered_catalogue(marker.parent)
    with Catalogue(db_path) as catalogue:
        record = catalogue.require(name)
    root = Path(record.files_root)
    if not root.is_dir():
        raise DataError(
            f"dataset '{name}' was registered from {root}, which no longer exists; "
            f"register it again with 'silo data add {name} --dicom-dir DIR'"
        )
    return root


def _version(dicom_dir: Path, masks_dir: Path | None) -> str:
    h = hashlib.sha256(b"fedsilo-segmentation-layout-1\0")
    h.update(_cache.dataset_version(dicom_dir, None).encode())
    h.update(b"\0masks:")
    h.update(_cache.dataset_version(masks_dir, None).encode() if masks_dir else b"<none>")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Scanning


@dataclass
class _Scan:
    series: dict[str, list[tuple[Path, SliceHeader]]] = field(default_factory=dict)
    segs: dict[str, DicomDataset] = field(default_factory=dict)
    seg_paths: dict[str, Path] = field(default_factory=dict)
    skipped: list[SkippedItem] = field(default_factory=list)
    n_files: int = 0


def _classify(ds: DicomDataset) -> str | None:
    """Why an image dataset cannot be a volume slice, or None when it can."""
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class:
        name = UID(sop_class).name
        if name != sop_class and "Image" not in name:
            return f"non-image SOP class '{name}' ({sop_class}): nothing to segment"
    if "PixelData" not in ds:
        return "no pixel data (tag (7FE0,0010) PixelData is absent)"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    if photometric.strip().upper() not in _SUPPORTED_PHOTOMETRIC:
        return f"unsupported PhotometricInterpretation '{photometric}' (grayscale only)"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames); volumes are built from single-frame slices"
    if not str(ds.get("SeriesInstanceUID", "") or "").strip():
        return "no SeriesInstanceUID (needed to group slices into a series)"
    return None


def _scan(dicom_dir: Path, root: Path) -> _Scan:
    scan = _Scan()
    paths = sorted((p for p in dicom_dir.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    for path in paths:
        scan.n_files += 1
        rel = path.relative_to(root).as_posix()
        ds, reason = read_dicom(path)
        if ds is None:
            scan.skipped.append(SkippedItem(rel, str(reason)))
            continue
        try:
            if is_seg(ds):
                scan.segs[rel] = ds  # bit-packed and small: kept rather than read twice
                scan.seg_paths[rel] = path
                continue
            reason = _classify(ds)
            if reason:
                scan.skipped.append(SkippedItem(rel, reason))
                continue
            header = slice_header(ds, rel)
        except Exception as exc:  # malformed element values, odd VRs, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            scan.skipped.append(SkippedItem(rel, f"unreadable DICOM ({first})"))
            continue
        scan.series.setdefault(header.series_uid, []).append((path, header))
    return scan


def _load_volume(files: list[tuple[Path, SliceHeader]]) -> Volume:
    check_series_geometry([h for _, h in files])  # fails before any pixel is decoded
    datasets, names = [], []
    for path, header in files:
        ds, reason = read_dicom(path)
        if ds is None:
            raise VolumeError(f"{header.source}: {reason}")
        datasets.append(ds)
        names.append(header.source)
    return build_volume(datasets, names)


def _load_mask(
    source: MaskSource, scan: _Scan, volume: Volume, preprocessing: VolumePreprocessing
) -> np.ndarray:
    if source.kind == "seg":
        return mask_from_seg(scan.segs[source.rel], volume, source.rel, preprocessing.segment)
    return mask_from_nifti(source.path, volume, source.rel, preprocessing.segment)


# --------------------------------------------------------------------------------------------
# Cache


_CACHE_FIELDS: dict[str, type] = {
    "images": torch.Tensor,
    "masks": torch.Tensor,
    "spacing_mm": torch.Tensor,
    "series_uids": list,
    "skipped": list,
    "warnings": list,
}


def _from_cache(entry: dict[str, Any], version: str, size: int) -> SegmentationData | None:
    images, masks, spacing = entry["images"], entry["masks"], entry["spacing_mm"]
    n = int(images.shape[0]) if images.ndim == 5 else -1
    cube = (n, 1, size, size, size)
    if (
        images.dtype != torch.float32
        or masks.dtype != torch.uint8
        or spacing.dtype != torch.float32
        or tuple(images.shape) != cube
        or tuple(masks.shape) != cube
        or tuple(spacing.shape) != (n, 3)
        or len(entry["series_uids"]) != n
    ):
        return None
    return SegmentationData(
        images=images,
        masks=masks,
        spacing_mm=spacing,
        series_uids=[str(s) for s in entry["series_uids"]],
        skipped=[SkippedItem(str(i), str(r)) for i, r in entry["skipped"]],
        warnings=[str(w) for w in entry["warnings"]],
        cache_hit=True,
        version=version,
    )


# --------------------------------------------------------------------------------------------
# Build


def build_segmentation_dataset(
    folder: Path, preprocessing: VolumePreprocessing, cache_dir: Path | None = None
) -> SegmentationData:
    """Build the preprocessed segmentation cases of ``folder`` (``dicom/`` + ``masks/``).

    With ``cache_dir``, tensors are reused when neither the files under ``dicom/`` and
    ``masks/`` (paths, sizes, mtimes) nor the preprocessing changed: then no DICOM is read.
    Raises DataError when the folder is missing, holds no DICOM, or no series has a usable mask.
    """
    folder = Path(folder)
    dicom_dir, masks_dir, root = _layout(folder)
    version = _version(dicom_dir, masks_dir)
    entry_path = None
    if cache_dir is not None:
        entry_path = _cache.cache_path(Path(cache_dir), version, preprocessing.fingerprint())
        entry = _cache.load_entry(entry_path, _CACHE_FIELDS)
        if entry is not None:
            cached = _from_cache(entry, version, preprocessing.input_size)
            if cached is not None:
                log.debug("segmentation cache hit %s", entry_path.name)
                return cached

    scan = _scan(dicom_dir, root)
    if scan.n_files == 0:
        raise DataError(
            f"no DICOM files in {dicom_dir}; copy the hospital's CT series (and SEG objects) there"
        )
    if not scan.series:
        example = scan.skipped[0] if scan.skipped else SkippedItem("?", "?")
        raise DataError(
            f"none of the {scan.n_files} file(s) in {dicom_dir} is a usable CT slice "
            f"(e.g. {example.item}: {example.reason}); check the export"
        )
    refs = {rel: seg_referenced_series(ds) for rel, ds in scan.segs.items()}
    chosen, problems, mask_skips = match_masks(scan.series, refs, scan.seg_paths, masks_dir, root)
    skipped = list(scan.skipped) + [SkippedItem(i, r) for i, r in mask_skips]
    warnings: list[str] = []
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    spacings: list[torch.Tensor] = []
    uids: list[str] = []
    for uid in sorted(scan.series):
        files = sorted(scan.series[uid], key=lambda f: f[1].source)
        what = f"series {uid}"
        if uid in problems:
            skipped.append(SkippedItem(what, problems[uid]))
            continue
        source = chosen.get(uid)
        if source is None:
            skipped.append(SkippedItem(
                what,
                f"no segmentation ({len(files)} slice(s) in {Path(files[0][1].source).parent}/): "
                f"no DICOM SEG references it and there is no masks/{uid}.nii.gz",
            ))  # fmt: skip
            continue
        try:
            volume = _load_volume(files)
            mask = _load_mask(source, scan, volume, preprocessing)
        except DataError as exc:  # VolumeError, MaskError: this series only
            skipped.append(SkippedItem(what, str(exc)))
            continue
        warnings.extend(volume.warnings)
        if not mask.any():
            warnings.append(
                f"{what}: the mask in {source.rel} is empty (no voxel labelled); "
                "it trains as a case without lesion"
            )
        image, label, spacing = preprocess_volume(volume, mask, preprocessing)
        if mask.any() and not label.any():
            warnings.append(
                f"{what}: the lesion in {source.rel} vanishes at {preprocessing.input_size}^3; "
                "raise input_size"
            )
        images.append(image)
        masks.append(label)
        spacings.append(spacing)
        uids.append(uid)
    if not images:
        reasons = [s for s in skipped if s.item.startswith("series ")] or skipped
        example = reasons[0]
        raise DataError(
            f"no usable labelled series in {dicom_dir} ({len(scan.series)} series; e.g. "
            f"{example.item}: {example.reason}); add DICOM SEG objects under dicom/ or NIfTI "
            f"masks as masks/<SeriesInstanceUID>.nii.gz"
        )
    for w in warnings[:20]:
        log.warning("%s", w)
    data = SegmentationData(
        images=torch.stack(images).contiguous(),
        masks=torch.stack(masks).contiguous(),
        spacing_mm=torch.stack(spacings).contiguous(),
        series_uids=uids,
        skipped=skipped,
        warnings=warnings,
        cache_hit=False,
        version=version,
    )
    if entry_path is not None:
        _cache.save_entry(
            entry_path,
            {
                "images": data.images,
                "masks": data.masks,
                "spacing_mm": data.spacing_mm,
                "series_uids": uids,
                "skipped": [[s.item, s.reason] for s in skipped],
                "warnings": warnings,
            },
        )
    return data
