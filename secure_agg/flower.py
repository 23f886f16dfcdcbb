"""Flower adapter of :mod:`secure_agg` (the only module of the package that imports flwr).

Server side: :class:`SecureAggregation`, the ``AggregationStep`` that the round loop
(``aggregator.federated_run``) calls between a strategy's ``configure_train`` and
``aggregate_train`` (and the same for evaluation). Silo side: ``silo_client.secure_round``,
which uses the record helpers below.

Exchanges (one :func:`send_and_receive` each: ``Grid.push_messages`` and a short pull loop;
message type ``<phase>.sa_<stage>`` with phase ``train`` or ``evaluate``)::

    sa_hello        server -> silo: global ArrayRecord + the strategy's ConfigRecord (plan, plan
                    hash, run id, round) + header; silo -> server: its silo NAME, its identity
                    public key, the context hash it computed, signed. The silo stores the model
                    (0600) so that the mask stage trains from exactly the model it hashed.
    sa_advertise    the protocol's ADVERTISE (participants = the names that said hello) ...
    sa_share, sa_mask, sa_consistency, sa_unmask    ... the protocol's stages.

Why a hello stage: the protocol's ADVERTISE request already names the participant set U0 (it is
bound into every silo's signed setup digest), and the server has no roster of its own, so it
first learns which silo NAME answers on which Flower node. The name is only a routing hint for
the server; every silo verifies every peer's name and keys against its OWN pinned roster.

Protocol fields travel in a ConfigRecord under :data:`SECAGG` (str, int, bytes and lists of
them); numpy vectors (the masked upload) in an ArrayRecord under :data:`SECAGG_ARRAYS`.

Failure policy (chosen): when fewer than ``t`` silos remain at any stage, or the round config is
unusable (e.g. fewer than 3 silos answered), :meth:`SecureAggregation.train` returns ``[]`` and
records why in ``report.refused`` (per node) and ``report.notes``; ``FederatedRun`` then raises
``RoundFailed`` and the global model is not advanced. No partial or plain result is ever
returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from training_plan import wire

from .errors import ConfigurationError, MalformedMessage, ProtocolAbort, SecureAggError
from .keys import PROTOCOL, Roster, check_name, transcript
from .messages import STAGES, new_message
from .round_config import RoundConfig
from .server import AggregateBounds, AggregateResult, ServerCoordinator

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from training_plan import TrainingPlan

log = logging.getLogger("fedsilo.aggregator")


def content_bytes(content: RecordDict) -> int:
    """Bytes of array data in a reply (what dominates the wire)."""
    return sum(record.count_bytes() for record in content.array_records.values())


SECAGG = "secagg"
"""ConfigRecord key of the protocol fields."""
SECAGG_ARRAYS = "secagg-arrays"
"""ArrayRecord key of the protocol's numpy fields (the masked vector)."""
HELLO = "hello"
ADAPTER_STAGES = (HELLO, *STAGES)
PHASES = ("train", "evaluate")
TRAIN_COUNTERS = ("examples", "loss_sum")
EVAL_COUNTERS = ("examples", "loss_sum", "true_pos", "false_pos", "true_neg", "false_neg")
_CONTEXT_LABEL = "fedsilo-context/1"


def message_type(phase: str, stage: str) -> str:
    """Flower message type of a stage, e.g. ``train.sa_advertise``."""
    if phase not in PHASES or stage not in ADAPTER_STAGES:
        raise ValueError(f"no secure-aggregation message type for {phase!r}/{stage!r}")
    return f"{phase}.sa_{stage}"


def counter_names(phase: str, plan: TrainingPlan | None = None) -> tuple[str, ...]:
    """Counters summed inside the masked vector in ``phase``: for evaluation, those the plan's
    task and metrics need (training_plan.metrics; without a plan, the classification basics)."""
    if phase == "train":
        return TRAIN_COUNTERS
    if plan is None:
        return EVAL_COUNTERS
    from training_plan.metrics import counter_names as plan_counters

    return plan_counters(plan)


_PER_EXAMPLE_PREFIXES = ("auc_pos_", "auc_neg_", "ece_n_", "ece_pos_")
_PER_EXAMPLE = ("true_pos", "false_pos", "true_neg", "false_neg", "dice_case_sum", "hd95_cases")


def aggregate_bounds(counters: Sequence[str], w_max: float) -> AggregateBounds:
    """What the server checks on the counter sums of a round (docs/secure_agg.md, "Bounded
    contributions"): every counter >= 0; ``examples`` <= w_max per silo and equal to the
    weight (silos cap both together, ``secure_agg.cap_weight``); per-example counts (confusion
    cells, histogram bins, defined cases) <= examples; an ECE bin's positives and score sum
    <= its count."""
    names = set(counters)
    at_most: dict[str, str] = {}
    for name in counters:
        if name in _PER_EXAMPLE or name.startswith(_PER_EXAMPLE_PREFIXES):
            at_most[name] = "examples"
        if name.startswith(("ece_pos_", "ece_conf_")):
            count = "ece_n_" + name.rsplit("_", 1)[1]
            if count in names:
                at_most[name] = count
    has_examples = "examples" in names
    return AggregateBounds(
        nonnegative=tuple(counters),
        per_silo_max={"examples": w_max} if has_examples else {},
        at_most=at_most if has_examples else {},
        weight_counter="examples" if has_examples else None,
    )


def codec_settings(plan: TrainingPlan) -> dict[str, Any]:
    """The codec parameters a plan fixes (the server uses them; silos check them)."""
    spec = plan.secure_aggregation
    return {
        "clip": float(spec.clip),
        "frac_bits": int(spec.fractional_bits),
        "bits": int(spec.field_bits),
        "w_max": float(spec.max_weight),
    }


# ------------------------------------------------------------------------ one exchange
PULL_INTERVAL_ENV = "FEDSILO_GRID_PULL_INTERVAL"
"""Environment variable: a fixed pull interval in seconds (``3`` reproduces Flower 1.42's
``Grid.send_and_receive``); unset, pulls back off from 0.02 s to 0.1 s for the first 3 s after
the push, then to 0.25 s, while nothing arrives."""
FIRST_PULL_INTERVAL = 0.02
LONGEST_PULL_INTERVAL = 0.25
EARLY_PULL_INTERVAL = 0.1
EARLY_PULL_SECONDS = 3.0
"""For this long after the push (when the replies of a stage without training arrive) pulls are
at most :data:`EARLY_PULL_INTERVAL` apart; later ones back off to :data:`LONGEST_PULL_INTERVAL`."""


def pull_intervals() -> tuple[float, float]:
    """(first, longest) seconds between pulls: :data:`PULL_INTERVAL_ENV` fixes both."""
    raw = os.environ.get(PULL_INTERVAL_ENV, "").strip()
    if not raw:
        return FIRST_PULL_INTERVAL, LONGEST_PULL_INTERVAL
    try:
        fixed = float(raw)
    except ValueError:
        fixed = float("nan")
    if not 0.001 <= fixed <= 60.0:  # also refuses nan
        raise ValueError(
            f"{PULL_INTERVAL_ENV}={raw!r} is not a number of seconds between 0.001 and 60; "
            "unset it for fedsilo's default"
        )
    return fixed, fixed


# ------------------------------------------------------------------------ object pulls
OBJECT_PULL_ENV = "FEDSILO_OBJECT_PULL_BACKOFF"
"""Environment variable: ``flower`` keeps Flower 1.42's object-pull backoff (1 s, doubling to
10 s) in this process; unset or ``fedsilo``, :func:`shorten_object_pull_backoff` applies
fedsilo's; anything else is refused (:func:`object_pull_mode`)."""
OBJECT_PULL_WRITTEN_FOR = "1.42."
"""Flower release series whose ``flwr.supercore.inflatable.inflatable_utils`` was read."""
OBJECT_PULL_FIRST_BACKOFF = 0.02
OBJECT_PULL_BACKOFF_CAP = 0.5
OBJECT_PULL_MAX_TRIES = 10_000
"""With the 0.5 s cap, about 83 minutes of retries per object: the same order as Flower's own
500 tries at up to 10 s; Flower's 2-hour ``max_time`` bound still applies on top."""


def object_pull_mode() -> str:
    """``fedsilo`` or ``flower``, from :data:`OBJECT_PULL_ENV` (ValueError, one line, otherwise)."""
    raw = os.environ.get(OBJECT_PULL_ENV, "").strip()
    mode = raw.lower() or "fedsilo"
    if mode not in ("fedsilo", "flower"):
        raise ValueError(
            f"{OBJECT_PULL_ENV}={raw!r} is neither 'fedsilo' nor 'flower'; unset it for "
            "fedsilo's default"
        )
    return mode


def shorten_object_pull_backoff(version: str | None = None) -> bool:
    """Retry a not-yet-uploaded Flower object after 0.02 s (doubling to 0.5 s), not after 1 s.

    Flower 1.42 moves every message as a message plus its objects (arrays, records). Whoever
    pulls a message (the SuperNode from the SuperLink, the ClientApp task from the SuperNode, the
    ServerApp's grid from the SuperLink) usually gets it while its sender is still uploading the
    objects; ``pull_objects`` then waits ``initial_backoff = 1`` s (doubling, cap 10 s) before
    asking again. Traced on a 3-silo secure round, that cost about a second in most of the six
    exchanges. This changes only the keyword defaults of the two pull functions in this
    process (``pull_objects`` and ``pull_and_inflate_object_from_tree``, which every caller in
    Flower uses without passing its own); the total retry time stays bounded
    (:data:`OBJECT_PULL_MAX_TRIES`, Flower's ``max_time``). Returns False, changing nothing, on
    a Flower other than :data:`OBJECT_PULL_WRITTEN_FOR` or when :data:`OBJECT_PULL_ENV` is
    ``flower``.
    """
    if object_pull_mode() == "flower":
        return False
    from flwr.supercore.inflatable import inflatable_utils as pulls
    from flwr.supercore.version import package_version

    version = version or package_version
    functions = (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree)
    expected = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not version.startswith(OBJECT_PULL_WRITTEN_FOR) or not all(
        expected <= set(f.__kwdefaults__ or {}) for f in functions
    ):
        log.warning(
            "object pulls left at Flower's 1 s backoff: written for flwr %sx, found %s",
            OBJECT_PULL_WRITTEN_FOR,
            version,
        )
        return False
    for function in functions:
        function.__kwdefaults__.update(
            initial_backoff=OBJECT_PULL_FIRST_BACKOFF,
            backoff_cap=OBJECT_PULL_BACKOFF_CAP,
            max_tries_per_object=OBJECT_PULL_MAX_TRIES,
        )
    return True


UNAVAILABLE_RETRIES = 20
"""How often a reply whose objects were not yet uploaded is pulled again before it counts."""


def _not_uploaded_yet(message: Message) -> bool:
    from flwr.common.constant import ErrorCode

    return message.has_error() and message.error.code == ErrorCode.MESSAGE_UNAVAILABLE


def pulls_every_three_seconds(grid: Grid) -> bool:
    """Whether ``grid`` is Flower 1.42's deployment Grid (``HttpGrid``), whose
    ``send_and_receive`` sleeps a hard-coded 3 s between pulls. Other grids keep their own:
    the simulation's ``InMemoryGrid`` has a configurable ``pull_interval``, and an in-process
    test grid answers while pushing."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return isinstance(grid, HttpGrid)


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None, own_loop: bool | None = None
) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` (None: no limit).

    Flower 1.42's ``Grid.send_and_receive`` sleeps a fixed 3 s between pulls, which made every
    exchange of a secure round (six per phase) cost seconds of pure waiting. This uses the public
    ``push_messages``/``pull_messages`` with a short interval that backs off while nothing
    arrives (a long local training is not polled 50 times a second) and snaps back after each
    reply. A message the SuperLink did not accept (``None`` id) is not waited for. ``own_loop``
    (default: :func:`pulls_every_three_seconds`) chooses this loop over the grid's own method.
    """
    if not (pulls_every_three_seconds(grid) if own_loop is None else own_loop):
        return list(grid.send_and_receive(messages, timeout=timeout))
    first, longest = pull_intervals()
    early = min(longest, max(first, EARLY_PULL_INTERVAL))  # a fixed interval stays fixed
    waiting = {i for i in grid.push_messages(messages) if i is not None}
    pushed = time.monotonic()
    deadline = None if timeout is None else pushed + timeout
    replies: list[Message] = []
    interval = first
    unavailable: dict[str, int] = {}
    while waiting:
        got = []
        for message in grid.pull_messages(waiting):
            asked = message.metadata.reply_to_message_id
            if _not_uploaded_yet(message) and unavailable.get(asked, 0) < UNAVAILABLE_RETRIES:
                # Flower's HttpGrid answers a reply whose objects it could not pull (the silo's
                # upload still running) with an error of its own, without confirming it: the
                # reply stays on the SuperLink, so pull it again instead of losing the silo.
                unavailable[asked] = unavailable.get(asked, 0) + 1
                continue
            got.append(message)
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting:
            break
        cap = early if time.monotonic() - pushed < EARLY_PULL_SECONDS else longest
        interval = first if got else min(cap, interval * 1.5)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            interval = min(interval, left)
        time.sleep(interval)
    return replies


# ------------------------------------------------------------------------ records <-> dicts
def to_records(msg: Mapping[str, Any]) -> dict[str, ConfigRecord | ArrayRecord]:
    """A protocol message as records: scalar/list fields -> ConfigRecord, arrays -> ArrayRecord."""
    plain: dict[str, Any] = {}
    arrays: dict[str, Array] = {}
    for key, value in msg.items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        elif isinstance(value, bytearray):
            plain[key] = bytes(value)
        else:
            plain[key] = list(value) if isinstance(value, tuple) else value
    out: dict[str, ConfigRecord | ArrayRecord] = {SECAGG: ConfigRecord(plain)}
    if arrays:
        out[SECAGG_ARRAYS] = ArrayRecord(arrays)
    return out


def from_content(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`to_records`; MalformedMessage if the records are missing or odd."""
    try:
        record = content[SECAGG]
        if not isinstance(record, ConfigRecord):
            raise MalformedMessage(f"'{SECAGG}' is not a ConfigRecord")
        msg: dict[str, Any] = {
            k: (list(v) if isinstance(v, list) else v) for k, v in record.items()
        }
        if SECAGG_ARRAYS in content:
            arrays = content[SECAGG_ARRAYS]
            if not isinstance(arrays, ArrayRecord):
                raise MalformedMessage(f"'{SECAGG_ARRAYS}' is not an ArrayRecord")
            for key in list(arrays):
                if key in msg:
                    raise MalformedMessage(f"field {key!r} is both a config and an array field")
                msg[key] = arrays[key].numpy()
        return msg
    except MalformedMessage:
        raise
    except Exception as exc:  # whatever a peer sent, it is a malformed message
        name = type(exc).__name__
        raise MalformedMessage(f"unreadable secure-aggregation records ({name})") from None


# ------------------------------------------------------------------------ context hash
def context_hash(
    keys: Sequence[str],
    arrays: Sequence[np.ndarray],
    *,
    phase: str,
    plan_hash: str,
    run_id: str,
    round_: int,
) -> bytes:
    """SHA-256 over the global model (names, dtypes, shapes, bytes) and the round binding.

    Each silo computes it over what it received in the hello stage; equal hashes (checked by
    every silo in SHARE and signed in CONSISTENCY) mean every silo got the same model and plan.
    """
    h = hashlib.sha256(transcript(_CONTEXT_LABEL, run_id, round_, phase, plan_hash, len(keys)))
    for key, array in zip(keys, arrays, strict=True):
        a = np.ascontiguousarray(array)
        h.update(transcript("array", run_id, round_, key, a.dtype.str, list(a.shape), a.nbytes))
        h.update(memoryview(a).cast("B"))
    return h.digest()


def hello_transcript(
    run_id: str, round_: int, phase: str, name: str, identity: bytes, ctx: bytes
) -> bytes:
    """What a silo signs in its hello reply."""
    return transcript("hello", run_id, round_, phase, name, identity, ctx)


def hello_request(run_id: str, round_: int, phase: str) -> dict[str, Any]:
    """The header of a hello request (the model and plan travel next to it)."""
    return new_message(run_id, round_, HELLO, phase=phase)


def check_header(msg: Mapping[str, Any], stage: str) -> tuple[str, int]:
    """Common header checks of any adapter message; returns (run_id, round)."""
    if msg.get("protocol") != PROTOCOL:
        raise MalformedMessage(f"not a {PROTOCOL} message")
    run_id, round_ = msg.get("run_id"), msg.get("round")
    if not isinstance(run_id, str) or not run_id:
        raise MalformedMessage("run_id must be a non-empty string")
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise MalformedMessage("round must be a non-negative int")
    if msg.get("stage") != stage:
        raise MalformedMessage(f"{msg.get('stage')!r} message received as {stage!r}")
    return run_id, round_


# ------------------------------------------------------------------------ server step
class _AbortedError(Exception):
    """Internal: the round cannot go on; ``reason`` is recorded and [] returned."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class SecureAggregation:
    """AggregationStep that runs the secure-aggregation protocol over Flower messages.

    The strategy receives ONE reply (built on a real reply of the last stage) whose arrays are
    ``global + sum(w_i d_i) / sum(w_i)`` and whose ``num-examples`` is the summed example count:
    any strategy that only needs the weighted mean (FedAvg) works unchanged. Evaluation sums
    counters (examples, loss sum, confusion counts) the same way and returns one MetricRecord.
    """

    name = "secure"

    def __init__(
        self,
        *,
        clip: float = 8.0,
        frac_bits: int = 22,
        bits: int = 32,
        threshold: int | None = None,
        w_max: float = 100_000.0,
        clip_warn_fraction: float = 0.01,
        timeout: float | None = 3600.0,
        key_timeout: float | None = 600.0,
        roster: Roster | None = None,
        weight_proof: bool = False,
    ) -> None:
        self.clip = float(clip)
        self.frac_bits = int(frac_bits)
        self.bits = int(bits)
        self.threshold = threshold
        self.w_max = float(w_max)
        self.clip_warn_fraction = float(clip_warn_fraction)
        self.timeout = timeout
        self.key_timeout = key_timeout
        self.roster = roster
        # each silo proves in zero knowledge that its weight is within [0, w_max]
        # (secure_agg.range_proof; about a second per silo and per phase on a dev box)
        self.weight_proof = bool(weight_proof)

    @classmethod
    def from_plan(cls, plan: TrainingPlan, **kwargs: Any) -> SecureAggregation:
        """The step with the plan's secure_aggregation settings (``kwargs`` override)."""
        settings: dict[str, Any] = {
            **codec_settings(plan),
            "threshold": plan.secure_aggregation.threshold,
        }
        settings.update(kwargs)
        return cls(**settings)

    # ---------------------------------------------------------------- AggregationStep
    def train(
        self, grid: Grid, server_round: int, messages: list[Message], report: Any
    ) -> list[Message]:
        """Securely aggregate the silos' updates; return one reply with the mean model."""
        return self._run(grid, server_round, messages, report, "train")

    def evaluate(
        self, grid: Grid, server_round: int, messages: list[Message], report: Any
    ) -> list[Message]:
        """Securely sum the silos' evaluation counts; return one reply with the metrics."""
        return self._run(grid, server_round, messages, report, "evaluate")

    # ---------------------------------------------------------------- internals
    def _run(
        self,
        grid: Grid,
        server_round: int,
        messages: list[Message],
        report: Any,
        phase: str,
    ) -> list[Message]:
        if not messages:
            return []
        exchange = _Exchange(self, grid, server_round, report, phase)
        try:
            return exchange.run(messages)
        except _AbortedError as exc:
            note = f"secure {phase} round {server_round} aborted at {exc.stage}: {exc.reason}"
            log.warning(note)
            report.notes.append(note)
            for node in exchange.active_nodes():
                report.refused.setdefault(node, f"round aborted at {exc.stage}: {exc.reason}")
            report.replied.clear()
            return []


class _Exchange:
    """One phase (train or evaluate) of one round: the stage-by-stage message exchange."""

    def __init__(
        self, step: SecureAggregation, grid: Grid, server_round: int, report: Any, phase: str
    ) -> None:
        self.step = step
        self.grid = grid
        self.round = server_round
        self.report = report
        self.phase = phase
        self.node_of: dict[str, int] = {}
        self.name_of: dict[int, str] = {}
        self.nodes: list[int] = []
        self.active: set[str] = set()

    def active_nodes(self) -> list[int]:
        if self.active:
            return [self.node_of[n] for n in sorted(self.active)]
        return [n for n in self.nodes if n not in self.report.refused]

    def _refuse(self, node: int, reason: str) -> None:
        self.report.refused[node] = reason
        name = self.name_of.get(node)
        if name is not None:
            self.active.discard(name)
        log.warning("silo node %s out of the secure round: %s", node, reason)

    def _send(
        self, stage: str, contents: Mapping[int, RecordDict], timeout: float | None
    ) -> dict[int, tuple[Message, dict[str, Any]]]:
        """Send one stage; error replies and silence count as dropouts (recorded)."""
        mtype = message_type(self.phase, stage)
        out = [
            Message(content=c, message_type=mtype, dst_node_id=node, group_id=str(self.round))
            for node, c in contents.items()
        ]
        got: dict[int, tuple[Message, dict[str, Any]]] = {}
        started = time.monotonic()
        answers = send_and_receive(self.grid, out, timeout=timeout)
        seconds = getattr(self.report, "stage_seconds", None)
        if seconds is not None:  # per-stage wall time, for the round's timings (no values)
            seconds[f"{self.phase}.{stage}"] = time.monotonic() - started
        for reply in answers:
            node = reply.metadata.src_node_id
            if node not in contents or node in got:
                continue
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                self._refuse(node, f"{stage}: {reason}")
                continue
            self.report.bytes_received += content_bytes(reply.content)
            try:
                got[node] = (reply, from_content(reply.content))
            except ProtocolAbort as exc:
                self._refuse(node, f"{stage}: {exc.reason}")
        for node in contents:
            if node not in got and node not in self.report.refused:
                self._refuse(node, f"{stage}: no reply (dropped out)")
        return got

    def _send_protocol(
        self, stage: str, requests: Mapping[str, dict[str, Any]], timeout: float | None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Message]]:
        contents = {
            self.node_of[name]: RecordDict(to_records(req)) for name, req in requests.items()
        }
        got = self._send(stage, contents, timeout)
        replies = {self.name_of[node]: msg for node, (_, msg) in got.items()}
        messages = {self.name_of[node]: reply for node, (reply, _) in got.items()}
        return replies, messages

    def _hello(self, messages: list[Message], run_id: str) -> None:
        header = ConfigRecord(hello_request(run_id, self.round, self.phase))
        contents = {}
        for m in messages:
            node = m.metadata.dst_node_id
            self.nodes.append(node)
            contents[node] = RecordDict(
                {
                    wire.ARRAYS: m.content[wire.ARRAYS],
                    wire.CONFIG: m.content[wire.CONFIG],
                    SECAGG: header,
                }
            )
        got = self._send(HELLO, contents, self.step.timeout)
        claims: dict[str, list[int]] = {}
        for node, (_, msg) in got.items():
            try:
                check_header(msg, HELLO)
                if msg["run_id"] != run_id or msg["round"] != self.round:
                    raise MalformedMessage("hello reply of another run or round")
                name = check_name(msg.get("silo"))
                identity, ctx, sig = (
                    msg.get("identity"),
                    msg.get("context_hash"),
                    msg.get("signature"),
                )
                if not all(isinstance(x, bytes) for x in (identity, ctx, sig)):
                    raise MalformedMessage("hello reply misses identity, context_hash or signature")
                if self.step.roster is not None:
                    if self.step.roster.get(name) != identity:
                        raise ProtocolAbort(f"identity key of {name!r} is not the roster's")
                    self.step.roster.verify(
                        name,
                        hello_transcript(run_id, self.round, self.phase, name, identity, ctx),
                        sig,
                    )
            except (SecureAggError, KeyError, TypeError) as exc:
                reason = exc.reason if isinstance(exc, ProtocolAbort) else str(exc)
                self._refuse(node, f"{HELLO}: {reason}")
                continue
            claims.setdefault(name, []).append(node)
        for name, nodes in sorted(claims.items()):
            if len(nodes) > 1:
                for node in nodes:
                    self._refuse(node, f"{HELLO}: silo name {name!r} claimed by several nodes")
                continue
            self.node_of[name] = nodes[0]
            self.name_of[nodes[0]] = name
            self.active.add(name)

    def _reject(self, coordinator: ServerCoordinator, answered: Iterable[str]) -> None:
        for name in answered:
            if name in coordinator.rejected and name in self.active:
                self._refuse(self.node_of[name], coordinator.rejected[name])

    def run(self, messages: list[Message]) -> list[Message]:
        first = messages[0]
        global_record = first.content[wire.ARRAYS]
        run_id = str(first.content[wire.CONFIG][wire.RUN_ID])
        keys = list(global_record.keys())
        arrays = [np.asarray(a) for a in global_record.to_numpy_ndarrays()]
        length = int(sum(a.size for a in arrays)) if self.phase == "train" else 0
        split = str(first.content[wire.CONFIG].get(wire.SPLIT, "validation"))

        self._hello(messages, run_id)
        plan = self._plan(first) if self.phase == "evaluate" else None
        step = self.step
        try:
            cfg = RoundConfig(
                run_id=run_id,
                round=self.round,
                participants=tuple(sorted(self.active)),
                vector_length=length,
                threshold=step.threshold,
                clip=step.clip,
                frac_bits=step.frac_bits,
                bits=step.bits,
                w_max=step.w_max,
                counter_names=counter_names(self.phase, plan),
                clip_warn_fraction=step.clip_warn_fraction,
                weight_proof=step.weight_proof,
            )
        except SecureAggError as exc:
            raise _AbortedError(HELLO, f"{len(self.active)} silo(s) answered: {exc}") from None
        coordinator = ServerCoordinator(
            cfg, step.roster, aggregate_bounds(cfg.counter_names, step.w_max)
        )
        stage = "advertise"
        try:
            reqs = coordinator.advertise_requests()
            for stage, collect, timeout in (
                ("advertise", coordinator.collect_advertisements, step.key_timeout),
                ("share", coordinator.collect_shares, step.key_timeout),
                ("mask", coordinator.collect_masked, step.timeout),
                ("consistency", coordinator.collect_consistency, step.key_timeout),
            ):
                replies, _ = self._send_protocol(stage, reqs, timeout)
                reqs = collect(replies)
                self._reject(coordinator, replies)
                for name in list(self.active):
                    if name not in reqs:
                        self._refuse(self.node_of[name], f"{stage}: not continued")
            stage = "unmask"
            replies, carriers = self._send_protocol(stage, reqs, step.key_timeout)
            result = coordinator.collect_unmask(replies)
            self._reject(coordinator, replies)
        except SecureAggError as exc:
            self._reject(coordinator, coordinator.rejected)
            reason = exc.reason if isinstance(exc, ProtocolAbort) else str(exc)
            raise _AbortedError(stage, reason) from None

        # Contributors are U3 (their vectors are in the sum), even if one missed the unmask.
        self.report.replied[:] = [self.node_of[n] for n in result.survivors]
        for name in result.dropped:
            self.report.refused.setdefault(self.node_of[name], "mask: dropped out after sharing")
        for warning in result.warnings:
            note = f"secure {self.phase} round {self.round}: {warning}"
            log.warning(note)
            self.report.notes.append(note)
        carrier = carriers[sorted(carriers)[0]]
        counters = result.counters
        examples = float(counters.get("examples", result.weight_sum))
        if self.phase == "train" or plan is None:
            return [self._train_reply(carrier, keys, arrays, result, examples)]
        return [self._eval_reply(carrier, counters, examples, result, plan, split)]

    @staticmethod
    def _plan(message: Message) -> TrainingPlan:
        """The plan the strategy's evaluate config carries (it decides the counters)."""
        from training_plan import TrainingPlan

        try:
            return TrainingPlan.model_validate_json(
                str(message.content[wire.CONFIG][wire.PLAN_JSON])
            )
        except (KeyError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _AbortedError(
                HELLO, f"the evaluate config carries no valid plan ({first})"
            ) from None

    def _train_reply(
        self,
        carrier: Message,
        keys: list[str],
        arrays: list[np.ndarray],
        result: AggregateResult,
        examples: float,
    ) -> Message:
        mean = np.asarray(result.mean, dtype=np.float32)
        model: dict[str, np.ndarray] = {}
        offset = 0
        for key, array in zip(keys, arrays, strict=True):
            n = array.size
            delta = mean[offset : offset + n].reshape(array.shape)
            model[key] = (array.astype(np.float32) + delta).astype(np.float32)
            offset += n
        if offset != mean.size:
            raise ConfigurationError("decoded vector does not fit the global model")
        metrics = {
            "train-loss": result.counters.get("loss_sum", 0.0) / max(examples, 1.0),
            "clipped-fraction": float(result.clipped_fraction),
            "secure-contributors": len(result.survivors),
            "secure-dropped": len(result.dropped),
        }
        carrier.content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in model.items()}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: float(examples), **metrics}),
            }
        )
        return carrier

    def _eval_reply(
        self,
        carrier: Message,
        counters: Mapping[str, float],
        examples: float,
        result: AggregateResult,
        plan: TrainingPlan,
        split: str,
    ) -> Message:
        from flwr.app import MetricRecord

        from training_plan.metrics import metric_prefix, metrics_from_sums

        prefix = metric_prefix(split) if split in ("validation", "test") else "eval"
        metrics = metrics_from_sums(plan, counters)
        record = MetricRecord(
            {
                wire.NUM_EXAMPLES: float(examples),
                **{f"{prefix}-{name}": float(value) for name, value in metrics.items()},
                "secure-contributors": len(result.survivors),
            }
        )
        carrier.content = RecordDict({wire.METRICS: record})
        return carrier
