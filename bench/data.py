"""Data-plane figures: ingest rate from a folder and from a real Orthanc, and the training
speed of our loader + trainer against a bare MONAI loop over the same tensors in memory.

    .venv/bin/python bench/data.py [--images 1000] [--pacs-images 400] [--size 128]

Targets (issue 4): folder ingest >= 200 instances/s (2D 128x128), DICOMweb >= 100/s, our
training steps/s within 10% of the bare MONAI loop. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from silo_client.data.ingest import managed_folder, register_dataset
from silo_client.data.synthetic import generate_hospitals
from silo_client.home import init_silo_home


def _generate(root: Path, n: int, size: int) -> Path:
    t = time.perf_counter()
    generate_hospitals(root, hospitals=1, images_per_hospital=n, seed=3, image_size=size)
    hospital = root / "hospital-0"
    count = len(list((hospital / "dicom").iterdir()))
    print(f"generated {count} synthetic {size}x{size} images in {time.perf_counter() - t:.1f}s")
    return hospital


def bench_folder(tmp: Path, hospital: Path) -> float:
    """Instances/s of `silo data add --dicom-dir` (read, decode, catalogue) on a cold catalogue."""
    home = init_silo_home(tmp / "home-folder", "bench")
    t = time.perf_counter()
    summary = register_dataset(home, "bench", source_kind="dicom-dir",
                               source=str(hospital / "dicom"), files_root=hospital / "dicom",
                               labels_csv=hospital / "labels.csv")  # fmt: skip
    dt = time.perf_counter() - t
    rate = summary.new_ok / dt
    print(f"folder ingest: {summary.new_ok} instances in {dt:.2f}s = {rate:.0f} instances/s "
          "(target >= 200)")  # fmt: skip
    t = time.perf_counter()
    again = register_dataset(home, "bench", source_kind="dicom-dir",
                             source=str(hospital / "dicom"), files_root=hospital / "dicom",
                             labels_csv=hospital / "labels.csv")  # fmt: skip
    print(f"folder re-run (nothing new): {again.unchanged} unchanged in "
          f"{time.perf_counter() - t:.2f}s")  # fmt: skip
    return rate


def bench_pacs(tmp: Path, hospital: Path, n: int) -> tuple[float | None, float | None]:
    """Instances/s pulled + ingested from Orthanc over DICOMweb and over DIMSE C-GET."""
    from silo_client.data import pacs
    from tests.pacs.conftest import AET, OUR_AET, PASSWORD, USER, orthanc_missing, running_orthanc

    if orthanc_missing():
        print("PACS ingest: skipped (Orthanc not installed: apt-get install orthanc "
              "orthanc-dicomweb)")  # fmt: skip
        return None, None
    files = sorted((hospital / "dicom").iterdir())[:n]
    folder = tmp / "orthanc"
    folder.mkdir()
    with running_orthanc(folder) as orthanc:
        t = time.perf_counter()
        orthanc.upload(files)
        print(f"uploaded {len(files)} instances to Orthanc in {time.perf_counter() - t:.1f}s")
        rates: list[float | None] = []
        for kind in ("dicomweb", "dimse"):
            home = init_silo_home(tmp / f"home-{kind}", "bench")
            dest = managed_folder(home.root, "pacs") / "dicom"
            if kind == "dicomweb":
                pull = pacs.dicomweb_puller(orthanc.dicomweb, pacs.PacsAuth(USER, PASSWORD),
                                            "", dest)  # fmt: skip
                source = orthanc.dicomweb
            else:
                pull = pacs.dimse_puller(orthanc.dimse, OUR_AET, AET, "", dest)
                source = orthanc.dimse
            t = time.perf_counter()
            summary = register_dataset(home, "pacs", source_kind=kind, source=source,
                                       files_root=dest, pull=pull)  # fmt: skip
            dt = time.perf_counter() - t
            rate = summary.new_ok / dt
            target = " (target >= 100)" if kind == "dicomweb" else ""
            print(f"{kind} pull + ingest: {summary.pulled} pulled, {summary.new_ok} ok in "
                  f"{dt:.2f}s = {rate:.0f} instances/s{target}")  # fmt: skip
            rates.append(rate)
    return rates[0], rates[1]


def bench_training(tmp: Path, hospital: Path, size: int, epochs: int) -> tuple[float, float]:
    """Steps/s: our load_local_data (cached) + train_local vs a bare MONAI loop, same tensors."""
    import monai
    from torch import nn

    from silo_client.home import SiloHome
    from silo_client.local_round import load_local_data
    from silo_client.training import make_optimizer, train_local
    from training_plan import TrainingPlan
    from training_plan.models import build_plan_model

    torch.set_num_threads(max(1, int(os.environ.get("FEDSILO_TORCH_THREADS", "2"))))
    home = init_silo_home(tmp / "home-train", "bench")
    register_dataset(home, "default", source_kind="dicom-dir", source=str(hospital / "dicom"),
                     files_root=hospital / "dicom", labels_csv=hospital / "labels.csv")  # fmt: skip
    plan = TrainingPlan.model_validate({
        "title": "bench", "model": {"name": "resnet10"},
        "preprocessing": {"input_size": size},
        "training": {"batch_size": 16, "local_epochs": epochs, "seed": 0,
                     "validation_fraction": 0.0},
        "federation": {"rounds": 1, "min_silos": 3},
    })  # fmt: skip
    home = SiloHome.open(home.root)
    load_local_data(home, plan)  # fill the cache (the silo's steady state between rounds)

    def ours() -> tuple[int, float]:
        torch.manual_seed(0)
        model = build_plan_model(plan.model)
        t = time.perf_counter()
        data = load_local_data(home, plan)
        result = train_local(model, data.train_images, data.train_labels, plan.training, seed=0)
        return result.steps, time.perf_counter() - t

    data = load_local_data(home, plan)
    pairs = zip(data.train_images, data.train_labels.tolist(), strict=True)
    items = [{"image": img, "label": float(y)} for img, y in pairs]

    def bare() -> tuple[int, float]:
        torch.manual_seed(0)
        model = build_plan_model(plan.model)
        t = time.perf_counter()
        loader = monai.data.DataLoader(monai.data.Dataset(items), batch_size=16, shuffle=True,
                                       drop_last=True)  # fmt: skip
        optimizer = make_optimizer(model, plan.training)
        loss_fn = nn.BCEWithLogitsLoss()
        model.train()
        steps = 0
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(batch["image"]).squeeze(1), batch["label"].float())
                loss.backward()
                optimizer.step()
                steps += 1
        return steps, time.perf_counter() - t

    results: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(3):  # interleaved, median of 3: the 2 cores are shared
        for name, fn in (("ours", ours), ("bare", bare)):
            steps, dt = fn()
            results[name].append(steps / dt)
    ours_rate = sorted(results["ours"])[1]
    bare_rate = sorted(results["bare"])[1]
    print(f"training ({len(items)} images {size}x{size}, resnet10, batch 16, {epochs} epoch(s), "
          f"{torch.get_num_threads()} threads): ours {ours_rate:.2f} steps/s (loader from cache + "
          f"train_local), bare MONAI loop {bare_rate:.2f} steps/s, ratio "
          f"{ours_rate / bare_rate:.3f} (target >= 0.90)")  # fmt: skip
    return ours_rate, bare_rate


def main() -> None:
    """Run the benchmarks and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--pacs-images", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["folder", "pacs", "training"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        hospital = _generate(tmp / "data", args.images, args.size)
        if "folder" not in args.skip:
            bench_folder(tmp, hospital)
        if "pacs" not in args.skip:
            bench_pacs(tmp, hospital, args.pacs_images)
        if "training" not in args.skip:
            small = _generate(tmp / "train-data", args.train_images, args.train_size)
            bench_training(tmp, small, args.train_size, args.epochs)


if __name__ == "__main__":
    main()
