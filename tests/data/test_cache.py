"""The preprocessed-tensor cache: hits decode no DICOM, changes invalidate, corruption heals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from silo_client.data import cache as cache_mod
from silo_client.data.cache import CacheWarning
from silo_client.data.dataset_builder import build_dataset
from silo_client.data.preprocessing import Preprocessing

PREP = Preprocessing(input_size=16)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pydicom.dcmread call made by the loader."""
    calls: list[str] = []
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return calls


def test_warm_build_decodes_no_dicom(hospital: Path, tmp_path: Path, reads: list[str]) -> None:
    cache = tmp_path / "cache"
    cold = build_dataset(hospital, PREP, cache_dir=cache)
    assert not cold.cache_hit and len(reads) == len(cold)
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp"))
    reads.clear()
    warm = build_dataset(hospital, PREP, cache_dir=cache)
    assert warm.cache_hit and reads == []
    assert torch.equal(warm.images, cold.images) and torch.equal(warm.labels, cold.labels)
    assert warm.study_uids == cold.study_uids and warm.groups == cold.groups
    assert warm.skipped == cold.skipped and warm.version == cold.version


def test_preprocessing_change_invalidates(hospital: Path, tmp_path: Path, reads) -> None:
    cache = tmp_path / "cache"
    build_dataset(hospital, PREP, cache_dir=cache)
    reads.clear()
    other = build_dataset(hospital, Preprocessing(16, 40, 400), cache_dir=cache)
    assert not other.cache_hit and reads
    assert len(list(cache.glob("*.pt"))) == 2


def test_file_changes_invalidate(hospital: Path, tmp_path: Path, reads) -> None:
    cache = tmp_path / "cache"
    base = build_dataset(hospital, PREP, cache_dir=cache)
    victim = sorted((hospital / "dicom").glob("*.dcm"))[0]

    st = victim.stat()  # touched (same bytes, new mtime)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    reads.clear()
    assert not build_dataset(hospital, PREP, cache_dir=cache).cache_hit and reads

    (hospital / "dicom" / "notes.txt").write_text("scan protocol v2")  # a file added
    again = build_dataset(hospital, PREP, cache_dir=cache)
    assert not again.cache_hit and again.n_skipped == base.n_skipped + 1

    text = (hospital / "labels.csv").read_text()  # a label edited
    flipped = text.replace(",0\n", ",1\n", 1)
    assert flipped != text
    (hospital / "labels.csv").write_text(flipped)
    edited = build_dataset(hospital, PREP, cache_dir=cache)
    assert not edited.cache_hit
    assert int(edited.labels.sum()) == int(base.labels.sum()) + 1


def test_corrupt_cache_is_rebuilt_with_warning(hospital: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = build_dataset(hospital, PREP, cache_dir=cache)
    (entry,) = cache.glob("*.pt")
    for garbage in (b"", b"not a torch file", entry.read_bytes()[:100]):
        entry.write_bytes(garbage)
        with pytest.warns(CacheWarning, match="ignoring corrupt data cache file"):
            rebuilt = build_dataset(hospital, PREP, cache_dir=cache)
        assert not rebuilt.cache_hit and torch.equal(rebuilt.images, base.images)
        assert build_dataset(hospital, PREP, cache_dir=cache).cache_hit  # healed


def test_foreign_payload_is_ignored(hospital: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_dataset(hospital, PREP, cache_dir=cache)
    (entry,) = cache.glob("*.pt")
    torch.save({"format": cache_mod.CACHE_FORMAT, "images": "oops"}, entry)
    with pytest.warns(CacheWarning):
        assert not build_dataset(hospital, PREP, cache_dir=cache).cache_hit


def test_unwritable_cache_warns_but_builds(hospital: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(CacheWarning, match="could not write data cache file"):
        data = build_dataset(hospital, PREP, cache_dir=blocker)
    assert len(data) > 0


def test_dataset_version_ignores_location_but_not_content(hospital: Path, tmp_path: Path) -> None:
    v1 = cache_mod.dataset_version(hospital / "dicom", hospital / "labels.csv")
    assert v1 == cache_mod.dataset_version(hospital / "dicom", hospital / "labels.csv")
    copy = tmp_path / "copy"
    shutil.copytree(hospital, copy)  # copy2 keeps mtimes
    assert cache_mod.dataset_version(copy / "dicom", copy / "labels.csv") == v1
    (copy / "labels.csv").write_text("StudyInstanceUID,label\n")
    assert cache_mod.dataset_version(copy / "dicom", copy / "labels.csv") != v1
