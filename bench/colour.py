"""Does the synthetic colour task need colour? The same network trained on the same colour
photographs seen as RGB (`preprocessing.channels: 3`) and as luma (`to_grayscale: true`), tested
on a held-out hospital of another camera and storage.

    .venv/bin/python bench/colour.py [--images 60] [--size 32] [--epochs 4] [--seeds 2]

Prints the held-out AUC and accuracy of each view per seed; asserts nothing. The generator puts
the label in a blue-grey veil of about the lesion's brightness, so RGB should beat luma clearly.
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

from fedsilo.local_consortium import score_model
from fedsilo.synthetic import generate_colour_hospitals
from silo_client.data.dataset_builder import build_dataset
from silo_client.data.preprocessing import Preprocessing
from silo_client.training import train_local
from training_plan import parse_plan
from training_plan.models import build_plan_model


def main() -> None:
    """Generate 4 colour hospitals, train on 3, test on the 4th, RGB against luma."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="per hospital (nominal)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f} (1 min)")
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-colour-") as tmp_name:
        root = Path(tmp_name)
        generate_colour_hospitals(root, hospitals=4, images_per_hospital=args.images, seed=11,
                                  image_size=max(args.size, 32))  # fmt: skip
        views = {
            "RGB (channels: 3)": Preprocessing(input_size=args.size, channels=3),
            "luma (to_grayscale: true)": Preprocessing(input_size=args.size, to_grayscale=True),
        }
        for view, prep in views.items():
            train = [build_dataset(root / f"hospital-{k}", prep) for k in range(3)]
            test = build_dataset(root / "hospital-3", prep)
            images = torch.cat([d.images for d in train])
            labels = torch.cat([d.labels for d in train])
            plan = parse_plan(
                "title: colour bench\nmodel: {name: resnet10}\n"
                f"preprocessing: {{input_size: {args.size}, channels: {prep.channels}}}\n"
                f"training: {{local_epochs: {args.epochs}, batch_size: 16}}\n"
            )
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = build_plan_model(plan.model, plan.preprocessing.channels)
                t = time.perf_counter()
                train_local(model, images, labels, plan.training, seed)
                score = score_model(model, test.images, test.labels)
                print(f"{view}: seed {seed}: held-out AUC {score.auc:.3f}, accuracy "
                      f"{score.accuracy:.3f} ({len(labels)} train / {len(test.labels)} test "
                      f"images, {time.perf_counter() - t:.0f} s)")  # fmt: skip
    print(f"load average at end {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
