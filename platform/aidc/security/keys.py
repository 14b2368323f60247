"""API keys: random 256-bit secrets handed out once and stored only as sha256 digests.

A key reads `aidc_<id>_<secret>`: the id finds the record, the secret's sha256 is compared in constant
time. sha256, not scrypt/argon2: those slow down guessing *low-entropy passwords*; a 256-bit random
secret cannot be guessed, and a slow hash would cost milliseconds on every request on every replica.
Scopes: `infer:<model>` (one registered model name), `infer:*` (every model), `admin` (everything,
including `aidc keys` on a running system), and the job roles the tenancy gateway checks (`aidc.tenancy`):
`viewer` (list and read its team's jobs and logs), `developer` (viewer + submit and stop its team's jobs),
`deployer` (serve deploys and registry aliases). A key may belong to a team (`team`); job roles need one,
except `admin`. Records live in `<security home>/api_keys.json`.
"""

from __future__ import annotations

import hmac
import hashlib
import json
import re
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from aidc import storage
from aidc.errors import AidcError, ConfigError
from aidc.security import audit, security_home

KEYS_FILE = "api_keys.json"
PREFIX = "aidc_"
_SCOPE = re.compile(r"^(admin|viewer|developer|deployer|infer:\*|infer:[A-Za-z0-9_.-]+)$")
TEAM_ROLES = ("viewer", "developer", "deployer")  # roles on a team's jobs: the key needs a team
#: what each role may do with jobs (the gateway's check); admin does everything on every team's jobs
_ROLE_RIGHTS = {"viewer": {"read"}, "developer": {"read", "submit"}, "deployer": {"read", "deploy"},
                "admin": {"read", "submit", "deploy", "admin"}}
_TEAM = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def team_problem(name: str) -> str | None:
    """What is wrong with a team name, or None (keys, rate limits and the tenancy gateway's teams share it)."""
    if _TEAM.match(name or ""):
        return None
    return f"bad team name {name!r}: lowercase letters, digits, - and _, up to 40, e.g. vision"
_KEY = re.compile(r"^aidc_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{20,})$")


class KeyRecord(BaseModel):
    """What the store keeps about a key (never the key itself)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., description="Public key id (the part after aidc_); safe to log.")
    owner: str = Field(..., description="Who the key belongs to (person, team or service).")
    scopes: list[str] = Field(..., description="infer:<model>, infer:*, admin, or a job role: viewer, developer, "
                              "deployer.")
    team: str | None = Field(None, description="The team the key belongs to (its jobs, quota and priority); "
                             "null: no team (inference-only keys and cluster admins).")
    sha256: str = Field(..., description="Hex sha256 of the whole key string.")
    created_at: str = Field(..., description="ISO 8601 UTC.")
    created_by: str = Field(..., description="OS user (or key owner) that created it.")
    expires_at: str | None = Field(None, description="ISO 8601 UTC after which the key is refused; null: never.")
    revoked_at: str | None = Field(None, description="ISO 8601 UTC when revoked; null: active.")
    rate_limit: float | None = Field(None, gt=0, description="Requests per second per replica; null: no limit.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once above the rate (default 2x rate).")

    def allows(self, model: str | None) -> bool:
        """Whether the scopes cover a request for `model` (None: a request that names no model)."""
        if "admin" in self.scopes or "infer:*" in self.scopes:
            return True
        if model is None:
            return any(s.startswith("infer:") for s in self.scopes)
        return f"infer:{model}" in self.scopes

    def can(self, right: str) -> bool:
        """Whether the key's roles grant a job right: read, submit, deploy or admin."""
        return any(right in _ROLE_RIGHTS.get(s, ()) for s in self.scopes)

    def state(self, now: datetime | None = None) -> str:
        now = now or datetime.now(timezone.utc)
        if self.revoked_at:
            return "revoked"
        if self.expires_at and datetime.fromisoformat(self.expires_at) <= now:
            return "expired"
        return "active"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def keys_path(home: str | None = None) -> str:
    return storage.join(security_home(home), KEYS_FILE)


class TeamLimit(BaseModel):
    """A team's inference rate limit: every key of the team together, per replica of each Serve app."""

    model_config = ConfigDict(extra="forbid")
    rate_limit: float = Field(..., gt=0, description="Requests per second per replica for all the team's keys.")
    burst: int | None = Field(None, ge=1, description="Requests at once above the rate (default 2x rate).")


def parse_store(text: str) -> dict[str, KeyRecord]:
    return {k: KeyRecord.model_validate(v) for k, v in json.loads(text).get("keys", {}).items()}


def parse_team_limits(text: str) -> dict[str, TeamLimit]:
    return {k: TeamLimit.model_validate(v) for k, v in json.loads(text).get("team_limits", {}).items()}


def load(home: str | None = None) -> dict[str, KeyRecord]:
    path = keys_path(home)
    return parse_store(storage.read_text(path)) if storage.exists(path) else {}


def _update(home: str | None, change, limits=None) -> KeyRecord:
    """Read-modify-write the store under a lock (local/NFS) so concurrent `aidc keys` calls cannot lose a key.
    `change(records)` edits the key records; `limits(team_limits)`, if given, the team limits."""
    path = keys_path(home)

    def rewrite():
        text = storage.read_text(path) if storage.exists(path) else "{}"
        records, team_limits = parse_store(text), parse_team_limits(text)
        rec = change(records)
        if limits is not None:
            rec = limits(team_limits)
        # a key without a team is written as before teams existed, so older readers (extra="forbid") still load it
        storage.write_text(path, json.dumps({"keys": {k: v.model_dump(exclude={"team"} if v.team is None else None)
                                                      for k, v in records.items()},
                                             "team_limits": {k: v.model_dump() for k, v in team_limits.items()}},
                                            indent=1))
        return rec

    if storage.is_uri(path):
        return rewrite()
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with audit.locked(Path(path + ".lock")):
        rec = rewrite()
        Path(path).chmod(0o600)
    return rec


def set_team_limit(team: str, rate_limit: float | None, burst: int | None = None, *, home: str | None = None,
                   actor: str | None = None) -> TeamLimit | None:
    """Set (or with rate_limit None, remove) a team's inference rate limit, shared by all its keys."""
    if team_problem(team):
        raise ConfigError(team_problem(team))

    def apply(team_limits):
        if rate_limit is None:
            team_limits.pop(team, None)
            return None
        team_limits[team] = TeamLimit(rate_limit=rate_limit, burst=burst)
        return team_limits[team]

    out = _update(home, lambda records: None, apply)
    audit.record("team.rate_limit", target=team, actor=actor, home=home,
                 details={"rate_limit": rate_limit, "burst": burst})
    return out


def validate_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if not _SCOPE.match(s)]
    if bad or not scopes:
        raise ConfigError(f"bad scope(s) {bad or scopes}: use infer:<model name> (infer:digits-cnn), infer:*, admin "
                          "or a job role (viewer, developer, deployer)")
    return sorted(set(scopes))


def create(owner: str, scopes: list[str], *, expires_in_s: float | None = None, rate_limit: float | None = None,
           burst: int | None = None, home: str | None = None, actor: str | None = None,
           team: str | None = None) -> tuple[str, KeyRecord]:
    """A new key: (the key - shown once, never stored - , its record)."""
    if not owner.strip():
        raise ConfigError("a key needs an owner: --owner alice (a person, team or service)")
    scopes = validate_scopes(scopes)
    if team is not None and team_problem(team):
        raise ConfigError(team_problem(team))
    if team is None and any(s in TEAM_ROLES for s in scopes):
        raise ConfigError(f"job roles {scopes} act on a team's jobs: give the key a team (--team vision)")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = f"{PREFIX}{key_id}_{secret}"
    actor = actor or audit.default_actor()
    rec = KeyRecord(id=key_id, owner=owner, scopes=scopes, sha256=hashlib.sha256(key.encode()).hexdigest(),
                    created_at=_now().isoformat(), created_by=actor,
                    expires_at=(_now() + timedelta(seconds=expires_in_s)).isoformat() if expires_in_s else None,
                    rate_limit=rate_limit, burst=burst, team=team)

    def add(records):
        records[key_id] = rec
        return rec

    _update(home, add)
    audit.record("key.create", target=key_id, actor=actor, home=home,
                 details={"owner": owner, "scopes": scopes, "team": team, "expires_at": rec.expires_at,
                          "rate_limit": rate_limit})
    return key, rec


def revoke(key_id: str, *, home: str | None = None, actor: str | None = None) -> KeyRecord:
    key_id = key_id.removeprefix(PREFIX).split("_")[0]  # accept the id, or a whole key pasted by mistake

    def mark(records):
        if key_id not in records:
            raise AidcError(f"no key with id {key_id!r}; see aidc keys list")
        old = records[key_id]
        records[key_id] = old.model_copy(update={"revoked_at": old.revoked_at or _now().isoformat()})
        return records[key_id]

    rec = _update(home, mark)
    audit.record("key.revoke", target=key_id, actor=actor, home=home, details={"owner": rec.owner})
    return rec


class KeyRefused(AidcError):
    """A presented key is unknown, malformed, revoked or expired (reason says which)."""

    def __init__(self, message: str, reason: str = "invalid_key", key_id: str | None = None):
        super().__init__(message)
        self.reason, self.key_id = reason, key_id

    def __reduce__(self):
        return (type(self), (self.message, self.reason, self.key_id))


def key_id(key: str) -> str | None:
    """The public id inside a well-formed key, else None."""
    m = _KEY.match(key or "")
    return m["id"] if m else None


def authenticate(records: dict[str, KeyRecord], key: str) -> KeyRecord:
    """The record of a valid, active key, or KeyRefused (its message never contains the key)."""
    m = _KEY.match(key or "")
    if not m:
        raise KeyRefused("malformed API key: expected aidc_<id>_<secret> (create one with aidc keys create)",
                         "malformed_key")
    rec = records.get(m["id"])
    if rec is None or not hmac.compare_digest(rec.sha256, hashlib.sha256(key.encode()).hexdigest()):
        raise KeyRefused(f"unknown API key (id {m['id']}); create one with aidc keys create", "unknown_key", m["id"])
    state = rec.state()
    if state != "active":
        raise KeyRefused(f"API key {rec.id} is {state}; ask an admin for a new one (aidc keys create)", state, rec.id)
    return rec


__all__ = ["TEAM_ROLES", "KeyRecord", "KeyRefused", "TeamLimit", "authenticate", "create", "key_id", "keys_path",
           "load", "parse_store", "parse_team_limits", "revoke", "set_team_limit", "team_problem", "validate_scopes"]
