"""Serving metrics for every protocol: requests by app, model, version, protocol, route and status code;
latency histograms; batch sizes.

Hooks, one line each:
- HTTP (any Serve ingress FastAPI app): `api.add_middleware(RequestMetrics)`.
- gRPC servicer methods: `with grpc_request("ModelInfer") as call: ...`: the code is a raised RequestError's
  status, 500 for other exceptions, or `call["code"] = status` for an error answered without raising.
- Whoever learns which model/version answers (a data plane, a handler): `tag_request(model, version)`.
- A batched model call: `observe_batch(model, version, size)`.

Labels stay bounded: the route is FastAPI's path template (`/models/{name}/infer`), never the raw path.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager

from aidc.ops import metrics

_request: contextvars.ContextVar[dict | None] = contextvars.ContextVar("aidc_request_labels", default=None)


_app_name: str | None = None


def app_name() -> str:
    """The Serve application this replica belongs to ('' outside Serve); a replica never changes app."""
    global _app_name
    if _app_name is None:
        try:
            from ray import serve

            _app_name = serve.get_replica_context().app_name or ""
        except Exception:  # noqa: BLE001 - outside a replica
            _app_name = ""
    return _app_name


def tag_request(model: str, version: str | None = None) -> None:
    """Label the current request with the model (and version) that answers it; a no-op outside a request."""
    labels = _request.get()
    if labels is not None:
        labels["model"] = str(model)
        if version is not None:
            labels["version"] = str(version)


def _record(labels: dict, protocol: str, route: str, code: int | str, seconds: float) -> None:
    app = app_name()
    metrics.inc("aidc_serve_requests_total", app=app, model=labels.get("model", ""),
                version=labels.get("version", ""), protocol=protocol, route=route, code=str(code))
    metrics.observe("aidc_serve_request_duration_seconds", seconds, app=app, model=labels.get("model", ""),
                    protocol=protocol, route=route)


class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request (streams: until the last byte is sent)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        labels: dict = {}
        token = _request.set(labels)
        status = {"code": 500}
        start = time.perf_counter()

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            _request.reset(token)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if "model" not in labels and "name" in scope.get("path_params", {}):
                labels["model"] = scope["path_params"]["name"]
            _record(labels, "http", route, status["code"], time.perf_counter() - start)


@contextmanager
def grpc_request(method: str):
    """Count and time one gRPC call; the HTTP-equivalent status: a RequestError's, 500 for anything else."""
    labels: dict = {}
    token = _request.set(labels)
    start, code = time.perf_counter(), 200
    try:
        yield labels
    except Exception as exc:
        code = getattr(exc, "status", 500)
        raise
    finally:
        _request.reset(token)
        _record(labels, "grpc", method, labels.pop("code", code), time.perf_counter() - start)


def observe_batch(model: str, version: str, size: int) -> None:
    """One model call ran `size` requests together (dynamic batching)."""
    metrics.observe("aidc_serve_batch_size", size, app=app_name(), model=model, version=version)
