"""The silo's Flower ClientApp (Message API).

The SuperNode starts one ClientApp process per message; this module therefore imports only what
every message needs, and torch/MONAI load lazily inside the handlers that train or evaluate.
Every refusal or failure is answered with a Flower error reply whose reason is one line without
paths, values or anything else identifying (details go to the silo's own log).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from silo_client.errors import DataError, PlanRefused, SiloConfigError, SiloError
from silo_client.home import SiloHome
from training_plan import wire
from training_plan.errors import PlanError

log = logging.getLogger("fedsilo.silo")

app = ClientApp()


def _setup_logging(home: SiloHome) -> None:
    home.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(home.logs_dir / "clientapp.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedsilo")
    root.handlers = [handler]
    root.setLevel(logging.INFO)


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;]+)+[\\/]?")


def redact_paths(text: str) -> str:
    """Remove file paths from a reason that leaves the silo: paths can name patients or studies.

    The full message stays in the silo's own log.
    """
    return _PATH.sub("<local path>", text)


def error_reply(msg: Message, exc: BaseException) -> Message:
    """Turn an exception into a Flower error reply with a code and a one-line reason."""
    if isinstance(exc, PlanRefused | PlanError):
        code = wire.ERROR_REFUSED
    elif isinstance(exc, DataError):
        code = wire.ERROR_DATA
    elif isinstance(exc, SiloConfigError):
        code = wire.ERROR_CONFIG
    else:
        code = wire.ERROR_INTERNAL
    if code == wire.ERROR_INTERNAL:
        reason = f"internal error in the silo ({type(exc).__name__}); see the silo's clientapp.log"
    else:
        reason = redact_paths(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def guarded(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Run a handler; any failure becomes an error reply instead of a crashed ClientApp."""

    def run(msg: Message, context: Context) -> Message:
        try:
            home = SiloHome.from_node_config(context.node_config)
            _setup_logging(home)
        except SiloError as exc:
            return error_reply(msg, exc)
        import time

        started = time.monotonic()
        log.info("received %s", msg.metadata.message_type)
        _wipe_abandoned_rounds(home)
        try:
            reply = handler(msg, context)
            log.info("answered %s in %.1f s", msg.metadata.message_type, time.monotonic() - started)
        except (SiloError, PlanError) as exc:
            log.warning("refused %s: %s", msg.metadata.message_type, exc)
            reply = error_reply(msg, exc)
        except Exception as exc:
            log.exception("failed %s", msg.metadata.message_type)
            reply = error_reply(msg, exc)
        return _audited(home, msg, context, reply)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _wipe_abandoned_rounds(home: SiloHome) -> None:
    """At every message of any run: shred secure rounds whose deadline passed (the reaper
    process does it at the deadline; this catches what it missed)."""
    from silo_client.abandoned_rounds import sweep_expired

    try:
        wiped, _ = sweep_expired(home.root)
    except OSError as exc:  # never let housekeeping fail a message; the reaper retries
        log.warning("could not sweep abandoned secure rounds: %s", exc)
        return
    for stem in wiped:
        log.info("secure round %s passed its deadline: its keys and shares were shredded", stem)


def _audited(home: SiloHome, msg: Message, context: Context, reply: Message) -> Message:
    """Record in the silo's audit log what this reply sends (kind and size, no values)."""
    from silo_client.governance.enforcement import record_reply

    error = reply.error.reason if reply.has_error() else None
    size = 0
    if error is None:
        from flwr.common.serde import recorddict_to_proto

        size = recorddict_to_proto(reply.content).ByteSize()
    try:
        record_reply(home.root, msg.metadata.message_type, str(context.run_id), error, size)
    except SiloError as exc:  # an unwritable audit log must not let anything leave unrecorded
        log.error("audit log: %s", exc)
        return error_reply(msg, exc)
    return reply


def _plan_and_round(msg: Message, context: Context):
    from silo_client.governance.enforcement import check_plan
    from silo_client.local_round import plan_from_wire

    config = msg.content[wire.CONFIG]
    try:
        plan_json = str(config[wire.PLAN_JSON])
        claimed = str(config[wire.PLAN_HASH])
        server_round = int(config[wire.ROUND])
    except KeyError as exc:
        raise PlanRefused(
            f"the server's message lacks '{exc.args[0]}'; is it a fedsilo server?"
        ) from None
    plan = plan_from_wire(plan_json, claimed)
    home = SiloHome.from_node_config(context.node_config)
    run_id = str(config.get(wire.RUN_ID, context.run_id))
    check_plan(home, plan, claimed, run_id=run_id, stage=msg.metadata.message_type)
    return plan, server_round


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    """Plain (not securely aggregated) training: reply with the update and the example count."""
    from silo_client.local_round import train_round

    plan, server_round = _plan_and_round(msg, context)
    if plan.secure_aggregation.enabled:
        raise PlanRefused("the plan requires secure aggregation; refusing to send a plain update")
    home = SiloHome.from_node_config(context.node_config)
    global_arrays = msg.content[wire.ARRAYS].to_numpy_ndarrays()
    keys = list(msg.content[wire.ARRAYS].keys())
    run_id = str(msg.content[wire.CONFIG].get(wire.RUN_ID, context.run_id))
    update, result = train_round(
        home, plan, dict(zip(keys, global_arrays, strict=True)), server_round, run_id=run_id
    )
    from silo_client.governance.enforcement import check_min_examples

    check_min_examples(
        home, result.num_examples, run_id=str(context.run_id), digest=plan_hash_of(msg)
    )
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord({k: _array(v) for k, v in update.items()}),
            wire.METRICS: MetricRecord(
                {wire.NUM_EXAMPLES: result.num_examples, "train-loss": result.mean_loss}
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Plain evaluation of the global model on the silo's validation (or final test) split.

    The reply carries the plan's evaluation counters (training_plan.metrics) and the example
    count; the server adds them over silos. This reveals the silo's own counts to the server,
    which only a plan with secure aggregation off (allowed by this site's policy) can ask for.
    """
    from silo_client.local_round import check_split, evaluate_round

    plan, server_round = _plan_and_round(msg, context)
    split = str(msg.content[wire.CONFIG].get(wire.SPLIT, "validation"))
    check_split(plan, split, server_round)
    if plan.secure_aggregation.enabled:
        raise PlanRefused("the plan requires secure aggregation; refusing to send plain metrics")
    home = SiloHome.from_node_config(context.node_config)
    record = msg.content[wire.ARRAYS]
    global_arrays = dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))
    counters = evaluate_round(home, plan, global_arrays, split, server_round)
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: int(counters["examples"]),
            **{wire.COUNTER + name: float(value) for name, value in counters.items()},
        }
    )
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


def plan_hash_of(msg: Message) -> str:
    """The plan hash a server message claims (already checked by ``plan_from_wire``)."""
    return str(msg.content[wire.CONFIG][wire.PLAN_HASH])


def _array(value):
    from flwr.app import Array

    return Array(value)


# Secure aggregation: one handler per stage and phase ("train.sa_hello", ..., "evaluate.sa_unmask").
# The stage logic lives in silo_client.secure_round (imported lazily: only the mask stage trains).
SECURE_STAGES = ("hello", "advertise", "share", "mask", "consistency", "unmask")


def _secure_handler(phase: str, stage: str) -> Callable[[Message, Context], Message]:
    def handler(msg: Message, context: Context) -> Message:
        from silo_client.secure_round import handle

        return handle(msg, context, phase, stage)

    handler.__name__ = f"secure_{phase}_{stage}"
    handler.__doc__ = f"Secure aggregation, {phase} phase, {stage} stage."
    return guarded(handler)


for _stage in SECURE_STAGES:
    app.train(f"sa_{_stage}")(_secure_handler("train", _stage))
    app.evaluate(f"sa_{_stage}")(_secure_handler("evaluate", _stage))
