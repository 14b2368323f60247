"""HTTP request parsing and error bodies: bad input is a 4xx JSON error that names the problem."""

from __future__ import annotations

import json

from aidc.errors import RequestError


def error_body(message: str, status: int, field: str | None = None) -> dict:
    return {"error": {"status": status, "message": message, **({"field": field} if field else {})}}


def parse_json_body(raw: bytes, max_bytes: int) -> dict:
    """Decode a JSON object body, refusing oversized, non-JSON and non-object bodies."""
    if len(raw) > max_bytes:
        raise RequestError(f"request body is {len(raw)} bytes, over the limit of {max_bytes}", status=413)
    if not raw.strip():
        raise RequestError('empty request body; send JSON like {"instances": [...]}', status=400)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", status=400) from None
    if not isinstance(body, dict):
        raise RequestError('request body must be a JSON object like {"instances": [...]}', status=422)
    return body


def _reject_constant(name: str) -> float:
    """json.loads accepts NaN/Infinity literals; a prediction request must not."""
    raise RequestError(f"{name} is not allowed in requests: send finite numbers", status=422)


def require(body: dict, key: str, allowed: set[str]):
    unknown = set(body) - allowed
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}", field=sorted(unknown)[0])
    if key not in body:
        raise RequestError(f"missing field {key!r}", field=key)
    return body[key]


__all__ = ["error_body", "parse_json_body", "require"]
