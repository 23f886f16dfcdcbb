"""Colour DICOM (RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, PALETTE COLOR) decodes to RGB, a 12-bit
JPEG Extended image decodes, a missing codec is named, pydicom's warnings land in the catalogue
and the ingest log (never on the terminal), and the plan's channels decide which images fit."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless
from typer.testing import CliRunner

from fedsilo.synthetic import generate_colour_hospitals
from silo_client.cli import app
from silo_client.data.catalogue import Catalogue
from silo_client.data.catalogued import build_catalogued_dataset
from silo_client.data.dataset_builder import build_dataset
from silo_client.data.dicom_read import LibraryMessages, decode_failure
from silo_client.data.ingest import INGEST_LOG, inspect_file, load_frames, register_dataset
from silo_client.data.plan_fit import (
    catalogue_fit_problem,
    dataset_fit_problem,
    folder_photometric_counts,
)
from silo_client.data.preprocessing import Preprocessing
from silo_client.errors import DataError
from silo_client.home import SiloHome, init_silo_home
from tests.data.dicom_factory import image_dataset, save, textured

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
runner = CliRunner()


def _rgb(n: int = 48) -> np.ndarray:
    """A smooth colour test card: red, green and blue ramps plus a bright square."""
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    rgb = np.stack([xx, yy, 1.0 - (xx + yy) / 2], axis=-1) * 230 + 10
    rgb[n // 4 : n // 2, n // 4 : n // 2] = [250, 240, 30]
    return np.rint(rgb).astype(np.uint8)


def _colour_dataset(rgb: np.ndarray) -> pydicom.Dataset:
    ds = image_dataset(rgb[..., 0], Modality="XC")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    return ds


def rgb_file(rgb: np.ndarray) -> pydicom.Dataset:
    return _colour_dataset(rgb)


def ybr_full_file(rgb: np.ndarray) -> pydicom.Dataset:
    ds = _colour_dataset(rgb)
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    return ds


def jpeg_ybr_422_file(rgb: np.ndarray) -> pydicom.Dataset:
    """JPEG baseline from Pillow: YCbCr with 4:2:2 chroma subsampling, as cameras write it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=95, subsampling=1)
    ds = _colour_dataset(rgb)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


def j2k_rct_file(rgb: np.ndarray) -> pydicom.Dataset:
    """JPEG 2000 lossless with the reversible colour transform (openjpeg encodes it)."""
    ds = _colour_dataset(rgb)
    ds.compress(JPEG2000Lossless, use_mct=True)
    ds.PhotometricInterpretation = "YBR_RCT"
    return ds


def rle_rgb_file(rgb: np.ndarray) -> pydicom.Dataset:
    ds = _colour_dataset(rgb)
    ds.compress(RLELossless)
    return ds


def jpeg_ls_rgb_file(rgb: np.ndarray) -> pydicom.Dataset:
    ds = _colour_dataset(rgb)
    ds.compress(JPEGLSLossless)
    return ds


def palette_file(rgb: np.ndarray) -> tuple[pydicom.Dataset, np.ndarray]:
    """PALETTE COLOR: 8-bit indices into 16-bit red/green/blue LUTs; returns the expected RGB."""
    n = rgb.shape[0]
    index = (np.arange(n * n).reshape(n, n) % 256).astype(np.uint8)
    lut = np.stack(
        [np.arange(256) * 257, (255 - np.arange(256)) * 257, (np.arange(256) * 7 % 256) * 257]
    ).astype(np.uint16)
    ds = image_dataset(index, Modality="US")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour, table in zip(("Red", "Green", "Blue"), lut, strict=True):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.tobytes())
    return ds, np.stack([lut[0][index], lut[1][index], lut[2][index]], axis=-1)


COLOUR = {
    "RGB": (rgb_file, 0.0),
    "YBR_FULL": (ybr_full_file, 1.0),  # integer YBR rounding
    "YBR_FULL_422": (jpeg_ybr_422_file, 6.0),  # lossy JPEG, subsampled chroma
    "YBR_RCT": (j2k_rct_file, 0.0),
    "RLE-RGB": (rle_rgb_file, 0.0),
    "JPEG-LS-RGB": (jpeg_ls_rgb_file, 0.0),
}


def _record(path: Path):
    st = path.stat()
    return inspect_file(path, path.name, st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("kind", sorted(COLOUR))
def test_colour_encodings_decode_to_rgb(tmp_path: Path, kind: str) -> None:
    make, tolerance = COLOUR[kind]
    rgb = _rgb()
    path = save(make(rgb), tmp_path / f"{kind}.dcm")
    record = _record(path)
    assert record.status == "ok", record.reason
    assert record.photometric == pydicom.dcmread(path).PhotometricInterpretation
    assert (record.rows, record.columns, record.frames) == (48, 48, 1)
    frames, window, _ = load_frames(path)
    assert frames.shape == (1, 48, 48, 3) and window == (0.0, 255.0)
    assert np.abs(frames[0] - rgb).mean() <= tolerance


def test_palette_colour_is_looked_up(tmp_path: Path) -> None:
    ds, expected = palette_file(_rgb())
    path = save(ds, tmp_path / "palette.dcm")
    assert _record(path).photometric == "PALETTE COLOR"
    frames, window, _ = load_frames(path)
    assert window == (0.0, 65535.0)
    assert np.array_equal(frames[0], expected.astype(np.float64))


@pytest.mark.parametrize(
    "name",
    [
        "examples_rgb_color.dcm",  # RGB
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline, YBR_FULL
        "examples_ybr_color.dcm",  # JPEG baseline, YBR_FULL_422, 30 frames
        "SC_ybr_full_422_uncompressed.dcm",  # uncompressed, subsampled YBR_FULL_422
        "examples_jpeg2k.dcm",  # JPEG 2000, YBR_RCT
        "examples_palette.dcm",  # PALETTE COLOR
        "SC_rgb_rle_16bit_2frame.dcm",  # 16-bit RGB, RLE, 2 frames
        "JPGExtended.dcm",  # 12-bit JPEG Extended, grayscale
        "image_dfl.dcm",  # Deflated Explicit VR Little Endian
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    ],
)
def test_pydicom_sample_files_are_usable(name: str) -> None:
    path = PYDICOM_FILES / name
    if not path.is_file():  # pragma: no cover - shipped with pydicom 3
        pytest.skip(f"{name} is not installed with pydicom here")
    record = _record(path)
    assert record.status == "ok", record.reason


def test_sequential_jpeg_with_a_bad_scan_header_is_repaired() -> None:
    """pydicom's JPEG-lossy.dcm (12-bit JPEG Extended) says Se=0 in its scan header: libjpeg
    refuses it; the silo repairs the header, decodes the same pixels as JPGExtended.dcm, and
    records what it did."""
    broken, reference = PYDICOM_FILES / "JPEG-lossy.dcm", PYDICOM_FILES / "JPGExtended.dcm"
    if not broken.is_file() or not reference.is_file():  # pragma: no cover
        pytest.skip("pydicom's JPEG Extended samples are not installed here")
    record = _record(broken)
    assert record.status == "ok" and record.bits_stored == 12
    assert "repaired a sequential JPEG scan header" in (record.warnings or "")
    assert np.array_equal(load_frames(broken)[0], load_frames(reference)[0])


def test_no_decoder_at_all_names_the_syntax(tmp_path: Path) -> None:
    ds = image_dataset(textured(16))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" * 8])
    ds["PixelData"].VR = "OB"
    record = _record(save(ds, tmp_path / "video.dcm"))
    assert record.status == "skipped"
    assert record.reason.startswith("pixel data in MPEG-4 AVC/H.264 High Profile / Level 4.1")
    assert "no decoder exists for it" in record.reason


def test_a_missing_codec_is_named(tmp_path: Path) -> None:
    """A silo without the JPEG plugins (hidden from import in a fresh interpreter) says which
    packages would decode the file."""
    rgb = _rgb(16)
    path = save(jpeg_ybr_422_file(rgb), tmp_path / "jpeg.dcm")
    code = (
        "import sys\n"
        "for m in ('pylibjpeg', 'libjpeg', 'PIL', 'gdcm'):\n"
        "    sys.modules[m] = None\n"
        "from pathlib import Path\n"
        "from silo_client.data.ingest import inspect_file\n"
        f"p = Path({str(path)!r}); st = p.stat()\n"
        "print(inspect_file(p, p.name, st.st_size, st.st_mtime_ns).reason)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    reason = out.stdout.strip()
    assert reason.startswith("pixel data in JPEG Baseline (Process 1) cannot be decoded: codec ")
    assert "pylibjpeg-libjpeg" in reason and "pillow" in reason
    assert out.stderr.strip() == ""


def test_decode_failures_are_grouped_by_syntax() -> None:
    from silo_client.data.catalogue import reason_category

    missing = (
        "pixel data in JPEG Baseline (Process 1) cannot be decoded: codec missing (pylibjpeg - "
        "requires pylibjpeg>=2.0)"
    )
    assert reason_category(missing) == (
        "pixel data in JPEG Baseline (Process 1) cannot be decoded: codec missing"
    )
    broken = "pixel data in JPEG 2000 Image Compression cannot be decoded (pylibjpeg: bad header)"
    assert reason_category(broken) == "pixel data in JPEG 2000 Image Compression cannot be decoded"


def test_decode_failure_keeps_the_plugins_complaint() -> None:
    exc = RuntimeError("Unable to decode:\n  pylibjpeg: bad marker\n  pillow: nope")
    assert decode_failure(JPEGBaseline8Bit, exc) == (
        "pixel data in JPEG Baseline (Process 1) cannot be decoded (pylibjpeg: bad marker; "
        "pillow: nope)"
    )


# ---------------------------------------------------------------------------- warnings


def test_library_warnings_are_captured_not_printed(capfd: pytest.CaptureFixture) -> None:
    padded, vr = PYDICOM_FILES / "MR_small_padded.dcm", PYDICOM_FILES / "SC_rgb_jpeg.dcm"
    if not padded.is_file() or not vr.is_file():  # pragma: no cover
        pytest.skip("pydicom's sample files are not installed here")
    assert "excess padding" in (_record(padded).warnings or "")
    assert "Expected explicit VR, but found implicit VR" in (_record(vr).warnings or "")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    with LibraryMessages() as messages:
        import warnings

        warnings.warn("one", UserWarning, stacklevel=1)
        warnings.warn("one", UserWarning, stacklevel=1)
    assert messages.messages == ["UserWarning: one"]


def test_cli_add_keeps_the_terminal_quiet(tmp_path: Path) -> None:
    """Real `silo data add` process: pydicom's warnings go to the catalogue entry and the ingest
    log, not to stderr; `silo data show` counts photometric interpretations and warned files."""
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("MR_small_padded.dcm", "SC_rgb_jpeg.dcm", "examples_palette.dcm"):
        if not (PYDICOM_FILES / name).is_file():  # pragma: no cover
            pytest.skip(f"{name} is not installed with pydicom here")
        (folder / name).write_bytes((PYDICOM_FILES / name).read_bytes())
    save(ybr_full_file(_rgb()), folder / "ybr.dcm")
    home = init_silo_home(tmp_path / "home", "site")
    silo = Path(sys.executable).parent / "silo"
    run = subprocess.run(
        [str(silo), "data", "add", "mixed", "--dicom-dir", str(folder), "--home", str(home.root)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr and "padding" not in run.stderr, run.stderr
    assert "2 new file(s) with DICOM reader warnings" in run.stdout
    log = (tmp_path / "home" / "datasets" / "mixed" / INGEST_LOG).read_text()
    assert "warning MR_small_padded.dcm: UserWarning: The pixel data is 8320 bytes long" in log
    assert "warning SC_rgb_jpeg.dcm: UserWarning: Expected explicit VR" in log
    show = subprocess.run(
        [str(silo), "data", "show", "mixed", "--home", str(home.root), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    shown = json.loads(show.stdout)
    assert shown["photometric"] == {
        "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 1, "YBR_FULL": 1,
    }  # fmt: skip
    assert shown["files_with_warnings"] == 2 and shown["ok"] == 4
    assert {w["path"] for w in shown["warned_files"]} == {"MR_small_padded.dcm", "SC_rgb_jpeg.dcm"}
    text = runner.invoke(app, ["data", "show", "mixed", "--home", str(home.root)]).output
    assert "photometric interpretations: MONOCHROME2: 1, PALETTE COLOR: 1, RGB: 1" in text


def test_cli_add_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    for i in range(30):
        save(rgb_file(_rgb(16)), folder / f"img-{i:02d}.dcm")
    home = init_silo_home(tmp_path / "home", "site")
    silo = Path(sys.executable).parent / "silo"
    env = {**__import__("os").environ, "FORCE_COLOR": "1", "COLUMNS": "160"}
    run = subprocess.run(
        [str(silo), "data", "add", "big", "--dicom-dir", str(folder), "--home", str(home.root)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", run.stderr + run.stdout)
    assert "reading DICOM" in plain and "30/30" in plain and "files/s" in plain
    assert "30 new (30 ok, 0 skipped)" in plain


# ---------------------------------------------------------------------------- catalogue


def _v1_catalogue(path: Path, files_root: Path) -> None:
    """A catalogue as fedsilo wrote it before colour: schema 1, no warnings column, a colour
    file recorded as skipped."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE dataset (name TEXT PRIMARY KEY, source_kind TEXT NOT NULL,
            source TEXT NOT NULL, files_root TEXT NOT NULL, labels_csv TEXT,
            label_column TEXT NOT NULL DEFAULT 'label',
            key_tag TEXT NOT NULL DEFAULT 'StudyInstanceUID', query TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL DEFAULT 'ingesting', created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE file (dataset TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT,
            study_uid TEXT, series_uid TEXT, sop_uid TEXT, sop_class TEXT,
            modality TEXT, rows INTEGER, columns INTEGER, frames INTEGER,
            spacing_row REAL, spacing_col REAL, slice_thickness REAL,
            transfer_syntax TEXT, photometric TEXT, bits_stored INTEGER,
            accession_digest TEXT, patient_digest TEXT, patient_group TEXT,
            ingested REAL NOT NULL, PRIMARY KEY (dataset, path));
        """
    )
    db.execute(
        "INSERT INTO dataset VALUES ('old', 'dicom-dir', ?, ?, NULL, 'label', "
        "'StudyInstanceUID', '', 'complete', 1, 1)",
        (str(files_root), str(files_root)),
    )
    for p in sorted(files_root.iterdir()):
        st = p.stat()
        colour = p.name.startswith("rgb")
        db.execute(
            "INSERT INTO file (dataset, path, size, mtime_ns, status, reason, photometric, "
            "ingested) VALUES ('old', ?, ?, ?, ?, ?, ?, 1)",
            (p.name, st.st_size, st.st_mtime_ns, "skipped" if colour else "ok",
             "unsupported PhotometricInterpretation 'RGB' (only grayscale MONOCHROME1/"
             "MONOCHROME2 is used)" if colour else None,
             None if colour else "MONOCHROME2"),
        )  # fmt: skip
    db.commit()
    db.close()


def test_v1_catalogue_is_migrated_and_colour_files_are_read_again(tmp_path: Path) -> None:
    root = tmp_path / "files"
    save(image_dataset(textured(16)), root / "gray.dcm")
    save(rgb_file(_rgb(16)), root / "rgb.dcm")
    db_path = tmp_path / "catalogue.sqlite"
    _v1_catalogue(db_path, root)
    with Catalogue(db_path) as catalogue:
        assert catalogue.summary("old")["files"] == 2  # still accounted for
        assert catalogue.known_files("old")["rgb.dcm"][1] == -1  # marked for reading again
        from silo_client.data.ingest import ingest_folder

        summary = ingest_folder(catalogue, "old", root)
        assert (summary.new_ok, summary.unchanged) == (1, 1)
        assert catalogue.summary("old")["photometric"] == {"MONOCHROME2": 1, "RGB": 1}
        version = catalogue.db.execute("SELECT value FROM meta").fetchone()[0]
    assert version == "2"
    with Catalogue(db_path) as again:  # opening a current catalogue changes nothing
        assert again.summary("old")["ok"] == 2


def test_a_newer_catalogue_is_refused_untouched(tmp_path: Path) -> None:
    db_path = tmp_path / "catalogue.sqlite"
    Catalogue(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    before = db_path.read_bytes()
    with pytest.raises(DataError, match="schema version 9, newer than this fedsilo reads"):
        Catalogue(db_path)
    assert db_path.read_bytes() == before


# ---------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def colour_hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colour")
    generate_colour_hospitals(root, hospitals=2, images_per_hospital=8, seed=3, image_size=32)
    return root / "hospital-1"  # JPEG YBR_FULL_422


def _registered(tmp_path: Path, folder: Path, name: str = "default") -> SiloHome:
    home = init_silo_home(tmp_path / "home", "site")
    register_dataset(
        home, name, source_kind="dicom-dir", source=str(folder / "dicom"),
        files_root=folder / "dicom", labels_csv=folder / "labels.csv",
    )  # fmt: skip
    return SiloHome.open(home.root)


def test_channels_3_gives_rgb_tensors(tmp_path: Path, colour_hospital: Path) -> None:
    home = _registered(tmp_path, colour_hospital)
    folder = home.dataset_folder("default")
    data = build_catalogued_dataset(folder, Preprocessing(input_size=16, channels=3))
    n = len(list((colour_hospital / "dicom").iterdir()))
    assert data.images.shape[1:] == (3, 16, 16) and len(data) == n
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    # the colour is kept: a skin photograph is redder than it is blue
    assert float(data.images[:, 0].mean()) > float(data.images[:, 2].mean()) + 0.1
    gray = build_catalogued_dataset(folder, Preprocessing(input_size=16, to_grayscale=True))
    assert gray.images.shape[1:] == (1, 16, 16)
    luma = torch.tensordot(torch.tensor([0.299, 0.587, 0.114]), data.images, dims=([0], [1]))
    assert torch.allclose(gray.images[:, 0], luma, atol=1e-5)
    # the legacy folder layout (dicom/ + labels.csv) reads colour the same way
    plain = build_dataset(colour_hospital, Preprocessing(input_size=16, channels=3))
    assert torch.allclose(plain.images, data.images, atol=1e-5)


def test_colour_dataset_refused_by_a_grayscale_plan(tmp_path: Path, colour_hospital: Path) -> None:
    home = _registered(tmp_path, colour_hospital)
    folder = home.dataset_folder("default")
    with pytest.raises(DataError) as info:
        build_catalogued_dataset(folder, Preprocessing(input_size=16))
    message = str(info.value)
    n = len(list((colour_hospital / "dicom").iterdir()))
    assert message.startswith(f"dataset 'default' does not fit the plan: it holds {n} YBR_FULL_422")
    assert "preprocessing.channels: 3, or to_grayscale: true" in message
    assert "\n" not in message
    assert catalogue_fit_problem(folder, 1, False) == (
        "none of this site's images fit the plan: they are colour (YBR_FULL_422) and the plan "
        "takes grayscale images (preprocessing.channels: 1)"
    )
    assert catalogue_fit_problem(folder, 3, False) is None
    assert catalogue_fit_problem(folder, 1, True) is None
    with Catalogue.of_home(home.root) as catalogue:
        assert catalogue.summary("default")["ok"] == n  # nothing stored was touched


def test_plain_folder_fit_is_read_from_headers_and_remembered(
    tmp_path: Path, colour_hospital: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain folder (dicom/ + labels.csv, not catalogued) is judged at the gate too, from its
    headers, and the counts are kept per folder version in the silo's cache."""
    import shutil

    import pydicom

    folder = tmp_path / "plain"
    shutil.copytree(colour_hospital, folder)
    (folder / "dicom" / "notes.txt").write_text("not DICOM")  # left to the dataset builder
    cache = tmp_path / "cache"
    n = len(list((colour_hospital / "dicom").iterdir()))
    assert dataset_fit_problem(folder, 1, False, cache) == (
        "none of this site's images fit the plan: they are colour (YBR_FULL_422) and the plan "
        "takes grayscale images (preprocessing.channels: 1)"
    )
    assert dataset_fit_problem(folder, 3, False, cache) is None
    assert dataset_fit_problem(folder, 1, True, cache) is None
    (remembered,) = cache.glob("photometric-*.json")

    def no_reads(*args, **kwargs):
        raise AssertionError("headers read again for an unchanged folder")

    monkeypatch.setattr(pydicom, "dcmread", no_reads)
    assert folder_photometric_counts(folder / "dicom", cache) == {"YBR_FULL_422": n}
    monkeypatch.undo()
    remembered.write_text("{damaged")  # a damaged entry is counted again, not trusted
    assert folder_photometric_counts(folder / "dicom", cache) == {"YBR_FULL_422": n}
    # one grayscale image more: a new folder version, counted again, and now some images fit
    save(image_dataset(textured(32)), folder / "dicom" / "gray.dcm")
    assert folder_photometric_counts(folder / "dicom", cache) == {
        "YBR_FULL_422": n,
        "MONOCHROME2": 1,
    }
    assert dataset_fit_problem(folder, 1, False, cache) is None
    assert list(cache.glob("photometric-*.json")) != [remembered]  # only the new version kept
    assert len(list(cache.glob("photometric-*.json"))) == 1
    assert dataset_fit_problem(folder, 3, False) is None  # without a cache: read every time
    assert dataset_fit_problem(tmp_path / "missing", 3, False, cache) is None  # builder says why


def test_mixed_dataset_skips_what_does_not_fit(tmp_path: Path, colour_hospital: Path) -> None:
    import csv
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(colour_hospital, folder)
    gray = image_dataset(textured(32))
    save(gray, folder / "dicom" / "gray.dcm")
    with (folder / "labels.csv").open("a") as fh:
        csv.writer(fh, lineterminator="\n").writerow([gray.StudyInstanceUID, 1])
    home = _registered(tmp_path, folder)
    data = build_catalogued_dataset(
        home.dataset_folder("default"), Preprocessing(input_size=16, channels=3)
    )
    assert len(data) == len(list((colour_hospital / "dicom").iterdir()))
    reasons = dict(data.skipped)
    assert reasons["gray.dcm"] == (
        "grayscale image (MONOCHROME2) but the plan takes colour images (preprocessing.channels: 3)"
    )
    one = build_catalogued_dataset(home.dataset_folder("default"), Preprocessing(input_size=16))
    assert len(one) == 1 and dict(one.skipped)["img-0000.dcm"].startswith("colour image (")
    from silo_client.data.checks import check_dataset

    with Catalogue.of_home(home.root) as catalogue:
        codes = {w.code: w.message for w in check_dataset(catalogue, "default", 1)}
    assert codes["mixed-colour"].startswith("grayscale and colour images (MONOCHROME2: 1, ")


def test_plan_channels_schema_and_model() -> None:
    from training_plan import parse_plan, plan_hash
    from training_plan.errors import PlanError
    from training_plan.hashing import canonical_json
    from training_plan.models import build_plan_model

    base = "title: t\nmodel: {name: resnet10}\npreprocessing: {input_size: 32%s}\n"
    plain = parse_plan(base % "")
    assert b"channels" not in canonical_json(plain)  # old plans keep their hash
    assert plan_hash(parse_plan(base % ", channels: 1")) == plan_hash(plain)
    colour = parse_plan(base % ", channels: 3")
    assert plan_hash(colour) != plan_hash(plain)
    model = build_plan_model(colour.model, colour.preprocessing.channels)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1)
    with pytest.raises(PlanError, match="to_grayscale converts colour to one channel"):
        parse_plan(base % ", channels: 3, to_grayscale: true")
    with pytest.raises(PlanError, match="channels"):
        parse_plan(base % ", channels: 2")
    seg = "title: s\ntask: segmentation\nmodel: {name: unet}\npreprocessing: {input_size: 32%s}\n"
    with pytest.raises(PlanError, match="segmentation reads grayscale"):
        parse_plan(seg % ", channels: 3")
    example = Path(__file__).parents[2] / "examples" / "plan-colour.yaml"
    from training_plan import load_plan

    assert load_plan(example).preprocessing.channels == 3


def test_synthetic_colour_hospitals_are_deterministic(tmp_path: Path) -> None:
    a = generate_colour_hospitals(tmp_path / "a", hospitals=6, images_per_hospital=4, seed=1,
                                  image_size=32)  # fmt: skip
    generate_colour_hospitals(tmp_path / "b", hospitals=6, images_per_hospital=4, seed=1,
                              image_size=32)  # fmt: skip
    with pytest.raises(DataError, match="image_size must be >= 32 pixels for colour"):
        generate_colour_hospitals(tmp_path / "c", image_size=24)
    storages = {spec.storage for spec in a}
    assert storages == {"rgb", "rgb-planar", "ybr-full", "jpeg-ybr422", "rle-rgb", "j2k-rct"}
    for spec in a:
        files_a = sorted((tmp_path / "a" / spec.name / "dicom").iterdir())
        files_b = sorted((tmp_path / "b" / spec.name / "dicom").iterdir())
        assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]
        for path in files_a:
            record = _record(path)
            assert record.status == "ok", (spec.storage, record.reason)
