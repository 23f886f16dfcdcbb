"""Data-plane figures, each against its alternative in the same run: ingest rate from a folder
(vs a bare pydicom read+decode loop), of colour photographs in six storages (same alternative),
from a real Orthanc over DICOMweb (vs a plain
dicomweb-client loop: one WADO-RS per series, decode and re-encode) and over C-GET, and the
training speed of our loader + trainer against a bare MONAI loop over the same tensors.

    .venv/bin/python bench/data.py [--images 1000] [--pacs-images 400] [--repeats 3]
        [--skip folder colour pacs training]

Targets (issue 4): folder ingest >= 200 instances/s (2D 128x128), DICOMweb >= 100/s, our
training steps/s within 10% of the bare MONAI loop (ratio >= 0.90). Issue 16: C-GET >= 50/s, and
every instance the PACS holds for the query accounted for (pulled + undelivered = listed).
Every figure is the median of --repeats timed runs after an untimed warm-up, printed with its
min-max spread; the training sides alternate (ours-bare, bare-ours, ...) and the ratio is the
median of the per-pair ratios, so load from other processes hits both sides alike. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fedsilo.synthetic import generate_hospitals
from silo_client.data.ingest import managed_folder, register_dataset
from silo_client.home import init_silo_home


def _spread(values: list[float], unit: str, digits: int = 0) -> str:
    """'median unit (min-max, n=k)'."""
    med = statistics.median(values)
    unit = f" {unit}" if unit else ""
    return (
        f"{med:.{digits}f}{unit} (min-max {min(values):.{digits}f}-{max(values):.{digits}f}, "
        f"n={len(values)})"
    )


def _generate(root: Path, n: int, size: int) -> Path:
    t = time.perf_counter()
    generate_hospitals(root, hospitals=1, images_per_hospital=n, seed=3, image_size=size)
    hospital = root / "hospital-0"
    count = len(list((hospital / "dicom").iterdir()))
    print(f"generated {count} synthetic {size}x{size} images in {time.perf_counter() - t:.1f}s")
    return hospital


def _rates(run: Callable[[int], float], repeats: int) -> list[float]:
    """run(i) -> instances/s; one untimed warm-up (i = -1), then ``repeats`` timed runs."""
    run(-1)
    return [run(i) for i in range(repeats)]


def bench_folder(tmp: Path, hospital: Path, repeats: int) -> float:
    """Instances/s of `silo data add --dicom-dir` (read, decode, catalogue) on a cold catalogue,
    against a bare loop that only reads and decodes each file with pydicom."""
    import pydicom

    files = sorted((hospital / "dicom").iterdir())

    def ours(i: int) -> float:
        home = init_silo_home(tmp / f"home-folder{i}", "bench")
        t = time.perf_counter()
        summary = register_dataset(home, "bench", source_kind="dicom-dir",
                                   source=str(hospital / "dicom"), files_root=hospital / "dicom",
                                   labels_csv=hospital / "labels.csv")  # fmt: skip
        return summary.new_ok / (time.perf_counter() - t)

    def bare(i: int) -> float:
        t = time.perf_counter()
        for path in files:
            pydicom.dcmread(path).pixel_array  # noqa: B018 (the decode is the work)
        return len(files) / (time.perf_counter() - t)

    ours_rates, bare_rates = _rates(ours, repeats), _rates(bare, repeats)
    print(f"folder ingest ({len(files)} files): ours {_spread(ours_rates, 'instances/s')} "
          "(target >= 200)")  # fmt: skip
    print(f"  alternative, bare pydicom read + decode, no catalogue: "
          f"{_spread(bare_rates, 'instances/s')}")  # fmt: skip
    home = init_silo_home(tmp / "home-folder0", "bench")
    t = time.perf_counter()
    again = register_dataset(home, "bench", source_kind="dicom-dir",
                             source=str(hospital / "dicom"), files_root=hospital / "dicom",
                             labels_csv=hospital / "labels.csv")  # fmt: skip
    print(f"  re-run (nothing new): {again.unchanged} unchanged in "
          f"{time.perf_counter() - t:.2f}s")  # fmt: skip
    return statistics.median(ours_rates)


def bench_colour_folder(tmp: Path, n: int, size: int, repeats: int) -> None:
    """Instances/s of `silo data add` on colour photographs in every storage the synthetic
    colour task writes (RGB, planar RGB, YBR_FULL, JPEG YBR_FULL_422, RLE, JPEG 2000 YBR_RCT),
    against the bare pydicom read + decode (to RGB) loop over the same files."""
    import pydicom

    from fedsilo.synthetic import generate_colour_hospitals

    root = tmp / "colour-data"
    specs = generate_colour_hospitals(root, hospitals=6, images_per_hospital=max(4, n // 6),
                                      seed=3, image_size=size)  # fmt: skip
    folders = [root / spec.name for spec in specs]
    files = sorted(p for f in folders for p in (f / "dicom").iterdir())

    def ours(i: int) -> float:
        home = init_silo_home(tmp / f"home-colour{i}", "bench")
        t = time.perf_counter()
        ok = 0
        for folder in folders:
            ok += register_dataset(home, folder.name, source_kind="dicom-dir",
                                   source=str(folder / "dicom"), files_root=folder / "dicom",
                                   labels_csv=folder / "labels.csv").new_ok  # fmt: skip
        assert ok == len(files), f"only {ok} of {len(files)} colour files ingested"
        return ok / (time.perf_counter() - t)

    def bare(i: int) -> float:
        t = time.perf_counter()
        for path in files:
            pydicom.dcmread(path).pixel_array  # noqa: B018 (the decode is the work)
        return len(files) / (time.perf_counter() - t)

    ours_rates, bare_rates = _rates(ours, repeats), _rates(bare, repeats)
    print(f"colour folder ingest ({len(files)} files {size}x{size}, 6 storages): ours "
          f"{_spread(ours_rates, 'instances/s')}")  # fmt: skip
    print(f"  alternative, bare pydicom read + decode, no catalogue: "
          f"{_spread(bare_rates, 'instances/s')}")  # fmt: skip


def _plain_dicomweb_pull(url: str, user: str, password: str, dest: Path) -> int:
    """What dicomweb-client alone gives: QIDO-RS, then one WADO-RS per series, one at a time,
    each instance decoded by the client and written again with pydicom."""
    import pydicom
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.trust_env = False
    session.auth = (user, password)
    client = DICOMwebClient(url=url, session=session)
    series = {
        (i["0020000D"]["Value"][0], i["0020000E"]["Value"][0])
        for i in client.search_for_instances(
            fields=["StudyInstanceUID", "SeriesInstanceUID"], limit=100_000
        )
    }
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for study, ser in sorted(series):
        for ds in client.iter_series(study, ser, media_types=(("application/dicom", "*"),)):
            pydicom.dcmwrite(dest / f"{n}.dcm", ds, enforce_file_format=False)
            n += 1
    return n


def _plain_cget_pull(address: str, aet: str, called: str, dest: Path) -> int:
    """What a straightforward pynetdicom script does: C-FIND the series, then one C-GET per
    series, one presentation context per storage class holding every transfer syntax."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

    dest.mkdir(parents=True, exist_ok=True)
    host, port = address.rsplit(":", 1)
    n = [0]

    def store(event: object) -> int:
        ds = event.dataset  # type: ignore[attr-defined]
        ds.file_meta = event.file_meta  # type: ignore[attr-defined]
        ds.save_as(dest / f"{n[0]}.dcm", enforce_file_format=True)
        n[0] += 1
        return 0

    ae = AE(ae_title=aet)
    ae.add_requested_context(Find)
    ae.add_requested_context(Get)
    ae.add_requested_context(CTImageStorage, ALL_TRANSFER_SYNTAXES[:])
    assoc = ae.associate(host, int(port), ae_title=called,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, store)])  # fmt: skip
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = query.SeriesInstanceUID = ""
    series = [(ident.StudyInstanceUID, ident.SeriesInstanceUID)
              for status, ident in assoc.send_c_find(query, Find)
              if status and status.Status in (0xFF00, 0xFF01) and ident is not None]  # fmt: skip
    for study, ser in series:
        get = Dataset()
        get.QueryRetrieveLevel = "SERIES"
        get.StudyInstanceUID, get.SeriesInstanceUID = study, ser
        for _ in assoc.send_c_get(get, Get):
            pass
    assoc.release()
    return n[0]


def bench_pacs(tmp: Path, hospital: Path, n: int, repeats: int) -> None:
    """Instances/s pulled + ingested from Orthanc over DICOMweb and C-GET; the plain
    dicomweb-client loop as the DICOMweb alternative (pull only, like our pull-only figure)."""
    from silo_client.data import pacs
    from tests.pacs.conftest import AET, OUR_AET, PASSWORD, USER, orthanc_missing, running_orthanc

    if orthanc_missing():
        print("PACS ingest: skipped (Orthanc not installed: apt-get install orthanc "
              "orthanc-dicomweb)")  # fmt: skip
        return
    files = sorted((hospital / "dicom").iterdir())[:n]
    folder = tmp / "orthanc"
    folder.mkdir()
    with running_orthanc(folder) as orthanc:
        t = time.perf_counter()
        orthanc.upload(files)
        print(f"uploaded {len(files)} instances to Orthanc in {time.perf_counter() - t:.1f}s")
        for kind in ("dicomweb", "dimse"):
            pulls: list[float] = []

            def ours(i: int, kind: str = kind, pulls: list[float] = pulls) -> float:
                home = init_silo_home(tmp / f"home-{kind}{i}", "bench")
                dest = managed_folder(home.root, "pacs") / "dicom"
                if kind == "dicomweb":
                    inner = pacs.dicomweb_puller(orthanc.dicomweb, pacs.PacsAuth(USER, PASSWORD),
                                                 "", dest)  # fmt: skip
                    source = orthanc.dicomweb
                else:
                    inner = pacs.dimse_puller(orthanc.dimse, OUR_AET, AET, "", dest)
                    source = orthanc.dimse
                pull_s = [0.0]

                def pull(catalogue: object) -> int:
                    t0 = time.perf_counter()
                    got = inner(catalogue)  # type: ignore[arg-type]
                    pull_s[0] = time.perf_counter() - t0
                    return got

                t = time.perf_counter()
                summary = register_dataset(home, "pacs", source_kind=kind, source=source,
                                           files_root=dest, pull=pull)  # fmt: skip
                dt = time.perf_counter() - t
                if summary.new_ok != len(files):
                    print(f"  {kind}: only {summary.new_ok} of {len(files)} ingested!")
                accounted = summary.pulled + len(summary.undelivered)
                if i >= 0:
                    print(f"  run {i}: {summary.pulled} pulled + {len(summary.undelivered)} "
                          f"named as undelivered = {accounted} of the {len(files)} the PACS "
                          "holds for the query")  # fmt: skip
                if i >= 0:
                    pulls.append(summary.pulled / pull_s[0])
                return summary.new_ok / dt

            totals = _rates(ours, repeats)
            target = " (target >= 100)" if kind == "dicomweb" else " (target >= 50)"
            print(f"{kind} pull + ingest ({len(files)} instances): "
                  f"{_spread(totals, 'instances/s')}{target}")  # fmt: skip
            print(f"  pull only: {_spread(pulls, 'instances/s')}")
            if kind == "dicomweb":

                def plain(i: int) -> float:
                    t = time.perf_counter()
                    got = _plain_dicomweb_pull(orthanc.dicomweb, USER, PASSWORD,
                                               tmp / f"plain{i}")  # fmt: skip
                    return got / (time.perf_counter() - t)

                print("  alternative, plain dicomweb-client loop (one WADO-RS per series, "
                      f"decode + re-encode), pull only: "
                      f"{_spread(_rates(plain, repeats), 'instances/s')}")  # fmt: skip
            else:

                def plain_get(i: int) -> float:
                    t = time.perf_counter()
                    got = _plain_cget_pull(orthanc.dimse, OUR_AET, AET, tmp / f"plain-get{i}")
                    return got / (time.perf_counter() - t)

                print("  alternative, plain pynetdicom loop (C-FIND series, one C-GET per "
                      "series, one context per class with every syntax), pull only: "
                      f"{_spread(_rates(plain_get, repeats), 'instances/s')}")  # fmt: skip


def bench_training(tmp: Path, hospital: Path, size: int, epochs: int, repeats: int) -> None:
    """Steps/s: our load_local_data (from the cache) + train_local against a bare MONAI loop.

    Both sides: the same model (same init), optimizer, loss, batch size, number of steps,
    shuffled batches from the same in-memory tensors, the same torch threads. What only ours
    does: load the tensors from the preprocessed cache (the silo's steady state between
    rounds), timed and printed separately.
    """
    import monai
    from torch import nn

    from silo_client.home import SiloHome
    from silo_client.local_data import load_local_data
    from silo_client.training import make_optimizer, train_local
    from training_plan import TrainingPlan
    from training_plan.models import build_plan_model

    # The silo's default (silo_client/training.py): one intra-op thread per ClientApp. With two
    # threads on this shared 2-core machine a step took ~5x longer than with one (OpenMP
    # threads waiting on each other while other processes hold the cores), which is noise,
    # not a property of either loop.
    torch.set_num_threads(max(1, int(os.environ.get("FEDSILO_TORCH_THREADS", "1"))))
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
    data = load_local_data(home, plan)
    images, labels = data.train_images, data.train_labels.float()
    items = [{"image": img, "label": y} for img, y in zip(images, labels, strict=True)]
    load_s: list[float] = []

    def ours() -> tuple[int, float]:
        torch.manual_seed(0)
        model = build_plan_model(plan.model)
        t = time.perf_counter()
        local = load_local_data(home, plan)
        t_loaded = time.perf_counter()
        result = train_local(model, local.train_images, local.train_labels, plan.training,
                             seed=0)  # fmt: skip
        load_s.append(t_loaded - t)
        return result.steps, time.perf_counter() - t

    def bare() -> tuple[int, float]:
        torch.manual_seed(0)
        model = build_plan_model(plan.model)
        t = time.perf_counter()
        loader = monai.data.DataLoader(
            monai.data.Dataset(items), batch_size=16, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        optimizer = make_optimizer(model, plan.training)
        loss_fn = nn.BCEWithLogitsLoss()
        model.train()
        steps = 0
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(batch["image"]).squeeze(1), batch["label"])
                loss.backward()
                optimizer.step()
                steps += 1
        return steps, time.perf_counter() - t

    ours(), bare()  # warm-up: thread pools, allocator, first-touch of the cache file
    load_s.clear()
    ours_rates: list[float] = []
    bare_rates: list[float] = []
    for i in range(repeats):  # ours-bare, bare-ours, ...: drift and position hit both sides
        pair = ((ours_rates, ours), (bare_rates, bare))
        for rates, fn in pair if i % 2 == 0 else pair[::-1]:
            steps, dt = fn()
            rates.append(steps / dt)
    ratios = [o / b for o, b in zip(ours_rates, bare_rates, strict=True)]
    steps_per_run = int(len(items) // 16) * epochs
    print(f"training ({len(items)} images {size}x{size}, resnet10, batch 16, {epochs} epoch(s) = "
          f"{steps_per_run} steps per run, {torch.get_num_threads()} threads):")  # fmt: skip
    print(f"  ours (load from cache + train_local): {_spread(ours_rates, 'steps/s', 2)}; "
          f"cache load {_spread([s * 1000 for s in load_s], 'ms')}")  # fmt: skip
    print(f"  alternative, bare MONAI loop (same tensors in memory): "
          f"{_spread(bare_rates, 'steps/s', 2)}")  # fmt: skip
    print(f"  ratio ours/bare per pair: {_spread(ratios, '', 3)} "
          "(target >= 0.90)")  # fmt: skip


def main() -> None:
    """Run the benchmarks and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--pacs-images", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["folder", "colour", "pacs", "training"])  # fmt: skip
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average at start {load[0]:.1f} (1 min), "
          f"{load[1]:.1f} (5 min): other processes share the cores")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        hospital = _generate(tmp / "data", args.images, args.size)
        if "folder" not in args.skip:
            bench_folder(tmp, hospital, args.repeats)
        if "colour" not in args.skip:
            bench_colour_folder(tmp, args.images // 2, args.size, args.repeats)
        if "pacs" not in args.skip:
            bench_pacs(tmp, hospital, args.pacs_images, args.repeats)
        if "training" not in args.skip:
            small = _generate(tmp / "train-data", args.train_images, args.train_size)
            bench_training(tmp, small, args.train_size, args.epochs, max(args.repeats, 5))
    print(f"load average at end {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
