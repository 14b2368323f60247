"""Operations without a cluster: the metric catalogue and its recording API, the serving middleware over a
real FastAPI app, the alert rules (promtool check + unit tests), the dashboard's PromQL, `aidc status`
rendering from real-shaped dashboard/Prometheus answers, the Ray log filter, and GPU energy on CPU."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess

import pytest

from aidc.errors import IntegrityError, RequestError
from aidc.ops import metrics
from tests.conftest import REPO

MONITORING = REPO / "platform" / "monitoring"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _promtool(*args: str, cwd=MONITORING) -> str:
    if not shutil.which(PROMTOOL):
        pytest.skip("promtool is not installed: `make setup` installs the Debian prometheus package (as root)")
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# -- the catalogue and its API -----------------------------------------------------------------

def test_catalogue_follows_prometheus_conventions():
    units = ("_total", "_seconds", "_bytes", "_ratio", "_per_second", "_kwh", "_timestamp_seconds")
    for m in metrics.CATALOGUE.values():
        assert re.fullmatch(r"aidc_[a-z0-9_]+", m.name) and m.help.endswith("."), m
        assert (m.kind == "counter") == m.name.endswith("_total"), f"{m.name}: only counters end in _total"
        assert set(m.labels).isdisjoint({"request_id", "user", "key", "path", "prompt"}), m  # bounded labels
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets) and m.buckets, m
            assert m.name.endswith(units) or m.name.endswith("_size"), f"{m.name}: name its unit"
    assert metrics.exported_name("aidc_auth_failures_total") == "ray_aidc_auth_failures_total"


def test_recording_outside_ray_is_a_local_no_crash_and_misuse_is_loud():
    before = metrics.value("aidc_auth_failures_total", app="llm", reason="missing_key")
    metrics.count_auth_failure("llm", "missing_key")
    metrics.inc("aidc_auth_failures_total", 2, app="llm", reason="missing_key")
    assert metrics.value("aidc_auth_failures_total", app="llm", reason="missing_key") == before + 3
    metrics.set_gauge("aidc_train_step", 7, job="j", run="r")
    metrics.set_gauge("aidc_train_step", 9, job="j", run="r")
    assert metrics.value("aidc_train_step", job="j", run="r") == 9
    metrics.observe("aidc_train_checkpoint_save_seconds", 0.5, job="j")
    assert metrics.value("aidc_train_checkpoint_save_seconds", "count", job="j") >= 1
    with pytest.raises(ValueError, match="unknown"):
        metrics.inc("aidc_auth_failures_total", app="llm", user="alice")
    with pytest.raises(KeyError, match="CATALOGUE"):
        metrics.inc("aidc_made_up_total")
    with pytest.raises(TypeError, match="is a gauge"):
        metrics.inc("aidc_train_step", job="j", run="r")


def test_model_load_counts_integrity_failures_with_a_bounded_reason():
    def failures(reason):
        return metrics.value("aidc_model_integrity_failures_total", model="digits-cnn", reason=reason)

    before = failures("modified"), failures("manifest")
    exc = IntegrityError("weights.safetensors changed")
    exc.reason = "modified"  # set by aidc.security.signing
    with pytest.raises(IntegrityError), metrics.model_load("digits-cnn@champion"):
        raise exc
    with pytest.raises(IntegrityError), metrics.model_load("digits-cnn/3"):
        raise IntegrityError("x fails its sha256 check")
    assert (failures("modified"), failures("manifest")) == (before[0] + 1, before[1] + 1)
    ok = metrics.value("aidc_model_loads_total", model="spam", outcome="ok")
    with metrics.model_load("spam"):
        pass
    assert metrics.value("aidc_model_loads_total", model="spam", outcome="ok") == ok + 1


# -- serving middleware over a real FastAPI app ------------------------------------------------

def _asgi_call(app, method: str, path: str) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": [], "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5)}

    async def run():
        try:
            await app(scope, receive, send)
        except RuntimeError:
            pass  # an unhandled error is re-raised by Starlette after the 500 is sent

    asyncio.run(run())
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_request_middleware_labels_route_model_version_and_code():
    from fastapi import FastAPI

    from aidc.ops.serving import RequestMetrics, grpc_request, tag_request

    api = FastAPI()
    api.add_middleware(RequestMetrics)

    @api.get("/models/{name}/infer")
    def infer(name: str):
        tag_request(name, "3")
        return {"ok": True}

    @api.get("/predict")
    def predict():
        tag_request("digits-cnn", "1")
        raise RuntimeError("boom")

    def count(**labels):
        base = {"app": "", "protocol": "http", "version": "", "model": ""}
        return metrics.value("aidc_serve_requests_total", **{**base, **labels})

    before = count(model="spam", version="3", route="/models/{name}/infer", code="200")
    assert _asgi_call(api, "GET", "/models/spam/infer") == 200
    assert count(model="spam", version="3", route="/models/{name}/infer", code="200") == before + 1
    before = count(model="digits-cnn", version="1", route="/predict", code="500")
    assert _asgi_call(api, "GET", "/predict") == 500
    assert count(model="digits-cnn", version="1", route="/predict", code="500") == before + 1
    before = count(route="unmatched", code="404")
    assert _asgi_call(api, "GET", "/nope/123") == 404  # raw paths never become labels
    assert count(route="unmatched", code="404") == before + 1

    async def grpc(fail):
        with grpc_request("ModelInfer"):
            tag_request("spam", "2")
            if fail:
                raise RequestError("unknown model", status=404)

    before = count(protocol="grpc", route="ModelInfer", model="spam", version="2", code="404")
    with pytest.raises(RequestError):
        asyncio.run(grpc(True))
    asyncio.run(grpc(False))
    assert count(protocol="grpc", route="ModelInfer", model="spam", version="2", code="404") == before + 1
    assert count(protocol="grpc", route="ModelInfer", model="spam", version="2", code="200") >= 1


# -- alert rules and dashboards ---------------------------------------------------------------

def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    assert "SUCCESS" in _promtool("check", "rules", "alerts.yml")
    out = _promtool("test", "rules", "alerts_test.yml", "alerts_data_test.yml")
    assert out.count("SUCCESS") == 2, out
    # every alert has a firing and a non-firing case in the test file
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = [t for f in ("alerts_test.yml", "alerts_data_test.yml")
             for t in yaml.safe_load((MONITORING / f).read_text())["tests"]]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in alerts:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine) and any(not c["exp_alerts"] for c in mine), name


def _dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "dashboards" / "aidc.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_dashboard_panel_parses_and_names_only_defined_metrics(tmp_path):
    import yaml

    exprs = _dashboard_exprs()
    assert len(exprs) > 30
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel:expr_{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in _promtool("check", "rules", str(tmp_path / "panels.yml"), cwd=tmp_path)
    # the platform metrics the dashboard and the rules name exist in the catalogue (no drift)
    text = "\n".join(exprs) + (MONITORING / "alerts.yml").read_text()
    used = set(re.findall(r"ray_(aidc_[a-z0-9_]+?)(?:_bucket|_count|_sum)?\b", text))
    defined = set(metrics.CATALOGUE)
    assert used <= defined, sorted(used - defined)


# -- aidc status --------------------------------------------------------------------------------

NODE_ID = "42c85265244188cb24c31d7c8f600bdb9ee6cfb07a3917f9735454ce"
SNAPSHOT = {  # shapes as Ray 2.60's dashboard and Prometheus answer them
    "dashboard": "http://127.0.0.1:8265", "errors": [],
    "nodes": {"summary": [{"hostname": "vm", "ip": "192.0.2.2", "cpu": 41.0, "mem": [25276510208, 17633386496, 30.2,
                                                                                    7643123712],
                           "raylet": {"nodeId": NODE_ID, "isHeadNode": True, "state": "ALIVE",
                                      "resourcesTotal": {"CPU": 4.0, "memory": 12426903552.0, "GPU": 1.0}}}],
              "nodeLogicalResources": {NODE_ID: "2.5/4.0 CPU\n1.0/1.0 GPU\n1.5GiB/11.57GiB memory\n"
                                                "0B/4.96GiB object_store_memory"}},
    "jobs": [{"submission_id": "raysubmit_abc", "status": "RUNNING", "entrypoint": "python -m jobs.train --config x"},
             {"submission_id": "raysubmit_old", "status": "FAILED", "entrypoint": "python -m jobs.tune", "end_time": 5}],
    "serve": {"tensors": {"status": "RUNNING", "route_prefix": "/v2", "deployments": {
        "TensorIngress": {"status": "HEALTHY", "replicas": [{"state": "RUNNING"}]},
        "digits-cnn-v1": {"status": "UNHEALTHY", "message": "replica failed its health check",
                          "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]}}}},
    "prometheus": {"url": "http://prom:9090",
                   "request_rate": [({"app": "tensors"}, 12.5)], "error_rate": [({"app": "tensors"}, 0.25)],
                   "train_epoch": [({"job": "digits", "run": "digits-1"}, 3.0)],
                   "train_step": [({"job": "digits", "run": "digits-1"}, 120.0)],
                   "train_running": [({"job": "digits", "run": "digits-1"}, 1.0)],
                   "tune_trials": [({"sweep": "s1", "state": "running"}, 2.0), ({"sweep": "s1", "state": "stopped"}, 3.0)],
                   "alerts": [{"labels": {"alertname": "AidcModelIntegrityFailure", "severity": "page",
                                          "model": "spam", "reason": "modified"},
                               "annotations": {"summary": "Model spam failed its integrity check (modified)"},
                               "state": "firing"}]},
}


def test_status_renders_one_screen():
    from aidc.cli.status import parse_usage, render

    assert parse_usage("1.5GiB/11.57GiB memory\n0.5/2.0 CPU")["memory"] == (1.5 * 2**30, 11.57 * 2**30)
    screen = render(SNAPSHOT)
    lines = screen.splitlines()
    node = next(line for line in lines if "(head)" in line)
    assert "2.5/4" in node and "1/1" in node and "1.5G/11.6G" in node and "ALIVE" in node
    assert any("raysubmit_abc" in line and "RUNNING" in line for line in lines)
    assert any("training digits run digits-1: epoch 3, step 120" in line for line in lines)
    assert any("s1: running 2, stopped 3" in line for line in lines)
    app = next(line for line in lines if line.strip().startswith("tensors"))
    assert "RUNNING" in app and "2/3" in app and "12.50" in app and "0.25" in app
    assert any("digits-cnn-v1: UNHEALTHY replica failed its health check" in line for line in lines)
    assert "ALERTS FIRING: 1" in screen and "[page] AidcModelIntegrityFailure model=spam, reason=modified" in screen

    bare = render({**SNAPSHOT, "prometheus": None, "serve": None, "errors": ["serve: connection refused"]})
    assert "AIDC_PROMETHEUS_URL" in bare and "ALERTS" not in bare and "UNAVAILABLE" in bare
    assert "serve: connection refused" in bare


def test_status_command_says_what_is_unreachable(capsys):
    from aidc.testing import free_port

    from aidc.cli import main

    assert main(["status", "--address", f"http://127.0.0.1:{free_port()}"]) == 1
    out = capsys.readouterr().out
    assert "UNAVAILABLE" in out and "Traceback" not in out
    # nothing listening: one line naming what to start, not a connection error per section
    assert out.count("no Ray dashboard answers at") == 1 and "make head" in out and "jobs:" not in out, out


# -- logs and energy ----------------------------------------------------------------------------

def test_the_state_api_warning_is_filtered_and_nothing_else():
    from aidc.ops.logs import CLEANER_LOGGER, quiet_ray_workers

    quiet_ray_workers()
    quiet_ray_workers()  # idempotent: one filter
    log = logging.getLogger(CLEANER_LOGGER)
    assert len(log.filters) == 1

    records: list[str] = []

    class Kept(logging.Handler):  # on the logger itself: whether Ray's "ray" logger propagates to the root varies
        def emit(self, record):
            records.append(record.getMessage())

    kept, level = Kept(), log.level
    log.addHandler(kept)
    log.setLevel(logging.WARNING)
    try:
        log.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
                    "Continuing to monitor.")
        log.warning("Detected that the Ray Train controller actor (x) is dead.")
    finally:
        log.removeHandler(kept)
        log.setLevel(level)
    assert records == ["Detected that the Ray Train controller actor (x) is dead."]


def test_gpu_energy_is_absent_cleanly_without_a_gpu():
    import torch

    from aidc.ops.energy import GpuEnergy

    kwh = GpuEnergy().kwh()
    if torch.cuda.is_available():
        assert kwh is not None and kwh >= 0
    else:
        assert kwh is None


def test_sweep_trials_are_counted_by_state():
    from types import SimpleNamespace

    from aidc.ops.tuning import TrialStateMetrics

    cb = TrialStateMetrics("unit-sweep", epochs=4)
    trials = [SimpleNamespace(trial_id=f"t{i}", last_result={}) for i in range(4)]
    for t in trials:
        cb.on_trial_start(0, trials, t)
    assert metrics.value("aidc_tune_trials", sweep="unit-sweep", state="running") == 4
    trials[0].last_result = {"epoch": 3}  # ran every epoch
    trials[1].last_result = {"epoch": 0}  # ASHA stopped it after its first epoch
    cb.on_trial_complete(1, trials, trials[0])
    cb.on_trial_complete(1, trials, trials[1])
    cb.on_trial_error(1, trials, trials[2])
    cb.on_experiment_end(trials)
    counts = {s: metrics.value("aidc_tune_trials", sweep="unit-sweep", state=s)
              for s in ("running", "completed", "stopped", "errored")}
    assert counts == {"running": 1, "completed": 1, "stopped": 1, "errored": 1}


def test_model_flops_utilization_uses_the_gpu_peak():
    from aidc.train.telemetry import model_flops_utilization, peak_flops

    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Unknown GPU") is None
    # a 100M-parameter model at 200k tokens/s on one H100: 6 * 1e8 * 2e5 / 989e12 = 12%
    assert model_flops_utilization(100_000_000, 200_000, 989e12) == pytest.approx(0.1213, abs=1e-3)


def test_tensors_grpc_methods_are_counted_with_their_status():
    """The tensors app's gRPC wrapper (no Serve needed): a RequestError becomes the gRPC status and is counted."""
    from serve_apps.tensors import TensorIngress

    from aidc.ops.serving import tag_request
    from aidc.serving.oip_grpc import pb

    class Context:  # what grpc gives the servicer: set_code / set_details
        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    async def unknown_model():
        tag_request("nope")
        raise RequestError("model 'nope' is not served here", status=404)

    def count():
        return metrics.value("aidc_serve_requests_total", app="", model="nope", version="", protocol="grpc",
                             route="ModelInfer", code="404")

    grpc_call = TensorIngress.func_or_class._grpc
    before, ctx = count(), Context()
    reply = asyncio.run(grpc_call(ctx, pb.ModelInferResponse, unknown_model))
    assert isinstance(reply, pb.ModelInferResponse) and ctx.code.name == "NOT_FOUND" and "nope" in ctx.details
    assert count() == before + 1
