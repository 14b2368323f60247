"""The way a user drives aidc: `ray start`, `ray job submit` (preprocess, train), `serve deploy` over HTTPS with an API
key, HTTP, the audit trail, then stop."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from aidc.serving.retry import wait_ready
from tests.conftest import BIN, REPO, free_port, ray_head
from tests.conftest import run_cli as _run

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path):
    """A head started with `ray start`, with token auth on, like `make demo`; always stopped. Serve's own proxy
    rather than HAProxy: this flow serves HTTPS from Serve's http_options, which Ray's HAProxy ingress lacks
    (README, Security)."""
    no_haproxy = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    with ray_head(tmp_path, num_cpus=4, prefix="aidc-e2e-", ray_env=no_haproxy) as (env, dashboard, _):
        yield env, dashboard


def test_submit_jobs_deploy_and_predict_over_http(cluster, tmp_path):
    env, dashboard = cluster
    submit = [BIN / "ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--", "python", "-m"]
    for attempt in range(12):  # a head that just started may not have its job agent yet ("No available agent")
        proc = subprocess.run(submit + ["jobs.preprocess", "--config", "jobs/configs/digits.yaml"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout or attempt == 11:
            break
        time.sleep(10)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
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
    cert = _self_signed_cert(tmp_path)  # HTTPS: Serve's http_options TLS settings, a certificate made here
    serve_cfg["http_options"].update(ssl_keyfile=str(tmp_path / "tls.key"), ssl_certfile=str(cert))
    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg))
    _run([BIN / "serve", "deploy", str(cfg_path), "--address", dashboard], env)
    url = f"https://127.0.0.1:{port}/digits"
    try:  # proxy up but replica still starting: refused, timed out or 404 until the proxy routes the app
        wait_ready(f"{url}/healthz", timeout_s=180, poll_s=2, verify=str(cert))
    except TimeoutError as exc:
        pytest.fail(f"Serve app never became healthy: {exc}\n"
                    + _run([BIN / "serve", "status", "--address", dashboard], env))

    # API keys are on in the shipped config: a key made with the CLI, sent by `aidc predict` ($AIDC_API_KEY)
    key = _run([BIN / "aidc", "keys", "create", "--owner", "e2e", "--scope", "infer:digits-cnn", "--quiet"],
               env).split()[0]
    client_env = {**env, "AIDC_API_KEY": key, "REQUESTS_CA_BUNDLE": str(cert)}
    out = _run([BIN / "aidc", "predict", "--url", f"{url}/predict", "--limit", "170"], client_env)
    accuracy = float(out.split("accuracy ")[1].split()[0])
    assert accuracy >= 0.9, out
    r = requests.post(f"{url}/predict", json={"instances": [[1, 2]]}, timeout=30, verify=cert,
                      headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 422 and "expected 8 rows of 8" in r.json()["error"]["message"]
    r = requests.post(f"{url}/predict", json={"instances": [[1, 2]]}, timeout=30, verify=cert)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    with pytest.raises(requests.RequestException):  # plain HTTP on the TLS port gets no HTTP answer
        requests.get(f"http://127.0.0.1:{port}/digits/healthz", timeout=10)

    # The cluster's own API: a job submitted without the cluster token is refused (the ones above carried it)
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    refused = subprocess.run([BIN / "ray", "job", "submit", "--address", dashboard, "--no-wait", "--", "true"],
                             cwd=REPO, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert any(w in (refused.stdout + refused.stderr).lower() for w in ("401", "unauthenticated", "token")), refused

    # The audit trail, written by the jobs, the Serve controller, the replicas and the CLI into one chain
    out = _run([BIN / "aidc", "audit", "verify"], env)
    assert "hash chain intact" in out
    trail = _run([BIN / "aidc", "audit", "tail", "-n", "100"], env)
    for event in ("job.start python -m jobs.preprocess", "job.start python -m jobs.train",
                  "model.register digits-cnn/1", "serve.deploy predictor", "key.create", "auth.denied predictor"):
        assert event in trail, trail


def _self_signed_cert(directory: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (key in directory/tls.key, 0600)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "tls.key").chmod(0o600)
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "tls.crt"


def test_make_demo_head_on_a_machine_that_never_ran_ray(tmp_path):
    """Issue #23: `make demo`'s first step with a HOME that has no ~/.ray (a new user's machine): the cluster
    token is created 0600 and announced, the head starts with token auth, a job goes through, a second run
    reuses the running head, and after `make stop` the next start reuses the token."""
    import os
    import stat

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    real_pip = [p for p in (Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf") if p.is_file()]
    env.update(HOME=str(home), AIDC_STORAGE=str(tmp_path / "storage"),
               **({"PIP_CONFIG_FILE": str(real_pip[0])} if real_pip else {}))  # the machine's package index
    dash, gcs, metrics, agent = free_port(), free_port(), free_port(), free_port()
    # the job agent's port too: another Ray on this host may hold Ray's default (52365)
    ports = [f"DASHBOARD_PORT={dash}", f"DEMO_GCS_PORT={gcs}", f"METRICS_PORT={metrics}", f"DASHBOARD_AGENT_PORT={agent}"]
    token = home / ".ray" / "auth_token"
    try:
        out = _run(["make", "--no-print-directory", "head", *ports], env, timeout=300)
        assert f"created the cluster token in {token} (mode 0600" in out and "started" in out, out
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        first = token.read_text()
        headers = {"Authorization": f"Bearer {first}"}
        assert requests.get(f"http://127.0.0.1:{dash}/api/version", headers=headers, timeout=10).ok
        submit = [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
                  "--", "python", "-m", "jobs.preprocess", "--config", "jobs/configs/digits.yaml"]
        job_env = {**env, "RAY_AUTH_MODE": "token"}
        for attempt in range(12):  # a head that just started may not have its job agent yet
            proc = subprocess.run(submit, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=600)
            if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr or attempt == 11:
                break
            time.sleep(10)
        assert proc.returncode == 0 and "rows read 1797" in proc.stdout + proc.stderr, proc.stderr[-3000:]
        out = _run(["make", "--no-print-directory", "head", *ports], env, timeout=120)
        assert "already on" in out and "reusing it" in out, out
        _run(["make", "--no-print-directory", "stop", *ports], env, timeout=120)
        out = _run(["make", "--no-print-directory", "head", *ports], env, timeout=300)
        assert f"cluster token: {token}" in out and "started" in out and token.read_text() == first, out
    finally:
        _run(["make", "--no-print-directory", "stop", *ports], env, timeout=120)
