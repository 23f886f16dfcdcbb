"""A hostile folder: names that are not UTF-8, links that go nowhere or in circles, folders that
cannot be read, a multi-gigabyte file of zeros, half-copied exports, undecodable pixels. Each is
recorded with a reason, nothing crashes, nothing goes unaccounted for, and nothing stored is
lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from typer.testing import CliRunner

from silo_client.cli import app
from silo_client.data import ingest
from silo_client.data.catalogue import Catalogue
from silo_client.data.volume import VolumeError, build_volume
from silo_client.home import SiloHome, init_silo_home
from tests.data.dicom_factory import image_dataset, jpeg_baseline, save, textured

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> SiloHome:
    return init_silo_home(tmp_path / "home", "site-a")


def _add(home: SiloHome, folder: Path) -> dict:
    result = runner.invoke(
        app, ["data", "add", "d", "--dicom-dir", str(folder), "--home", str(home.root), "--json"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def _skipped(home: SiloHome) -> dict[str, str]:
    with Catalogue.of_home(home.root) as cat:
        return dict(cat.skipped("d"))


def test_non_utf8_file_names_are_recorded_not_a_crash(home: SiloHome, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    save(image_dataset(textured(16)), folder / "ok.dcm")
    image = save(image_dataset(textured(16)), tmp_path / "image.dcm").read_bytes()
    raw = os.fsencode(folder)
    with open(raw + b"/caf\xe9-\xff.dcm", "wb") as fh:  # Latin-1 bytes, not UTF-8
        fh.write(image)
    with open(raw + b"/notes-\xe9.txt", "wb") as fh:
        fh.write(b"not dicom")
    out = _add(home, folder)
    assert (out["files"], out["new_ok"], out["new_skipped"]) == (3, 1, 2)
    skipped = _skipped(home)
    assert "file name is not valid UTF-8" in skipped["caf\\xe9-\\xff.dcm"]
    assert skipped["notes-\\xe9.txt"].startswith("not a DICOM file")
    again = _add(home, folder)  # recorded the same way: nothing read again, nothing lost
    assert (again["unchanged"], again["new_ok"], again["new_skipped"]) == (3, 0, 0)
    assert again["catalogue"]["state"] == "complete" and again["catalogue"]["ok"] == 1


def test_links_that_go_nowhere_or_in_circles_are_accounted_for(
    home: SiloHome, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    (folder / "series").mkdir(parents=True)
    save(image_dataset(textured(16)), folder / "series" / "a.dcm")
    (folder / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (folder / "loop.dcm").symlink_to(folder / "loop.dcm")
    (folder / "series" / "back").symlink_to(folder)  # a folder link back up: a loop
    (folder / "gone-folder").symlink_to(tmp_path / "no-such-folder")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save(image_dataset(textured(16)), elsewhere / "b.dcm")
    (folder / "linked").symlink_to(elsewhere)  # a linked series folder is followed
    os.mkfifo(folder / "pipe.dcm")  # opening it would block the ingest forever
    out = _add(home, folder)
    skipped = _skipped(home)
    assert out["new_ok"] == 2 and out["files"] == 7, skipped
    assert skipped["pipe.dcm"] == "a FIFO; not read"
    assert skipped["gone.dcm"].startswith("dangling symbolic link")
    assert skipped["gone-folder"].startswith("dangling symbolic link")
    assert skipped["loop.dcm"].startswith("symbolic link loop")
    assert skipped["series/back"].startswith("symbolic link to a folder already looked at")
    again = _add(home, folder)
    assert (again["unchanged"], again["new_ok"] + again["new_skipped"]) == (7, 0)


def test_unreadable_folder_is_recorded(home: SiloHome, tmp_path: Path) -> None:
    """Tests run as root, for whom chmod 000 blocks nothing: the ingest runs in a child whose
    capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), so the
    kernel refuses it the folder as it would any other user."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed: cannot drop root's file-access bypass")
    folder = tmp_path / "export"
    (folder / "locked").mkdir(parents=True)
    save(image_dataset(textured(16)), folder / "a.dcm")
    save(image_dataset(textured(16)), folder / "locked" / "b.dcm")
    os.chmod(folder / "locked", 0)
    try:
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
               "from silo_client.cli import main; main()", "data", "add", "d", "--dicom-dir",
               str(folder), "--home", str(home.root), "--json"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    finally:
        os.chmod(folder / "locked", 0o755)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["new_ok"], out["new_skipped"]) == (1, 1)
    assert _skipped(home)["locked"].startswith("folder cannot be read (Permission denied)")


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_large_non_dicom_file_is_decided_from_its_first_bytes(tmp_path: Path) -> None:
    """A sparse 4 GiB file of zeros: classified from its first bytes (counted by the kernel's
    per-process read counter), not by a forced parse of 4 GiB."""
    if not Path("/proc/self/io").exists():
        pytest.skip("no /proc/self/io to count the bytes read")
    big = tmp_path / "zeros.bin"
    with open(big, "wb") as fh:
        fh.truncate(4 << 30)
    before = _bytes_read()
    record = ingest.inspect_file(big, "zeros.bin", 4 << 30, 0)
    read = _bytes_read() - before
    assert record.status == "skipped" and record.reason.startswith("not a DICOM file")
    assert read < 64 * 1024, f"{read} bytes read to classify a file of zeros"


def test_interrupt_after_a_large_file_keeps_what_was_read(
    home: SiloHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    for i in range(3):
        save(image_dataset(textured(16)), folder / f"a{i}.dcm")
    with open(folder / "b-zeros.bin", "wb") as fh:
        fh.truncate(2 << 30)
    save(image_dataset(textured(16)), folder / "c.dcm")

    def stop(done: int, total: int) -> None:
        if done == 4:  # right after the big file
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest.register_dataset(home, "d", source_kind="dicom-dir", source=str(folder),
                                files_root=folder, progress=stop)  # fmt: skip
    with Catalogue.of_home(home.root) as cat:
        assert sorted(cat.known_files("d")) == ["a0.dcm", "a1.dcm", "a2.dcm", "b-zeros.bin"]
    out = _add(home, folder)
    assert (out["unchanged"], out["new_ok"]) == (4, 1)


def test_truncated_exports_say_truncated(tmp_path: Path) -> None:
    good = save(image_dataset(textured(32)), tmp_path / "good.dcm").read_bytes()
    pixel_at = good.rfind(b"\xe0\x7f\x10\x00")
    cases = {
        "in-pixels.dcm": good[: len(good) - 100],
        "before-pixels.dcm": good[: pixel_at + 3],  # inside the PixelData header
        "in-header.dcm": good[:300],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        record = ingest.inspect_file(tmp_path / name, name, len(data), 0)
        assert record.status == "skipped"
        assert record.reason.startswith("truncated file (it ends at byte "), (name, record.reason)
    nopix = image_dataset(textured(16))
    del nopix.PixelData
    save(nopix, tmp_path / "nopix.dcm")  # complete, just without pixels: not 'truncated'
    record = ingest.inspect_file(tmp_path / "nopix.dcm", "nopix.dcm", 1, 0)
    assert record.reason.startswith("no pixel data")


def test_decode_failure_keeps_the_codecs_cause(tmp_path: Path) -> None:
    ds = jpeg_baseline(textured(32, bits=8))
    ds.PixelData = encapsulate([b"\xff\xd8" + b"garbage" * 10])
    path = save(ds, tmp_path / "bad-jpeg.dcm")
    reason = ingest.inspect_file(path, "bad-jpeg.dcm", 1, 0).reason
    assert reason.startswith("pixel data in JPEG Baseline (Process 1) cannot be decoded")
    # the cause pydicom puts after its first line: what the decoder itself said
    assert "pylibjpeg: libjpeg error" in reason and "\n" not in reason


@pytest.mark.parametrize("value", ["abc", "1.5", "2x"])
def test_malformed_number_of_frames_is_a_volume_error(value: str) -> None:
    slices = []
    for k in range(3):
        ds = image_dataset(textured(8))
        ds.ImagePositionPatient = [0, 0, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        slices.append(ds)
    # as read from a file: the bytes are only converted when the value is first used
    slices[1][0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(value), value.encode(),
                                           0, False, True)  # fmt: skip
    with pytest.raises(VolumeError, match="malformed NumberOfFrames"):
        build_volume(slices)
