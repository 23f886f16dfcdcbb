"""Synthetic multi-hospital DICOM data for a lesion-or-not classification task (grayscale CT /
X-ray slices), a colour one (dermatology-like photographs) and a 3-D segmentation one.

Each hospital gets a folder ``<out>/hospital-<k>/`` with

* ``dicom/img-XXXX.dcm``: one 16-bit MONOCHROME2 image per study, written by pydicom with a
  valid preamble and Explicit VR Little Endian, carrying fake but realistic-looking PHI
  (names, birth dates, accession numbers, referring physicians) so privacy tests can search
  for it;
* ``labels.csv``: ``StudyInstanceUID,label`` (1 = a lesion is present);
* ``spec.json``: the :class:`HospitalSpec` the folder was drawn from.

Images look like CT / X-ray slices: a soft-edged body with fat, organs, vessels, a bone,
a gradient and texture. A positive image carries a faint roughly circular lesion whose
contrast shrinks as ``difficulty`` goes from 0 (obvious) to 1 (nearly invisible).

Hospitals differ the way real ones do: scanner calibration (gain and offset in physical
units), storage encoding (BitsStored, PixelRepresentation, RescaleSlope/Intercept), noise,
blur, class balance, size, and lesion appearance. Each hospital alone therefore sees a
narrower and smaller slice of the task than the pooled data.

Output is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    VLPhotographicImageStorage,
    generate_uid,
)

from silo_client.errors import DataError

__all__ = [
    "COLOUR_GENERATOR_VERSION",
    "GENERATOR_VERSION",
    "SEGMENTATION_GENERATOR_VERSION",
    "ColourHospitalSpec",
    "HospitalSpec",
    "SegmentationHospitalSpec",
    "generate_colour_hospital",
    "generate_colour_hospitals",
    "generate_hospital",
    "generate_hospitals",
    "generate_segmentation_hospital",
    "generate_segmentation_hospitals",
    "generate_test_set",
    "lesion_contrast_hu",
    "make_colour_specs",
    "make_hospital_specs",
    "make_segmentation_specs",
    "render_ct_volume",
    "render_skin_lesion",
    "write_nifti_mask",
    "write_seg",
]

#: Bumped whenever the generated pixels or tags change for a given seed.
GENERATOR_VERSION = "1"

_SPEC_STREAM = 1
_IMAGE_STREAM = 2
_TEST_STREAM = 3

# Scanner / storage profiles, cycled over hospitals.
_PROFILES: tuple[dict[str, object], ...] = (
    {  # classic CT: 12-bit unsigned, intercept -1024
        "modality": "CT",
        "sop_class_uid": str(CTImageStorage),
        "bits_stored": 12,
        "pixel_representation": 0,
        "rescale_slope": 1.0,
        "rescale_intercept": -1024.0,
        "window_center": 40.0,
        "window_width": 400.0,
        "manufacturer": "Meridian Imaging",
        "model": "Helix 64",
    },
    {  # X-ray style: 16-bit unsigned, slope 0.5
        "modality": "DX",
        "sop_class_uid": str(DigitalXRayImageStorageForPresentation),
        "bits_stored": 16,
        "pixel_representation": 0,
        "rescale_slope": 0.5,
        "rescale_intercept": -1024.0,
        "window_center": 50.0,
        "window_width": 450.0,
        "manufacturer": "Northlight Systems",
        "model": "RadView DR2",
    },
    {  # CT stored as signed HU
        "modality": "CT",
        "sop_class_uid": str(CTImageStorage),
        "bits_stored": 16,
        "pixel_representation": 1,
        "rescale_slope": 1.0,
        "rescale_intercept": 0.0,
        "window_center": 35.0,
        "window_width": 380.0,
        "manufacturer": "Cobalt Medical",
        "model": "Spectra 128",
    },
    {  # secondary capture from a PACS export
        "modality": "OT",
        "sop_class_uid": str(SecondaryCaptureImageStorage),
        "bits_stored": 12,
        "pixel_representation": 0,
        "rescale_slope": 1.0,
        "rescale_intercept": -1000.0,
        "window_center": 45.0,
        "window_width": 420.0,
        "manufacturer": "PACSware",
        "model": "Export 3",
    },
)

_INSTITUTIONS = (
    "St. Aldhelm General Hospital",
    "Riverside University Medical Center",
    "Hollowbrook Regional Clinic",
    "Mercy Vale Teaching Hospital",
    "Northgate Community Hospital",
    "Lakeshore Children's and Adult Hospital",
)
_FIRST_NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Keiko", "Lars", "Maja", "Nikolai", "Olga", "Pedro", "Quentin", "Rosa", "Samir", "Tereza",
    "Ulrich", "Vera", "Wen", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
_LAST_NAMES = (
    "Andersson", "Bianchi", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvath",
    "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov",
    "Quinn", "Rossi", "Schmidt", "Tanaka", "Urban", "Varga", "Weber", "Xu", "Yilmaz", "Zeller",
)  # fmt: skip


@dataclass(frozen=True)
class HospitalSpec:
    """Parameters of one synthetic hospital: its data distribution and storage conventions."""

    name: str
    index: int
    n_images: int
    positive_fraction: float
    institution_name: str
    modality: str
    sop_class_uid: str
    manufacturer: str
    model: str
    bits_stored: int
    pixel_representation: int
    rescale_slope: float
    rescale_intercept: float
    window_center: float
    window_width: float
    intensity_gain: float
    intensity_offset: float
    noise_sigma: float
    blur_sigma: float
    lesion_contrast_scale: float
    lesion_radius_scale: float
    pixel_spacing: float
    difficulty: float
    image_size: int
    seed: int

    @property
    def n_positive(self) -> int:
        """Number of positive (lesion) images in this hospital."""
        return round(self.n_images * self.positive_fraction)

    def to_json(self) -> str:
        """The spec as stable, sorted JSON (written next to the data as ``spec.json``)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def lesion_contrast_hu(difficulty: float) -> float:
    """Mean lesion contrast in HU-like units for a difficulty in [0, 1] (0 obvious, 1 faint)."""
    return 20.0 + 600.0 * (1.0 - difficulty) ** 2


def _check_args(
    hospitals: int, images_per_hospital: int, difficulty: float, image_size: int
) -> None:
    if hospitals < 1:
        raise DataError(f"hospitals must be >= 1, got {hospitals}; pass a positive count")
    if images_per_hospital < 4:
        raise DataError(
            f"images_per_hospital must be >= 4, got {images_per_hospital}; pass a larger count"
        )
    if not 0.0 <= difficulty <= 1.0:
        raise DataError(f"difficulty must be in [0, 1], got {difficulty}; 0 = obvious, 1 = faint")
    if image_size < 16:
        raise DataError(f"image_size must be >= 16 pixels, got {image_size}; pass e.g. 64")


def _spread(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """n values evenly spread over [lo, hi] in random order (so hospitals surely differ)."""
    if n == 1:
        return np.array([(lo + hi) / 2.0])
    return rng.permutation(np.linspace(lo, hi, n))


def make_hospital_specs(
    hospitals: int = 3,
    images_per_hospital: int = 120,
    seed: int = 0,
    difficulty: float = 0.5,
    image_size: int = 64,
) -> list[HospitalSpec]:
    """Draw the per-hospital parameters (deterministic for the arguments); writes nothing."""
    _check_args(hospitals, images_per_hospital, difficulty, image_size)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPEC_STREAM]))
    size_factors = _spread(rng, 0.6, 1.4, hospitals)
    positive = _spread(rng, 0.2, 0.5, hospitals)
    offsets = _spread(rng, -45.0, 45.0, hospitals)
    gains = _spread(rng, 0.85, 1.15, hospitals)
    noises = _spread(rng, 8.0, 22.0, hospitals)
    institutions = rng.permutation(len(_INSTITUTIONS))
    specs = []
    for k in range(hospitals):
        profile = _PROFILES[k % len(_PROFILES)]
        specs.append(
            HospitalSpec(
                name=f"hospital-{k}",
                index=k,
                n_images=max(4, round(images_per_hospital * float(size_factors[k]))),
                positive_fraction=round(float(positive[k]), 3),
                institution_name=_INSTITUTIONS[int(institutions[k % len(_INSTITUTIONS)])],
                modality=str(profile["modality"]),
                sop_class_uid=str(profile["sop_class_uid"]),
                manufacturer=str(profile["manufacturer"]),
                model=str(profile["model"]),
                bits_stored=int(profile["bits_stored"]),  # type: ignore[call-overload]
                pixel_representation=int(profile["pixel_representation"]),  # type: ignore[call-overload]
                rescale_slope=float(profile["rescale_slope"]),  # type: ignore[arg-type]
                rescale_intercept=float(profile["rescale_intercept"]),  # type: ignore[arg-type]
                window_center=float(profile["window_center"]),  # type: ignore[arg-type]
                window_width=float(profile["window_width"]),  # type: ignore[arg-type]
                intensity_gain=round(float(gains[k]), 4),
                intensity_offset=round(float(offsets[k]), 2),
                noise_sigma=round(float(noises[k]), 2),
                blur_sigma=round(float(rng.uniform(0.0, 1.1)), 3),
                lesion_contrast_scale=round(float(rng.uniform(0.75, 1.25)), 3),
                lesion_radius_scale=round(float(rng.uniform(0.8, 1.25)), 3),
                pixel_spacing=round(float(rng.uniform(0.6, 0.9)) * 512 / image_size, 4),
                difficulty=float(difficulty),
                image_size=int(image_size),
                seed=int(seed),
            )
        )
    return specs


# --------------------------------------------------------------------------------------------
# Image model


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (numpy only)."""
    if sigma <= 0.05:
        return img
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.pad(img, ((radius, radius), (0, 0)), mode="reflect")
    out = np.lib.stride_tricks.sliding_window_view(out, kernel.size, axis=0) @ kernel
    out = np.pad(out, ((0, 0), (radius, radius)), mode="reflect")
    return np.lib.stride_tricks.sliding_window_view(out, kernel.size, axis=1) @ kernel


def _soft_ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, theta: float,
    edge: float,
) -> np.ndarray:  # fmt: skip
    """Soft (sigmoid-edged) filled ellipse in [0, 1]; ``edge`` is the edge width relative."""
    c, s = np.cos(theta), np.sin(theta)
    dy, dx = yy - cy, xx - cx
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -50, 50)))


def _render_hu(
    rng: np.random.Generator, spec: HospitalSpec, label: int
) -> tuple[np.ndarray, dict[str, float]]:
    """One image in HU-like physical units (before the scanner's calibration and encoding)."""
    s = spec.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s

    # Body outline and subcutaneous fat.
    cy, cx = 0.5 + rng.normal(0.0, 0.025, 2)
    ry, rx = rng.uniform(0.36, 0.45), rng.uniform(0.40, 0.47)
    body = _soft_ellipse(yy, xx, cy, cx, ry, rx, 0.0, 0.03)
    inner = _soft_ellipse(yy, xx, cy, cx, ry * 0.88, rx * 0.9, 0.0, 0.04)
    tissue = -95.0 + (rng.uniform(30.0, 50.0) + 95.0) * inner

    # Gradient (beam hardening / coil shading).
    g = rng.normal(0.0, 18.0, 2)
    tissue += g[0] * (yy - 0.5) * 2.0 + g[1] * (xx - 0.5) * 2.0

    # Organs: large soft blobs of different density.
    for _ in range(int(rng.integers(3, 7))):
        oy, ox = cy + rng.uniform(-0.22, 0.22), cx + rng.uniform(-0.25, 0.25)
        blob = _soft_ellipse(
            yy, xx, oy, ox, rng.uniform(0.06, 0.17), rng.uniform(0.06, 0.17),
            rng.uniform(0, np.pi), 0.12,
        )  # fmt: skip
        tissue += rng.uniform(-50.0, 40.0) * blob * inner

    # Vessels: small bright dots, the lesion's look-alikes.
    for _ in range(int(rng.integers(0, 4))):
        vy, vx = cy + rng.uniform(-0.28, 0.28), cx + rng.uniform(-0.3, 0.3)
        rad = rng.uniform(0.01, 0.025)
        tissue += (
            rng.uniform(15.0, 60.0) * _soft_ellipse(yy, xx, vy, vx, rad, rad, 0.0, 0.2) * inner
        )

    # Bone (spine-like), saturates in a soft-tissue window.
    by, bx = cy + ry * rng.uniform(0.55, 0.7), cx + rng.normal(0.0, 0.02)
    bone = _soft_ellipse(
        yy, xx, by, bx, rng.uniform(0.05, 0.07), rng.uniform(0.05, 0.08), 0.0, 0.08
    )
    tissue += rng.uniform(350.0, 700.0) * bone

    # Tissue texture.
    texture = _gaussian_blur(rng.normal(0.0, 1.0, (s, s)), 1.5)
    tissue += 7.0 * texture / max(float(texture.std()), 1e-6)

    info: dict[str, float] = {}
    if label:
        # Lesion position inside the body, away from the edge.
        ang = rng.uniform(0.0, 2.0 * np.pi)
        rad_frac = np.sqrt(rng.uniform(0.0, 1.0)) * 0.6
        ly, lx = cy + ry * rad_frac * np.sin(ang), cx + rx * rad_frac * np.cos(ang)
        radius = rng.uniform(0.05, 0.095) * spec.lesion_radius_scale
        contrast = (
            lesion_contrast_hu(spec.difficulty) * spec.lesion_contrast_scale * rng.uniform(0.8, 1.2)
        )
        squash = rng.uniform(0.8, 1.2)
        lesion = _soft_ellipse(
            yy, xx, ly, lx, radius * squash, radius / squash, rng.uniform(0, np.pi), 0.2
        )
        tissue += contrast * lesion * inner
        info = {"y": float(ly), "x": float(lx), "radius": float(radius), "contrast": contrast}

    hu = -1000.0 * (1.0 - body) + tissue * body
    hu = _gaussian_blur(hu, spec.blur_sigma)
    hu += rng.normal(0.0, spec.noise_sigma, (s, s))
    return hu, info


def _encode(hu: np.ndarray, spec: HospitalSpec) -> np.ndarray:
    """Apply the scanner calibration and the storage encoding: physical -> stored values."""
    physical = spec.intensity_gain * hu + spec.intensity_offset
    stored = np.rint((physical - spec.rescale_intercept) / spec.rescale_slope)
    if spec.pixel_representation:
        lo, hi = -(2 ** (spec.bits_stored - 1)), 2 ** (spec.bits_stored - 1) - 1
        return np.clip(stored, lo, hi).astype("<i2")
    return np.clip(stored, 0, 2**spec.bits_stored - 1).astype("<u2")


# --------------------------------------------------------------------------------------------
# DICOM writing


def _fmt_ds(value: float) -> str:
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8g}"[:16]


def _uid(*parts: object) -> str:
    return str(
        generate_uid(entropy_srcs=["fedsilo-synthetic", GENERATOR_VERSION, *map(str, parts)])
    )


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    name: str
    birth_date: dt.date
    sex: str


def _draw_patient(rng: np.random.Generator, prefix: str, number: int) -> _Patient:
    first = _FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]
    last = _LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 68)))
    return _Patient(
        patient_id=f"{prefix}{number:06d}",
        name=f"{last}^{first}",
        birth_date=birth,
        sex=str(rng.choice(["F", "M"])),
    )


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    spec: HospitalSpec,
    patient: _Patient,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: dt.date,
    study_time: str,
    accession: str,
    physician: str,
    number: int,
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if spec.modality == "CT" else "OTHER"]
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    date = study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = accession
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model
    ds.InstitutionName = spec.institution_name
    ds.ReferringPhysicianName = physician
    ds.StudyDescription = "CHEST ABDOMEN" if spec.modality != "DX" else "CHEST PA"
    ds.SeriesDescription = "Synthetic slice"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    age = (study_date - patient.birth_date).days // 365
    ds.PatientAge = f"{max(age, 0):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = accession[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    if spec.modality == "CT":
        ds.SliceThickness = "1.25"
        ds.ImagePositionPatient = ["-160", "-160", f"{-number * 1.25:.2f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.KVP = "120"
    else:
        ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_fmt_ds(spec.pixel_spacing), _fmt_ds(spec.pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = spec.pixel_representation
    ds.WindowCenter = _fmt_ds(spec.window_center)
    ds.WindowWidth = _fmt_ds(spec.window_width)
    ds.RescaleIntercept = _fmt_ds(spec.rescale_intercept)
    ds.RescaleSlope = _fmt_ds(spec.rescale_slope)
    ds.RescaleType = "HU" if spec.modality == "CT" else "US"
    ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_images(
    folder: Path,
    rng: np.random.Generator,
    plan: list[tuple[HospitalSpec, int]],
    namespace: str,
    id_prefix: str,
) -> list[tuple[str, int]]:
    """Render and write one DICOM per (spec, label); returns ``(StudyInstanceUID, label)``.

    ``namespace`` feeds the UIDs' entropy: it must differ whenever the content differs.
    """
    dicom_dir = folder / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    n = len(plan)
    # About 8% of the patients come back for a second study.
    n_repeat = n // 12
    n_patients = n - n_repeat
    patient_of_study = np.concatenate(
        [np.arange(n_patients), rng.choice(n_patients, size=n_repeat, replace=False)]
    )
    patient_of_study = rng.permutation(patient_of_study)
    numbers = rng.choice(900_000, size=n_patients, replace=False) + 100_000
    patients = [_draw_patient(rng, id_prefix, int(num)) for num in numbers]
    base_date = dt.date(2019, 1, 1)
    rows: list[tuple[str, int]] = []
    for i, (spec, label) in enumerate(plan):
        hu, _ = _render_hu(rng, spec, label)
        pixels = _encode(hu, spec)
        patient = patients[int(patient_of_study[i])]
        study_date = base_date + dt.timedelta(days=int(rng.integers(0, 365 * 5)))
        study_time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
        accession = f"ACC{int(rng.integers(10**7, 10**8))}"
        doc_first = _FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]
        doc_last = _LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]
        physician = f"{doc_last}^{doc_first}^^Dr."
        study_uid = _uid(namespace, "study", i)
        series_uid = _uid(namespace, "series", i)
        sop_uid = _uid(namespace, "sop", i)
        _write_dicom(
            dicom_dir / f"img-{i:04d}.dcm",
            pixels,
            spec,
            patient,
            study_uid,
            series_uid,
            sop_uid,
            study_date,
            study_time,
            accession,
            physician,
            i + 1,
        )
        rows.append((study_uid, int(label)))
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows(rows)
    return rows


def _labels_for(rng: np.random.Generator, spec: HospitalSpec) -> list[int]:
    labels = np.zeros(spec.n_images, dtype=int)
    labels[: spec.n_positive] = 1
    return [int(v) for v in rng.permutation(labels)]


def generate_hospital(folder: Path, spec: HospitalSpec) -> Path:
    """Write one hospital's ``dicom/``, ``labels.csv`` and ``spec.json`` under ``folder``.

    Returns ``folder``. Deterministic for the spec (its ``seed`` and ``index``).
    """
    folder = Path(folder)
    if (folder / "dicom").exists() and any((folder / "dicom").iterdir()):
        raise DataError(f"{folder / 'dicom'} already contains files; generate into an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _IMAGE_STREAM, spec.index]))
    labels = _labels_for(rng, spec)
    _write_images(
        folder,
        rng,
        [(spec, lab) for lab in labels],
        namespace=f"{spec.name}|{spec.to_json()}",
        id_prefix=f"H{spec.index}-",
    )
    (folder / "spec.json").write_text(spec.to_json(), encoding="utf-8")
    return folder


def generate_hospitals(
    out: Path,
    hospitals: int = 3,
    images_per_hospital: int = 120,
    seed: int = 0,
    difficulty: float = 0.5,
    image_size: int = 64,
) -> list[HospitalSpec]:
    """Write ``out/hospital-<k>/`` for k in ``range(hospitals)``; returns their specs.

    Same arguments give byte-identical files. Hospitals differ in size (0.6x..1.4x
    ``images_per_hospital``), class balance (20%..50% positives), calibration, encoding,
    noise, blur and lesion appearance.
    """
    specs = make_hospital_specs(hospitals, images_per_hospital, seed, difficulty, image_size)
    out = Path(out)
    for spec in specs:
        generate_hospital(out / spec.name, spec)
    return specs


def generate_test_set(
    out: Path,
    n: int = 200,
    seed: int = 0,
    hospitals: int = 3,
    images_per_hospital: int = 120,
    difficulty: float = 0.5,
    image_size: int = 64,
) -> list[HospitalSpec]:
    """Write a held-out pooled test set (``out/dicom``, ``out/labels.csv``).

    Images are drawn from a mix of the hospitals that :func:`generate_hospitals` makes with
    the same arguments (each image from a uniformly chosen hospital, with that hospital's
    class balance and appearance), from a random stream disjoint from the training data.
    Returns the hospital specs the images were drawn from.
    """
    if n < 2:
        raise DataError(f"test set size n must be >= 2, got {n}; pass e.g. n=200")
    specs = make_hospital_specs(hospitals, images_per_hospital, seed, difficulty, image_size)
    out = Path(out)
    if (out / "dicom").exists() and any((out / "dicom").iterdir()):
        raise DataError(f"{out / 'dicom'} already contains files; generate into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TEST_STREAM]))
    which = rng.integers(0, len(specs), size=n)
    plan = [(specs[int(k)], int(rng.random() < specs[int(k)].positive_fraction)) for k in which]
    # Make sure both classes are present for AUC.
    if len({lab for _, lab in plan}) < 2:
        plan[0] = (plan[0][0], 1 - plan[0][1])
    key = f"test|{n}|{seed}|{hospitals}|{images_per_hospital}|{difficulty}|{image_size}"
    _write_images(out, rng, plan, namespace=key, id_prefix="T-")
    return specs


# --------------------------------------------------------------------------------------------
# 3-D CT-like series with lesion masks (segmentation)

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


# --------------------------------------------------------------------------------------------
# Colour photographs (dermatology-like) for a colour classification task

_COLOUR_STREAM = 5
#: Bumped whenever the generated colour images or tags change for a given seed.
COLOUR_GENERATOR_VERSION = "1"

# How each hospital's camera/PACS stores a colour photograph, cycled over hospitals: every
# colour path the silo reads (RGB interleaved or planar, YBR_FULL, JPEG YBR_FULL_422, RLE,
# JPEG 2000 with the reversible colour transform).
_COLOUR_PROFILES: tuple[dict[str, object], ...] = (
    {"storage": "rgb", "manufacturer": "Dermalight", "model": "DL-200"},
    {"storage": "jpeg-ybr422", "manufacturer": "Cutis Optics", "model": "Macro 5"},
    {"storage": "rle-rgb", "manufacturer": "PACSware", "model": "Export 3"},
    {"storage": "ybr-full", "manufacturer": "Skinview", "model": "SV-1"},
    {"storage": "j2k-rct", "manufacturer": "Northlight Systems", "model": "Dermo 2"},
    {"storage": "rgb-planar", "manufacturer": "Meridian Imaging", "model": "Photo 9"},
)  # fmt: skip

_SKIN_TONES = np.array(
    [[232, 190, 160], [214, 165, 128], [190, 140, 100], [160, 110, 75], [120, 80, 55]],
    dtype=np.float64,
)
_BROWN = np.array([110.0, 70.0, 45.0])
_BLUE_GREY = np.array([72.0, 80.0, 112.0])  # about the brown's luma: colour, not brightness


@dataclass(frozen=True)
class ColourHospitalSpec:
    """Parameters of one synthetic hospital of colour skin-lesion photographs."""

    name: str
    index: int
    n_images: int
    positive_fraction: float
    storage: str
    institution_name: str
    manufacturer: str
    model: str
    white_balance: tuple[float, float, float]  # per-channel gain of the camera
    brightness: float
    noise_sigma: float
    image_size: int
    seed: int

    @property
    def n_positive(self) -> int:
        """Number of positive (suspicious lesion) images."""
        return round(self.n_images * self.positive_fraction)

    def to_json(self) -> str:
        """The spec as stable, sorted JSON (written next to the data as ``spec.json``)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def make_colour_specs(
    hospitals: int = 3, images_per_hospital: int = 60, seed: int = 0, image_size: int = 64
) -> list[ColourHospitalSpec]:
    """Draw the per-hospital parameters of the colour task (deterministic); writes nothing."""
    _check_args(hospitals, images_per_hospital, 0.5, image_size)
    if image_size < 32:
        raise DataError(
            f"image_size must be >= 32 pixels for colour photographs, got {image_size} (JPEG 2000 "
            "storage needs 32); pass e.g. 64"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, _COLOUR_STREAM, 0]))
    size_factors = _spread(rng, 0.7, 1.3, hospitals)
    positive = _spread(rng, 0.3, 0.5, hospitals)
    institutions = rng.permutation(len(_INSTITUTIONS))
    specs = []
    for k in range(hospitals):
        profile = _COLOUR_PROFILES[k % len(_COLOUR_PROFILES)]
        gains = rng.uniform(0.9, 1.1, 3)
        specs.append(
            ColourHospitalSpec(
                name=f"hospital-{k}",
                index=k,
                n_images=max(4, round(images_per_hospital * float(size_factors[k]))),
                positive_fraction=round(float(positive[k]), 3),
                storage=str(profile["storage"]),
                institution_name=_INSTITUTIONS[int(institutions[k % len(_INSTITUTIONS)])],
                manufacturer=str(profile["manufacturer"]),
                model=str(profile["model"]),
                white_balance=(
                    round(float(gains[0]), 3),
                    round(float(gains[1]), 3),
                    round(float(gains[2]), 3),
                ),
                brightness=round(float(rng.uniform(0.9, 1.1)), 3),
                noise_sigma=round(float(rng.uniform(3.0, 8.0)), 2),
                image_size=int(image_size),
                seed=int(seed),
            )
        )
    return specs


def render_skin_lesion(
    rng: np.random.Generator, spec: ColourHospitalSpec, label: int
) -> np.ndarray:
    """One ``[S, S, 3]`` uint8 RGB photograph of skin with a pigmented lesion.

    Every image has a brown lesion; a positive one also carries a blue-grey veil of about the
    same brightness, so the label lives in colour more than in grayscale.
    """
    s = spec.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
    tone = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))] * rng.uniform(0.95, 1.05, 3)
    texture = _gaussian_blur(rng.normal(0.0, 1.0, (s, s)), 1.2)
    texture /= max(float(texture.std()), 1e-6)
    img = tone[None, None, :] * (1.0 + 0.03 * texture[..., None])
    cy, cx = 0.5 + rng.normal(0.0, 0.06, 2)
    ry, rx = rng.uniform(0.14, 0.24), rng.uniform(0.14, 0.24)
    lesion = _soft_ellipse(yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi), 0.12)
    brown = _BROWN * rng.uniform(0.85, 1.15)
    img = img * (1.0 - lesion[..., None]) + brown[None, None, :] * lesion[..., None]
    # Darker dots in every lesion (a pigment network) so brightness alone does not tell.
    for _ in range(int(rng.integers(2, 6))):
        dy, dx = cy + rng.normal(0, ry / 2), cx + rng.normal(0, rx / 2)
        dot = _soft_ellipse(yy, xx, dy, dx, 0.03, 0.03, 0.0, 0.3) * lesion
        img *= 1.0 - 0.25 * dot[..., None]
    if label:
        vy, vx = cy + rng.normal(0, ry / 3), cx + rng.normal(0, rx / 3)
        veil = _soft_ellipse(
            yy, xx, vy, vx, ry * rng.uniform(0.45, 0.7), rx * rng.uniform(0.45, 0.7),
            rng.uniform(0, np.pi), 0.2,
        ) * lesion  # fmt: skip
        blue = _BLUE_GREY * rng.uniform(0.9, 1.1)
        img = img * (1.0 - veil[..., None]) + blue[None, None, :] * veil[..., None]
    # Vignetting of the dermatoscope, the camera's white balance, brightness and noise.
    vignette = 1.0 - 0.25 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 4.0
    img = img * vignette[..., None] * np.asarray(spec.white_balance)[None, None, :]
    img = img * spec.brightness + rng.normal(0.0, spec.noise_sigma, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _colour_pixel_module(ds: Dataset, rgb: np.ndarray, storage: str) -> None:
    """Store ``rgb`` in ``ds`` the way the profile's camera or PACS does."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

    ds.SamplesPerPixel = 3
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    if storage == "rgb-planar":
        ds.PlanarConfiguration = 1
        ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    elif storage == "ybr-full":
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    elif storage == "jpeg-ybr422":
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=92, subsampling=1)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.PixelData = rgb.tobytes()
        if storage == "rle-rgb":
            ds.compress(RLELossless, generate_instance_uid=False)
        elif storage == "j2k-rct":
            ds.compress(JPEG2000Lossless, use_mct=True, generate_instance_uid=False)
            ds.PhotometricInterpretation = "YBR_RCT"


def _write_colour_dicom(
    path: Path, rgb: np.ndarray, spec: ColourHospitalSpec, patient: _Patient, uids: tuple,
    study_date: dt.date, accession: str, number: int,
) -> None:  # fmt: skip
    study_uid, series_uid, sop_uid = uids
    sop_class = str(VLPhotographicImageStorage if spec.index % 2 else SecondaryCaptureImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = accession
    ds.Modality = "XC"
    ds.Manufacturer = spec.manufacturer
    ds.ManufacturerModelName = spec.model
    ds.InstitutionName = spec.institution_name
    ds.StudyDescription = "DERMATOSCOPY"
    ds.SeriesDescription = "Synthetic skin lesion"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.BodyPartExamined = "SKIN"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = accession[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.PatientOrientation = ""
    _colour_pixel_module(ds, rgb, spec.storage)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def generate_colour_hospital(folder: Path, spec: ColourHospitalSpec) -> Path:
    """Write one hospital's colour ``dicom/``, ``labels.csv`` and ``spec.json``; returns it."""
    folder = Path(folder)
    dicom_dir = folder / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise DataError(f"{dicom_dir} already contains files; generate into an empty folder")
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _COLOUR_STREAM, 1, spec.index]))
    labels = np.zeros(spec.n_images, dtype=int)
    labels[: spec.n_positive] = 1
    labels = rng.permutation(labels)
    namespace = f"colour|{COLOUR_GENERATOR_VERSION}|{spec.name}|{spec.to_json()}"
    rows: list[tuple[str, int]] = []
    for i, label in enumerate(labels.tolist()):
        patient = _draw_patient(rng, f"C{spec.index}-", int(rng.integers(100_000, 1_000_000)))
        uids = (
            _uid(namespace, "study", i),
            _uid(namespace, "series", i),
            _uid(namespace, "sop", i),
        )
        date = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 4)))
        accession = f"ACC{int(rng.integers(10**7, 10**8))}"
        rgb = render_skin_lesion(rng, spec, int(label))
        _write_colour_dicom(
            dicom_dir / f"img-{i:04d}.dcm", rgb, spec, patient, uids, date, accession, i + 1
        )
        rows.append((uids[0], int(label)))
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows(rows)
    (folder / "spec.json").write_text(spec.to_json(), encoding="utf-8")
    return folder


def generate_colour_hospitals(
    out: Path,
    hospitals: int = 3,
    images_per_hospital: int = 60,
    seed: int = 0,
    image_size: int = 64,
) -> list[ColourHospitalSpec]:
    """Write ``out/hospital-<k>/`` of colour skin-lesion photographs (label 1: a blue-grey veil
    in the lesion); hospitals differ in camera white balance, brightness, noise, class balance
    and how they store colour. Same arguments give the same pixels."""
    specs = make_colour_specs(hospitals, images_per_hospital, seed, image_size)
    for spec in specs:
        generate_colour_hospital(Path(out) / spec.name, spec)
    return specs
