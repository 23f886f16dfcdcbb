"""The consortium's server dies mid-run (kill -9 of the SuperLink and its ServerApp), comes back
on the same database, the silos reconnect by themselves, and `aggregator resume` finishes the run
from its last checkpoint. Real processes, TLS, secure aggregation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.artifacts import read_events
from aggregator.control import write_flower_app
from aggregator.pki import make_tls
from fedsilo.flower_processes import FlowerCluster
from fedsilo_base.process_tree import superexec_helpers
from tests.e2e.cluster import govern, grey_silos, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLAN = (
    "title: restart\n"
    "model: {name: resnet10}\n"
    "preprocessing: {input_size: 32}\n"
    "training: {batch_size: 8, local_epochs: 1}\n"
    "federation: {rounds: 2, min_silos: 3, evaluate_every: 0, final_evaluation: false}\n"
    "secure_aggregation: {max_weight: 40}\n"
)


def _descendants(pid: int) -> list[int]:
    """Every process whose parent chain leads to pid (the ServerApp under SuperExec)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_superlink_killed_then_run_resumed(tmp_path: Path) -> None:
    homes = grey_silos(tmp_path, 4)
    govern(homes, PLAN)
    homes = homes[:3]  # a roster of four; three take part
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.yaml").write_text(PLAN)
    tls = make_tls(tmp_path / "tls", "restart-test", ["127.0.0.1"])
    # the persistent state the consortium's SuperLink runs with: the restart must find the run
    database = tmp_path / "cluster" / "superlink.db"
    with FlowerCluster(tmp_path / "cluster", tls, database=database) as cluster:
        superlink = cluster.start_superlink()
        supernodes = [cluster.start_supernode(h.name, {"home": str(h.root)}) for h in homes]
        app_dir = write_flower_app(
            run_dir / "app", {"plan-path": "", "out-dir": "", "run-id": "", "stage-timeout": 0}
        )
        cluster.submit(
            app_dir,
            {"plan-path": str(run_dir / "plan.yaml"), "out-dir": str(run_dir), "run-id": "rs"},
        )
        events_path = run_dir / "events.jsonl"
        wait_for(
            lambda: any(e["event"] == "round-finished" for e in read_events(events_path)),
            400,
            "round 1",
        )
        # kill -9: the SuperLink, its SuperExec and the ServerApp under it
        victims = [superlink.popen.pid]
        for helper in superexec_helpers(superlink.popen.pid):
            victims += [helper, *_descendants(helper)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        superlink.popen.wait(timeout=10)
        assert not any(e["event"] == "run-finished" for e in read_events(events_path))

        cluster.start_superlink()  # same port, same database
        resumed = subprocess.run(
            [
                str(Path(sys.executable).parent / "aggregator"),
                "resume",
                str(run_dir),
                "--superlink",
                cluster.address,
                "--root-certificates",
                str(tls.ca_cert),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resumes at round 2" in resumed.stdout
        wait_for(
            lambda: any(
                e["event"] in ("run-finished", "run-failed") for e in read_events(events_path)
            ),
            400,
            "the resumed run",
        )
        assert all(node.alive() for node in supernodes), "the silos' SuperNodes reconnected"
    events = read_events(events_path)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "run-finished", events[-1]
    assert "run-resumed" in kinds
    rounds = [e["round"] for e in events if e["event"] == "round-finished"]
    assert rounds == [1, 2], rounds
    assert (run_dir / "final_model.safetensors").exists()
