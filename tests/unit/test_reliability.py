"""Node-loss reliability pieces that need no cluster: elastic config defaults, the resize record, the
shared-storage check's single-node path and the client retry policy against a real flaky HTTP server."""

from __future__ import annotations

import http.server
import threading

import pytest

from aidc.config import ELASTIC_MAX_FAILURES, load_config
from aidc.errors import ConfigError
from aidc.train.trainer import resizes
from tests.conftest import CONFIGS


def _cfg(*overrides):
    return load_config(CONFIGS / "digits.yaml", list(overrides))


def test_elastic_runs_get_a_failure_budget_fixed_runs_keep_theirs():
    assert _cfg("resources.num_workers=[1, 4]", "run.max_failures=null").run.max_failures == ELASTIC_MAX_FAILURES
    assert _cfg("resources.num_workers=2", "run.max_failures=null").run.max_failures == 1
    assert _cfg("resources.num_workers=[1, 4]", "run.max_failures=3").run.max_failures == 3  # explicit wins
    assert _cfg("run.max_failures=-1").run.max_failures == -1  # no limit
    cfg = _cfg("resources.custom={pool_a100: 1}", "resources.elastic_resize_interval_s=5")
    assert cfg.resources.custom == {"pool_a100": 1} and cfg.resources.elastic_resize_interval_s == 5
    with pytest.raises(ConfigError, match="resources.num_workers"):
        _cfg("resources.num_workers=[3, 1]")
    with pytest.raises(ConfigError, match="run.max_failures"):
        _cfg("run.max_failures=-2")


def test_elastic_runs_wait_less_for_a_worker_group_on_a_fixed_size_cluster():
    """After a node loss Ray Train may first try the old size (the lost node still counted): an elastic run's
    attempt gives up sooner and is resized from what is free; an explicit bound always wins."""
    from aidc.runtime import ELASTIC_START_TIMEOUT_S, START_TIMEOUT_S, start_timeout_s

    assert start_timeout_s(None) == START_TIMEOUT_S == 180
    assert start_timeout_s(None, elastic=True) == ELASTIC_START_TIMEOUT_S < START_TIMEOUT_S
    assert start_timeout_s(45, elastic=True) == 45


def test_resizes_are_the_restarts_that_changed_the_world_size():
    resumes = [{"epoch": 2, "step": 8, "world_size": 2, "from_world_size": 2},  # a crash, same size
               {"epoch": 3, "step": 12, "world_size": 1, "from_world_size": 2},
               {"epoch": 9, "step": 36, "world_size": 2, "from_world_size": 1},
               {"epoch": 1, "step": 4}]  # a run from before world sizes were recorded
    assert [(r["from_world_size"], r["world_size"]) for r in resizes(resumes)] == [(2, 1), (1, 2)]


def test_shared_storage_check_is_a_no_op_without_a_multi_node_cluster(tmp_path):
    from aidc import storage

    storage.check_shared(str(tmp_path))  # no Ray running: nothing to compare
    storage.check_shared("s3://bucket/aidc")  # object stores are shared by nature
    assert not (tmp_path / storage.SHARED_CHECK_DIR).exists()


class _Flaky(http.server.BaseHTTPRequestHandler):
    plan: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        status = self.plan.pop(0) if self.plan else 200
        if status == "cut":  # a proxy or node gone mid-response: headers sent, the body cut off, connection closed
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"predictions"')
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Flaky.seen.clear()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/predict"
    server.shutdown()


def test_retry_policy_rides_out_5xx_and_429_but_never_retries_a_bad_request(flaky):
    from aidc.serving.retry import retry_policy, retrying_session, run_load

    _, url = flaky
    session = retrying_session(retry_policy(attempts=5, backoff_s=0.01))
    _Flaky.plan[:] = [503, 500, 429, 504]  # 500: what Serve answers when the replica died mid-request
    resp = session.post(url, json={"instances": []})
    assert resp.status_code == 200 and len(_Flaky.seen) == 5 and len(resp.raw.retries.history) == 4
    for status in (422, 404, 401):
        _Flaky.seen.clear()
        _Flaky.plan[:] = [status]
        assert session.post(url, json={}).status_code == status and len(_Flaky.seen) == 1
    _Flaky.plan[:] = [503] * 3
    run = run_load(url, {"instances": []}, clients=3, total=12, policy=retry_policy(attempts=5, backoff_s=0.01))
    assert run.done() == 12 and not run.failed() and sum(s.retries for s in run.samples) == 3


def test_retrying_session_retries_a_response_cut_off_mid_body(flaky):
    """urllib3's Retry ends at the status line; a body lost mid-read is retried by the session too (as openai's)."""
    import requests

    from aidc.serving.retry import retry_policy, retrying_session, run_load

    _, url = flaky
    _Flaky.plan[:] = ["cut", 503, "cut"]
    resp = retrying_session(retry_policy(attempts=5, backoff_s=0.01)).post(url, json={"instances": []})
    assert resp.status_code == 200 and resp.json() == {} and len(_Flaky.seen) == 4
    assert [h.status for h in resp.raw.retries.history] == [None, 503, None]  # the whole story, in order
    _Flaky.plan[:] = ["cut"] * 3  # attempts spent: the caller gets the read error, not a hang or a half body
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        retrying_session(retry_policy(attempts=2, backoff_s=0.01)).post(url, json={})
    _Flaky.plan[:] = ["cut"] * 2
    run = run_load(url, {"instances": []}, clients=2, total=6, policy=retry_policy(attempts=3, backoff_s=0.01))
    # two cuts, two retries: of two requests, or of one that both clients' turns cut (the server's plan is shared)
    retried = [r for s in run.samples if s.retried_for for r in s.retried_for.split("; ")]
    assert not run.failed() and sum(s.retries for s in run.samples) == 2 and len(retried) == 2, retried
    assert all(r.startswith("ProtocolError: ") for r in retried), retried


def test_retry_policy_retries_refused_connections_then_reports_them(tmp_path):
    from aidc.serving.retry import retry_policy, run_load
    from aidc.testing import free_port

    run = run_load(f"http://127.0.0.1:{free_port()}/predict", {}, clients=1, total=1,
                   policy=retry_policy(attempts=2, backoff_s=0.01))
    assert run.done() == 1 and run.failed()[0].status is None and "ConnectionError" in run.failed()[0].error
    (what, n), = run.failure_counts(run.samples[0].start).items()  # as the chaos run and node-loss tests report it
    assert n == 1 and what.startswith("sent +0.0 s after the fault: HTTP None ConnectionError"), what


def test_wait_ready_polls_through_404s_and_says_what_it_last_saw(flaky):
    """A route the proxy does not know yet answers 404 (never retried by the policy): wait_ready polls it."""
    from aidc.serving.retry import wait_ready

    _, url = flaky
    _Flaky.plan[:] = [404, 404, 503]
    wait_ready(url, timeout_s=30, poll_s=0.01)
    assert len(_Flaky.seen) == 4
    _Flaky.plan[:] = [404] * 10_000
    with pytest.raises(TimeoutError, match=r"did not answer 200 within 0 s \(last: HTTP 404"):
        wait_ready(url, timeout_s=0.3, poll_s=0.01)
