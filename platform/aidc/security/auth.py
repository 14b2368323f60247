"""API-key checks for every Serve app: one ASGI middleware for HTTP, one call for gRPC servicer methods.

A request carries `Authorization: Bearer <key>` (HTTP header or gRPC metadata). The key store is re-read
from the security home at most every `refresh_s` seconds (when its file changed), so a key revoked with
`aidc keys revoke` stops working on every replica within seconds, without a redeploy. Refusals: 401
(no key, unknown, revoked, expired), 403 (the key's scopes do not cover the model), 429 + Retry-After
(the key's rate limit) - in each protocol's own error shape. Failures are counted, logged with the key
id only (never the key), and written to the audit log at a bounded rate.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from aidc import storage
from aidc.errors import GRPC_CODES, AidcError
from aidc.ops.metrics import count_auth_failure
from aidc.security import audit, keys

logger = logging.getLogger(__name__)


class AuthArgs(BaseModel):
    """The `auth:` block of a Serve app's args. On unless a config turns it off."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Require an API key on inference routes (health routes stay open).")
    refresh_s: float = Field(2.0, gt=0, le=300, description="Re-read the key store at most this often (revocation "
                             "takes effect within about this long on every replica).")
    audit_interval_s: float = Field(10.0, ge=0, description="At most one audit record per app, reason and key id "
                                    "this often per replica (the rest are counted into it).")


class AuthError(AidcError):
    """A request refused by auth: status 401, 403 or 429, a bounded reason, Retry-After seconds for 429."""

    def __init__(self, message: str, status: int = 401, reason: str = "missing_key", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after

    def __reduce__(self):
        return (type(self), (self.message, self.status, self.reason, self.retry_after))


class _Bucket:
    """Token bucket: `rate` requests per second, `burst` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), time.monotonic()

    def take(self) -> float:
        """0 when the request may go, else the seconds until a token is free."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Principal:
    """Who a request runs as, once its key checked out."""

    key_id: str
    owner: str
    scopes: list[str]


class Guard:
    """The key check of one app in one replica process: cached key store, scopes, per-key rate limits."""

    def __init__(self, app: str, args: AuthArgs | None = None, home: str | None = None, model: str | None = None):
        self.app, self.args, self.home, self.model = app, args or AuthArgs(), home, model
        self._records: dict[str, keys.KeyRecord] = {}
        self._team_limits: dict[str, keys.TeamLimit] = {}
        self._stamp: tuple | None = None
        self._checked = -math.inf
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._audit = audit.RateLimitedAudit(self.args.audit_interval_s)

    def _store(self, force: bool = False) -> dict[str, keys.KeyRecord]:
        """The key records, re-read when older than refresh_s (or forced: a key id not seen yet) and changed."""
        now = time.monotonic()
        if not force and now - self._checked < self.args.refresh_s:
            return self._records
        with self._lock:
            if not force and now - self._checked < self.args.refresh_s:
                return self._records
            path = keys.keys_path(self.home)
            try:
                stamp = None if storage.is_uri(path) else storage.file_stamp(path)  # replaced atomically
                if stamp is None or stamp != self._stamp:
                    text = storage.read_text(path)
                    self._records, self._team_limits = keys.parse_store(text), keys.parse_team_limits(text)
                    self._stamp = stamp
            except FileNotFoundError:
                self._records, self._stamp = {}, None
            except Exception as exc:  # a half-written or unreadable store: keep the last good copy, retry soon
                logger.error("cannot read the API key store %s (keeping the last copy): %s", path, exc)
            self._checked = now
        return self._records

    def check(self, authorization: str | None, model: str | None) -> Principal | None:
        """The caller's principal, or AuthError. `model`: the registered model the request is for (None: none)."""
        if not self.args.enabled:
            return None
        try:
            return self._check(authorization, model)
        except AuthError as exc:
            self._refused(exc, model)
            raise

    def authenticate(self, authorization: str | None) -> keys.KeyRecord:
        """The record of the key in an `Authorization: Bearer <key>` header, or AuthError (401)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not authorization:
            raise AuthError("missing API key: send the header 'Authorization: Bearer <key>' "
                            "(create a key with: aidc keys create --owner you --scope infer:*)", 401, "missing_key")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: use 'Authorization: Bearer <key>'", 401, "malformed_key")
        try:
            records = self._store()
            if keys.key_id(token.strip()) not in records:  # a key created since the last read works at once
                records = self._store(force=True)
            return keys.authenticate(records, token.strip())
        except keys.KeyRefused as exc:
            err = AuthError(exc.message, 401, exc.reason)
            err.key_id = exc.key_id
            raise err from None

    def _check(self, authorization: str | None, model: str | None) -> Principal:
        rec = self.authenticate(authorization)
        if not rec.allows(model):
            err = AuthError(f"API key {rec.id} (owner {rec.owner}) may not use model {model!r}: its scopes are "
                            f"{rec.scopes}; ask for a key with scope infer:{model} or infer:*", 403, "scope")
            err.key_id = rec.id
            raise err
        team = self._team_limits.get(rec.team) if rec.team else None
        for who, limit, burst, bucket_id in ((f"API key {rec.id}", rec.rate_limit, rec.burst, rec.id),
                                             (f"team {rec.team}", team and team.rate_limit, team and team.burst,
                                              f"team:{rec.team}")):
            if not limit:
                continue
            with self._lock:
                bucket = self._buckets.get(bucket_id)
                if bucket is None or bucket.rate != limit:
                    bucket = self._buckets[bucket_id] = _Bucket(limit, burst or max(1, int(2 * limit)))
                wait = bucket.take()
            if wait > 0:
                err = AuthError(f"{who} is over its rate limit of {limit:g} requests/s; retry after "
                                f"{math.ceil(wait)} s", 429, "rate_limited", max(1, math.ceil(wait)))
                err.key_id = rec.id
                raise err
        return Principal(rec.id, rec.owner, rec.scopes)

    def _refused(self, exc: AuthError, model: str | None) -> None:
        key_id = getattr(exc, "key_id", None)
        count_auth_failure(self.app, exc.reason)
        logger.warning("auth refused on %s: %s (key %s, model %s)", self.app, exc.reason, key_id or "-", model)
        self._audit(f"{self.app}/{exc.reason}/{key_id}", "auth.denied", target=self.app, outcome="denied",
                    actor=f"key:{key_id}" if key_id else "anonymous", home=self.home,
                    details={"reason": exc.reason, "status": exc.status, "model": model})


# ---- HTTP: one ASGI middleware -------------------------------------------------------------------------------

#: what a route needs: OPEN (no key), KEY (any valid key), BODY (the JSON body's "model"), MODEL (the app's one
#: model, set by configure(model=...)), or a model name
OPEN, KEY, BODY, MODEL = "\0open", "\0key", "\0body", "\0model"


class ApiKeyAuth:
    """ASGI middleware in front of a Serve app's FastAPI ingress.

    api.add_middleware(ApiKeyAuth, app="llm", policy=route_policy, error_body=lambda msg, status, reason: {...})
    `policy(path)` (path relative to the app's route prefix) returns OPEN, KEY, BODY or a model name. The
    replica configures it from its args once: `ApiKeyAuth.configure("llm", args.auth)`.
    """

    guards: dict[str, Guard] = {}
    max_body_bytes = 64 << 20

    def __init__(self, app, *, name: str, policy: Callable[[str], str], error_body: Callable[[str, int, str], dict]):
        self.app, self.name, self.policy, self.error_body = app, name, policy, error_body

    @classmethod
    def configure(cls, name: str, args: AuthArgs | dict | None = None, home: str | None = None,
                  model: str | None = None) -> Guard:
        """Set this process's guard for app `name`; `model`: the one model an app serves (policy MODEL)."""
        if isinstance(args, BaseModel):
            args = args.model_dump()
        cls.guards[name] = Guard(name, AuthArgs.model_validate(args or {}), home, model)
        return cls.guards[name]

    @classmethod
    def guard_for(cls, name: str) -> Guard:
        if name not in cls.guards:
            cls.configure(name)  # not configured: secure by default
        return cls.guards[name]

    def guard(self) -> Guard:
        return self.guard_for(self.name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        need = self.policy(path or "/")
        if need == OPEN or scope.get("method") == "OPTIONS" or not self.guard().args.enabled:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        model, replay = None, receive
        if need == BODY:
            body, replay = await _buffer(receive, self.max_body_bytes)
            if body is None:
                msg = f"request body over {self.max_body_bytes} bytes"
                return await _send_json(send, 413, self.error_body(msg, 413, "too_large"), None)
            model = _body_model(body) or self.guard().model  # no model named: the app's one model, if it has one
        elif need == MODEL:
            model = self.guard().model
        elif need != KEY:
            model = need
        try:
            principal = self.guard().check(headers.get("authorization"), model)
        except AuthError as exc:
            return await _send_json(send, exc.status, self.error_body(exc.message, exc.status, exc.reason),
                                    exc.retry_after)
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, replay, send)


async def _buffer(receive, limit: int):
    """Read the whole request body (up to `limit`), and a receive() that replays it to the app."""
    chunks, size, more = [], 0, True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        size += len(chunks[-1])
        more = msg.get("more_body", False) and size <= limit
    if size > limit:
        return None, receive
    body, sent = b"".join(chunks), False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _body_model(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None


async def _send_json(send, status: int, body: dict, retry_after: int | None) -> None:
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="aidc"'))
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


# ---- gRPC ------------------------------------------------------------------------------------------------------

def grpc_check(guard: Guard, grpc_context, model: str | None) -> bool:
    """Check a gRPC call's key; on refusal set UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED with the
    message on the context and return False (the servicer then answers an empty message)."""
    import grpc

    try:
        guard.check(grpc_authorization(grpc_context), model)
        return True
    except AuthError as exc:
        if grpc_context is None:
            raise
        grpc_context.set_code(getattr(grpc.StatusCode, GRPC_CODES[exc.status]))
        grpc_context.set_details(exc.message)
        return False


def grpc_authorization(grpc_context) -> str | None:
    """The `authorization` metadata of a gRPC call (Serve's RayServegRPCContext or a plain grpc context)."""
    if grpc_context is None:
        return None
    for k, v in grpc_context.invocation_metadata() or ():
        if k.lower() == "authorization":
            return v
    return None


__all__ = ["BODY", "KEY", "MODEL", "OPEN", "ApiKeyAuth", "AuthArgs", "AuthError", "Guard", "Principal",
           "grpc_authorization", "grpc_check"]
