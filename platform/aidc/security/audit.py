"""The audit log: append-only JSON lines, each record chained to the one before it by sha256.

A record: {"seq", "ts", "actor", "action", "target", "outcome", "details", "prev", "hash"}, where `hash`
is the sha256 of the record's canonical JSON without `hash`, and `prev` is the previous record's hash.
Editing a record breaks its hash; deleting, inserting or reordering breaks `seq` and `prev`; cutting
records off the end disagrees with `audit.head.json`. Writers on any node take a file lock, so the log
must sit on a local or shared POSIX filesystem (NFS), not an object store.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from aidc import storage
from aidc.errors import AidcError
from aidc.security import security_home

logger = logging.getLogger(__name__)

LOG = "audit.jsonl"
HEAD = "audit.head.json"
GENESIS = "0" * 64
ACTOR_ENV = "AIDC_ACTOR"


class AuditRecord(BaseModel):
    """One audit event, as written to the log (before its hash is added)."""

    model_config = ConfigDict(extra="forbid")
    seq: int = Field(..., description="Position in the log, from 1.")
    ts: str = Field(..., description="When, ISO 8601 UTC.")
    actor: str = Field(..., description="Who: an API key's owner (key:<id>) or the OS user.")
    action: str = Field(..., description="What, e.g. key.create, auth.denied, model.register, model.refused.")
    target: str | None = Field(None, description="What it was done to: a key id, model ref, app, job.")
    outcome: str = Field("ok", description="ok, denied, refused, failed.")
    details: dict = Field(default_factory=dict, description="Extra facts (never secrets).")
    prev: str = Field(..., description="sha256 of the previous record (64 zeros for the first).")


def default_actor() -> str:
    """$AIDC_ACTOR, else the OS user the process runs as."""
    try:
        return os.environ.get(ACTOR_ENV) or getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return f"uid:{os.getuid()}"


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _local_dir(home: str | None) -> Path:
    home = security_home(home)
    if storage.is_uri(home):
        raise AidcError(f"the audit log needs a POSIX filesystem (local or NFS), not {home}; "
                        "set AIDC_SECURITY_DIR to a shared local path")
    path = Path(home)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@contextlib.contextmanager
def locked(lock_path: Path):
    """An exclusive flock held for the block: one writer at a time across processes and nodes (NFS)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _last_line(path: Path) -> str | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        block = min(size, 65536)
        while True:
            f.seek(size - block)
            lines = f.read(block).rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or block == size:
                return lines[-1].decode()
            block = min(size, block * 4)


def record(action: str, target: str | None = None, outcome: str = "ok", actor: str | None = None,
           details: dict | None = None, home: str | None = None) -> dict:
    """Append one event to the chain and return it (with its hash)."""
    directory = _local_dir(home)
    log = directory / LOG
    with locked(directory / "audit.lock"):
        last = _last_line(log)
        prev = json.loads(last) if last else {"seq": 0, "hash": GENESIS}
        rec = AuditRecord(seq=int(prev["seq"]) + 1, ts=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                          actor=actor or default_actor(), action=action, target=target, outcome=outcome,
                          details=details or {}, prev=prev["hash"]).model_dump(mode="json")
        rec["hash"] = _digest(rec)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        storage.write_text(str(directory / HEAD), json.dumps({"seq": rec["seq"], "hash": rec["hash"]}))
    return rec


def record_quietly(action: str, **kwargs) -> None:
    """record(), but a failure to write is logged, never raised: serving must not fail on the audit log."""
    try:
        record(action, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the event is still logged below
        logger.error("audit log write failed for %s %s: %s", action, kwargs.get("target"), exc)


class RateLimitedAudit:
    """At most one record per `key` every `interval_s` in this process; the rest are counted into the next one
    (auth failures under a flood must not flood the log)."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, key: str, action: str, **kwargs) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        details = dict(kwargs.pop("details", None) or {})
        if self._suppressed.get(key):
            details["suppressed_since_last"] = self._suppressed.pop(key)
        record_quietly(action, details=details, **kwargs)
        return True


def verify(home: str | None = None) -> tuple[int, list[str]]:
    """(records checked, problems found): each problem names the line and what was done to it."""
    directory = _local_dir(home)
    log = directory / LOG
    if not log.exists():
        return 0, []
    problems: list[str] = []
    prev_hash, expected_seq, count = GENESIS, 1, 0
    for lineno, line in enumerate(log.read_text().splitlines(), start=1):
        count += 1
        try:
            rec = json.loads(line)
            seq, claimed = int(rec["seq"]), rec["hash"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {lineno}: not a valid audit record (edited or corrupted)")
            prev_hash, expected_seq = None, expected_seq + 1
            continue
        if _digest(rec) != claimed:
            problems.append(f"line {lineno} (seq {seq}): edited - its content does not match its hash")
        if seq > expected_seq:
            problems.append(f"line {lineno}: seq {seq} follows seq {expected_seq - 1} - "
                            f"{seq - expected_seq} record(s) deleted before it")
        elif seq < expected_seq:
            problems.append(f"line {lineno}: seq {seq} where seq {expected_seq} was due - "
                            "a record inserted or moved here (reordered)")
        elif prev_hash is not None and rec.get("prev") != prev_hash:
            problems.append(f"line {lineno} (seq {seq}): does not chain to the record before it - "
                            "a record before it was replaced or inserted")
        prev_hash, expected_seq = claimed, seq + 1
    head_path = directory / HEAD
    if head_path.exists():
        head = json.loads(head_path.read_text())
        if head["seq"] != expected_seq - 1 or (head["hash"] != prev_hash and not problems):
            problems.append(f"the log ends at seq {expected_seq - 1} but its head records seq {head['seq']}: "
                            "records deleted from (or added to) the end")
    return count, problems


def tail(n: int = 20, home: str | None = None, action: str | None = None) -> list[dict]:
    """The last `n` records (optionally only those whose action starts with `action`)."""
    log = _local_dir(home) / LOG
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if action is None or str(rec.get("action", "")).startswith(action):
            out.append(rec)
    return out[-n:] if n > 0 else out


def format_record(rec: dict) -> str:
    details = " ".join(f"{k}={v}" for k, v in (rec.get("details") or {}).items())
    return (f"{rec.get('seq', '?'):>5} {rec.get('ts', '?')} {rec.get('actor', '?')}: {rec.get('action', '?')} "
            f"{rec.get('target') or '-'} -> {rec.get('outcome', '?')}" + (f"  {details}" if details else ""))


__all__ = ["AuditRecord", "RateLimitedAudit", "default_actor", "format_record", "locked", "record",
           "record_quietly", "tail", "verify"]
