"""Latency of a secure round through real Flower processes: Flower 1.42's defaults vs fedsilo's.

    python bench/round_latency.py [--hospitals 3] [--rounds 2] [--modes MODE,...]

Runs the same tiny-model secure run (resnet10 at a quarter width, 32x32, 16 images per hospital,
one local epoch, secure aggregation on) through a real TLS SuperLink and one SuperNode + silo
runner per hospital on 127.0.0.1, once per mode:

- ``flower``: Flower 1.42's own latencies: ``Grid.send_and_receive``'s 3 s pull interval, the
  SuperNode's 3 s idle poll, the SuperExec's 1 s task poll, a fresh interpreter per message
  (``FlowerCluster(flower_defaults=True)``); the SuperLink keeps its state in memory (Flower's
  default);
- ``fedsilo``: the short pulls (secure_agg.flower.send_and_receive), the SuperNode launched with
  a short poll (silo_client/supernode_launch.py), the runner's 0.1 s task poll and tasks forked
  from its pre-warmed worker (silo_client/task_worker.py); SuperLink state in memory, as in
  ``fedsilo demo``;
- ``fedsilo-sqlite``: the same, with the SuperLink's persistent SQLite state
  (``--database FILE``), as ``aggregator start`` runs the consortium's SuperLink so that it
  survives a restart: the price of persistence, per exchange.

Printed per mode and round: the six exchanges of the secure train phase (hello, advertise, share,
mask, consistency, unmask; server-side wall time of each), the local training time (the slowest
silo's ``answered train.sa_mask in X s`` from its clientapp.log: training + masking), the
**per-exchange overhead** (mean of the five exchanges that do no training) and the **secure round
overhead** (round time minus local training). Targets: <= 0.5 s per exchange, <= 3 s per round
for 3 silos on 2 cores. Timings depend on load: the machine's load average is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("hello", "advertise", "share", "mask", "consistency", "unmask")
PLAN = """\
title: round latency bench
purpose: measure how long a secure round waits on Flower rather than computes
researcher: {{name: Bench Researcher}}
model: {{name: resnet10, args: {{widen_factor: 0.25}}}}
preprocessing: {{input_size: 32}}
training: {{batch_size: 8, local_epochs: 1, seed: 3, validation_fraction: 0.0}}
federation: {{rounds: {rounds}, min_silos: {hospitals}, evaluate_every: 0, final_evaluation: false}}
secure_aggregation: {{max_weight: 40}}
"""


MODES = ("flower", "fedsilo", "fedsilo-sqlite")
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _mask_seconds(home: Path) -> list[tuple[float, float]]:
    """Per round, (local training, whole answer) seconds of the silo's train.sa_mask task, from
    its clientapp.log: training runs from ``received train.sa_mask`` to ``round N: trained``;
    the answer adds masking and the reply-pacing hold (silo_client/reply_pacing.py)."""
    log = home / "logs" / "clientapp.log"
    if not log.exists():
        return []
    text = log.read_text(errors="replace")
    received = [_seconds(m) for m in re.findall(STAMP + r".*received train\.sa_mask$", text, re.M)]
    trained = [_seconds(m) for m in re.findall(STAMP + r".*round \d+: trained ", text, re.M)]
    answered = [float(m) for m in re.findall(r"answered train\.sa_mask in ([0-9.]+) s", text)]
    return [(t - r, a) for r, t, a in zip(received, trained, answered, strict=False)]


def paced_policy(policy, pacing: str):
    """``policy`` with ``reply_pacing_ratio`` from ``--reply-pacing`` (``off`` or a ratio),
    validated by the site policy's own bounds (pydantic ValidationError otherwise)."""
    ratio = None if pacing == "off" else pacing
    return type(policy).model_validate({**policy.model_dump(), "reply_pacing_ratio": ratio})


def run_mode(
    mode: str, work: Path, hospitals: int, rounds: int, pacing: str = "policy"
) -> list[dict]:
    """One secure run in ``mode`` (see :data:`MODES`); one dict of figures per round.

    ``pacing``: ``policy`` leaves the sites' default reply pacing; ``off`` or a ratio sets every
    site's ``reply_pacing_ratio`` (silo_client/reply_pacing.py) for this run."""
    from aggregator.artifacts import read_events
    from aggregator.control import write_flower_app
    from aggregator.pki import make_tls
    from fedsilo.flower_processes import FlowerCluster
    from fedsilo.local_consortium import approve_everywhere, pin_roster
    from fedsilo.synthetic import generate_hospitals
    from silo_client.home import init_silo_home
    from training_plan import parse_plan

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    specs = generate_hospitals(
        work / "hospitals", hospitals=hospitals, images_per_hospital=16, image_size=32, seed=5
    )
    homes = [
        init_silo_home(work / "silos" / s.name, s.name, work / "hospitals" / s.name) for s in specs
    ]
    pin_roster(homes)
    text = PLAN.format(rounds=rounds, hospitals=hospitals)
    plan = parse_plan(text)
    (work / "plan.yaml").write_text(text)
    approve_everywhere(homes, [plan], work)
    if pacing != "policy":
        from silo_client.governance.policy import load_policy, save_policy

        for home in homes:  # after approve_everywhere, which writes the policy
            policy = paced_policy(load_policy(home.root), pacing)
            save_policy(home.root, policy, actor="bench/round_latency.py")
    tls = make_tls(work / "tls", "latency-bench", ["127.0.0.1", "localhost"])
    out = work / "run"
    database = work / "superlink.db" if mode == "fedsilo-sqlite" else None
    with FlowerCluster(work, tls, flower_defaults=mode == "flower", database=database) as cluster:
        cluster.start_superlink()
        for home in homes:
            cluster.start_supernode(home.name, {"home": str(home.root)})
        app_dir = write_flower_app(
            work / "app", {"plan-path": "", "out-dir": "", "run-id": "", "node-wait": 180}
        )
        cluster.submit(
            app_dir,
            {"plan-path": str(work / "plan.yaml"), "out-dir": str(out), "run-id": f"lat-{mode}"},
        )
        deadline = time.monotonic() + 900
        while True:
            events = read_events(out / "events.jsonl")
            failed = [e for e in events if e["event"] in ("run-failed", "round-failed")]
            if failed:
                raise SystemExit(f"{mode}: the run failed: {failed[-1]}")
            if any(e["event"] == "run-finished" for e in events):
                break
            cluster.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: no result within 900 s; logs in {work / 'logs'}")
            time.sleep(0.5)
    training = [_mask_seconds(home.root) for home in homes]
    rows = []
    for event in (e for e in events if e["event"] == "round-finished"):
        index = event["round"] - 1
        stages = {s: float(event["timings"].get(f"train.{s}", float("nan"))) for s in STAGES}
        local = max(t[index][0] for t in training if len(t) > index)
        answer = max(t[index][1] for t in training if len(t) > index)
        others = [stages[s] for s in STAGES if s != "mask"]
        rows.append(
            {
                "mode": mode,
                "round": event["round"],
                "round_seconds": float(event["seconds"]),
                "local_training_seconds": local,
                "pacing_hold_seconds": max(0.0, answer - local),
                "stages": stages,
                "per_exchange_overhead": sum(others) / len(others),
                "round_overhead": float(event["seconds"]) - local,
                "round_overhead_without_hold": float(event["seconds"]) - answer,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both modes and print the side-by-side figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, in order, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--reply-pacing",
        default="policy",
        help="the sites' reply pacing: 'policy' (their default policy, ratio 2), 'off', or a "
        "ratio between 1.1 and 16",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedsilo-round-latency"))
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    load_before = os.getloadavg()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.reply_pacing != "policy":
        from pydantic import ValidationError

        from silo_client.governance.policy import SitePolicy

        try:
            paced_policy(SitePolicy(), args.reply_pacing)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            parser.error(f"--reply-pacing {args.reply_pacing!r}: {reason} (or 'policy', 'off')")
    rows = []
    for mode in modes:
        started = time.monotonic()
        rows += run_mode(mode, args.out / mode, args.hospitals, args.rounds, args.reply_pacing)
        print(f"{mode}: whole run (start-up included) {time.monotonic() - started:.1f} s")
    load_after = os.getloadavg()
    header = f"{'mode':14} {'round':>5} " + " ".join(f"{s[:7]:>7}" for s in STAGES)
    header += f" {'train':>6} {'hold':>5} {'round':>6} {'per-exch':>8} {'overhead':>8}"
    header += f" {'w/o hold':>8}"
    print(header)
    for row in rows:
        print(
            f"{row['mode']:14} {row['round']:>5} "
            + " ".join(f"{row['stages'][s]:7.2f}" for s in STAGES)
            + f" {row['local_training_seconds']:6.2f} {row['pacing_hold_seconds']:5.2f}"
            + f" {row['round_seconds']:6.2f} {row['per_exchange_overhead']:8.2f}"
            + f" {row['round_overhead']:8.2f} {row['round_overhead_without_hold']:8.2f}"
        )
    print(
        "per-exch: mean wall time of the 5 exchanges without training; train: the slowest "
        "silo's local training (model and data load included); hold: how long its masked reply "
        "was then held (masking + reply pacing, silo_client/reply_pacing.py); overhead: round "
        "time minus train; w/o hold: minus train and hold. Targets: per-exch <= 0.5 s, "
        "overhead <= 3 s."
    )
    print(
        f"load average (1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/"
        f"{load_before[2]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}"
        f" on {os.cpu_count()} cores; reply pacing: {args.reply_pacing}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "round_latency.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
