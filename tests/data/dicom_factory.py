"""Build DICOM files in every encoding a hospital sends, with pydicom's own encoders where they
exist (RLE, JPEG-LS, JPEG 2000), Pillow for JPEG baseline and a tiny lossless-JPEG (process 14,
selection value 1) encoder below for the one encoding no Python package writes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)


def image_dataset(pixels: np.ndarray, sop_class: str = CTImageStorage, **tags: Any) -> Dataset:
    """An uncompressed little-endian grayscale image dataset (frames first when 3-D)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "CODEC-1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path, *, big_endian: bool = False) -> Path:
    """Write with preamble and file meta."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if big_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        pydicom.dcmwrite(path, ds, enforce_file_format=True, little_endian=False,
                         implicit_vr=False)  # fmt: skip
    else:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def textured(n: int = 64, frames: int = 1, bits: int = 12) -> np.ndarray:
    """A deterministic textured image (or stack) using the full ``bits`` range."""
    rng = np.random.default_rng(n * 31 + frames)
    yy, xx = np.mgrid[0:n, 0:n]
    base = (np.sin(yy / 5.0) + np.cos(xx / 7.0) + 2.0) / 4.0 * (2**bits - 1)
    stack = [
        np.clip(base + rng.normal(0, 40, (n, n)) + 50 * f, 0, 2**bits - 1) for f in range(frames)
    ]
    dtype = np.uint8 if bits == 8 else np.uint16
    arr = np.stack(stack).astype(dtype)
    return arr if frames > 1 else arr[0]


def compressed(pixels: np.ndarray, syntax: UID, **kwargs: Any) -> Dataset:
    """A dataset compressed with pydicom's encoders (RLE, JPEG-LS, JPEG 2000)."""
    ds = image_dataset(pixels)
    ds.compress(syntax, **kwargs)
    return ds


def jpeg_baseline(pixels: np.ndarray, quality: int = 95) -> Dataset:
    """8-bit JPEG baseline via Pillow, encapsulated."""
    from PIL import Image

    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=quality)
    ds = image_dataset(pixels)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def jpeg_lossless(pixels: np.ndarray) -> Dataset:
    """JPEG lossless, process 14, first-order prediction (selection value 1), encapsulated."""
    ds = image_dataset(pixels)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([encode_lossless_jpeg(pixels, int(ds.BitsStored))])
    ds["PixelData"].VR = "OB"
    return ds


def encode_lossless_jpeg(img: np.ndarray, precision: int) -> bytes:
    """Minimal ITU T.81 lossless encoder: one component, predictor 1, Pt 0, one Huffman table
    giving every difference category 0..16 a 5-bit code."""
    rows, cols = img.shape
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diffs = ((x - pred) % 65536).ravel()
    bits: list[str] = []
    for d in diffs.tolist():
        d = d - 65536 if d > 32768 else d
        ssss = 16 if d == 32768 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            extra = d if d > 0 else d + (1 << ssss) - 1
            bits.append(format(extra, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00, *counts, *range(17)])
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision])
    out += rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    out += b"\xff\xc4" + (len(dht) + 2).to_bytes(2, "big") + dht
    out += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0])
    out += data + b"\xff\xd9"
    return bytes(out)
