"""Synthetic colour photographs (dermatology-like) for a colour classification task.

Each hospital's camera/PACS stores its photographs differently (RGB interleaved or planar,
YBR_FULL, JPEG YBR_FULL_422, RLE, JPEG 2000), so every colour path the silo reads is
exercised. Output is deterministic for the arguments.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    VLPhotographicImageStorage,
)

from fedsilo.synthetic.classification import SpecMethods, _check_args
from fedsilo.synthetic.dicom_writing import (
    _INSTITUTIONS,
    _draw_patient,
    _Patient,
    _uid,
)
from fedsilo.synthetic.drawing import _gaussian_blur, _soft_ellipse, _spread
from silo_client.errors import DataError

__all__ = [
    "COLOUR_GENERATOR_VERSION",
    "ColourHospitalSpec",
    "generate_colour_hospital",
    "generate_colour_hospitals",
    "make_colour_specs",
    "render_skin_lesion",
]

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
class ColourHospitalSpec(SpecMethods):
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
