"""Segmentation labels for a volume, matched to its series by SeriesInstanceUID.

Two sources are read, both giving a binary ``(D, H, W)`` uint8 mask in the volume's slice order
(:class:`~silo_client.data.volume.Volume`):

* **DICOM SEG** objects (read with highdicom) anywhere under the dataset's ``dicom/`` folder. A SEG
  belongs to the series named in its ReferencedSeriesSequence. Its frames are mapped onto the
  series' slices through the SOPInstanceUIDs each frame references (DerivationImageSequence);
  a SEG whose frames carry no such references is mapped through its frames'
  ImagePositionPatient (PlanePositionSequence) projected on the slice normal instead.
* **NIfTI** files ``masks/<SeriesInstanceUID>.nii.gz`` (or ``.nii``). NIfTI stores its array in
  its own axis order with an index->RAS affine; the mask is brought onto the volume grid through
  that affine (converted to DICOM's LPS): each NIfTI axis must run along one volume axis (either
  direction) with the same voxel size, and voxel 0 must sit on a voxel corner of the volume. This
  covers dcm2niix-style files (axes column, row, slice) and arrays saved in the volume's own
  (slice, row, column) order alike. A NIfTI whose sform and qform codes are both 0 carries no
  orientation; its array is then taken as (column, row, slice) in the series' slice order (the
  layout converters write), and only its shape is checked.

A voxel is labelled when its value is > 0, or, with ``segment`` given, when it belongs to that
segment: a SEG SegmentLabel (case-insensitive) or segment number, or a NIfTI label value.
Problems raise :class:`MaskError` (a :class:`~silo_client.errors.DataError`) with one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset as DicomDataset

from silo_client.data.volume import Volume
from silo_client.errors import DataError

__all__ = [
    "NIFTI_SUFFIXES",
    "SEG_SOP_CLASS",
    "MaskError",
    "MaskShapeError",
    "MaskSource",
    "is_seg",
    "mask_from_nifti",
    "mask_from_seg",
    "match_masks",
    "nifti_series_uid",
    "seg_referenced_series",
]

#: SOP Class UID of the DICOM Segmentation Storage object.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: File name endings of NIfTI masks, longest first.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ALIGN_TOL = 0.02  # relative voxel-size / cosine tolerance when matching a NIfTI grid
_OFFSET_TOL = 0.5  # voxels


class MaskError(DataError):
    """A segmentation mask cannot be used for its series; the message says why."""


class MaskShapeError(MaskError):
    """A mask's voxel grid has another shape than its series' volume."""


@dataclass(frozen=True)
class MaskSource:
    """Where the mask of one series comes from: a DICOM SEG or a NIfTI file."""

    kind: str  # "seg" | "nifti"
    path: Path
    rel: str  # path relative to the dataset folder, for messages


def is_seg(ds: DicomDataset) -> bool:
    """True when ``ds`` is a DICOM Segmentation object."""
    sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return sop == SEG_SOP_CLASS


def seg_referenced_series(ds: DicomDataset) -> list[str]:
    """SeriesInstanceUIDs a SEG references (ReferencedSeriesSequence; else its source images)."""
    out = [
        str(item.get("SeriesInstanceUID", "")).strip()
        for item in ds.get("ReferencedSeriesSequence", [])
    ]
    return [u for u in dict.fromkeys(out) if u]


def nifti_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID a NIfTI mask file is named after, or None if not a NIfTI name."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def match_masks(
    series_uids: Iterable[str],
    segs: Mapping[str, list[str]],
    seg_paths: Mapping[str, Path],
    masks_dir: Path | None,
    folder: Path,
) -> tuple[dict[str, MaskSource], dict[str, str], list[tuple[str, str]]]:
    """Pair series with their masks.

    ``segs`` maps a SEG's relative path to the series it references, ``seg_paths`` that path to
    the file. Returns (series -> mask source, series -> reason it cannot be used (two masks),
    skipped mask files with reasons: SEG or NIfTI naming a series that is not in the dataset,
    files in ``masks/`` that are not NIfTI masks).
    """
    known = set(series_uids)
    found: dict[str, list[MaskSource]] = {}
    skipped: list[tuple[str, str]] = []
    for rel, refs in sorted(segs.items()):
        if not refs:
            skipped.append((rel, "DICOM SEG names no referenced series (ReferencedSeriesSequence)"))
            continue
        hits = [u for u in refs if u in known]
        if not hits:
            skipped.append(
                (rel, f"DICOM SEG references series {refs[0]}, which is not in dicom/ "
                      "(copy that CT series there or remove the SEG)")
            )  # fmt: skip
            continue
        if len(hits) > 1:
            skipped.append((rel, f"DICOM SEG references {len(hits)} series; one per SEG is used"))
            continue
        found.setdefault(hits[0], []).append(MaskSource("seg", Path(seg_paths[rel]), rel))
    if masks_dir is not None and masks_dir.is_dir():
        for path in sorted(p for p in masks_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            uid = nifti_series_uid(path)
            if uid is None:
                skipped.append(
                    (rel, "not a NIfTI mask (expected masks/<SeriesInstanceUID>.nii.gz)")
                )
            elif uid not in known:
                skipped.append(
                    (rel, f"NIfTI mask names series {uid}, which is not in dicom/ "
                          "(the file name must be the series' SeriesInstanceUID)")
                )  # fmt: skip
            else:
                found.setdefault(uid, []).append(MaskSource("nifti", path, rel))
    chosen: dict[str, MaskSource] = {}
    problems: dict[str, str] = {}
    for uid, sources in found.items():
        if len(sources) == 1:
            chosen[uid] = sources[0]
            continue
        kinds = {s.kind for s in sources}
        names = " and ".join(s.rel for s in sources)
        if kinds == {"seg", "nifti"}:
            problems[uid] = (
                f"both a DICOM SEG and a NIfTI mask label this series ({names}); keep one"
            )
        else:
            problems[uid] = f"{len(sources)} masks label this series ({names}); keep one"
    return chosen, problems, skipped


# ------------------------------------------------------------------------------------ SEG


def _seg_segment_numbers(seg: object, segment: str | None, rel: str) -> list[int]:
    numbers = [int(n) for n in seg.segment_numbers]  # type: ignore[attr-defined]
    if segment is None:
        return numbers
    labels = {
        n: str(seg.get_segment_description(n).segment_label)  # type: ignore[attr-defined]
        for n in numbers
    }
    wanted = [n for n, lab in labels.items() if lab.lower() == segment.strip().lower()]
    if not wanted and segment.strip().isdigit() and int(segment) in labels:
        wanted = [int(segment)]
    if not wanted:
        shown = ", ".join(f"{n}: {lab}" for n, lab in labels.items())
        raise MaskError(f"{rel}: no segment '{segment}' in this DICOM SEG (segments: {shown})")
    return wanted


def mask_from_seg(
    ds: DicomDataset, volume: Volume, rel: str = "DICOM SEG", segment: str | None = None
) -> np.ndarray:
    """Binary ``(D, H, W)`` mask of ``volume`` from a DICOM SEG dataset (see the module doc)."""
    import highdicom as hd

    refs = seg_referenced_series(ds)
    if volume.series_uid not in refs:
        raise MaskError(
            f"{rel}: DICOM SEG references series {', '.join(refs) or '(none)'}, "
            f"not series {volume.series_uid}"
        )
    d, h, w = volume.shape
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (rows, cols) != (h, w):
        raise MaskShapeError(
            f"{rel}: DICOM SEG frames are {rows}x{cols}, the series' slices are {h}x{w} "
            "(rows x columns); the SEG was made on another image grid"
        )
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:
        raise MaskError(f"{rel}: not a valid DICOM SEG ({_one_line(exc)})") from None
    numbers = _seg_segment_numbers(seg, segment, rel)
    sops = set(volume.sop_uids)
    referenced = {str(sop) for _, series, sop in seg.get_source_image_uids() if series}
    foreign = referenced - sops
    if referenced and foreign:
        raise MaskError(
            f"{rel}: DICOM SEG references {len(foreign)} image(s) that are not slices of series "
            f"{volume.series_uid} (e.g. SOPInstanceUID {sorted(foreign)[0]}); is the series "
            "complete in dicom/?"
        )
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_uids,
            segment_numbers=numbers,
            combine_segments=True,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,
        )
        mask = np.asarray(pixels) > 0
    except Exception:
        # Frames without per-frame source references: map them by their plane positions.
        mask = _seg_by_position(ds, seg, volume, numbers, rel)
    if mask.shape != (d, h, w):
        raise MaskShapeError(
            f"{rel}: DICOM SEG gives a mask of shape {mask.shape}, the series is {(d, h, w)}"
        )
    return mask.astype(np.uint8)


def _seg_by_position(
    ds: DicomDataset, seg: object, volume: Volume, numbers: list[int], rel: str
) -> np.ndarray:
    d, h, w = volume.shape
    normal = volume.normal
    positions = np.asarray(volume.positions) if volume.positions else (
        np.asarray(volume.origin) @ normal + np.arange(d) * volume.spacing[0]
    )  # fmt: skip
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        raise MaskError(f"{rel}: DICOM SEG has no PerFrameFunctionalGroupsSequence to place frames")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [DicomDataset()])[0]
    mask = np.zeros((d, h, w), dtype=bool)
    for i, item in enumerate(frames):
        try:
            ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            # With one segment, writers put the segment identification in the shared groups.
            ident = (
                item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
            )
            number = int(ident[0].ReferencedSegmentNumber)
        except (AttributeError, IndexError, TypeError, ValueError):
            raise MaskError(
                f"{rel}: DICOM SEG frame {i + 1} has neither source image references nor a "
                "plane position and segment number; it cannot be placed on the series"
            ) from None
        if number not in numbers:
            continue
        z = float(ipp @ normal)
        k = int(np.argmin(np.abs(positions - z)))
        if abs(positions[k] - z) > 0.25 * volume.spacing[0]:
            raise MaskError(
                f"{rel}: DICOM SEG frame {i + 1} lies at {z:.4g} mm along the slice normal, "
                f"where series {volume.series_uid} has no slice"
            )
        frame = np.asarray(seg.get_stored_frame(i + 1))  # type: ignore[attr-defined]
        mask[k] |= frame.reshape(h, w) > 0
    return mask


# ------------------------------------------------------------------------------------ NIfTI


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _nifti_to_volume_axes(
    affine_ras: np.ndarray, volume: Volume, rel: str
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], np.ndarray]:
    """(volume axis of each NIfTI axis, whether it runs backwards, voxel-0 offset in voxels)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    t = np.linalg.inv(volume.affine()) @ lps
    axes: list[int] = []
    flips: list[bool] = []
    for a in range(3):
        col = t[:3, a]
        b = int(np.argmax(np.abs(col)))
        others = np.delete(np.abs(col), b)
        if abs(abs(col[b]) - 1.0) > _ALIGN_TOL or np.any(others > _ALIGN_TOL) or b in axes:
            raise MaskError(
                f"{rel}: the NIfTI voxel grid is not the series' grid (NIfTI axis {a} runs "
                f"{np.round(col, 3).tolist()} in series voxels); resample the mask onto the "
                "series or export it from this series"
            )
        axes.append(b)
        flips.append(bool(col[b] < 0))
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2]), t[:3, 3]


def mask_from_nifti(path: Path, volume: Volume, rel: str | None = None,
                    segment: str | None = None) -> np.ndarray:  # fmt: skip
    """Binary ``(D, H, W)`` mask of ``volume`` from a NIfTI file (see the module doc)."""
    import nibabel as nib

    rel = rel or Path(path).name
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise MaskError(f"{rel}: not a readable NIfTI file ({_one_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskShapeError(f"{rel}: NIfTI mask has {data.ndim} dimensions {data.shape}, need 3")
    if segment is None:
        labelled = data > 0
    elif segment.strip().lstrip("-").isdigit():
        labelled = data == int(segment)
    else:
        raise MaskError(
            f"{rel}: NIfTI masks have label values, not segment names; pass a label number "
            f"instead of '{segment}'"
        )
    d, h, w = volume.shape
    header = img.header
    oriented = int(header.get("sform_code", 0)) > 0 or int(header.get("qform_code", 0)) > 0
    if not oriented:
        if labelled.shape != (w, h, d):
            raise MaskShapeError(
                f"{rel}: NIfTI mask has shape {labelled.shape} (taken as columns x rows x slices: "
                f"it has no orientation), the series is {w} x {h} x {d}"
            )
        return np.ascontiguousarray(np.transpose(labelled, (2, 1, 0))).astype(np.uint8)
    axes, flips, offset = _nifti_to_volume_axes(np.asarray(img.affine, dtype=float), volume, rel)
    # Reorder the NIfTI axes into (slice, row, column) and flip the ones that run backwards.
    order = [axes.index(b) for b in range(3)]
    arr = np.transpose(labelled, order)
    names = ("slices", "rows", "columns")
    if arr.shape != (d, h, w):
        shown = " x ".join(f"{n} {names[i]}" for i, n in enumerate(arr.shape))
        raise MaskShapeError(
            f"{rel}: NIfTI mask has shape {labelled.shape}, i.e. {shown} in the series' axes; "
            f"the series has {d} slices x {h} rows x {w} columns"
        )
    for b in range(3):
        if flips[order[b]]:
            arr = np.flip(arr, axis=b)
    # Voxel 0 of the NIfTI must land on the first (or, along a flipped axis, last) voxel.
    expected = np.array([(arr.shape[b] - 1) if flips[order[b]] else 0 for b in range(3)])
    delta = offset - expected
    if np.any(np.abs(delta) > _OFFSET_TOL):
        raise MaskError(
            f"{rel}: NIfTI mask is shifted from the series by {np.round(delta, 2).tolist()} "
            "voxels (slices, rows, columns); it was not made on this series' grid"
        )
    return np.ascontiguousarray(arr).astype(np.uint8)
