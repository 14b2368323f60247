"""Preprocess -> Ray Train (2 DDP workers) -> MLflow registry -> Ray Serve over HTTP, on one local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from aidc.config import load_config
from aidc.tasks import preprocess
from aidc.registry import CONFIG, fetched, tracking_uri
from aidc.train.register import register
from aidc.train.trainer import run_training
from aidc.testing import serve_shutdown, serve_start
from tests.conftest import CONFIGS, free_port
from tests.security_helpers import bearer, make_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("aidc"))


@pytest.fixture(scope="module")
def cfg(root):
    return load_config(CONFIGS / "digits.yaml", [f"run.storage={root}", "train.epochs=5", "run.name=it-digits"])


@pytest.fixture(scope="module")
def dataset(cfg):
    return preprocess(cfg)


@pytest.fixture(scope="module")
def trained(cfg, dataset):
    outcome = run_training(cfg)
    return outcome, register(cfg, outcome)


def test_preprocess_accounts_for_every_row(dataset):
    dv, reused = dataset
    m = dv.manifest()
    assert not reused
    c = m["counts"]
    assert c["read"] == 1797 == c["kept"] + c["rejected"]
    assert sum(c["splits"].values()) == c["kept"]
    ids = {s: set(dv.read_numpy(s)["id"].tolist()) for s in ("train", "val", "test")}
    assert sum(len(v) for v in ids.values()) == c["kept"]
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"])
    assert m["config"]["data"]["split"]["train"] == 0.8 and m["fingerprint"].startswith(dv.version)


def test_normalisation_is_fitted_on_the_training_split_only(dataset):
    dv, _ = dataset
    state = dv.manifest()["transform"]["standardize"]
    train = dv.read_numpy("train")["image"]
    assert state["mean"] == pytest.approx(float(train.mean()), rel=1e-6)
    assert state["std"] == pytest.approx(float(train.std()), rel=1e-5)
    everything = np.concatenate([dv.read_numpy(s)["image"] for s in ("train", "val", "test")])
    assert state["mean"] != pytest.approx(float(everything.mean()), rel=1e-9)


def test_same_input_and_config_reuse_the_version_and_a_new_seed_does_not(cfg, dataset):
    dv, _ = dataset
    again, reused = preprocess(cfg)
    assert reused and again.version == dv.version
    other, reused = preprocess(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"split": cfg.data.split.model_copy(update={"seed": 7})})}))
    assert not reused and other.version != dv.version


def test_training_reaches_target_accuracy_and_registers_the_model(trained, cfg, root):
    outcome, version = trained
    assert [row["epoch"] for row in outcome.history] == list(range(5))
    assert outcome.metrics["test_accuracy"] >= 0.97
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]
    with fetched(version.ref, tracking_uri(None, root)) as (mv, files):
        assert str(mv.version) == version.version
        assert "epochs: 5" in (files / CONFIG).read_text()  # the resolved config travels with the model


def test_serve_predicts_over_http_and_rejects_bad_requests(trained, cfg, root, dataset):
    from ray import serve

    from serve_apps.predictor import app_builder

    _, version = trained
    port = free_port()
    serve_start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"model": version.ref, "tracking_uri": tracking_uri(None, root), "max_batch_size": 64}),
                  name="digits", route_prefix="/digits")
        url = f"http://127.0.0.1:{port}/digits"
        auth = bearer(make_key("infer:digits-cnn"))  # API keys are on by default
        assert requests.post(f"{url}/predict", json={"instances": []}, timeout=30).status_code == 401
        test = dataset[0].read_numpy("test")
        x, y = test["image"][:64], test["label"][:64]
        r = requests.post(f"{url}/predict", json={"instances": x.tolist()}, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == {"name": "digits-cnn", "version": version.version}
        preds = np.array([p["class"] for p in body["predictions"]])
        assert (preds == y).mean() >= 0.95
        assert requests.get(f"{url}/metadata", headers=auth, timeout=10).json()["features"]["image_shape"] == [8, 8]

        cases = [
            ({"instances": [[1, 2, 3]]}, 422, "expected 8 rows of 8"),
            ({"instances": []}, 422, "is empty"),
            ({"instances": x[:65].tolist() + x[:1].tolist()}, 413, "over the limit of 64"),
            ({"instances": [[["a"] * 8] * 8]}, 422, "not a number"),
            ({"images": []}, 422, "unknown field"),
        ]
        for payload, status, fragment in cases:
            r = requests.post(f"{url}/predict", json=payload, headers=auth, timeout=30)
            assert r.status_code == status and fragment in r.json()["error"]["message"], (payload, r.text)
        r = requests.post(f"{url}/predict", data=b'{"instances": [[NaN]]}', headers=auth, timeout=30)
        assert r.status_code == 422 and "NaN" in r.json()["error"]["message"]
        r = requests.post(f"{url}/predict", data=b"not json", headers=auth, timeout=30)
        assert r.status_code == 400
    finally:
        serve_shutdown()
