"""The three CLIs on one runner, one env variable per home, and commands that only read create
nothing: a mistyped home is a one-line error with the hint to run init."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.cli import main as aggregator_main
from fedsilo.cli import main as fedsilo_main
from silo_client.cli import main as silo_main

BIN = Path(sys.executable).parent
ENTRY = {"aggregator": aggregator_main, "fedsilo": fedsilo_main, "silo": silo_main}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (folders too), to show nothing changed."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(root.rglob("*"))
    }


def _call(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *argv: str
) -> tuple[int, str, str]:
    """Run an entry point in-process as its console script would; (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", list(argv))
    main: Callable[[], None] = ENTRY[argv[0]]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for var in ("FEDSILO_HOME", "FEDSILO_CONSORTIUM_HOME", "FEDSILO_CONSORTIUM", "FEDSILO_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


READ_ONLY_CONSORTIUM = [
    ("aggregator", "plans", "--home", "TYPO"),
    ("aggregator", "runs", "--home", "TYPO"),
    ("aggregator", "models", "--home", "TYPO"),
    ("aggregator", "members", "--home", "TYPO"),
    ("aggregator", "doctor", "--home", "TYPO"),
    ("aggregator", "run", "abcdef12", "--home", "TYPO"),
    ("fedsilo", "plan", "status", "abcdef12", "--consortium", "TYPO"),
    ("fedsilo", "plan", "results", "abcdef12", "--consortium", "TYPO"),
    ("fedsilo", "aggregator", "plans", "--home", "TYPO"),
]
READ_ONLY_SILO = [
    ("silo", "show", "--home", "TYPO"),
    ("silo", "data", "list", "--home", "TYPO"),
    ("silo", "plan", "list", "--home", "TYPO"),
    ("silo", "policy", "show", "--home", "TYPO"),
    ("silo", "audit", "show", "--home", "TYPO"),
    ("silo", "audit", "verify", "--home", "TYPO"),
    ("silo", "doctor", "--home", "TYPO"),
    ("fedsilo", "silo", "show", "--home", "TYPO"),
]


@pytest.mark.parametrize("argv", READ_ONLY_CONSORTIUM + READ_ONLY_SILO, ids=" ".join)
def test_reading_a_home_that_does_not_exist_creates_nothing(
    argv: tuple[str, ...], workdir: Path, capsys, monkeypatch
) -> None:
    code, _, err = _call(capsys, monkeypatch, *argv)
    assert code == 2, err
    role, init = ("silo", "silo init") if "silo" in argv[:2] else ("consortium", "aggregator init")
    assert err.startswith(f"error: TYPO is not a {role} home") and f"'{init} --home TYPO" in err
    assert not (workdir / "TYPO").exists()
    assert not (workdir / "user").exists()  # nor the default home


def test_reading_an_existing_home_writes_nothing(workdir: Path, capsys, monkeypatch) -> None:
    assert _call(capsys, monkeypatch, "aggregator", "init", "--home", "c", "--name", "net",
                 "--address", "127.0.0.1:9093")[0] == 0  # fmt: skip
    assert _call(capsys, monkeypatch, "silo", "init", "--home", "h", "--name", "hosp")[0] == 0
    before = _tree(workdir)
    for argv in [a[:-1] + (("c",) if a[0] != "silo" and a[1] != "silo" else ("h",))
                 for a in READ_ONLY_CONSORTIUM + READ_ONLY_SILO]:  # fmt: skip
        code, _, err = _call(capsys, monkeypatch, *argv)
        assert code in (0, 1, 2), (argv, err)  # doctor fails its checks; unknown plan is 2
        assert "Traceback" not in err
    for argv in (("silo", "data", "show", "ct", "--home", "h"),
                 ("silo", "data", "check", "ct", "--home", "h"),
                 ("silo", "data", "audit", "ct", "--home", "h")):  # fmt: skip
        code, _, err = _call(capsys, monkeypatch, *argv)
        assert code == 2 and "no dataset named 'ct'" in err and "silo data add ct" in err
    assert _tree(workdir) == before


def test_aggregator_plans_never_reads_the_silos_variable(
    workdir: Path, capsys, monkeypatch
) -> None:
    assert _call(capsys, monkeypatch, "silo", "init", "--home", "h", "--name", "hosp")[0] == 0
    before = _tree(workdir / "h")
    monkeypatch.setenv("FEDSILO_HOME", str(workdir / "h"))
    monkeypatch.setenv("FEDSILO_CONSORTIUM", str(workdir / "h"))  # the old second name: ignored
    default = workdir / "user" / ".fedsilo" / "consortium"
    code, _, err = _call(capsys, monkeypatch, "aggregator", "plans")
    assert code == 2 and f"{default} is not a consortium home" in err
    assert "FEDSILO_CONSORTIUM_HOME" in err
    code, _, err = _call(capsys, monkeypatch, "fedsilo", "plan", "status", "abcdef12")
    assert code == 2 and f"{default} is not a consortium home" in err
    assert _tree(workdir / "h") == before and not (workdir / "user").exists()


def test_the_consortium_variable_names_the_home_everywhere(
    workdir: Path, capsys, monkeypatch
) -> None:
    assert _call(capsys, monkeypatch, "aggregator", "init", "--home", "c", "--name", "net",
                 "--address", "127.0.0.1:9093")[0] == 0  # fmt: skip
    monkeypatch.setenv("FEDSILO_CONSORTIUM_HOME", str(workdir / "c"))
    code, out, err = _call(capsys, monkeypatch, "aggregator", "plans", "--json")
    assert (code, json.loads(out)) == (0, []), err
    code, _, err = _call(capsys, monkeypatch, "fedsilo", "plan", "status", "abcdef12")
    assert code == 2 and err == "error: no submitted plan has a hash starting with abcdef12"
    code, out, _ = _call(capsys, monkeypatch, "aggregator", "members", "--json")
    assert code == 0 and json.loads(out) == {"members": {}, "removed": {}}


def test_silo_init_refuses_a_bad_name_before_any_key(workdir: Path, capsys, monkeypatch) -> None:
    code, _, err = _call(
        capsys, monkeypatch, "silo", "init", "--name", "bad name/../x", "--home", "h"
    )
    assert code == 2 and "invalid silo name 'bad name/../x'" in err and "--name" in err
    assert _tree(workdir) == {}
    # an existing home keeps its name, keys and request when a rename is refused
    assert _call(capsys, monkeypatch, "silo", "init", "--name", "hosp", "--home", "h")[0] == 0
    before = _tree(workdir)
    assert _call(capsys, monkeypatch, "silo", "init", "--name", "a/b", "--home", "h")[0] == 2
    assert _tree(workdir) == before


def _bad_request(path: Path) -> None:
    payload = {
        "hospital": "bad name/../x",
        "secagg_ed25519": base64.b64encode(b"k" * 32).decode(),
        "node_auth_public_key": "ecdsa-sha2-nistp384 AAAA",
        "created": "2026-01-01T00:00:00+00:00",
    }
    path.write_text(
        json.dumps(
            {
                "format": "fedsilo-enrollment-request/1",
                "payload": payload,
                "signature": "",
                "node_auth_signature": "",
            }
        )
    )


def test_enroll_of_a_badly_named_request_is_one_line_from_every_door(
    workdir: Path, capsys, monkeypatch
) -> None:
    assert _call(capsys, monkeypatch, "aggregator", "init", "--home", "c", "--name", "net",
                 "--address", "127.0.0.1:9093")[0] == 0  # fmt: skip
    _bad_request(workdir / "req.json")
    before = _tree(workdir / "c")
    expected = "error: req.json: invalid silo name 'bad name/../x': use [A-Za-z0-9._-], <= 64 chars"
    for door in (("aggregator",), ("fedsilo", "aggregator")):
        code, _, err = _call(capsys, monkeypatch, *door, "enroll", "req.json", "--home", "c")
        assert (code, err) == (2, expected)
    code, _, err = _call(capsys, monkeypatch, "aggregator", "enroll", ".", "--home", "c")
    assert code == 2 and err.startswith("error: . is a folder")
    assert _tree(workdir / "c") == before
    # the installed console scripts, as an operator types them
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    for door in (["aggregator"], ["fedsilo", "aggregator"]):
        done = subprocess.run(
            [str(BIN / door[0]), *door[1:], "enroll", "req.json", "--home", "c"],
            capture_output=True, text=True, cwd=workdir, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2 and " ".join(done.stderr.split()) == expected, done.stderr
    debug = subprocess.run(
        [str(BIN / "aggregator"), "--debug", "enroll", "req.json", "--home", "c"],
        capture_output=True, text=True, cwd=workdir, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "ConsortiumError" in debug.stderr


@pytest.mark.parametrize("argv", [("fedsilo",), ("silo",), ("aggregator",),
                                  ("fedsilo", "silo"), ("fedsilo", "aggregator")])  # fmt: skip
def test_debug_is_a_real_option_in_every_help(argv, workdir: Path, capsys, monkeypatch) -> None:
    code, out, _ = _call(capsys, monkeypatch, *argv, "--help")
    assert code == 0 and "--debug" in out and "FEDSILO_DEBUG" in out


def test_plan_new_writes_a_valid_plan_for_each_task(workdir: Path, capsys, monkeypatch) -> None:
    from training_plan import load_plan

    for task in ("classification", "segmentation"):
        code, _, err = _call(capsys, monkeypatch, "fedsilo", "plan", "new", f"{task}.yaml",
                             "--task", task)  # fmt: skip
        assert code == 0, err
        assert load_plan(workdir / f"{task}.yaml").task == task
    code, _, err = _call(capsys, monkeypatch, "fedsilo", "plan", "new", "d.yaml", "--task", "det")
    assert code == 2 and "'det' is not known" in err and not (workdir / "d.yaml").exists()
