"""Helpers shared by the benchmarks: a fresh local Ray per measurement, timing, peak RSS sampling."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
# The datasets the benchmarks read: $AIDC_DATA_MIRROR when it is a local folder (as the loaders read it), else
# ../shared/data beside the checkout.
_MIRROR = os.environ.get("AIDC_DATA_MIRROR", "")
SHARED_DATA = Path(_MIRROR).resolve() if _MIRROR and "://" not in _MIRROR else ROOT.parent / "shared" / "data"


def percentile_ms(seconds: list[float], q: float, digits: int = 1) -> float | None:
    """The q-th percentile of latencies in seconds, in milliseconds (numpy's linear interpolation); None for no
    samples. The one latency statistic of every benchmark."""
    import numpy as np

    return round(float(np.percentile(seconds, q)) * 1000, digits) if len(seconds) else None


async def closed_loop(concurrency: int, send, *, todo: list | None = None, seconds: float | None = None,
                      ready=None, **session) -> float:
    """The one load driver of the serving benchmarks: `concurrency` clients over one aiohttp session, each
    sending its next request when its last is answered (a closed loop), until `todo` is empty or for `seconds`.
    `await send(session, item)` makes one request (item: the next of `todo`, else None) and records what it
    measures; `await ready(session)` (warm-up, waiting for other client processes) runs before the clock
    starts. `session`: aiohttp.ClientSession arguments. Returns the loop's wall seconds."""
    import asyncio

    import aiohttp

    if (todo is None) == (seconds is None):
        raise ValueError("closed_loop: give either todo (a work list) or seconds (a time window)")
    async with aiohttp.ClientSession(**session) as client:
        if ready is not None:
            await ready(client)
        start = time.perf_counter()
        end = start + (seconds or 0.0)

        async def one_client():
            while todo if todo is not None else time.perf_counter() < end:
                await send(client, todo.pop() if todo is not None else None)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.perf_counter() - start


def gpu_split(gpus: float, users: int) -> float:
    """Each of `users` replicas' GPU when they share `gpus`: aidc.runtime.gpu_share for whole GPUs (so every one
    can be placed), a fraction of one GPU split evenly and rounded down to Ray's unit (1e-4)."""
    from aidc.runtime import gpu_share

    return gpu_share(int(gpus), users) if gpus >= 1 else math.floor(gpus / users * 1e4) / 1e4


@contextlib.contextmanager
def local_ray(num_cpus: float, **kwargs):
    import ray

    from aidc.runtime import apply_ray_env, ensure_token

    apply_ray_env()  # the environment every aidc Ray runs with (aidc.runtime.RAY_ENV)
    ensure_token()  # else Ray's embedded init writes ~/.ray/auth_token world-readable (issue #23)
    # A whole number: ray.init(num_cpus=4.0) left the raylet dead at start (<defunct>, "node timed out during
    # startup") on a 16-core GPU machine; an int started it there every time.
    num_cpus = int(num_cpus) if float(num_cpus).is_integer() else num_cpus
    # address="local": a fresh Ray even when another one runs on this host (else ray.init would join it)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


class PeakRSS:
    """Samples the resident memory of this process and of Ray's worker processes (by name)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.driver, self.workers, self._stop = interval, 0, 0, threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray::" in (p.info["name"] or "") or "ray::" in cmd or "default_worker.py" in cmd:
                    self.workers = max(self.workers, p.info["memory_info"].rss if p.info["memory_info"] else 0)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


_KEY = None


def api_key_header() -> dict:
    """A fresh API key for the benchmark client (the apps require one; made once per process)."""
    from aidc.security.keys import create

    global _KEY
    if _KEY is None:
        _KEY = create("benchmarks", ["infer:*"])[0]
    return {"Authorization": f"Bearer {_KEY}"}
