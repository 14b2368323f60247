"""A real fault pages someone: `ray start` cluster -> Serve app -> a tampered model in the registry ->
Prometheus (scraping Ray's service-discovery file, evaluating platform/monitoring/alerts.yml as shipped)
-> Alertmanager -> a webhook receiver in this test.

The fault: a registered model version's weights are changed on disk after registration. The `tensors` app
serves it multiplexed (loaded on first request, in a live replica); the load refuses it (signature and
sha256 manifest), aidc.ops.metrics counts the integrity failure, and AidcModelIntegrityFailure must reach
the webhook. Along the way Prometheus must also see the request metrics of the real HTTP traffic.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import BIN, REPO, free_port, ray_head, run_cli

pytestmark = pytest.mark.e2e
RULES = REPO / "platform" / "monitoring" / "alerts.yml"


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    pytest.skip(f"{names[0]} is not installed: `make setup` installs the Debian prometheus packages (as root)")


def _wait(what: str, check, timeout: float = 180, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class Webhook:
    """Alertmanager's webhook receiver: collects every notification body it is sent."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str) -> list[dict]:
        return [a for body in self.received for a in body["alerts"] if a["labels"].get("alertname") == name]


@pytest.fixture
def cluster(tmp_path):
    """A head started with `ray start` (token auth on, metrics on a free port); always stopped."""
    with ray_head(tmp_path, num_cpus=2, prefix="aidc-alert-", timeout=300) as head:
        yield head


def _register_tiny_models(storage: Path, monkeypatch) -> Path:
    """Two registered, signed image models (untrained weights: this test is about the alert path); returns
    the weights file of `tampered`'s registered version."""
    import torch

    from aidc.models import SmallCNN
    from aidc.registry import WEIGHTS, export_model_dir, register_model_dir, resolve, tracking_uri

    monkeypatch.setenv("AIDC_STORAGE", str(storage))
    spec = {"task": "image_classification", "model": {"arch": "cnn", "channels": [8], "hidden": 16, "dropout": 0.1},
            "features": {"image_shape": [8, 8], "num_classes": 10, "raw_range": [0.0, 16.0]},
            "transform": {"standardize": {"mean": 4.0, "std": 6.0}}}
    for name in ("healthy", "tampered"):
        torch.manual_seed(0)
        d = storage.parent / name
        export_model_dir(d, state_dict=SmallCNN(image_size=8, channels=[8], hidden=16).state_dict(), spec=spec,
                         config_yaml=f"name: {name}\n")
        register_model_dir(d, name, "champion")
    mv = resolve("tampered@champion", tracking_uri())
    weights = Path(mv.source.removeprefix("file://")) / WEIGHTS
    assert weights.is_file(), mv.source
    return weights


def test_a_tampered_model_pages_through_prometheus_and_alertmanager(cluster, tmp_path, monkeypatch):
    env, dashboard, ray_temp = cluster
    weights = _register_tiny_models(Path(env["AIDC_STORAGE"]), monkeypatch)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # the fault: weights changed after signing

    http = free_port()
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": http},
        "applications": [{"name": "tensors", "route_prefix": "/v2", "import_path": "serve_apps.tensors:app_builder",
                          "args": {"auth": {"enabled": False},
                                   "multiplexed": {"models": ["healthy", "tampered"],
                                                   "deployment": {"num_cpus": 0.2}}},
                          "deployments": [{"name": "TensorIngress", "ray_actor_options": {"num_cpus": 0.1}}]}],
    }))
    run_cli([BIN / "serve", "deploy", str(serve_config), "--address", dashboard], env, timeout=300)
    url = f"http://127.0.0.1:{http}/v2"
    _wait("the tensors app", lambda: _get(f"{url}/health/ready") == 200, timeout=240)

    webhook = Webhook()
    am_port, prom_port = free_port(), free_port()
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "test", "group_by": ["alertname", "model"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "test", "webhook_configs": [{"url": webhook.url, "send_resolved": True}]}],
    }))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],  # the production rules, as shipped
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [
            {"files": [str(ray_temp / "session_latest" / "prom_metrics_service_discovery.json")]}]}],
    }))
    procs = [
        subprocess.Popen([_binary("alertmanager", "prometheus-alertmanager"),
                          f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
                          f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "alertmanager.log", "w")),
        subprocess.Popen([_binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w")),
    ]
    prom = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        _wait("Prometheus to load the shipped rules", lambda: _rules_loaded(prom), timeout=60)
        # Real traffic: the healthy model answers; the tampered one is refused when the replica loads it.
        image = {"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}]}
        ok = requests.post(f"{url}/models/healthy/infer", json=image, timeout=60)
        assert ok.status_code == 200, ok.text
        refused = requests.post(f"{url}/models/tampered/infer", json=image, timeout=60)
        assert refused.status_code >= 400, refused.text

        # The integrity failure pages (no `for:` on that rule) with the model and a bounded reason.
        fired = _wait("AidcModelIntegrityFailure at the webhook",
                      lambda: [a for a in webhook.alerts("AidcModelIntegrityFailure") if a["status"] == "firing"],
                      timeout=180)
        labels = fired[0]["labels"]
        assert labels["model"] == "tampered" and labels["severity"] == "page", labels
        assert labels["reason"] in {"modified", "manifest", "signature"}, labels
        assert "tampered" in fired[0]["annotations"]["summary"]
        assert not [a for a in webhook.alerts("AidcModelIntegrityFailure") if a["labels"]["model"] == "healthy"]

        # Prometheus scraped the request metrics of that traffic, by app, model, protocol, route and code.
        series = _query(prom, 'ray_aidc_serve_requests_total{app="tensors", route="/models/{name}/infer"}',
                        lambda found: {s["metric"]["model"] for s in found} >= {"healthy", "tampered"})
        by_model = {s["metric"]["model"]: s["metric"] for s in series}
        assert by_model["healthy"]["code"] == "200" and by_model["healthy"]["protocol"] == "http", series
        assert by_model["tampered"]["code"] == str(refused.status_code), series
        loads = {(s["metric"]["model"], s["metric"]["outcome"]) for s in _query(prom, "ray_aidc_model_loads_total")}
        assert {("healthy", "ok"), ("tampered", "integrity")} <= loads, loads

        # The operator's screen shows the node, the app with its replicas and rate, and the firing alert.
        screen = run_cli([BIN / "aidc", "status", "--address", dashboard, "--prometheus",
                          f"http://127.0.0.1:{prom_port}"], env, timeout=300)
        assert "(head)" in screen and "ALIVE" in screen, screen
        app_line = next(line for line in screen.splitlines() if line.strip().startswith("tensors"))
        assert "RUNNING" in app_line and "2/2" in app_line, screen
        assert "AidcModelIntegrityFailure" in screen and "model=tampered" in screen, screen
        assert "UNAVAILABLE" not in screen, screen
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        webhook.server.shutdown()
        subprocess.run([BIN / "serve", "shutdown", "-y", "--address", dashboard], env=env, capture_output=True,
                       timeout=120)


def _get(url: str) -> int:
    try:
        return requests.get(url, timeout=10).status_code
    except requests.RequestException:
        return 0


def _rules_loaded(prom: str) -> bool:
    try:
        groups = requests.get(f"{prom}/rules", timeout=5).json()["data"]["groups"]
    except (requests.RequestException, ValueError, KeyError):
        return False
    return any(r.get("name") == "AidcModelIntegrityFailure" for g in groups for r in g["rules"])


def _query(prom: str, expr: str, enough=bool) -> list[dict]:
    def run():
        result = requests.get(f"{prom}/query", params={"query": expr}, timeout=10).json()["data"]["result"]
        return result if enough(result) else None

    return _wait(f"Prometheus to return {expr}", run, timeout=60)
