"""The client retry policy the platform recommends, and a small load generator that uses it.

A replica or node that dies under load costs a few requests an error the client can safely retry: the
proxy answers 503 while no replica can take the request (or when a replica is shedding load), a
connection can be reset while a proxy or node goes away, and a request that was inside a replica when
its process or node died gets a 500 (Ray Serve's proxy maps the replica's death, RayActorError, to 500:
seen in tests/cluster). The `openai` client retries connection errors, 408, 429 and every 5xx with
exponential backoff; plain HTTP clients should do the same. Predictions are idempotent, so POSTs are
retried too. The policy is urllib3's `Retry` (what `requests` uses), configured here once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# 503: no replica available / shedding load (Serve's backpressure); 502/504: a proxy lost its upstream;
# 500: also what a request gets when its replica dies mid-request; 408: Serve's request timeout; 429 carries
# Retry-After, honoured. As the openai client does. Never other 4xx (a bad request): retrying cannot help.
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


def retry_policy(attempts: int = 8, backoff_s: float = 0.1, backoff_max_s: float = 5.0):
    """urllib3 Retry: connection errors and RETRY_STATUSES, exponential backoff with jitter, Retry-After honoured.

    With the defaults a request keeps trying for ~15 s in all (0.1, 0.2, 0.4, ... capped at 5 s), enough
    to ride out a replica restart; raise `attempts` where a node must come back first. A genuine server
    bug (a 500 every time) thus costs the caller those ~15 s before it sees the error.
    """
    from urllib3.util.retry import Retry

    return Retry(
        total=attempts, connect=attempts, read=attempts, status=attempts, other=0,
        status_forcelist=RETRY_STATUSES, allowed_methods=None,  # None: POST too (predictions are idempotent)
        backoff_factor=backoff_s, backoff_max=backoff_max_s, backoff_jitter=backoff_s,
        respect_retry_after_header=True, raise_on_status=False,
    )


def retrying_session(policy=None, pool_size: int = 4):
    """A requests.Session that retries with `policy` (default: retry_policy()).

    Also retried, as the `openai` client does: a connection lost while the response body is being read (urllib3's
    Retry covers the request and the status line only; a proxy or node going away mid-response otherwise reaches
    the caller as ChunkedEncodingError). Those are retried up to the policy's attempts, with its backoff.
    """
    import requests

    session = requests.Session()
    adapter = _body_retrying_adapter()(max_retries=policy or retry_policy(), pool_connections=pool_size,
                                   pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@functools.cache
def _body_retrying_adapter():
    """HTTPAdapter that also retries a response body cut off mid-read (built on first use: requests is lazy here)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.exceptions import ProtocolError

    class BodyRetryingAdapter(HTTPAdapter):
        def send(self, request, stream=False, **kwargs):
            retries = self.max_retries
            while True:
                resp = super().send(request, stream=stream, **kwargs)
                if stream:
                    return resp
                try:
                    resp.content  # noqa: B018 - read the body here, where a lost connection can still be retried
                except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                    resp.close()
                    if resp.raw is not None and resp.raw.retries is not None:  # what this attempt retried itself
                        retries = retries.new(history=retries.history + resp.raw.retries.history)
                    try:  # raises once the attempts are spent; then the caller sees the read error
                        retries = retries.increment(request.method, request.url, error=ProtocolError(str(exc)))
                    except Exception:  # noqa: BLE001 - attempts spent
                        raise exc from None
                    logger.debug("retrying %s %s: connection lost mid-response (%s)", request.method, request.url, exc)
                    retries.sleep()
                    continue
                if retries.history and resp.raw is not None and resp.raw.retries is not None:  # one history in all
                    resp.raw.retries = resp.raw.retries.new(history=retries.history + resp.raw.retries.history)
                return resp

    return BodyRetryingAdapter


def wait_ready(url: str, timeout_s: float = 120.0, poll_s: float = 0.25, headers: dict | None = None,
               verify: bool | str = True) -> float:
    """Poll GET `url` (a freshly deployed app's health route, through the proxy) until it answers 200;
    returns the seconds waited.

    `serve deploy` returns before the application is up, and the proxies learn routes from Serve's controller
    asynchronously (HAProxy, Serve's ingress here, after a config reload): until the proxy routes the app its
    path answers 404 "Path not found", which no retrying client retries (a 404 is the caller's mistake). Wait
    on this, a readiness probe, before sending traffic to an app that was just deployed. `verify`: as in
    `requests` (a CA bundle or certificate path for HTTPS).
    """
    import requests

    start = time.monotonic()
    last = "no answer yet"
    while True:
        try:
            resp = requests.get(url, headers=headers, timeout=min(10.0, timeout_s), verify=verify)
            if resp.status_code == 200:
                return time.monotonic() - start
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"[:300]
        if time.monotonic() - start >= timeout_s:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s (last: {last}); is the app "
                               "deployed and RUNNING (`serve status`), and is this its route prefix?")
        time.sleep(poll_s)


@dataclass
class Sample:
    start: float  # time.monotonic() when the request was sent
    end: float
    status: int | None  # final HTTP status; None when it never got one (the error says why)
    retries: int = 0
    error: str | None = None
    retried_for: str | None = None  # what the retried attempts got ("HTTP 500; ProtocolError ..."), if any

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LoadRun:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self) -> int:
        return len(self.samples)

    def failed(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    def failure_counts(self, t_fault: float) -> dict[str, int]:
        """Failed requests counted by when they were sent (seconds after `t_fault`), final status and error."""
        from collections import Counter

        return dict(Counter(f"sent {s.start - t_fault:+.1f} s after the fault: HTTP {s.status} {s.error or ''}"[:240]
                            for s in self.failed()))

    def window(self, t0: float, t1: float) -> list[Sample]:
        """Requests in flight at some point in [t0, t1]."""
        return [s for s in self.samples if s.end >= t0 and s.start <= t1]


def _retried_for(history) -> str | None:
    """urllib3's retry history in a line: the status or error each retried attempt got."""
    return "; ".join(f"HTTP {h.status}" if h.status else f"{type(h.error).__name__}: {h.error}"[:120]
                     for h in history) or None


def run_load(url: str, body: dict, *, clients: int, total: int | None = None, headers: dict | None = None,
             policy=None, timeout_s: float = 60.0, pace_s: float = 0.0, stop: threading.Event | None = None,
             run: LoadRun | None = None) -> LoadRun:
    """POST `body` to `url` from `clients` threads, each with its own retrying session, `total` times in all
    or until `stop` is set; each client waits `pace_s` between its requests.

    Pass a LoadRun to watch progress from another thread (run.done()) while this call blocks.
    """
    run = run or LoadRun()
    counter = iter(range(total)) if total is not None else iter(int, 1)  # iter(int, 1): endless zeros
    counter_lock = threading.Lock()

    def client() -> None:
        session = retrying_session(policy, pool_size=1)
        while not (stop and stop.is_set()):
            with counter_lock:
                if next(counter, None) is None:
                    break
            if pace_s:
                time.sleep(pace_s)
            t0 = time.monotonic()
            try:
                resp = session.post(url, json=body, headers=headers, timeout=timeout_s)
                history = resp.raw.retries.history if resp.raw is not None and resp.raw.retries else ()
                sample = Sample(t0, time.monotonic(), resp.status_code, len(history),
                                None if resp.ok else resp.text[:200], _retried_for(history))
            except Exception as exc:  # noqa: BLE001 - a failed request is a result here, not a crash
                sample = Sample(t0, time.monotonic(), None, 0, f"{type(exc).__name__}: {exc}"[:300])
            with run.lock:
                run.samples.append(sample)
        session.close()

    threads = [threading.Thread(target=client, name=f"load-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = run.failed()
    if failed:
        logger.warning("%d of %d requests failed; first: %s", len(failed), len(run.samples), failed[0].error)
    return run
