

import numpy as np
import pytest
import torch

from aidc.errors import RegistryError, RequestError
from aidc.models import SmallCNN
from aidc.registry import MANIFEST, export_model_dir, verify_manifest
from aidc.serving.http import parse_json_body, require
from aidc.tasks.loaded import LoadedModel
from aidc.tasks import get_task

FEATURES = {"image_shape": [8, 8], "num_classes": 10, "raw_range": [0.0, 16.0]}
TASK = get_task("image_classification")


@pytest.mark.parametrize("size,channels", [(8, (8, 16)), (28, (8, 16, 32))])
def test_cnn_shapes(size, channels):
    model = SmallCNN(image_size=size, channels=channels, hidden=32)
    assert model(torch.zeros(3, 1, size, size)).shape == (3, 10)


def test_cnn_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = SmallCNN(image_size=8, channels=(8,), hidden=32, dropout=0.0)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() == 1.0


def _instance(v=1.0):
    return [[v] * 8 for _ in range(8)]


@pytest.mark.parametrize(
    "instances,status,fragment",
    [
        ([], 422, "is empty"),
        ("abc", 422, "must be a list of images"),
        ([[1, 2, 3]], 422, "has 3 values; expected 8 rows of 8 numbers or a flat list of 64"),
        ([[[1] * 8] * 7], 422, "has shape 7x8"),
        ([[["x"] * 8] * 8], 422, "is 'x', not a number"),
        ([[[True] * 8] * 8], 422, "not a number"),
        ([[[float("nan")] * 8] * 8], 422, "NaN and infinity are not allowed"),
        ([[[float("inf")] * 8] * 8], 422, "NaN and infinity are not allowed"),
        ([_instance(17.0)], 422, "outside the trained range 0..16"),
        ([_instance()] * 5, 413, "over the limit of 4"),
    ],
)
def test_bad_instances_get_a_named_4xx(instances, status, fragment):
    with pytest.raises(RequestError) as err:
        TASK.parse_instances(instances, FEATURES, max_batch=4)
    assert err.value.status == status and fragment in err.value.message


def test_flat_and_nested_instances_are_accepted():
    x = TASK.parse_instances([_instance(2.0), [3.0] * 64], FEATURES, max_batch=4)
    assert x.shape == (2, 8, 8) and x[1, 7, 7] == 3.0


@pytest.mark.parametrize(
    "raw,status,fragment",
    [(b"", 400, "empty request body"), (b"{nope", 400, "not valid JSON"), (b"[1]", 422, "must be a JSON object"),
     (b'{"instances": [NaN]}', 422, "NaN is not allowed"), (b"x" * 2000, 413, "over the limit of 1024")],
)
def test_json_bodies(raw, status, fragment):
    with pytest.raises(RequestError) as err:
        parse_json_body(raw, max_bytes=1024)
    assert err.value.status == status and fragment in err.value.message


def test_unknown_and_missing_fields():
    with pytest.raises(RequestError, match="unknown field"):
        require({"instances": [], "x": 1}, "instances", {"instances"})
    with pytest.raises(RequestError, match="missing field 'instances'"):
        require({}, "instances", {"instances"})


def _export(tmp_path):
    model = SmallCNN(image_size=8, channels=[8], hidden=16)
    spec = {"task": "image_classification", "model": {"arch": "cnn", "channels": [8], "hidden": 16, "dropout": 0.1},
            "features": FEATURES, "transform": {"standardize": {"mean": 4.0, "std": 6.0}}}
    d = tmp_path / "model"
    export_model_dir(d, state_dict=model.state_dict(), spec=spec, config_yaml="name: t\n")
    return model, d


def test_exported_model_round_trips_through_the_serving_loader(tmp_path):
    model, d = _export(tmp_path)
    loaded = LoadedModel.from_dir(d)
    raw = np.random.default_rng(0).uniform(0, 16, size=(4, 8, 8)).astype(np.float32)
    preds = loaded.predict(raw)
    model.eval()
    expected = model(torch.from_numpy((raw[:, None] - 4.0) / 6.0)).argmax(1).tolist()
    assert [p["class"] for p in preds] == expected
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 for p in preds)


def test_tampered_or_extra_files_are_refused(tmp_path):
    _, d = _export(tmp_path)
    verify_manifest(d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(RegistryError, match="fails its sha256 check"):
        verify_manifest(d)
    _, d2 = _export(tmp_path / "b")
    (d2 / "evil.pkl").write_bytes(b"x")
    with pytest.raises(RegistryError, match="unexpected \\['evil.pkl'\\]"):
        verify_manifest(d2)
    (d2 / MANIFEST).unlink()
    with pytest.raises(RegistryError, match="no MANIFEST"):
        verify_manifest(d2)


def test_a_missing_version_names_the_command_that_makes_it(tmp_path):
    from aidc.registry import resolve

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for ref, hint in (("digits-cnn@champion", "jobs.train"), ("digits-cnn@int8", "compress.method=int8"),
                      ("digits-cnn@pruned", "compress.method=prune"), ("digits-cnn@tuned", "jobs.tune")):
        with pytest.raises(RegistryError, match="not found in registry") as err:
            resolve(ref, uri)
        assert hint in str(err.value), err.value
