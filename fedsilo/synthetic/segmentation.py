"""Synthetic 3-D CT-like series with lesion masks for a segmentation task.

Each hospital gets a folder of DICOM series (one per case) whose lesion masks come as DICOM
SEG or as NIfTI files, depending on the hospital's conventions (slice order, tilt, storage).
Output is deterministic for the arguments.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
)

from fedsilo.synthetic.dicom_writing import (
    _FIRST_NAMES,
    _INSTITUTIONS,
    _LAST_NAMES,
    _draw_patient,
    _fmt_ds,
    _Patient,
    _uid,
)
from fedsilo.synthetic.drawing import _spread
from silo_client.errors import DataError

__all__ = [
    "SEGMENTATION_GENERATOR_VERSION",
    "SegmentationHospitalSpec",
    "generate_segmentation_hospital",
    "generate_segmentation_hospitals",
    "make_segmentation_specs",
    "render_ct_volume",
    "write_nifti_mask",
    "write_seg",
]

_SEG_STREAM = 4
#: Bumped whenever the generated 3-D series or masks change for a given seed.
SEGMENTATION_GENERATOR_VERSION = "1"

# Per-hospital scanner conventions, cycled: how a site stores and orders its series and how
# its lesion masks come (DICOM SEG from the PACS's annotation tool, or NIfTI from a research
# pipeline).
_CT_PROFILES: tuple[dict[str, object], ...] = (
    {"pixel_representation": 0, "rescale_intercept": -1024.0, "tilt_deg": 0.0,
     "reverse_numbers": False, "mask_format": "seg", "manufacturer": "Meridian Imaging",
     "model": "Helix 64"},
    {"pixel_representation": 1, "rescale_intercept": 0.0, "tilt_deg": 0.0,
     "reverse_numbers": True, "mask_format": "nifti", "manufacturer": "Cobalt Medical",
     "model": "Spectra 128"},
    {"pixel_representation": 0, "rescale_intercept": -1000.0, "tilt_deg": 12.0,
     "reverse_numbers": False, "mask_format": "seg", "manufacturer": "Northlight Systems",
     "model": "AxialPro 32"},
    {"pixel_representation": 1, "rescale_intercept": -1024.0, "tilt_deg": -8.0,
     "reverse_numbers": True, "mask_format": "nifti", "manufacturer": "PACSware",
     "model": "Export 3"},
)  # fmt: skip


@dataclass(frozen=True)
class SegmentationHospitalSpec:
    """Parameters of one synthetic hospital of 3-D CT series with lesion masks."""

    name: str
    index: int
    n_cases: int
    size: int  # rows = columns
    slices_min: int
    slices_max: int
    pixel_spacing: float  # mm
    slice_spacing: float  # mm (also the SliceThickness)
    tilt_deg: float  # rotation of the slice plane about the patient's left-right axis
    reverse_numbers: bool  # InstanceNumber runs against the position (feet-first exports)
    mask_format: str  # "seg" (DICOM SEG) or "nifti" (masks/<SeriesInstanceUID>.nii.gz)
    pixel_representation: int
    rescale_intercept: float
    intensity_offset: float  # HU calibration offset of the scanner
    noise_sigma: float  # HU
    lesion_contrast: float  # HU above the surrounding tissue
    institution_name: str
    manufacturer: str
    model: str
    seed: int

    def to_json(self) -> str:
        """The spec as stable, sorted JSON (written next to the data as ``spec.json``)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def make_segmentation_specs(
    n_hospitals: int = 3,
    cases_per_hospital: int = 16,
    size: int = 64,
    slices: tuple[int, int] = (24, 32),
    seed: int = 0,
) -> list[SegmentationHospitalSpec]:
    """Draw the per-hospital parameters of the 3-D generator (deterministic); writes nothing."""
    if n_hospitals < 1:
        raise DataError(f"n_hospitals must be >= 1, got {n_hospitals}; pass a positive count")
    if cases_per_hospital < 2:
        raise DataError(
            f"cases_per_hospital must be >= 2, got {cases_per_hospital}; pass a larger count"
        )
    if not 16 <= size <= 512:
        raise DataError(f"size must be in [16, 512] pixels, got {size}; pass e.g. 64")
    lo, hi = slices
    if not 8 <= lo <= hi <= 512:
        raise DataError(f"slices must satisfy 8 <= min <= max <= 512, got {slices}; e.g. (24, 32)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SEG_STREAM]))
    offsets = _spread(rng, -30.0, 30.0, n_hospitals)
    noises = _spread(rng, 8.0, 20.0, n_hospitals)
    thickness = _spread(rng, 2.5, 5.0, n_hospitals)
    institutions = rng.permutation(len(_INSTITUTIONS))
    specs = []
    for k in range(n_hospitals):
        profile = _CT_PROFILES[k % len(_CT_PROFILES)]
        specs.append(
            SegmentationHospitalSpec(
                name=f"hospital-{k}",
                index=k,
                n_cases=int(cases_per_hospital),
                size=int(size),
                slices_min=int(lo),
                slices_max=int(hi),
                pixel_spacing=round(float(rng.uniform(0.65, 0.85)) * 512 / size, 4),
                slice_spacing=round(float(thickness[k]) * 4) / 4,  # scanners use 0.25 mm steps
                tilt_deg=float(profile["tilt_deg"]),  # type: ignore[arg-type]
                reverse_numbers=bool(profile["reverse_numbers"]),
                mask_format=str(profile["mask_format"]),
                pixel_representation=int(profile["pixel_representation"]),  # type: ignore[call-overload]
                rescale_intercept=float(profile["rescale_intercept"]),  # type: ignore[arg-type]
                intensity_offset=round(float(offsets[k]), 2),
                noise_sigma=round(float(noises[k]), 2),
                lesion_contrast=round(float(rng.uniform(70.0, 110.0)), 1),
                institution_name=_INSTITUTIONS[int(institutions[k % len(_INSTITUTIONS)])],
                manufacturer=str(profile["manufacturer"]),
                model=str(profile["model"]),
                seed=int(seed),
            )
        )
    return specs


def _soft_ellipsoid(
    zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, c: np.ndarray, r: np.ndarray, edge: float
) -> tuple[np.ndarray, np.ndarray]:
    """(soft occupancy in [0, 1], normalised radius) of an axis-aligned ellipsoid."""
    rad = np.sqrt(((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((rad - 1.0) / edge, -50, 50))), rad


def render_ct_volume(
    rng: np.random.Generator, spec: SegmentationHospitalSpec, depth: int, n_lesions: int
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like volume ``(D, H, W)`` in HU (after the scanner's calibration and noise) and its
    binary lesion mask (uint8): body, fat, organs, spine, 1+ ellipsoidal lesions, noise."""
    s = spec.size
    zz, yy, xx = np.meshgrid(
        np.arange(depth) * spec.slice_spacing,
        np.arange(s) * spec.pixel_spacing,
        np.arange(s) * spec.pixel_spacing,
        indexing="ij",
    )
    extent = s * spec.pixel_spacing
    cz = depth * spec.slice_spacing / 2.0
    cy, cx = extent * (0.5 + rng.normal(0.0, 0.02, 2))
    # Body: an elliptic cylinder whose width changes slowly along z (chest to abdomen).
    taper = 1.0 + 0.08 * np.sin((zz - cz) / max(cz, 1.0) * rng.uniform(0.5, 1.5))
    ry, rx = extent * rng.uniform(0.33, 0.40), extent * rng.uniform(0.40, 0.46)
    r_body = np.sqrt(((yy - cy) / (ry * taper)) ** 2 + ((xx - cx) / (rx * taper)) ** 2)
    body = 1.0 / (1.0 + np.exp(np.clip((r_body - 1.0) / 0.02, -50, 50)))
    inner = 1.0 / (1.0 + np.exp(np.clip((r_body - 0.88) / 0.03, -50, 50)))
    tissue = -100.0 + (rng.uniform(35.0, 55.0) + 100.0) * inner
    for _ in range(int(rng.integers(3, 6))):  # organs
        c = np.array([cz + rng.uniform(-0.3, 0.3) * cz, cy + rng.uniform(-0.2, 0.2) * ry * 2,
                      cx + rng.uniform(-0.2, 0.2) * rx * 2])  # fmt: skip
        r = np.array([rng.uniform(0.4, 0.9) * cz, rng.uniform(0.12, 0.3) * ry * 2,
                      rng.uniform(0.12, 0.3) * rx * 2])  # fmt: skip
        occ, _ = _soft_ellipsoid(zz, yy, xx, c, r, 0.15)
        tissue += rng.uniform(-40.0, 30.0) * occ * inner
    # Spine: a bright cylinder behind the organs.
    sy, sx = cy + ry * rng.uniform(0.6, 0.72), cx + rng.normal(0.0, 2.0)
    r_spine = np.sqrt(((yy - sy) / (0.09 * ry * 2)) ** 2 + ((xx - sx) / (0.08 * rx * 2)) ** 2)
    tissue += rng.uniform(400.0, 700.0) / (1.0 + np.exp(np.clip((r_spine - 1.0) / 0.1, -50, 50)))
    mask = np.zeros((depth, s, s), dtype=np.uint8)
    for _ in range(n_lesions):
        # Inside the body, away from its edge, whole in z so the mask is not cut by the FOV.
        radius_mm = rng.uniform(0.06, 0.11) * extent
        r = radius_mm * rng.uniform(0.8, 1.25, 3)
        r[0] = max(r[0], 1.6 * spec.slice_spacing)
        ang = rng.uniform(0.0, 2.0 * np.pi)
        frac = np.sqrt(rng.uniform(0.0, 1.0)) * 0.5
        c = np.array([
            rng.uniform(r[0] + spec.slice_spacing, max(2 * cz - r[0] - spec.slice_spacing,
                                                       r[0] + spec.slice_spacing + 1e-3)),
            cy + ry * frac * np.sin(ang), cx + rx * frac * np.cos(ang),
        ])  # fmt: skip
        occ, rad = _soft_ellipsoid(zz, yy, xx, c, r, 0.08)
        tissue += spec.lesion_contrast * rng.uniform(0.85, 1.15) * occ
        mask |= (rad <= 1.0).astype(np.uint8)
    hu = -1000.0 * (1.0 - body) + tissue * body + spec.intensity_offset
    hu += rng.normal(0.0, spec.noise_sigma, hu.shape)
    return hu, mask


def _tilt_orientation(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines of an axial plane rotated by ``tilt_deg`` about the L-R axis."""
    t = np.deg2rad(tilt_deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)])


def _ct_slice(
    pixels: np.ndarray,
    spec: SegmentationHospitalSpec,
    patient: _Patient,
    ids: dict[str, str],
    position: np.ndarray,
    orientation: tuple[np.ndarray, np.ndarray],
    number: int,
    sop_uid: str,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ids["date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ids["time"]
    ds.AccessionNumber = ids["accession"]
    ds.Modality = "CT"
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model
    ds.InstitutionName = spec.institution_name
    ds.ReferringPhysicianName = ids["physician"]
    ds.StudyDescription = "CT ABDOMEN"
    ds.SeriesDescription = "Synthetic abdomen"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.BodyPartExamined = "ABDOMEN"
    ds.StudyInstanceUID = ids["study"]
    ds.SeriesInstanceUID = ids["series"]
    ds.FrameOfReferenceUID = ids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.StudyID = ids["accession"][-6:]
    ds.SeriesNumber = 2
    ds.InstanceNumber = number
    ds.SliceThickness = _fmt_ds(spec.slice_spacing)
    ds.KVP = "120"
    ds.ImagePositionPatient = [_fmt_ds(float(v)) for v in position]
    ds.ImageOrientationPatient = [_fmt_ds(float(v)) for v in (*orientation[0], *orientation[1])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_fmt_ds(spec.pixel_spacing), _fmt_ds(spec.pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if spec.pixel_representation else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = spec.pixel_representation
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = _fmt_ds(spec.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    return ds


def _encode_ct(hu: np.ndarray, spec: SegmentationHospitalSpec) -> np.ndarray:
    stored = np.rint(hu - spec.rescale_intercept)
    if spec.pixel_representation:
        return np.clip(stored, -32768, 32767).astype("<i2")
    return np.clip(stored, 0, 4095).astype("<u2")


def write_seg(
    path: Path, source_slices: list[Dataset], mask: np.ndarray, series_uid: str, sop_uid: str
) -> Path:
    """Write ``mask`` (``(D, H, W)``, slice k of ``source_slices[k]``) as a binary DICOM SEG
    with one segment "lesion", made with highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=source_slices,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=300,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="fedsilo synthetic",
        manufacturer_model_name="lesion annotator",
        software_versions=SEGMENTATION_GENERATOR_VERSION,
        device_serial_number="0001",
    )
    seg.save_as(path)
    return path


def write_nifti_mask(path: Path, mask: np.ndarray, affine_lps: np.ndarray) -> Path:
    """Write ``mask`` (``(D, H, W)`` in volume index order, with its index->LPS affine) the way
    converters such as dcm2niix do: array axes (column, row, slice), RAS+ affine, sform and
    qform set to scanner coordinates."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(mask.astype(np.uint8), (2, 1, 0)))
    # volume index (d, r, c) -> nifti index (i=c, j=r, k=d); LPS -> RAS flips x and y.
    perm = np.zeros((4, 4))
    perm[2, 0] = perm[1, 1] = perm[0, 2] = perm[3, 3] = 1.0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps @ perm
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def generate_segmentation_hospital(folder: Path, spec: SegmentationHospitalSpec) -> Path:
    """Write one hospital: ``dicom/case-XXX/slice-YYY.dcm`` CT series (file names in shuffled
    order, so nothing but the positions orders them), their lesion masks as DICOM SEG
    (``dicom/seg/``) or NIfTI (``masks/<SeriesInstanceUID>.nii.gz``), and ``spec.json``."""
    folder = Path(folder)
    dicom_dir = folder / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise DataError(f"{dicom_dir} already contains files; generate into an empty folder")
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _SEG_STREAM, 1, spec.index]))
    namespace = f"seg|{SEGMENTATION_GENERATOR_VERSION}|{spec.to_json()}"
    row_dir, col_dir = _tilt_orientation(spec.tilt_deg)
    normal = np.cross(row_dir, col_dir)
    base_date = dt.date(2019, 1, 1)
    for case in range(spec.n_cases):
        depth = int(rng.integers(spec.slices_min, spec.slices_max + 1))
        n_lesions = 1 + int(rng.random() < 0.3)
        hu, mask = render_ct_volume(rng, spec, depth, n_lesions)
        stored = _encode_ct(hu, spec)
        patient = _draw_patient(rng, f"S{spec.index}-", 100_000 + 7 * case)
        study_date = base_date + dt.timedelta(days=int(rng.integers(0, 365 * 5)))
        doc = (
            f"{_LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]}^"
            f"{_FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]}^^Dr."
        )
        ids = {
            "date": study_date.strftime("%Y%m%d"),
            "time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
            "accession": f"ACC{int(rng.integers(10**7, 10**8))}",
            "physician": doc,
            "study": _uid(namespace, "study", case),
            "series": _uid(namespace, "series", case),
            "frame": _uid(namespace, "frame", case),
        }
        extent = spec.size * spec.pixel_spacing
        origin = np.array([-extent / 2, -extent / 2, -300.0 + rng.uniform(-20, 20)])
        slices: list[Dataset] = []
        for k in range(depth):
            position = origin + k * spec.slice_spacing * normal
            number = depth - k if spec.reverse_numbers else k + 1
            slices.append(
                _ct_slice(
                    stored[k], spec, patient, ids, position, (row_dir, col_dir), number,
                    _uid(namespace, "sop", case, k),
                )
            )  # fmt: skip
        case_dir = dicom_dir / f"case-{case:03d}"
        case_dir.mkdir()
        # File names carry a random order: readers must order by position, not by name.
        for name_index, k in enumerate(rng.permutation(depth)):
            pydicom.dcmwrite(
                case_dir / f"slice-{name_index:03d}.dcm", slices[int(k)], enforce_file_format=True
            )
        if spec.mask_format == "seg":
            (dicom_dir / "seg").mkdir(exist_ok=True)
            write_seg(
                dicom_dir / "seg" / f"seg-{case:03d}.dcm", slices, mask,
                _uid(namespace, "seg-series", case), _uid(namespace, "seg-sop", case),
            )  # fmt: skip
        else:
            (folder / "masks").mkdir(exist_ok=True)
            affine = np.eye(4)
            affine[:3, 0] = normal * spec.slice_spacing
            affine[:3, 1] = col_dir * spec.pixel_spacing
            affine[:3, 2] = row_dir * spec.pixel_spacing
            affine[:3, 3] = origin
            write_nifti_mask(folder / "masks" / f"{ids['series']}.nii.gz", mask, affine)
    (folder / "spec.json").write_text(spec.to_json(), encoding="utf-8")
    return folder


def generate_segmentation_hospitals(
    root: Path,
    n_hospitals: int = 3,
    cases_per_hospital: int = 16,
    size: int = 64,
    slices: tuple[int, int] = (24, 32),
    seed: int = 0,
) -> list[Path]:
    """Write ``root/hospital-<k>/`` 3-D CT hospitals with lesion masks; returns their folders.

    Hospitals differ in pixel spacing, slice thickness (2.5-5 mm), HU offset, noise, storage
    encoding, slice orientation (some tilted), InstanceNumber direction and mask format (DICOM
    SEG for some, NIfTI for others). Every case has one or two ellipsoidal lesions.
    """
    specs = make_segmentation_specs(n_hospitals, cases_per_hospital, size, slices, seed)
    root = Path(root)
    return [generate_segmentation_hospital(root / spec.name, spec) for spec in specs]
