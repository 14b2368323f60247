"""API keys on the Serve apps: which routes need which scope, and refusals in each protocol's error shape.

The check itself is aidc.security.auth (an ASGI middleware for HTTP, `grpc_check` for gRPC). An app adds it
with one line at module level, `protect(api, "llm")`, and configures it from its args in the replica:
`ApiKeyAuth.configure("llm", self.args.auth)`. Health and readiness routes and the OpenAPI document stay open.
"""

from __future__ import annotations

import re

from aidc.security.auth import BODY, KEY, MODEL, OPEN, ApiKeyAuth, AuthArgs
from aidc.serving.http import error_body, openai_error_body

DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
_OIP_MODEL = re.compile(r"^/models/(?P<name>[^/]+)(?P<rest>/.*)?$")
_OIP_READY = re.compile(r"^(/versions/[^/]+)?/ready$")
OPENAI_CODES = {401: "invalid_api_key", 403: "model_not_permitted", 429: "rate_limit_exceeded"}


def predictor_policy(path: str) -> str:
    """The JSON predictor: /healthz open; everything else is for the app's one model."""
    return OPEN if path in DOCS or path.rstrip("/") == "/healthz" else MODEL


def oip_policy(path: str) -> str:
    """Open Inference Protocol: health, readiness and server metadata open; /models/{name}/... needs infer:{name}."""
    if path in DOCS or path in ("/", "/health/live", "/health/ready"):  # server metadata: like gRPC ServerMetadata
        return OPEN
    m = _OIP_MODEL.match(path)
    if m:
        return OPEN if _OIP_READY.match(m["rest"] or "") else m["name"]
    return KEY


def openai_policy(path: str) -> str:
    """OpenAI-compatible, under /v1 (and vLLM's tokenizer routes at the root): /health open; /models any key;
    generation/tokenizer routes need the body's model (the app's one model when the body names none)."""
    if path.startswith("/v1/"):
        path = path[3:]
    if path in DOCS or path == "/health":
        return OPEN
    if path in ("/completions", "/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info"):
        return BODY
    return KEY


APPS = {
    "predictor": (predictor_policy, lambda msg, status, reason: error_body(msg, status)),
    "tensors": (oip_policy, lambda msg, status, reason: {"error": msg}),
    "llm": (openai_policy, lambda msg, status, reason: openai_error_body(msg, status, None, OPENAI_CODES.get(status))),
}


def protect(api, app: str) -> None:
    """Add the API-key middleware of app kind `app` (predictor, tensors, llm) to a FastAPI ingress."""
    policy, body = APPS[app]
    api.add_middleware(ApiKeyAuth, name=app, policy=policy, error_body=body)


__all__ = ["APPS", "ApiKeyAuth", "AuthArgs", "oip_policy", "openai_policy", "predictor_policy", "protect"]
