"""What every Serve app shares over HTTP: the app-args base, body limits, JSON decoding, error bodies per protocol
(OpenAI's envelope, OIP's, the predictor's) and Retry-After. Bad input is a 4xx JSON error that names the problem."""

from __future__ import annotations

import json
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from aidc.errors import RequestError
from aidc.security.auth import AuthArgs


class Strict(BaseModel):
    """Arguments and bodies that refuse unknown fields (a typo is an error, never silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class AppArgs(Strict):
    """What every app's `args:` block has: where the registry is, the largest body, API keys."""

    tracking_uri: Optional[str] = Field(None, description="MLflow registry; default sqlite under $AIDC_STORAGE.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (413 above).")
    auth: AuthArgs = Field(default_factory=AuthArgs, description="API keys (aidc keys); on unless enabled: false.")


def retry_after(status: int) -> Optional[dict]:
    """The Retry-After header of an answer a client should retry (429 queue full, 503 not available now)."""
    return {"Retry-After": "1"} if status in (429, 503) else None


# The OpenAI error envelope's type and code by status (the llm app; OpenAI's own values)
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "timeout_error",
                      413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                      500: "server_error", 503: "server_error"}
OPENAI_ERROR_CODES = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}


def openai_error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code or OPENAI_ERROR_CODES.get(status)}}


class BodyLimit:
    """ASGI middleware: a body over `max_body_bytes` (by its Content-Length) gets 413 before any parsing.
    The limit is a class attribute the Serve replica sets from its args (one app per replica process)."""

    max_body_bytes = 1_000_000

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        length = dict(scope.get("headers") or []).get(b"content-length") if scope["type"] == "http" else None
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            body = json.dumps(openai_error_body(f"request body is {int(length)} bytes, over the limit of "
                                                f"{self.max_body_bytes}; send fewer or shorter prompts", 413)).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def error_body(message: str, status: int, field: str | None = None) -> dict:
    return {"error": {"status": status, "message": message, **({"field": field} if field else {})}}


def check_body_size(size: int, max_bytes: int, hint: str = "") -> None:
    """413 for a body over the app's limit (max_body_bytes), saying what to send instead."""
    if size > max_bytes:
        raise RequestError(f"request body is {size} bytes, over the limit of {max_bytes}" + (f"; {hint}" if hint else ""),
                           status=413)


def parse_json(raw: bytes, constant_status: int) -> object:
    """JSON text -> value; 400 for what is not JSON, `constant_status` for NaN/Infinity literals (json.loads
    takes them; a request must not: 422 in the predictor's API, 400 in the Open Inference Protocol's)."""
    def reject(name: str):
        raise RequestError(f"{name} is not allowed in requests: send finite numbers", status=constant_status)

    try:
        return json.loads(raw, parse_constant=reject)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", status=400) from None


def parse_json_body(raw: bytes, max_bytes: int) -> dict:
    """Decode a JSON object body, refusing oversized, non-JSON and non-object bodies."""
    check_body_size(len(raw), max_bytes)
    if not raw.strip():
        raise RequestError('empty request body; send JSON like {"instances": [...]}', status=400)
    body = parse_json(raw, constant_status=422)
    if not isinstance(body, dict):
        raise RequestError('request body must be a JSON object like {"instances": [...]}', status=422)
    return body


def require(body: dict, key: str, allowed: set[str]):
    unknown = set(body) - allowed
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}", field=sorted(unknown)[0])
    if key not in body:
        raise RequestError(f"missing field {key!r}", field=key)
    return body[key]


__all__ = ["error_body", "parse_json_body", "require"]
