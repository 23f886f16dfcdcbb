"""deploy/: compose, Helm chart and systemd units parse and hold together (checked here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.required_tools import tool_missing

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHART = DEPLOY / "helm" / "fedsilo-consortium"


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    silos = [name for name in services if name.startswith("hospital-")]
    assert len(silos) == 3
    assert sum(1 for name in services if name.startswith("orthanc-")) == 3
    for name, service in services.items():
        assert "image" in service, name
        for network in service.get("networks", []):
            assert network in compose["networks"], (name, network)
        for dep in service.get("depends_on", []):
            assert dep in services, (name, dep)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose["volumes"], (name, source)
    for name in silos:
        assert services[name]["command"][:2] == ["silo", "start"]
    superlink = services["superlink"]
    command = superlink["command"]
    assert command[:2] == ["aggregator", "start"]
    # only the Fleet API port is published; the Control API stays on the container's loopback
    assert superlink["ports"] == ["9093:9093"]
    assert command[command.index("--bind") + 1] == "0.0.0.0"
    assert "--port" not in command  # the Fleet port comes from the home's --address


def _render(template: str, values: dict, release: str = "rel") -> str:
    """A small stand-in for `helm template` covering the constructs this chart uses."""

    def lookup(path: str):
        node = values
        for part in path.split("."):
            node = node[part]
        return node

    lines = []
    for line in template.splitlines():
        match = re.match(r"\s*\{\{- if (\.Values\.[\w.]+) \}\}", line)
        if match or re.match(r"\s*\{\{- end \}\}", line):
            continue
        lines.append(line)
    text = "\n".join(lines)

    def expr(m: re.Match) -> str:
        body = m.group(1).strip().lstrip("-").strip()
        if body == ".Release.Name":
            return release
        add = re.fullmatch(r"add \.Values\.([\w.]+) (\d+)", body)
        if add:
            return str(lookup(add.group(1)) + int(add.group(2)))
        to_yaml = re.fullmatch(r"toYaml \.Values\.([\w.]+) \| nindent (\d+)", body)
        if to_yaml:
            dumped = yaml.safe_dump(lookup(to_yaml.group(1)), default_flow_style=False)
            pad = " " * int(to_yaml.group(2))
            return "\n" + "\n".join(pad + x for x in dumped.splitlines())
        value = re.fullmatch(r"\.Values\.([\w.]+)", body)
        assert value, f"unsupported template expression {body!r}"
        return str(lookup(value.group(1)))

    return re.sub(r"\{\{(.*?)\}\}", expr, text)


def _chart_objects() -> list[dict]:
    """The chart rendered: by `helm template` when installed, else by the stand-in above."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    helm = shutil.which("helm")
    if helm:
        out = subprocess.run([helm, "template", "rel", str(CHART)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        return [d for d in yaml.safe_load_all(out) if d]
    # helm is in neither Debian nor PyPI: render with the stand-in
    return [
        yaml.safe_load(_render(p.read_text(), values))
        for p in sorted((CHART / "templates").glob("*.yaml"))
    ]


COMPOSE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose_spec.json"


def _compose_schema_errors(document: dict) -> list[str]:
    """Errors of a compose document against the vendored Compose Specification schema (the
    top-level ``name``, newer than the schema, is checked on its own)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    body = {k: v for k, v in document.items() if k != "name"}
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(body)]
    name = document.get("name")
    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", str(name)):
        errors.append(f"$.name: {name!r} is not a valid compose project name")
    return errors


def test_compose_file_matches_the_compose_specification_schema() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert _compose_schema_errors(compose) == []


def test_compose_schema_check_rejects_a_broken_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    service = next(iter(compose["services"]))
    compose["services"][service]["restart_policy"] = "always"  # not a service key
    compose["services"][service]["ports"] = {"9093": 9093}  # ports is a list
    compose["name"] = "Fedsilo Demo"
    errors = _compose_schema_errors(compose)
    assert any("restart_policy" in e for e in errors), errors
    assert any(".ports" in e for e in errors), errors
    assert any("$.name" in e for e in errors), errors


def test_helm_chart_renders_to_valid_kubernetes_objects() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "fedsilo-consortium"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = _chart_objects()
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "PersistentVolumeClaim", "Service"}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"].startswith("rel-")
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (superlink,) = pod["containers"]
    command = superlink["command"]
    assert command[:2] == ["aggregator", "start"]
    # 'aggregator start' serves the Fleet API on the pod; the Control API (Fleet port + 1) stays
    # on the pod's loopback and is neither a container port nor a Service port
    assert int(command[command.index("--port") + 1]) == values["port"]
    assert [p["containerPort"] for p in superlink["ports"]] == [values["port"]]
    assert [p["port"] for p in kinds["Service"]["spec"]["ports"]] == [values["port"]]
    selector = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert kinds["Service"]["spec"]["selector"] == selector


K8S_MODELS = Path(__file__).resolve().parents[2] / ".ci/node/node_modules/kubernetes-models"


def _validate_k8s(docs: list[dict]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", str(Path(__file__).with_name("k8s_validate.cjs")), str(K8S_MODELS)],
        input=json.dumps(docs), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_chart_objects_match_the_kubernetes_schemas() -> None:
    if not shutil.which("node") or not K8S_MODELS.is_dir():
        tool_missing(
            "node or the kubernetes-models schemas missing (.ci/run: npm ci --prefix .ci/node)"
        )
    docs = _chart_objects()
    done = _validate_k8s(docs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == len(docs) == 3
    # the validator does reject what the API server would
    broken = json.loads(json.dumps(docs))
    deployment = next(d for d in broken if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    done = _validate_k8s(broken)
    assert done.returncode == 1 and "INVALID apps/v1 Deployment" in done.stdout


def test_systemd_units_verify(tmp_path: Path) -> None:
    import sys

    if not shutil.which("systemd-analyze"):
        tool_missing("systemd-analyze not installed (apt-get install systemd; .ci/run does)")

    venv_bin = Path(sys.executable).parent
    for unit in (DEPLOY / "systemd").iterdir():
        text = unit.read_text().replace("/opt/fedsilo/.venv/bin", str(venv_bin))
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *[str(p) for p in sorted(tmp_path.glob("*.service"))]],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    problems = [
        line for line in (done.stdout + done.stderr).splitlines()
        if "fedsilo" in line and "Documentation" not in line
    ]  # fmt: skip
    if done.returncode != 0 and "System has not been booted with systemd" in done.stderr:
        pytest.skip("systemd-analyze cannot run without systemd as PID 1 here")
    assert not problems, "\n".join(problems)
