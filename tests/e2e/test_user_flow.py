"""The way a user drives aidc: `ray start`, `ray job submit` (preprocess, train), `serve deploy`, HTTP, then stop."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, free_port, stop_local_ray

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _run(args, env, timeout=600):
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture
def cluster(tmp_path):
    """A head started with `ray start`, with token auth on, like `make demo`; always stopped."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "AIDC_STORAGE": str(tmp_path / "storage")}
    env.pop("RAY_ADDRESS", None)
    # The cluster's own token, 0600, never the user's ~/.ray/auth_token (absent on a fresh machine).
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    dash, gcs = free_port(), free_port()
    # A short temp dir of its own (socket paths must stay under 108 bytes): stopping it ends only this cluster.
    temp_dir = tempfile.mkdtemp(prefix="aidc-e2e-", dir="/tmp")
    _run([BIN / "ray", "start", "--head", f"--port={gcs}", "--num-cpus=4", "--dashboard-host=127.0.0.1",
          f"--dashboard-port={dash}", f"--metrics-export-port={free_port()}", "--disable-usage-stats",
          f"--temp-dir={temp_dir}"], env)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        stop_local_ray(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_jobs_deploy_and_predict_over_http(cluster, tmp_path):
    env, dashboard = cluster
    submit = [BIN / "ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--", "python", "-m"]
    out = _run(submit + ["jobs.preprocess", "--config", "jobs/configs/digits.yaml"], env)
    assert "rows read 1797 = kept 1797 + rejected 0" in out
    out = _run(submit + ["jobs.train", "--config", "jobs/configs/digits.yaml", "--set", "train.epochs=4"], env)
    assert "registered digits-cnn version 1 as digits-cnn@champion" in out

    # The shipped Serve config, on a free port.
    serve_cfg = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    port = free_port()
    serve_cfg["http_options"]["port"] = port
    # The llm app serves shakespeare-gpt, which only `make demo` trains here (tests/integration/test_llm_serving.py
    # covers the llm app); leave it out rather than have Serve retry a replica whose model is missing.
    serve_cfg["applications"] = [a for a in serve_cfg["applications"] if a["name"] != "llm"]
    serve_cfg["grpc_options"]["port"] = free_port()
    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg))
    _run([BIN / "serve", "deploy", str(cfg_path), "--address", dashboard], env)
    url = f"http://127.0.0.1:{port}/digits"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:  # proxy up but replica still starting: refused or timed out
            pass
        time.sleep(2)
    else:
        pytest.fail("Serve app never became healthy:\n" + _run([BIN / "serve", "status", "--address", dashboard], env))

    out = _run([BIN / "aidc", "predict", "--url", f"{url}/predict", "--limit", "170"], env)
    accuracy = float(out.split("accuracy ")[1].split()[0])
    assert accuracy >= 0.9, out
    r = requests.post(f"{url}/predict", json={"instances": [[1, 2]]}, timeout=30)
    assert r.status_code == 422 and "expected 8 rows of 8" in r.json()["error"]["message"]
