"""The silo's side of a securely aggregated round: one handler per stage message.

Message types ``train.sa_<stage>`` / ``evaluate.sa_<stage>`` (see ``secure_agg.flower``)::

    hello        check the plan, store the received global model (0600) and compute the context
                 hash over it; reply our name, signed. Stale files of earlier rounds are wiped.
    advertise    check the round config against the approved plan, make round keys; state saved
    share        verify peers against OUR roster, deal encrypted shares
    mask         train (or evaluate) from exactly the stored model; upload the masked vector
    consistency  sign the survivor set
    unmask       reveal shares, then wipe the state and delete every file of the round

Each message runs in a fresh ClientApp process, so the round state travels between stages in
``<home>/secagg/<run>-<round>-<phase>.state`` (0600, written atomically, overwritten with zeros
before deletion). Any protocol refusal is an error reply with code ``ERROR_SECURE_AGG`` and a
one-line reason, and wipes the round's files. Only the mask stage imports torch (to train).

Beyond the protocol, the silo enforces (``governance.participation``, every refusal audited and
answered with ``ERROR_REFUSED`` and a one-line reason the server records as a ``silos-refused``
event): at most one survivor set per context (plan, received global model, phase) whatever the
run id or round; at least ``policy.min_round_silos(plan)`` participants and survivors; a Shamir
threshold of at least ``policy.min_threshold(n)`` (from the tolerated colluders). Each round has a
deadline (``policy.secure_round_timeout_seconds`` after its last stage): past it, its files are
shredded (``silo_client.abandoned_rounds``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedsilo_base.atomic_files import write_atomic
from secure_agg import (
    ClientState,
    ConfigurationError,
    MalformedMessage,
    ProtocolAbort,
    ReplayDetected,
    RoundConfig,
    SecAggClient,
    SecureAggError,
    cap_weight,
)
from secure_agg.flower import (
    HELLO,
    check_header,
    codec_settings,
    context_hash,
    counter_names,
    from_content,
    hello_transcript,
    to_records,
)
from secure_agg.messages import validate
from silo_client.abandoned_rounds import (
    deadline_of,
    ensure_reaper,
    set_deadline,
    stage_lock,
    stem_of,
    wipe_round,
)
from silo_client.errors import PlanRefused, SiloConfigError
from silo_client.governance.participation import (
    ParticipationLedger,
    ledger_context,
    refuse_low_threshold,
    refuse_small_round,
)
from silo_client.home import SiloHome
from silo_client.identity import load_identity, load_roster
from silo_client.reply_pacing import hold_until_grid_point
from training_plan import TrainingPlan, wire

log = logging.getLogger("fedsilo.silo")

_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


def _safe_run(run_id: str) -> str:
    if _SAFE.match(run_id):
        return run_id
    return "h" + hashlib.sha256(run_id.encode()).hexdigest()[:24]


class RoundFiles:
    """The files one (run, round, phase) keeps in ``<home>/secagg``."""

    def __init__(self, home: SiloHome, run_id: str, round_: int, phase: str) -> None:
        self.dir = home.secagg_dir
        self.run_id = run_id
        self.run_prefix = _safe_run(run_id) + "-"
        self.stem = f"{_safe_run(run_id)}-{int(round_)}-{phase}"
        self.state = self.dir / f"{self.stem}.state"
        self.global_npz = self.dir / f"{self.stem}.global.npz"
        self.context = self.dir / f"{self.stem}.context.json"

    # ---------------------------------------------------------------- writing
    def _prepare_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def save_global(
        self, keys: list[str], arrays: list[np.ndarray], context: dict[str, Any]
    ) -> None:
        """Store the received model and what the later stages need to know about it."""
        self._prepare_dir()
        buf = io.BytesIO()
        np.savez(buf, *arrays)
        write_atomic(self.global_npz, buf.getvalue(), mode=0o600)
        write_atomic(self.context, json.dumps({**context, "keys": keys}).encode(), mode=0o600)

    def save_state(self, state: ClientState) -> None:
        """Persist the round state (secrets) 0600; the in-memory copy is wiped."""
        self._prepare_dir()
        blob = state.to_bytes()
        try:
            write_atomic(self.state, blob, mode=0o600)
        finally:
            blob[:] = bytes(len(blob))
            state.wipe()

    # ---------------------------------------------------------------- reading
    def load_context(self) -> dict[str, Any]:
        """The hello stage's record of this round; ReplayDetected if there is none."""
        try:
            return json.loads(self.context.read_text())
        except FileNotFoundError:
            raise ReplayDetected(
                f"no secure-aggregation round {self.stem} in progress here (never started, "
                f"finished or wiped)"
            ) from None
        except ValueError:
            raise MalformedMessage(f"round record {self.context.name} is damaged") from None

    def load_global(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The global model stored at hello, by key, in the received order."""
        with np.load(self.global_npz, allow_pickle=False) as data:
            arrays = [data[f"arr_{i}"] for i in range(len(keys))]
        return dict(zip(keys, arrays, strict=True))

    def load_state(self, name: str, run_id: str, round_: int) -> ClientState:
        """The round state saved by the previous stage."""
        try:
            blob = bytearray(self.state.read_bytes())
        except FileNotFoundError:
            raise ReplayDetected(
                f"no secure-aggregation state for round {self.stem} (never advertised or wiped)"
            ) from None
        try:
            state = ClientState.from_bytes(blob)
        finally:
            blob[:] = bytes(len(blob))
        if state.name != name or state.run_id != run_id or state.round != round_:
            state.wipe()
            raise ReplayDetected(f"state file {self.state.name} belongs to another round")
        return state

    # ---------------------------------------------------------------- wiping
    def wipe(self) -> None:
        """Overwrite the secrets with zeros and delete every file of this round."""
        wipe_round(self.dir, self.stem)

    def set_deadline(self, seconds: float) -> float:
        """The round is abandoned if no stage advances it within ``seconds`` from now."""
        self._prepare_dir()
        return set_deadline(self.dir, self.stem, seconds)

    def remove_stale(self, now: float | None = None) -> list[Path]:
        """Wipe other rounds' files: of this run always (the server moved on), of other runs
        once their deadline passed (a round whose stage is running is left alone)."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        if not self.dir.is_dir():
            return removed
        stems = sorted({s for n in os.listdir(self.dir) if (s := stem_of(n)) is not None})
        for stem in stems:
            if stem == self.stem:
                continue
            same_run = stem.rsplit("-", 2)[0] == self.run_prefix[:-1]
            if not same_run and deadline_of(self.dir, stem) > now:
                continue
            with stage_lock(self.dir, stem, wait=False) as free:
                if free:
                    removed.extend(wipe_round(self.dir, stem))
        return removed


# ------------------------------------------------------------------------ handlers
def _client(home: SiloHome, plan: TrainingPlan) -> SecAggClient:
    identity, roster = load_identity(home), load_roster(home)
    try:
        return SecAggClient(
            home.name, identity, roster, min_threshold=plan.secure_aggregation.threshold
        )
    except ConfigurationError as exc:
        raise SiloConfigError(
            f"secure-aggregation identity of silo '{home.name}' does not match its roster "
            f"({exc}); run 'silo join' again"
        ) from None


def _plan(home: SiloHome, plan_json: str, claimed: str, run_id: str, stage: str) -> TrainingPlan:
    """The plan, unaltered, approved here and within the site policy (else PlanRefused)."""
    from silo_client.governance.enforcement import check_plan
    from silo_client.local_round import plan_from_wire

    plan = plan_from_wire(plan_json, claimed)
    check_plan(home, plan, claimed, run_id=run_id, stage=stage)
    return plan


def _reply(msg: Message, fields: dict[str, Any]) -> Message:
    return Message(RecordDict(to_records(fields)), reply_to=msg)


def _hello(home: SiloHome, msg: Message, phase: str, header: dict[str, Any]) -> Message:
    run_id, round_ = check_header(header, HELLO)
    if header.get("phase") != phase or set(header) != {
        "protocol",
        "run_id",
        "round",
        "stage",
        "phase",
    }:
        raise MalformedMessage(f"hello header does not fit a {phase} round")
    files = RoundFiles(home, run_id, round_, phase)
    for path in files.remove_stale():
        log.info("wiped stale secure-aggregation file %s", path.name)
    files.set_deadline(_timeout(home))  # before any secret is stored: never a round without one
    try:
        config = msg.content[wire.CONFIG]
        record = msg.content[wire.ARRAYS]
        if not isinstance(config, ConfigRecord) or not isinstance(record, ArrayRecord):
            raise KeyError(wire.CONFIG)
        plan_json, claimed = str(config[wire.PLAN_JSON]), str(config[wire.PLAN_HASH])
        config_run, config_round = str(config[wire.RUN_ID]), int(config[wire.ROUND])
    except KeyError as exc:
        raise PlanRefused(
            f"the server's message lacks '{exc.args[0]}'; is it a fedsilo server?"
        ) from None
    plan = _plan(home, plan_json, claimed, config_run, f"{phase}.sa_hello")
    split = str(config.get(wire.SPLIT, "validation")) if phase == "evaluate" else "train"
    if phase == "evaluate":
        from silo_client.local_round import check_split

        check_split(plan, split, config_round)
    if (config_run, config_round) != (run_id, round_):
        raise MalformedMessage(
            f"the plan's binding (run {config_run!r}, round {config_round}) differs from the "
            f"secure-aggregation header (run {run_id!r}, round {round_})"
        )
    keys = list(record.keys())
    arrays = [np.ascontiguousarray(a) for a in record.to_numpy_ndarrays()]
    bad = [k for k, a in zip(keys, arrays, strict=True) if a.dtype != np.float32]
    if bad:
        raise MalformedMessage(f"global model arrays must be float32 ({bad[0]!r} is not)")
    client = _client(home, plan)
    # The split is bound into the context hash the silos compare: all evaluate one split.
    bound_phase = phase if split in ("train", "validation") else f"{phase}/{split}"
    ctx = context_hash(
        keys, arrays, phase=bound_phase, plan_hash=claimed, run_id=run_id, round_=round_
    )
    files.save_global(
        keys,
        arrays,
        {
            "plan_json": plan_json,
            "plan_hash": claimed,
            "context_hash": ctx.hex(),
            "phase": phase,
            "split": split,
            # what the participation ledger keys on: no run id, no round number
            "ledger_phase": bound_phase,
            "ledger_context": ledger_context(claimed, bound_phase, keys, arrays),
        },
    )
    try:
        ensure_reaper(home.root)
    except OSError as exc:  # the sweep at the next message of any run still wipes the round
        log.warning("could not start the abandoned-round reaper: %s", exc)
    identity = client.identity.public_bytes
    log.info("secure %s round %d: received the global model (%d arrays)", phase, round_, len(keys))
    return _reply(
        msg,
        {
            **header,
            "silo": home.name,
            "identity": identity,
            "context_hash": ctx,
            "signature": client.identity.sign(
                hello_transcript(run_id, round_, phase, home.name, identity, ctx)
            ),
        },
    )


def _check_round_config(cfg: RoundConfig, plan: TrainingPlan, phase: str, length: int) -> None:
    """The server's codec config must be the approved plan's, for this model."""
    want = codec_settings(plan)
    got = {"clip": cfg.clip, "frac_bits": cfg.frac_bits, "bits": cfg.bits, "w_max": cfg.w_max}
    diff = sorted(k for k in want if float(want[k]) != float(got[k]))
    if diff:
        raise ProtocolAbort(
            f"the round's codec settings {diff} differ from the approved plan's; refusing"
        )
    if cfg.vector_length != length:
        raise ProtocolAbort(
            f"the round announces a vector of {cfg.vector_length} values, the model we received "
            f"has {length}"
        )
    if tuple(cfg.counter_names) != counter_names(phase, plan):
        raise ProtocolAbort(f"unexpected counters {list(cfg.counter_names)} in a {phase} round")


def _flat_length(files: RoundFiles, context: dict[str, Any]) -> int:
    with np.load(files.global_npz, allow_pickle=False) as data:
        return int(sum(data[f"arr_{i}"].size for i in range(len(context["keys"]))))


def _stage(
    home: SiloHome, msg: Message, phase: str, stage: str, request: dict[str, Any], files: RoundFiles
) -> Message:
    run_id, round_ = request["run_id"], request["round"]
    context = files.load_context()
    if context.get("phase") != phase:
        raise ReplayDetected(f"round {files.stem} is not a {phase} round")
    if "ledger_context" not in context:
        raise ReplayDetected(f"round {files.stem} was started by an older fedsilo; start anew")
    plan = _plan(home, context["plan_json"], context["plan_hash"], run_id, f"{phase}.sa_{stage}")
    client = _client(home, plan)
    if stage == "advertise":
        msg_ = validate(request, "advertise", "request")
        cfg = RoundConfig.from_request(msg_)
        length = _flat_length(files, context) if phase == "train" else 0
        _check_round_config(cfg, plan, phase, length)
        _check_participants(home, plan, context, msg_, run_id, round_)
        state, reply = client.advertise(msg_, bytes.fromhex(context["context_hash"]))
        files.save_state(state)
        return _reply(msg, reply)
    state = files.load_state(home.name, run_id, round_)
    try:
        if stage == "share":
            reply = client.share(state, request)
        elif stage == "mask":
            started = time.monotonic()
            vector, weight, counters = _local_vector(home, plan, files, context, phase, round_)
            reply = client.mask(state, request, vector, weight, counters)
            # the reply time must not tell the server how long we trained (silo_client.reply_pacing)
            ratio = _pacing_ratio(home)
            if ratio is not None:
                hold_until_grid_point(started, ratio=ratio)
        elif stage == "consistency":
            _check_survivors(home, plan, context, request, run_id, round_, stage)
            reply = client.consistency(state, request)
        elif stage == "unmask":
            reply = client.unmask(state, request)  # checks everything, wipes the state
            files.wipe()
            # the commit point: recorded (or refused) before any share leaves this process
            _check_survivors(home, plan, context, request, run_id, round_, stage)
            ParticipationLedger(home.root).claim(
                str(context["ledger_context"]),
                list(request["survivors"]),
                plan_hash=str(context["plan_hash"]),
                phase=str(context["ledger_phase"]),
                run_id=run_id,
                round_=round_,
            )
            log.info("secure %s round %d: shares revealed, round state wiped", phase, round_)
            return _reply(msg, reply)
        else:  # pragma: no cover - registration bug
            raise MalformedMessage(f"unknown stage {stage!r}")
    except BaseException:
        state.wipe()
        raise
    files.save_state(state)
    return _reply(msg, reply)


def _timeout(home: SiloHome) -> float:
    from silo_client.governance.policy import load_policy

    return float(load_policy(home.root).secure_round_timeout_seconds)


def _pacing_ratio(home: SiloHome) -> float | None:
    """The site's reply-pacing ratio (policy ``reply_pacing_ratio``; None: no hold)."""
    from silo_client.governance.policy import load_policy

    return load_policy(home.root).reply_pacing_ratio


def _check_participants(
    home: SiloHome,
    plan: TrainingPlan,
    context: dict[str, Any],
    request: dict[str, Any],
    run_id: str,
    round_: int,
) -> None:
    """ADVERTISE: enough participants, a threshold the site accepts, and a participant list
    that can still reach the survivor set on record for this context (else refuse now, before
    any training)."""
    from silo_client.governance.policy import load_policy

    policy = load_policy(home.root)
    participants = [str(p) for p in request["participants"]]
    n = len(participants)
    digest = str(context["plan_hash"])
    refuse_small_round(
        home.root,
        what="participants",
        count=n,
        minimum=policy.min_round_silos(plan),
        plan_hash=digest,
        run_id=run_id,
        round_=round_,
        stage="advertise",
    )
    refuse_low_threshold(
        home.root,
        threshold=int(request["threshold"]),
        n=n,
        minimum=policy.min_threshold(n),
        colluders=policy.tolerated_colluders,
        plan_hash=digest,
        run_id=run_id,
        round_=round_,
    )
    ParticipationLedger(home.root).check_participants(
        str(context["ledger_context"]),
        participants,
        run_id=run_id,
        round_=round_,
        stage="advertise",
    )


def _check_survivors(
    home: SiloHome,
    plan: TrainingPlan,
    context: dict[str, Any],
    request: dict[str, Any],
    run_id: str,
    round_: int,
    stage: str,
) -> None:
    """CONSISTENCY / UNMASK: the survivor set is large enough and the one on record (if any)."""
    from silo_client.governance.policy import load_policy

    survivors = request.get("survivors")
    if not isinstance(survivors, list) or not all(isinstance(x, str) for x in survivors):
        raise MalformedMessage("survivors must be a list of silo names")
    refuse_small_round(
        home.root,
        what="survivors",
        count=len(set(survivors)),
        minimum=load_policy(home.root).min_round_silos(plan),
        plan_hash=str(context["plan_hash"]),
        run_id=run_id,
        round_=round_,
        stage=stage,
    )
    ParticipationLedger(home.root).check_survivors(
        str(context["ledger_context"]), survivors, run_id=run_id, round_=round_, stage=stage
    )


def _local_vector(
    home: SiloHome,
    plan: TrainingPlan,
    files: RoundFiles,
    context: dict[str, Any],
    phase: str,
    round_: int,
) -> tuple[np.ndarray, float, dict[str, float]]:
    """Train (or evaluate) from the stored model; the vector, weight and counters to mask."""
    keys = list(context["keys"])
    global_arrays = files.load_global(keys)
    w_max = float(plan.secure_aggregation.max_weight)
    if phase == "train":
        from silo_client.local_round import train_round

        update, result = train_round(home, plan, global_arrays, round_, run_id=files.run_id)
        if set(update) != set(keys):
            raise PlanRefused("the trained model's arrays differ from the global model's")
        vector = (
            np.concatenate([np.asarray(update[k], dtype=np.float32).ravel() for k in keys])
            if keys
            else np.zeros(0, np.float32)
        )
        examples = int(result.num_examples)
        counters = {"examples": float(examples), "loss_sum": float(result.mean_loss) * examples}
    else:
        from silo_client.local_round import evaluate_round

        # the plan's evaluation counters (training_plan.metrics): only their sums leave
        counters = evaluate_round(
            home, plan, global_arrays, str(context.get("split", "validation")), round_
        )
        vector = np.zeros(0, np.float32)
        examples = int(counters["examples"])
    from silo_client.governance.enforcement import check_min_examples

    check_min_examples(home, examples, run_id=files.stem, digest=str(context["plan_hash"]))
    # weight AND counters capped together, so that the sums stay within what the server checks
    weight, counters = cap_weight(examples, counters, w_max)
    if phase == "train" and plan.privacy is not None and weight > 0:
        # DP: equal weights, so the masked update depends on the data only through DP-SGD; the
        # counters scale with the weight so they stay consistent with it (ratios unchanged)
        factor = w_max / weight
        weight, counters = float(w_max), {k: v * factor for k, v in counters.items()}
    if examples > w_max:
        log.warning(
            "secure %s round %d: %d examples exceed the plan's max_weight %d; weight and "
            "counters scaled down to it",
            phase,
            round_,
            examples,
            int(w_max),
        )
    return vector, weight, counters


def _error(msg: Message, exc: SecureAggError) -> Message:
    reason = exc.reason if isinstance(exc, ProtocolAbort) else str(exc)
    reason = reason.splitlines()[0] if reason else type(exc).__name__
    return Message(
        Error(code=wire.ERROR_SECURE_AGG, reason=f"secure aggregation: {reason}"), reply_to=msg
    )


def handle(msg: Message, context: Context, phase: str, stage: str) -> Message:
    """Answer one secure-aggregation stage message (called by the ClientApp)."""
    home = SiloHome.from_node_config(context.node_config)
    files: RoundFiles | None = None
    try:
        request = from_content(msg.content)
        run_id, round_ = check_header(request, stage)
        files = RoundFiles(home, run_id, round_, phase)
        with stage_lock(files.dir, files.stem):  # the reaper never shreds a running stage
            if stage == HELLO:
                return _hello(home, msg, phase, request)
            reply = _stage(home, msg, phase, stage, request, files)
            if stage != "unmask":
                files.set_deadline(_timeout(home))
            return reply
    except SecureAggError as exc:
        log.warning("secure %s %s refused: %s", phase, stage, exc)
        _wipe_after_failure(home, files, msg)
        return _error(msg, exc)
    except BaseException:
        _wipe_after_failure(home, files, msg)
        raise


def _wipe_after_failure(home: SiloHome, files: RoundFiles | None, msg: Message) -> None:
    """On any refusal or failure the round is over for us: wipe its files."""
    if files is None:
        try:
            header = from_content(msg.content)
            files = RoundFiles(home, str(header["run_id"]), int(header["round"]), _phase_of(msg))
        except (SecureAggError, KeyError, TypeError, ValueError):
            return
    files.wipe()


def _phase_of(msg: Message) -> str:
    return msg.metadata.message_type.split(".", 1)[0]
