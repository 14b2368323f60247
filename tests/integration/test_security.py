"""API keys on every Serve app (JSON predictor, OIP REST + gRPC, OpenAI-compatible) on the shared local Ray,
driven over real HTTP/gRPC and with the official openai client: no key, wrong scope, revoked key and good
key on every inference endpoint; revocation within seconds without a redeploy; per-key rate limits; a
tampered model version refused before it loads; the audit trail of it all; a fuzz run with a key."""

from __future__ import annotations

import time

import grpc
import openai
import pytest
import requests

from aidc.cli import main as aidc_main
from aidc.registry import register_model_dir, tracking_uri
from aidc.security import audit, keys
from aidc.testing import free_port, make_tiny_gpt2, serve_shutdown, serve_start
from tests.security_helpers import bearer, make_key

pytestmark = pytest.mark.integration
DIGITS, GPT = "sec-digits", "sec-gpt2"
AUTH = {"refresh_s": 0.5}  # re-read the key store every 0.5 s (default 2 s)
IMAGE = [[float((r * 8 + c) % 16) for c in range(8)] for r in range(8)]


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def models(root, tmp_path_factory):
    """Untrained digits-shaped CNNs (auth does not depend on the weights; no preprocessing or training to wait
    for) registered twice - v2 is tampered with below - and a tiny GPT-2 imported for the llm app."""
    import torch

    from aidc.registry import export_model_dir
    from aidc.tasks import get_task

    spec = {"task": "image_classification", "model": {"arch": "cnn", "channels": [8], "hidden": 16, "dropout": 0.0},
            "features": {"image_shape": [8, 8], "num_classes": 10, "raw_range": [0, 16]},
            "transform": {"standardize": {"mean": 4.9, "std": 6.0}, "augment": {"enabled": False}}}
    torch.manual_seed(0)
    model = get_task(spec["task"]).build_model(spec["model"], spec["features"])
    folder = tmp_path_factory.mktemp("cnn") / "model"
    export_model_dir(folder, state_dict=model.state_dict(), spec=spec, config_yaml="test: true\n")
    v1 = register_model_dir(folder, DIGITS, "champion", root=root)
    v2 = register_model_dir(folder, DIGITS, "candidate", root=root)
    folder = make_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny", n_positions=64, n_embd=64, n_head=2)
    assert aidc_main(["model", "import", str(folder), "--name", GPT, "--alias", "imported", "--storage", root]) == 0
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def server(models, root):
    from ray import serve

    from aidc.serving.oip_grpc import SERVICER
    from serve_apps.llm import app_builder as llm
    from serve_apps.predictor import app_builder as predictor
    from serve_apps.tensors import app_builder as tensors

    http, grpc_port = free_port(), free_port()
    serve_start(http_options={"host": "127.0.0.1", "port": http},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]})
    uri = tracking_uri(None, root)
    try:
        serve.run_many([  # all three at once: run_many waits for every one
            serve.RunTarget(predictor({"model": models["v1"].ref, "tracking_uri": uri, "auth": AUTH}), name="sd",
                            route_prefix="/sd"),
            serve.RunTarget(tensors({"tracking_uri": uri, "auth": AUTH, "models": [
                {"name": DIGITS, "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
                 "deployment": {"num_cpus": 0.2}}]}), name="tensors", route_prefix="/v2"),
            serve.RunTarget(llm({"models": [f"{GPT}@imported"], "tracking_uri": uri, "auth": AUTH,
                                 "defaults": {"max_num_seqs": 4, "num_cpus": 0.5}}), name="llm", route_prefix="/")])
        yield {"url": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc_port}", "uri": uri}
    finally:
        serve_shutdown()


@pytest.fixture(scope="module")
def keyring(server):
    revoked = make_key("infer:*", owner="leaver")
    keys.revoke(revoked.split("_")[1])
    return {"good": make_key(f"infer:{DIGITS}", f"infer:{GPT}", owner="app-team"),
            "wrong": make_key("infer:someone-elses-model", owner="other-team"), "revoked": revoked}


INFER = {"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": sum(IMAGE, [])}]}
# (app, method, path, body, needs the model's scope): every inference route of every app
ENDPOINTS = [
    ("predictor", "POST", "/sd/predict", {"instances": [IMAGE]}, True),
    ("predictor", "GET", "/sd/metadata", None, True),
    ("tensors", "GET", f"/v2/models/{DIGITS}", None, True),
    ("tensors", "POST", f"/v2/models/{DIGITS}/infer", INFER, True),
    ("tensors", "POST", f"/v2/models/{DIGITS}/versions/1/infer", INFER, True),
    ("llm", "GET", "/v1/models", None, False),
    ("llm", "POST", "/v1/completions", {"model": GPT, "prompt": "ab", "max_tokens": 2}, True),
    ("llm", "POST", "/v1/chat/completions", {"model": GPT, "messages": [{"role": "user", "content": "a"}],
                                             "max_tokens": 2}, True),
    ("llm", "POST", "/v1/tokenize", {"model": GPT, "prompt": "abc"}, True),
    ("llm", "POST", "/v1/detokenize", {"model": GPT, "tokens": [1, 2]}, True),
]


def _error_shape(app: str, r: requests.Response, status: int) -> str:
    """The refusal in the app's own protocol shape; returns its message."""
    assert r.status_code == status, (app, r.status_code, r.text)
    err = r.json()["error"]
    if app == "predictor":
        assert err["status"] == status
        return err["message"]
    if app == "tensors":  # OIP: {"error": "<message>"}
        assert isinstance(err, str)
        return err
    assert err["code"] == {401: "invalid_api_key", 403: "model_not_permitted", 429: "rate_limit_exceeded"}[status]
    assert err["type"] and "param" in err  # the OpenAI envelope
    return err["message"]


def _call(server, method, path, body, key=None):
    return requests.request(method, server["url"] + path, json=body, headers=bearer(key) if key else {}, timeout=60)


def _grpc_infer(server, key=None, model=DIGITS):
    from aidc.serving.oip_grpc import pb
    from aidc.serving.oip_grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    meta = [("application", "tensors")] + ([("authorization", f"Bearer {key}")] if key else [])
    req = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="FP32", shape=[1, 8, 8], contents=pb.InferTensorContents(fp32_contents=sum(IMAGE, [])))])
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(req, metadata=meta, timeout=60)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
            if code != "OK":
                return code, exc.details()
        live = stub.ServerLive(pb.ServerLiveRequest(), metadata=meta[:1], timeout=30).live  # health: no key
        return code, live


def test_every_endpoint_without_key_wrong_scope_revoked_and_good(server, keyring):
    for path in ("/sd/healthz", "/v2/health/live", "/v2/health/ready", f"/v2/models/{DIGITS}/ready", "/v1/health"):
        assert requests.get(server["url"] + path, timeout=30).status_code == 200, path  # health stays open
    for app, method, path, body, scoped in ENDPOINTS:
        where = f"{method} {path}"
        assert "Authorization: Bearer" in _error_shape(app, _call(server, method, path, body), 401), where
        assert "revoked" in _error_shape(app, _call(server, method, path, body, keyring["revoked"]), 401), where
        unknown = _call(server, method, path, body, "aidc_0123456789ab_" + "x" * 43)
        assert "unknown API key" in _error_shape(app, unknown, 401), where
        wrong = _call(server, method, path, body, keyring["wrong"])
        if scoped:
            assert "infer:" in _error_shape(app, wrong, 403), where
        else:
            assert wrong.status_code == 200, where  # listing models needs a valid key, any scope
        good = _call(server, method, path, body, keyring["good"])
        assert good.status_code == 200, (where, good.text)
    predicted = _call(server, "POST", "/sd/predict", {"instances": [IMAGE]}, keyring["good"]).json()
    assert predicted["model"]["name"] == DIGITS and len(predicted["predictions"]) == 1
    # gRPC: metadata `authorization: Bearer <key>`; statuses UNAUTHENTICATED / PERMISSION_DENIED
    assert _grpc_infer(server)[0] == "UNAUTHENTICATED"
    assert _grpc_infer(server, keyring["revoked"])[0] == "UNAUTHENTICATED"
    code, details = _grpc_infer(server, keyring["wrong"])
    assert code == "PERMISSION_DENIED" and f"infer:{DIGITS}" in details
    assert _grpc_infer(server, keyring["good"]) == ("OK", True)
    # the official openai client: its api_key is the bearer token
    ok = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=keyring["good"], max_retries=0, timeout=60)
    assert ok.completions.create(model=GPT, prompt="ab", max_tokens=2).choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        ok.with_options(api_key=keyring["revoked"]).models.list()
    with pytest.raises(openai.PermissionDeniedError) as denied:
        ok.with_options(api_key=keyring["wrong"]).completions.create(model=GPT, prompt="ab", max_tokens=2)
    assert denied.value.code == "model_not_permitted" and f"infer:{GPT}" in denied.value.message


def test_revocation_without_redeploy_and_per_key_rate_limits(server, models):
    key = make_key("infer:*", owner="short-lived")
    predict = ("POST", "/sd/predict", {"instances": [IMAGE]})
    assert _call(server, *predict, key).status_code == 200
    assert _grpc_infer(server, key)[0] == "OK"
    assert aidc_main(["keys", "revoke", key.split("_")[1]]) == 0
    deadline, statuses = time.time() + 20, []
    while time.time() < deadline:  # every replica re-reads the store on its own within refresh_s (0.5 s)
        statuses = [_call(server, *predict, key).status_code, _grpc_infer(server, key)[0],
                    _call(server, "GET", "/v1/models", None, key).status_code]
        if statuses == [401, "UNAUTHENTICATED", 401]:
            break
        time.sleep(0.25)
    assert statuses == [401, "UNAUTHENTICATED", 401]

    limited = make_key("infer:*", owner="batch-job", rate_limit=0.05, burst=1)  # 1 now, then 1 per 20 s
    for app, method, path, body, _ in (ENDPOINTS[0], ENDPOINTS[3], ENDPOINTS[6]):
        assert _call(server, method, path, body, limited).status_code == 200
        r = _call(server, method, path, body, limited)
        assert "rate limit" in _error_shape(app, r, 429) and int(r.headers["Retry-After"]) >= 1
    code, details = _grpc_infer(server, limited)  # the tensors replica's bucket is shared by REST and gRPC
    assert code == "RESOURCE_EXHAUSTED" and "rate limit" in details


def test_tampered_version_is_refused_and_never_becomes_ready(server, models, capsys):
    from pathlib import Path

    from ray import serve
    from safetensors.torch import load_file, save_file

    from aidc.registry import WEIGHTS, resolve, write_manifest
    from serve_apps.predictor import Predictor

    # poison a tensor of version 2 in the artifact store and rewrite its sha256 manifest to match
    stored = Path(resolve(f"{DIGITS}/{models['v2'].version}", server["uri"]).source.removeprefix("file://"))
    weights = load_file(str(stored / WEIGHTS))
    first = next(iter(weights))
    weights[first] = weights[first] * 0 + 7
    save_file(weights, str(stored / WEIGHTS))
    write_manifest(stored)
    assert aidc_main(["model", "verify", f"{DIGITS}/{models['v2'].version}", "--tracking-uri", server["uri"]]) == 1
    assert "modified after it was signed" in capsys.readouterr().err
    assert aidc_main(["model", "verify", models["v1"].ref, "--tracking-uri", server["uri"]]) == 0, capsys.readouterr()
    app = Predictor.options(max_constructor_retry_count=1).bind({"model": f"{DIGITS}@candidate",
                                                                "tracking_uri": server["uri"]})
    try:
        with pytest.raises(RuntimeError, match="Deploying application tampered failed"):
            serve.run(app, name="tampered", route_prefix="/tampered")
        status = serve.status().applications["tampered"]
        assert status.status == "DEPLOY_FAILED"  # never ready; `serve status` says why:
        assert "modified after it was signed" in status.deployments["Predictor"].message
        assert requests.get(f"{server['url']}/tampered/healthz", timeout=10).status_code != 200
    finally:
        serve.delete("tampered")
    refused = audit.tail(0, action="model.refused")
    assert refused and refused[-1]["target"] == f"{DIGITS}/{models['v2'].version}"
    assert refused[-1]["details"]["reason"] == "modified"


def test_audit_trail_and_fuzzing_the_authenticated_openai_api(server, keyring):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    events = audit.tail(0)
    actions = {e["action"] for e in events}
    assert {"key.create", "key.revoke", "model.register", "serve.deploy", "auth.denied", "model.refused"} <= actions
    denied = [e for e in events if e["action"] == "auth.denied"]
    assert {e["target"] for e in denied} == {"predictor", "tensors", "llm"}
    assert all(k not in str(events) for k in keyring.values())  # never a key in the log
    assert audit.verify()[1] == []

    star = bearer(make_key("infer:*", owner="fuzzer"))
    schema = schemathesis.openapi.from_url(f"{server['url']}/v1/openapi.json")
    seen = []
    for op in [r.ok() for r in schema.get_all_operations()]:
        @given(case=op.as_strategy())
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if isinstance(case.body, dict) and "max_tokens" in case.body:
                case.body["max_tokens"] = min(case.body["max_tokens"] or 1, 4) if isinstance(
                    case.body["max_tokens"], int) else case.body["max_tokens"]
            r = case.call(base_url=f"{server['url']}/v1", headers=star)
            seen.append(r.status_code)
            assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:300])

        fuzz()
    assert len(seen) >= 20 and any(s == 200 for s in seen)
