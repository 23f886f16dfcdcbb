"""The DICOM loader: shapes, ranges, windowing, MONAI compatibility, split."""

from __future__ import annotations

from pathlib import Path

import monai.data
import numpy as np
import pytest
import torch

from silo_client.data.dataset_builder import build_dataset
from silo_client.data.folder_scan import scan_dicom_folder
from silo_client.data.labels_csv import load_labels
from silo_client.data.local_dataset import LocalDataset
from silo_client.data.preprocessing import Preprocessing
from silo_client.errors import DataError


def test_shapes_dtypes_and_range(hospital: Path, small_hospitals) -> None:
    _, specs = small_hospitals
    data = build_dataset(hospital, Preprocessing(input_size=24), cache_dir=None)
    n = specs[0].n_images
    assert isinstance(data, monai.data.Dataset) and isinstance(data, LocalDataset)
    assert data.images.shape == (n, 1, 24, 24) and data.images.dtype == torch.float32
    assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert float(data.images.std()) > 0.05
    assert int(data.labels.sum()) == specs[0].n_positive
    assert data.n_skipped == 0 and data.skipped == [] and data.warnings == []
    item = data[0]
    assert item["image"].shape == (1, 24, 24) and item["image"].dtype == torch.float32
    assert isinstance(item["label"], int)
    assert len(data) == n
    batch = next(iter(monai.data.DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 1, 24, 24) and batch["label"].shape == (4,)


def test_labels_follow_study_uids(hospital: Path) -> None:
    data = build_dataset(hospital, Preprocessing(input_size=32))
    labels = load_labels(hospital / "labels.csv")
    assert [labels[u] for u in data.study_uids] == data.labels.tolist()
    assert data.paths == sorted(data.paths) and data.paths[0].startswith("img-")


def test_scan_lists_instances(hospital: Path, small_hospitals) -> None:
    scan = scan_dicom_folder(hospital / "dicom")
    assert len(scan.instances) == small_hospitals[1][0].n_images and not scan.skipped
    inst = scan.instances[0]
    assert inst.rows == inst.columns == 32 and inst.photometric_interpretation == "MONOCHROME2"


def _halves(left: int, right: int) -> np.ndarray:
    img = np.full((16, 16), left, dtype=np.uint16)
    img[:, 8:] = right
    return img


def test_explicit_window_after_rescale(labelled_folder) -> None:
    # stored 50 -> HU 0, stored 100 -> HU 100 (slope 2, intercept -100)
    folder = labelled_folder(_halves(50, 100), RescaleSlope="2", RescaleIntercept="-100")
    out = build_dataset(folder, Preprocessing(16, window_center=50, window_width=100)).images
    assert torch.allclose(out[0, 0, :, :6], torch.zeros(16, 6), atol=1e-5)
    assert torch.allclose(out[0, 0, :, 10:], torch.ones(16, 6), atol=1e-5)
    narrow = build_dataset(folder, Preprocessing(16, window_center=50, window_width=400)).images
    assert narrow[0, 0, 0, 0] == pytest.approx(0.375, abs=1e-4)  # (0 - (-150)) / 400


def test_file_window_then_min_max_fallback(labelled_folder) -> None:
    img = _halves(0, 200)
    folder = labelled_folder(img, WindowCenter="150", WindowWidth="100")
    out = build_dataset(folder, Preprocessing(16)).images  # file window [100, 200]
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.0) and float(out[0, 0, 0, 15]) == 1.0
    folder2 = labelled_folder(img * 0 + np.arange(16, dtype=np.uint16) * 10)  # no window tags
    out2 = build_dataset(folder2, Preprocessing(16)).images[0, 0]
    assert float(out2.min()) == pytest.approx(0.0) and float(out2.max()) == pytest.approx(1.0)


def test_missing_rescale_means_identity_and_monochrome1_is_inverted(labelled_folder) -> None:
    folder = labelled_folder(
        _halves(0, 100),
        RescaleSlope=None,
        RescaleIntercept=None,
        PixelSpacing=None,
        PhotometricInterpretation="MONOCHROME1",
    )
    out = build_dataset(folder, Preprocessing(16, window_center=50, window_width=100)).images
    assert float(out[0, 0, 0, 0]) == pytest.approx(1.0) and float(out[0, 0, 0, 15]) == 0.0


def test_non_square_is_padded_and_resized(labelled_folder) -> None:
    folder = labelled_folder(np.full((8, 16), 100, dtype=np.uint16))
    out = build_dataset(folder, Preprocessing(32, window_center=50, window_width=100)).images
    assert out.shape == (1, 1, 32, 32)
    assert float(out[0, 0, 0, 16]) == 0.0 and float(out[0, 0, 16, 16]) == pytest.approx(1.0)


def test_missing_preamble_is_tolerated(tmp_path: Path, write_dicom) -> None:
    path = write_dicom(tmp_path / "d" / "raw.dcm", preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    scan = scan_dicom_folder(tmp_path / "d")
    assert len(scan.instances) == 1 and not scan.skipped


def test_split_is_deterministic_stratified_and_grouped(tmp_path: Path) -> None:
    from fedsilo.synthetic import generate_hospitals

    generate_hospitals(tmp_path, hospitals=1, images_per_hospital=60, image_size=16, seed=2)
    data = build_dataset(tmp_path / "hospital-0", Preprocessing(16))
    train, val = data.split(0.25, seed=5)
    train2, val2 = data.split(0.25, seed=5)
    assert train.study_uids == train2.study_uids and val.study_uids == val2.study_uids
    assert len(train) + len(val) == len(data)
    assert not set(train.study_uids) & set(val.study_uids)
    assert not set(train.groups) & set(val.groups)  # no patient on both sides
    assert 0.15 <= len(val) / len(data) <= 0.35
    p_all = data.labels.float().mean().item()
    assert abs(val.labels.float().mean().item() - p_all) < 0.15
    assert set(val.labels.tolist()) == {0, 1}
    other, _ = data.split(0.25, seed=6)
    assert other.study_uids != train.study_uids
    assert torch.equal(val.images[0], data.images[data.study_uids.index(val.study_uids[0])])
    with pytest.raises(DataError, match="val_fraction"):
        data.split(1.0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input_size": 2}, "input_size must be in [8, 4096]"),
        ({"window_center": 40.0}, "needs both window_center and window_width"),
        ({"window_center": 40.0, "window_width": 0.0}, "window_width must be > 0"),
    ],
)
def test_bad_preprocessing(kwargs: dict, needle: str) -> None:
    with pytest.raises(DataError) as info:
        Preprocessing(**{"input_size": 32, **kwargs})
    assert needle in str(info.value)


def test_preprocessing_fingerprint() -> None:
    assert Preprocessing(32).fingerprint() == Preprocessing(32).fingerprint()
    assert Preprocessing(32).fingerprint() != Preprocessing(33).fingerprint()
    assert Preprocessing(32, 40, 400).fingerprint() != Preprocessing(32, 40, 401).fingerprint()
