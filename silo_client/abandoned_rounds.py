"""Shredding the secrets of secure rounds the server abandoned.

A secure round keeps its secrets (X25519 private keys, the self-mask seed, received Shamir shares,
the global model) in ``<home>/secagg/<stem>.*`` between stages, because every stage message runs
in its own ClientApp process. Unmask and any refusal wipe them; a server that simply stops sending
would leave them on disk. So each round also has a deadline (``<stem>.deadline``: the time after
which a round that has not advanced is over, set from the site policy's
``secure_round_timeout_seconds`` at every stage), and the files of a round past its deadline are
overwritten with zeros and deleted

- by a small reaper process (``python -m silo_client.abandoned_rounds HOME``) started at the
  round's first message: one per silo home, it sleeps until the next deadline and exits as soon as
  no round files are left;
- at the next message of ANY run (``sweep_expired``, called by the ClientApp before each handler),
  in case the reaper was not running (host restarted, process killed).

A stage in progress holds ``<stem>.lock`` (flock), so a long local training is never shredded
under the running stage. Only the standard library (and the audit log) is imported here: the
reaper must start fast and the sweep runs at every message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROUND_SUFFIXES = (".state", ".global.npz", ".context.json", ".deadline", ".lock")
"""Every file a round keeps: ``<stem><suffix>``."""
LEGACY_STALE_SECONDS = 3600.0
"""Round files without a deadline file (written by an older fedsilo) are stale after this."""
REAPER_LOCK = ".secagg-reaper.lock"
"""In the home folder (not in secagg/, which holds round files only)."""
SPAWNED: list[subprocess.Popen] = []
"""Reapers started by this process (tests stop the ones still running)."""


def shred(path: Path) -> None:
    """Best effort: overwrite with zeros, then unlink."""
    try:
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.write(bytes(size))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        pass
    path.unlink(missing_ok=True)


def stem_of(name: str) -> str | None:
    """The round stem of a file name in the secagg folder, or None if it is not a round file."""
    if name.startswith("."):
        if not name.endswith(".tmp"):
            return None  # the reaper's lock, not a round's
        name = name[1:].rsplit(".", 2)[0]  # write_atomic's temporary files
    for suffix in ROUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def round_files(secagg: Path, stem: str) -> list[Path]:
    """The files of one round (temporary ones included) that exist now."""
    try:
        names = os.listdir(secagg)
    except OSError:
        return []
    return [secagg / n for n in names if stem_of(n) == stem]


def set_deadline(secagg: Path, stem: str, seconds: float) -> float:
    """(Re)set the round's deadline to now + ``seconds``; returns it (epoch seconds)."""
    deadline = time.time() + float(seconds)
    path = secagg / f"{stem}.deadline"
    tmp = secagg / f".{stem}.deadline.{os.getpid()}.tmp"
    secagg.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as handle:
        handle.write(repr(deadline))
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return deadline


def deadline_of(secagg: Path, stem: str) -> float:
    """The round's deadline; without a readable deadline file, the newest file's mtime plus the
    legacy stale time."""
    try:
        return float((secagg / f"{stem}.deadline").read_text())
    except (OSError, ValueError):
        pass
    newest = 0.0
    for path in round_files(secagg, stem):
        with contextlib.suppress(OSError):
            newest = max(newest, path.stat().st_mtime)
    return newest + LEGACY_STALE_SECONDS


@contextlib.contextmanager
def stage_lock(secagg: Path, stem: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold ``<stem>.lock`` while a stage runs (or, with ``wait=False``, try to): yields whether
    the lock is held."""
    if not secagg.is_dir():
        secagg.mkdir(parents=True, exist_ok=True)
        os.chmod(secagg, 0o700)
    fd = os.open(secagg / f"{stem}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def wipe_round(secagg: Path, stem: str) -> list[Path]:
    """Shred every file of one round; returns what was removed."""
    removed = round_files(secagg, stem)
    for path in removed:
        shred(path)
    return removed


def sweep_expired(root: Path, now: float | None = None) -> tuple[list[str], float | None]:
    """Shred the rounds of the silo home at ``root`` whose deadline passed (unless a stage of
    theirs is running). Returns (stems wiped, the earliest deadline still ahead or None)."""
    secagg = Path(root) / "secagg"
    try:
        names = os.listdir(secagg)
    except OSError:
        return [], None
    stems = sorted({s for n in names if (s := stem_of(n)) is not None})
    wiped: list[str] = []
    ahead: float | None = None
    for stem in stems:
        now_ = time.time() if now is None else now
        deadline = deadline_of(secagg, stem)
        secrets = _holds_secrets(secagg, stem)
        if not secrets:
            deadline = min(deadline, now_)  # only a lock or deadline left: tidy up now
        if deadline > now_:
            ahead = deadline if ahead is None else min(ahead, deadline)
            continue
        with stage_lock(secagg, stem, wait=False) as free:
            if not free:  # a stage is running: look again shortly
                ahead = now_ + 1.0 if ahead is None else min(ahead, now_ + 1.0)
                continue
            later = time.time() if now is None else now
            if _holds_secrets(secagg, stem) and deadline_of(secagg, stem) > later:
                continue  # the round advanced between the two looks
            wipe_round(secagg, stem)
        if secrets:
            wiped.append(stem)
            _audit_wiped(Path(root), stem, deadline)
    return wiped, ahead


def _audit_wiped(root: Path, stem: str, deadline: float) -> None:
    from silo_client.errors import SiloError
    from silo_client.governance.audit import audit

    with contextlib.suppress(SiloError):
        audit(
            root,
            "secure-round-abandoned",
            round_files=stem,
            deadline=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline)),
            action="keys, shares and the stored model shredded",
        )


def ensure_reaper(root: Path) -> subprocess.Popen | None:
    """Start the home's reaper unless one runs (it holds ``<home>/.secagg-reaper.lock``)."""
    fd = os.open(Path(root) / REAPER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a reaper is running and will see the new round's files
    finally:
        os.close(fd)  # releases the probe lock; the reaper takes it for itself
    process = subprocess.Popen(
        [sys.executable, "-m", "silo_client.abandoned_rounds", str(Path(root).resolve())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    SPAWNED.append(process)
    return process


def reap(root: Path, poll: float = 1.0) -> int:
    """The reaper's loop: shred expired rounds until no round files are left."""
    secagg = Path(root) / "secagg"
    try:
        fd = os.open(Path(root) / REAPER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another reaper has this home
        while True:
            _, ahead = sweep_expired(root)
            if ahead is None and not _has_rounds(secagg):
                # hand over: release, then look once more (a round may have started meanwhile
                # while its starter saw our lock and spawned nobody)
                fcntl.flock(fd, fcntl.LOCK_UN)
                if not _has_rounds(secagg):
                    return 0
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0
                continue
            wait = poll if ahead is None else min(poll, max(0.05, ahead - time.time()))
            time.sleep(wait)
    finally:
        os.close(fd)


def _holds_secrets(secagg: Path, stem: str) -> bool:
    return any(
        (secagg / f"{stem}{suffix}").exists()
        for suffix in (".state", ".global.npz", ".context.json")
    )


def _has_rounds(secagg: Path) -> bool:
    try:
        return any(stem_of(n) is not None for n in os.listdir(secagg))
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(reap(Path(sys.argv[1])))
