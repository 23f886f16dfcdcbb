"""Synthetic multi-hospital DICOM data for a lesion-or-not classification task (grayscale CT /
X-ray slices).

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
)

from fedsilo.synthetic.dicom_writing import (
    _FIRST_NAMES,
    _INSTITUTIONS,
    _LAST_NAMES,
    GENERATOR_VERSION,
    _draw_patient,
    _fmt_ds,
    _Patient,
    _uid,
)
from fedsilo.synthetic.drawing import _gaussian_blur, _soft_ellipse, _spread
from silo_client.errors import DataError

__all__ = [
    "GENERATOR_VERSION",
    "HospitalSpec",
    "generate_hospital",
    "generate_hospitals",
    "generate_test_set",
    "lesion_contrast_hu",
    "make_hospital_specs",
]

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


class SpecMethods:
    """What every synthetic hospital spec (grey CT, colour photographs) answers alike."""

    n_images: int
    positive_fraction: float

    @property
    def n_positive(self) -> int:
        """Number of positive (lesion) images in this hospital."""
        return round(self.n_images * self.positive_fraction)

    def to_json(self) -> str:
        """The spec as stable, sorted JSON (written next to the data as ``spec.json``)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class HospitalSpec(SpecMethods):
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
