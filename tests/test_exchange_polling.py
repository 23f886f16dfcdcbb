"""Short polling on both sides of an exchange: the ServerApp's push/pull loop
(secure_agg.flower.send_and_receive) and the SuperNode's capped idle sleep
(silo_client/supernode_launch.py, written for Flower 1.42)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from secure_agg.flower import PULL_INTERVAL_ENV, pull_intervals, send_and_receive
from silo_client import supernode_launch
from tests.harness import InProcessGrid

REPO = Path(__file__).resolve().parents[1]


class SlowGrid(InProcessGrid):
    """Replies become pullable only after a number of pulls; some nodes never answer."""

    def __init__(self, apps, ready_after: dict[int, int], rejected: set[int] = frozenset()):
        super().__init__(apps)
        self.ready_after = ready_after
        self.rejected = rejected
        self.pulls = 0
        self.asked: list[set[str]] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        return [
            None if m.metadata.dst_node_id in self.rejected else i
            for m, i in zip(messages, ids, strict=True)
        ]

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        self.asked.append(wanted)
        ready = [
            i
            for i in wanted
            if i in self._inbox
            and self.pulls > self.ready_after.get(self._inbox[i].metadata.src_node_id, 0)
        ]
        return super().pull_messages(ready)


def _echo(message: Message, context) -> Message:
    return Message(RecordDict({"echo": ConfigRecord({"ok": 1})}), reply_to=message)


def _grid(nodes: list[int], **kwargs) -> SlowGrid:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.query()(_echo)
    return SlowGrid({node: (app, {}) for node in nodes}, **kwargs)


def _messages(grid: SlowGrid, nodes: list[int]) -> list[Message]:
    return [
        Message(RecordDict({"x": ConfigRecord({"n": n})}), dst_node_id=n, message_type="query")
        for n in nodes
    ]


def test_all_replies_arrive_and_only_missing_ones_are_pulled_again() -> None:
    grid = _grid([1, 2, 3], ready_after={1: 0, 2: 3, 3: 6})
    replies = send_and_receive(grid, _messages(grid, [1, 2, 3]), timeout=60, own_loop=True)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert grid.pulls == 7  # stops at the pull that brought the last reply
    assert [len(ids) for ids in grid.asked] == [3, 2, 2, 2, 1, 1, 1]


def test_pulls_stay_close_while_replies_are_due_then_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secure_agg import flower

    clock = {"now": 0.0}
    slept: list[tuple[float, float]] = []  # (when, how long)

    def sleep(seconds: float) -> None:
        slept.append((clock["now"], seconds))
        clock["now"] += seconds

    monkeypatch.setattr(flower.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(flower.time, "sleep", sleep)
    monkeypatch.delenv(PULL_INTERVAL_ENV, raising=False)
    grid = _grid([1], ready_after={1: 60})  # node 1 answers on the 61st pull (a long training)
    replies = send_and_receive(grid, _messages(grid, [1]), timeout=600, own_loop=True)
    assert [r.metadata.src_node_id for r in replies] == [1]
    early = [s for when, s in slept if when < flower.EARLY_PULL_SECONDS]
    late = [s for when, s in slept if when >= flower.EARLY_PULL_SECONDS + 1]
    assert early[0] < 0.05 and max(early) == flower.EARLY_PULL_INTERVAL
    assert late and set(late) == {flower.LONGEST_PULL_INTERVAL}


def test_a_silent_node_ends_at_the_deadline_with_the_replies_that_came() -> None:
    grid = _grid([1, 2], ready_after={2: 10**9})
    started = time.monotonic()
    replies = send_and_receive(grid, _messages(grid, [1, 2]), timeout=0.5, own_loop=True)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert time.monotonic() - started < 30  # returned (bounded), no timing claim


def test_a_message_the_superlink_refused_is_not_waited_for() -> None:
    # Flower 1.42's send_and_receive keeps None among the ids and waits the whole timeout.
    grid = _grid([1, 2], ready_after={}, rejected={2})
    replies = send_and_receive(grid, _messages(grid, [1, 2]), timeout=None, own_loop=True)
    assert [r.metadata.src_node_id for r in replies] == [1]


class UploadingGrid(SlowGrid):
    """Like Flower 1.42's HttpGrid while a silo's upload runs: the first pulls of node 2's reply
    give Flower's own MESSAGE_UNAVAILABLE error (sent from the server's node, not confirmed)."""

    def __init__(self, apps, unavailable_pulls: int):
        super().__init__(apps, ready_after={})
        self.unavailable_pulls = unavailable_pulls

    def pull_messages(self, message_ids):
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        ids = set(message_ids)
        pending = [i for i in ids if i in self._inbox and self._inbox[i].metadata.src_node_id == 2]
        if pending and self.unavailable_pulls > 0:
            self.unavailable_pulls -= 1
            ids -= set(pending)
            error = Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="uploading"),
                            reply_to=self._inbox[pending[0]])  # fmt: skip
            error.metadata.__dict__["_reply_to_message_id"] = pending[0]
            return [*super().pull_messages(ids), error]
        return super().pull_messages(ids)


def test_a_reply_still_uploading_is_pulled_again_not_lost() -> None:
    grid = _grid([1, 2], ready_after={})
    grid = UploadingGrid(grid.apps, unavailable_pulls=3)
    replies = send_and_receive(grid, _messages(grid, [1, 2]), timeout=60, own_loop=True)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert not any(r.has_error() for r in replies)


def test_only_flowers_deployment_grid_gets_the_short_loop() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid

    from secure_agg.flower import pulls_every_three_seconds

    grid = _grid([1], ready_after={})
    assert not pulls_every_three_seconds(grid)  # in process: answered while pushed
    assert pulls_every_three_seconds(HttpGrid.__new__(HttpGrid))


def test_pull_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PULL_INTERVAL_ENV, raising=False)
    first, longest = pull_intervals()
    assert first < longest <= 0.5
    monkeypatch.setenv(PULL_INTERVAL_ENV, "3")
    assert pull_intervals() == (3.0, 3.0)  # Flower 1.42's fixed interval, for the bench
    for bad in ("soon", "0", "nan", "1e9"):
        monkeypatch.setenv(PULL_INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{PULL_INTERVAL_ENV}=.* between 0.001 and 60"):
            pull_intervals()


def test_supernode_waits_are_paced_in_flowers_loop_module_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode import start_client_internal as loop

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(loop, "time", loop.time)  # both restored after the test
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    pacer = supernode_launch.shorten_supernode_poll(0.2)
    assert pacer is not None
    for _ in range(9):
        loop.time.sleep(3)  # Flower 1.42's idle poll: no message for this node
    assert slept[:4] == pytest.approx([0.02, 0.03, 0.045, 0.0675])
    assert slept[-1] == 0.2 and max(slept) == 0.2  # grows 1.5x per empty poll, up to the cap
    slept.clear()
    loop.time.sleep(0.5)  # Flower's wait for a reply in its own in-memory state
    assert slept == [supernode_launch.LOCAL_WAIT]
    assert loop.time.monotonic is time.monotonic
    time.sleep(3)  # everyone else's time.sleep is untouched
    assert slept[-1] == 3


def test_a_message_makes_the_supernode_poll_closely_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode import start_client_internal as loop

    slept: list[float] = []
    answers = iter([None, None, None, 7, None])  # run 7's message arrives on the 4th poll
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "_pull_and_store_message", lambda **kw: next(answers))
    supernode_launch.shorten_supernode_poll(0.2)
    for _ in range(5):
        if loop._pull_and_store_message(state=None) is None:
            loop.time.sleep(3)
    assert slept == pytest.approx([0.02, 0.03, 0.045, 0.02])


def test_flowers_own_waits_with_a_three_second_poll() -> None:
    pacer = supernode_launch.Pacer(3.0)
    assert [pacer.seconds(3), pacer.seconds(0.5), pacer.seconds(3)] == [3.0, 0.5, 3.0]


def test_supernode_patch_is_skipped_on_another_flower(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from flwr.supernode import start_client_internal as loop

    before = loop.time, loop._pull_and_store_message
    assert supernode_launch.shorten_supernode_poll(0.2, version="1.44.0") is None
    assert (loop.time, loop._pull_and_store_message) == before
    assert "written for flwr 1.42.x, found 1.44.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "FEDSILO_SUPERNODE_POLL_INTERVAL",
            "often",
            "is not a number of seconds between 0.01 and 60",
        ),
        ("FEDSILO_OBJECT_PULL_BACKOFF", "flwr", "is neither 'fedsilo' nor 'flower'"),
    ],
)
def test_a_bad_supernode_setting_stops_with_one_line(variable: str, value: str, line: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "silo_client.supernode_launch", "--help"],
        env={variable: value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fedsilo: {variable}={value!r} {line}; unset it for fedsilo's default"
    ]


def test_cluster_runs_fedsilos_polls_unless_asked_for_flowers(tmp_path: Path) -> None:
    from aggregator.pki import TlsFiles
    from fedsilo.flower_processes import FLOWER_DEFAULT_LATENCIES, FlowerCluster

    tls = TlsFiles(*(tmp_path / n for n in ("ca", "cert", "key")))
    fast = FlowerCluster(tmp_path, tls, port=1).env(tmp_path / "home")
    assert all(fast.get(k) == os.environ.get(k) for k in FLOWER_DEFAULT_LATENCIES)
    slow = FlowerCluster(tmp_path, tls, port=1, flower_defaults=True).env(tmp_path / "home")
    assert {k: slow[k] for k in FLOWER_DEFAULT_LATENCIES} == FLOWER_DEFAULT_LATENCIES


def test_superlink_state_in_memory_unless_a_database_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's and benches' SuperLink keeps Flower's in-memory state (its SQLite state made
    every exchange ~0.25 s slower); a cluster given a database (restart tests) persists."""
    import socket

    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from aggregator.pki import TlsFiles
    from fedsilo.flower_processes import FLOWER_IN_MEMORY_STATE, FlowerCluster

    # Flower's own name for it: another name would make flower-superlink open a FILE so named
    assert FLOWER_IN_MEMORY_STATE == FLWR_IN_MEMORY_DB_NAME
    tls = TlsFiles(*(tmp_path / n for n in ("ca", "cert", "key")))
    seen: list[str] = []

    class Running:
        def alive(self) -> bool:
            return True

    def start(self, name: str, args: list[str], home: Path) -> Running:
        seen.append(args[args.index("--database") + 1])
        return Running()

    monkeypatch.setattr(FlowerCluster, "_start", start)
    with socket.socket() as listener:  # stands in for the SuperLink's port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for database in (None, tmp_path / "s.db"):
            FlowerCluster(tmp_path, tls, port=port, database=database).start_superlink(timeout=5)
    assert seen == [FLOWER_IN_MEMORY_STATE, str(tmp_path / "s.db")]


@pytest.fixture
def flower_pull_defaults():
    """Flower's object-pull keyword defaults, restored after the test."""
    from flwr.supercore.inflatable import inflatable_utils as pulls

    functions = (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    yield functions
    for function, defaults in zip(functions, saved, strict=True):
        function.__kwdefaults__.clear()
        function.__kwdefaults__.update(defaults)


def test_object_pulls_retry_after_milliseconds_not_a_second(
    flower_pull_defaults, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.inflatable import inflatable_utils as pulls
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from secure_agg import flower

    monkeypatch.delenv(flower.OBJECT_PULL_ENV, raising=False)
    assert pulls.pull_objects.__kwdefaults__["initial_backoff"] == 1  # Flower 1.42's
    assert flower.shorten_object_pull_backoff()
    for function in flower_pull_defaults:
        assert function.__kwdefaults__["initial_backoff"] == flower.OBJECT_PULL_FIRST_BACKOFF
        assert function.__kwdefaults__["backoff_cap"] == flower.OBJECT_PULL_BACKOFF_CAP
        assert function.__kwdefaults__["max_time"] == 7200  # Flower's overall bound is kept
    # A real pull through Flower's own code: the object is still uploading for 3 tries.
    tries = {"a": 0}

    def pull(object_id: str) -> bytes:
        tries[object_id] += 1
        if tries[object_id] <= 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    waits: list[float] = []
    real_wait = pulls.threading.Event.wait

    def backoff_wait(self, timeout=None):  # the retry's early_stop.wait(sleep_time)
        if timeout is None:  # the thread pool's own waits
            return real_wait(self)
        waits.append(timeout)
        return real_wait(self, 0)

    monkeypatch.setattr(pulls.threading.Event, "wait", backoff_wait)
    assert pulls.pull_objects(["a"], pull) == {"a": b"content"}
    assert tries["a"] == 4
    assert len(waits) == 3 and max(waits) < 0.1  # 0.02, 0.04, 0.08 (+-20% jitter), not 1, 2, 4


def test_object_pull_backoff_left_alone_when_asked_or_on_another_flower(
    flower_pull_defaults, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from secure_agg import flower

    before = [dict(f.__kwdefaults__) for f in flower_pull_defaults]
    monkeypatch.setenv(flower.OBJECT_PULL_ENV, "flower")
    assert not flower.shorten_object_pull_backoff()
    monkeypatch.delenv(flower.OBJECT_PULL_ENV)
    assert not flower.shorten_object_pull_backoff(version="1.44.0")
    monkeypatch.setenv(flower.OBJECT_PULL_ENV, "sometimes")
    with pytest.raises(ValueError, match="neither 'fedsilo' nor 'flower'"):
        flower.shorten_object_pull_backoff()
    assert "written for flwr 1.42.x, found 1.44.0" in caplog.text
    assert [dict(f.__kwdefaults__) for f in flower_pull_defaults] == before


def test_a_bad_object_pull_setting_fails_the_run_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import Context

    from aggregator import server_app
    from aggregator.artifacts import read_events
    from secure_agg.flower import OBJECT_PULL_ENV

    monkeypatch.setenv(OBJECT_PULL_ENV, "sometimes")
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"plan-path": str(tmp_path / "plan.yaml"), "out-dir": str(tmp_path / "run")},
    )
    with pytest.raises(SystemExit):
        server_app.main(None, context)
    (event,) = read_events(tmp_path / "run" / "events.jsonl")
    assert event["event"] == "run-failed"
    assert event["reason"].startswith(f"{OBJECT_PULL_ENV}='sometimes' is neither")
