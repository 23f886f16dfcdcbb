"""A consortium joined with the CLIs only, then a secure-aggregation run over TLS with node auth.

Real processes on 127.0.0.1: `aggregator start` (flower-superlink, TLS, --enable-supernode-auth,
persistent database) and one `silo start` (supervised flower-supernode) per hospital. Every
process is stopped by PID in teardown (SIGTERM to the supervisors, which stop their children).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]

BIN = Path(sys.executable).parent
PLAN = (
    "title: t\nmodel: {name: resnet10}\npreprocessing: {input_size: 32}\n"
    "federation: {rounds: 1, min_silos: 3}\nsecure_aggregation: {max_weight: 40}\n"
)


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `aggregator ...` or `silo ...` and return the completed process."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200")
    done = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


class Supervisors:
    """Background `aggregator start` / `silo start` processes, stopped by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, key: str, *args: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        handle = (self.logs / f"{key}.out").open("ab")
        popen = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200"),
            start_new_session=True,
        )
        handle.close()
        self.procs[key] = popen
        return popen

    def output(self, key: str) -> str:
        return (self.logs / f"{key}.out").read_text(errors="replace")

    def wait_for(self, key: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output(key):
                return
            if self.procs[key].poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(f"{key} never printed {text!r}:\n{self.output(key)[-3000:]}")

    def stop(self, key: str) -> None:
        popen = self.procs.pop(key, None)
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=5)

    def stop_all(self) -> None:
        # silos first: a SuperNode whose SuperLink is gone retries its goodbye for a while
        for key in reversed(list(self.procs)):
            self.stop(key)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    """Init a consortium, init+enroll+join three silos, start the SuperLink; yields a dict."""
    from fedsilo.flower_processes import free_port
    from fedsilo.synthetic import generate_hospitals

    root = tmp_path_factory.mktemp("consortium")
    generate_hospitals(root / "data", hospitals=3, images_per_hospital=20, image_size=32)
    port, control_port = free_port(), free_port()
    chome = root / "consortium-home"
    # silos reach the fleet-only front on `port`; the Control API is on loopback `control_port`
    cli("aggregator", "init", "--home", str(chome), "--name", "testnet",
        "--address", f"127.0.0.1:{port}", "--control-port", str(control_port))  # fmt: skip
    names = ["hospital-0", "hospital-1", "hospital-2"]
    homes = {}
    for name in names:
        homes[name] = root / "silos" / name
        out = cli("silo", "init", "--home", str(homes[name]), "--name", name,
                  "--dataset", str(root / "data" / name)).stdout  # fmt: skip
        assert "node-authentication key fingerprint" in out
    for name in names:
        out = cli("aggregator", "enroll", str(homes[name] / "enrollment-request.json"),
                  "--home", str(chome)).stdout  # fmt: skip
        assert "both signatures verify" in out
    for name in names:
        bundle = chome / "bundles" / f"{name}.join.json"
        out = cli("silo", "join", str(bundle), "--home", str(homes[name]), "--yes").stdout
        assert "3 member(s) pinned" in out
    sup = Supervisors(root / "supervisor-logs")
    sup.start("superlink", "aggregator", "start", "--home", str(chome))
    sup.wait_for("superlink", "listening on")
    try:
        yield {"root": root, "home": chome, "port": port, "control_port": control_port,
               "homes": homes, "sup": sup}  # fmt: skip
    finally:
        sup.stop_all()


def _approve(home: Path, plan_path: Path) -> None:
    """Approve the plan at a silo when the governance module is present."""
    try:
        from silo_client.governance.approvals import approve_plan
        from silo_client.governance.policy import SitePolicy, save_policy
    except ImportError:
        return
    from training_plan import load_plan

    # hospital IT accepting unsigned plans from this test consortium (signing is tested elsewhere)
    policy = SitePolicy(require_signed_plans=False, min_local_examples=0)
    save_policy(home, policy, actor="test")
    approve_plan(home, load_plan(plan_path), actor="test")


def test_members_and_doctor(consortium) -> None:
    out = cli("aggregator", "members", "--home", str(consortium["home"]), "--json").stdout
    members = json.loads(out)["members"]
    assert sorted(members) == ["hospital-0", "hospital-1", "hospital-2"]
    assert all("node_id" in rec for rec in members.values())  # registered with the SuperLink
    doctor = cli("aggregator", "doctor", "--home", str(consortium["home"]), check=False)
    assert "superlink" in doctor.stdout and "reachable with TLS" in doctor.stdout
    assert "authorised nodes match" in doctor.stdout
    silo_doc = cli("silo", "doctor", "--home", str(consortium["homes"]["hospital-0"]), check=False)
    assert "reachable with TLS" in silo_doc.stdout
    assert "pinned roster of 3 silos" in silo_doc.stdout


def test_init_never_mints_a_new_root(consortium) -> None:
    ca_before = (consortium["home"] / "pki" / "ca.pem").read_bytes()
    again = cli("aggregator", "init", "--home", str(consortium["home"]), "--name", "testnet",
                "--address", "127.0.0.1:1", check=False)  # fmt: skip
    assert again.returncode == 2
    assert "never mints a new root" in again.stderr
    assert "Traceback" not in again.stderr
    assert (consortium["home"] / "pki" / "ca.pem").read_bytes() == ca_before
    assert os.stat(consortium["home"] / "pki" / "ca.key").st_mode & 0o777 == 0o600


def test_secure_aggregation_run_over_tls_with_node_auth(consortium) -> None:
    from aggregator.control import write_flower_app
    from aggregator.pki import TlsFiles
    from fedsilo.flower_processes import FlowerCluster

    root, sup = consortium["root"], consortium["sup"]
    plan_path = root / "plan.yaml"
    plan_path.write_text(PLAN)
    for name, home in consortium["homes"].items():
        _approve(home, plan_path)
        sup.start(name, "silo", "start", "--home", str(home), "--max-restarts", "2")
    pki = consortium["home"] / "pki"
    submitter = FlowerCluster(
        root / "submit", TlsFiles(pki / "ca.pem", pki / "superlink.pem", pki / "superlink.key"),
        port=consortium["control_port"],
    )  # fmt: skip
    (root / "submit").mkdir(exist_ok=True)
    app_dir = write_flower_app(root / "app", {"plan-path": "", "out-dir": "", "run-id": "",
                                               "node-wait": 120})  # fmt: skip
    out_dir = root / "run"
    submitter.submit(app_dir, {"plan-path": str(plan_path), "out-dir": str(out_dir),
                               "run-id": "consortium-e2e"})  # fmt: skip
    events_path = out_dir / "events.jsonl"
    deadline = time.monotonic() + 240
    events: list[dict] = []
    while time.monotonic() < deadline:
        if events_path.exists():
            events = [json.loads(line) for line in events_path.read_text().splitlines() if line]
            if any(e["event"] in ("run-finished", "run-failed") for e in events):
                break
        time.sleep(1)
    kinds = [e["event"] for e in events]
    assert "run-finished" in kinds, f"{kinds}\n{sup.output('superlink')[-1500:]}"
    finished = [e for e in events if e["event"] == "round-finished"]
    assert finished and finished[-1]["participants"] == 3
    for name in consortium["homes"]:
        assert sup.procs[name].poll() is None, sup.output(name)


def test_unenrolled_node_is_refused_at_the_silo(consortium, tmp_path: Path) -> None:
    home = tmp_path / "intruder"
    cli("silo", "init", "--home", str(home), "--name", "intruder")
    # it knows the address and the CA (public), but was never enrolled
    (home / "consortium").mkdir()
    (home / "consortium" / "ca.pem").write_bytes((consortium["home"] / "pki/ca.pem").read_bytes())
    (home / "consortium" / "consortium.json").write_text(json.dumps({
        "consortium": "testnet", "superlink": f"127.0.0.1:{consortium['port']}",
        "ca_fingerprint": "", "members": {}}))  # fmt: skip
    done = cli("silo", "start", "--home", str(home), "--max-restarts", "0", check=False,
               timeout=90)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refused this silo's node key" in done.stderr
    assert "Traceback" not in done.stderr
    superlink_log = (consortium["home"] / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log


def test_wrong_ca_is_refused_with_a_clear_message(consortium, tmp_path: Path) -> None:
    from aggregator.pki import create_ca

    home = consortium["homes"]["hospital-1"]
    stranger, _ = create_ca(tmp_path, "other")
    copy = tmp_path / "silo-copy"
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    (copy / "consortium" / "ca.pem").write_bytes(stranger.read_bytes())
    done = cli("silo", "start", "--home", str(copy), "--max-restarts", "0", check=False)
    assert done.returncode == 2
    assert "not signed by the consortium CA" in done.stderr
    doctor = cli("silo", "doctor", "--home", str(copy), check=False)
    assert doctor.returncode == 1 and "FAIL superlink" in doctor.stdout


def test_removed_node_is_refused(consortium) -> None:
    chome, sup = consortium["home"], consortium["sup"]
    sup.stop("hospital-2")
    out = cli("aggregator", "remove", "hospital-2", "--home", str(chome)).stdout
    assert "unregistered 1 node(s)" in out
    members = json.loads(cli("aggregator", "members", "--home", str(chome), "--json").stdout)
    assert "hospital-2" not in members["members"] and "hospital-2" in members["removed"]
    roster = json.loads((chome / "bundles" / "hospital-0.join.json").read_text())["roster"]
    assert sorted(roster["silos"]) == ["hospital-0", "hospital-1"]
    done = cli("silo", "start", "--home", str(consortium["homes"]["hospital-2"]),
               "--max-restarts", "0", check=False, timeout=90)  # fmt: skip
    assert done.returncode == 2
    assert "refused this silo's node key" in done.stderr
    # a member sees the roster change as a diff and must confirm it
    home0 = consortium["homes"]["hospital-0"]
    bundle0 = chome / "bundles" / "hospital-0.join.json"
    refused = cli("silo", "join", str(bundle0), "--home", str(home0), check=False)
    assert refused.returncode == 2
    assert "- hospital-2" in refused.stdout and "--yes" in refused.stderr
    pinned = json.loads((home0 / "identity" / "roster.json").read_text())
    assert "hospital-2" in pinned["silos"]  # not installed without confirmation
    cli("silo", "join", str(bundle0), "--home", str(home0), "--yes")
    pinned = json.loads((home0 / "identity" / "roster.json").read_text())
    assert "hospital-2" not in pinned["silos"]
