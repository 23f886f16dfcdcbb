"""What the end-to-end tests that run a plan through real Flower processes share: silo homes
governed as a hospital's IT would (pinned roster, a lenient site policy, the plan approved), a
TLS SuperLink with one SuperNode + silo runner per home on 127.0.0.1, the ServerApp submitted,
and bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.artifacts import read_events
from aggregator.control import write_flower_app
from aggregator.pki import make_tls
from fedsilo.flower_processes import FlowerCluster, ManagedProcess
from silo_client.home import SiloHome


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.25 s; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def grey_silos(tmp_path: Path, hospitals: int, images_per_hospital: int = 20) -> list[SiloHome]:
    """Synthetic grey CT hospitals (32x32, seed 5), one silo home each (not yet governed)."""
    from fedsilo.synthetic import generate_hospitals
    from silo_client.home import init_silo_home

    generate_hospitals(
        tmp_path / "data",
        hospitals=hospitals,
        images_per_hospital=images_per_hospital,
        seed=5,
        image_size=32,
    )
    return [
        init_silo_home(tmp_path / "silos" / name, name, tmp_path / "data" / name)
        for name in (f"hospital-{k}" for k in range(hospitals))
    ]


def govern(homes: list[SiloHome], plan_text: str, **policy: Any) -> None:
    """Pin the roster and, at every silo, a lenient policy (``policy`` overrides) and the plan
    approved by IT."""
    from fedsilo.local_consortium import pin_roster
    from silo_client.governance.approvals import approve_plan
    from silo_client.governance.policy import SitePolicy, save_policy
    from training_plan import parse_plan

    pin_roster(homes)
    plan = parse_plan(plan_text)
    fields = {"require_signed_plans": False, "min_local_examples": 0, **policy}
    for home in homes:
        save_policy(home.root, SitePolicy(**fields), actor="test IT")
        approve_plan(home.root, plan, actor="test IT")


@dataclass
class RunningPlan:
    """A submitted run: its cluster, each silo's SuperNode process and the run's output."""

    cluster: FlowerCluster
    out: Path
    nodes: dict[str, ManagedProcess] = field(default_factory=dict)

    @property
    def events_path(self) -> Path:
        return self.out / "events.jsonl"

    def ended(self) -> bool:
        """Whether the ServerApp wrote run-finished or run-failed."""
        return any(
            e["event"] in ("run-finished", "run-failed") for e in read_events(self.events_path)
        )

    def wait_for_end(self, timeout: float) -> list[dict]:
        """The run's events once it ended (fails the test after ``timeout`` seconds)."""
        wait_for(self.ended, timeout, "the end of the run")
        return read_events(self.events_path)


@contextmanager
def running_plan(
    tmp_path: Path, homes: list[SiloHome], plan_text: str, run_id: str, stage_timeout: int = 60
) -> Iterator[RunningPlan]:
    """Start the cluster (stopped on leaving, whatever happened) and submit ``plan_text``."""
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(plan_text)
    tls = make_tls(tmp_path / "tls", f"{run_id}-test", ["127.0.0.1"])
    with FlowerCluster(tmp_path / "cluster", tls) as cluster:
        cluster.start_superlink()
        run = RunningPlan(cluster, tmp_path / "run")
        for home in homes:
            run.nodes[home.name] = cluster.start_supernode(home.name, {"home": str(home.root)})
        app_dir = write_flower_app(
            tmp_path / "app", {"plan-path": "", "out-dir": "", "run-id": "", "stage-timeout": 0}
        )
        cluster.submit(
            app_dir,
            {
                "plan-path": str(plan_path),
                "out-dir": str(run.out),
                "run-id": run_id,
                "stage-timeout": stage_timeout,
            },
        )
        yield run
