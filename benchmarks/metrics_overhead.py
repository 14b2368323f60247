"""What the platform's metrics cost: aidc.ops.metrics against the bare library call, and the serving
middleware against an uninstrumented app, side by side in one process.

- record: microseconds per counter increment / histogram observation through `aidc.ops.metrics` (catalogue
  lookup, label check, local table, then Ray) against `ray.util.metrics` directly, inside a local Ray.
- middleware: microseconds per request of a FastAPI app called over ASGI (no network), with and without
  `RequestMetrics` (labels, timer, two records per request).

    python -m benchmarks.metrics_overhead [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from benchmarks.common import local_ray


def _per_call_us(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def record_us(n: int) -> dict:
    from ray.util.metrics import Counter, Histogram

    from aidc.ops import metrics

    raw_c = Counter("bench_raw_total", "raw", tag_keys=("app", "reason"))
    raw_h = Histogram("bench_raw_seconds", "raw", boundaries=metrics.LATENCY_S, tag_keys=("job",))
    tags = {"app": "bench", "reason": "missing_key"}
    return {
        "aidc_inc_us": round(_per_call_us(lambda: metrics.inc("aidc_auth_failures_total", **tags), n), 2),
        "ray_inc_us": round(_per_call_us(lambda: raw_c.inc(1, tags=tags), n), 2),
        "aidc_observe_us": round(_per_call_us(
            lambda: metrics.observe("aidc_train_checkpoint_save_seconds", 0.1, job="bench"), n), 2),
        "ray_observe_us": round(_per_call_us(lambda: raw_h.observe(0.1, tags={"job": "bench"}), n), 2),
    }


def _app(instrumented: bool):
    from fastapi import FastAPI

    from aidc.ops.serving import RequestMetrics, tag_request

    api = FastAPI()
    if instrumented:
        api.add_middleware(RequestMetrics)

    @api.get("/models/{name}/infer")
    async def infer(name: str):
        tag_request(name, "1")
        return {"ok": True}

    return api


def middleware_us(n: int) -> dict:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "path": "/models/m/infer", "raw_path": b"/models/m/infer", "query_string": b"", "headers": [],
             "scheme": "http", "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def loop(app, count):
        for _ in range(count):
            await app(dict(scope), receive, send)

    out = {}
    for name, app in (("bare", _app(False)), ("instrumented", _app(True))):
        asyncio.run(loop(app, 10))
        t = time.perf_counter()
        asyncio.run(loop(app, n))
        out[f"{name}_request_us"] = round((time.perf_counter() - t) / n * 1e6, 1)
    out["added_us_per_request"] = round(out["instrumented_request_us"] - out["bare_request_us"], 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="Few calls (smoke test).")
    a = p.parse_args(argv)
    n = 500 if a.quick else 20000
    with local_ray(1):
        result = {"record": record_us(n), "middleware": middleware_us(n // 5)}
    print(json.dumps(result), flush=True)
    rec = result["record"]
    print(f"aidc.ops.metrics inc {rec['aidc_inc_us']} us vs ray.util.metrics {rec['ray_inc_us']} us "
          f"({rec['aidc_inc_us'] / max(rec['ray_inc_us'], 1e-9):.2f}x); middleware adds "
          f"{result['middleware']['added_us_per_request']} us per request", flush=True)
    return result


if __name__ == "__main__":
    main()
