"""Open Inference Protocol data plane without Ray: tensor codecs (JSON, binary, gRPC), validation, signatures,
version routing and dynamic-batch splitting."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from aidc.errors import RequestError
from aidc.serving.oip import protocol as oip
from aidc.serving.oip.plane import DataPlane, ModelRoute, run_batch
from aidc.tasks import get_task

IMAGE_SIG = get_task("image_classification").tensor_signature({"image_shape": [8, 8], "num_classes": 10})


def _binary_body(inputs: list[tuple[str, str, np.ndarray]], **extra) -> tuple[bytes, str]:
    blobs = [oip.to_binary(a, dt) for _, dt, a in inputs]
    header = json.dumps({"inputs": [{"name": n, "datatype": dt, "shape": list(a.shape),
                                     "parameters": {"binary_data_size": len(b)}}
                                    for (n, dt, a), b in zip(inputs, blobs)], **extra}).encode()
    return header + b"".join(blobs), str(len(header))


def test_json_and_binary_bodies_decode_to_the_same_arrays():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    texts = np.array(["héllo", "spam!"], dtype=object)
    req, arrays = oip.parse_rest_body(json.dumps({"id": "a", "inputs": [
        {"name": "image", "shape": [2, 8, 8], "datatype": "FP32", "data": x.tolist()},
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": list(texts)}]}).encode(), None, 10**6)
    body, hl = _binary_body([("image", "FP32", x), ("text", "BYTES", texts)])
    _, binary = oip.parse_rest_body(body, hl, 10**6)
    assert req.id == "a"
    text_sig = get_task("text_classification").tensor_signature({"num_classes": 2})
    for a in (arrays, binary):
        np.testing.assert_array_equal(a["image"], x)
        assert a["image"].dtype == np.float32
        # binary BYTES arrive as raw bytes; a text input gets them as UTF-8 strings, like JSON's
        assert list(oip.validate_inputs({"text": a["text"]}, {"text": "BYTES"}, text_sig, "m")["text"]) == \
            list(texts)
    with pytest.raises(RequestError, match="BYTES element 0 is not UTF-8 text"):
        oip.validate_inputs({"text": np.array([b"\xff\xfe"], dtype=object)}, {"text": "BYTES"}, text_sig, "m")


@pytest.mark.parametrize("body,header,status,fragment", [
    (b"x" * 2000, None, 413, "over the limit"),
    (b"[1,", None, 400, "not valid JSON"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', None, 400, "NaN"),
    (b'{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [1.0]}]}', None, 400, "needs 2"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT64", "data": [1.5]}]}', None, 400, "holds 1.5"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [999]}]}', None, 400, "out of the INT8"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [true]}]}', None, 400, "holds True"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "F32", "data": [1]}]}', None, 400, "datatype"),
    (b'{"inputs": [{"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None, 400, "negative"),
    (b'{"inputs": [], "x": 1}', None, 400, "inputs"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}', None, 400, "no data"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', "x", 400, "integer"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', "999", 400, "body has"),
])
def test_malformed_bodies_name_the_problem(body, header, status, fragment):
    with pytest.raises(RequestError) as exc:
        oip.parse_rest_body(body, header, 1024)
    assert exc.value.status == status and fragment in exc.value.message


def test_binary_sizes_and_strays_are_checked():
    x = np.zeros((1, 8, 8), np.float32)
    body, hl = _binary_body([("image", "FP32", x)])
    with pytest.raises(RequestError, match="belong to no input"):
        oip.parse_rest_body(body + b"\0", hl, 10**6)
    with pytest.raises(RequestError, match="needs 256"):
        oip.decode_binary(b"\0" * 255, "FP32", [1, 8, 8], "image")
    with pytest.raises(RequestError, match="truncated"):
        oip.decode_binary(b"\x05\0", "BYTES", [1], "t")


def test_signature_validation_casts_and_rejects():
    ok = oip.validate_inputs({"image": np.zeros((3, 8, 8), np.float64)}, {"image": "FP64"}, IMAGE_SIG, "m")
    assert ok["image"].dtype == np.float32
    cases = [({"image": np.zeros((3, 8, 8), np.int64)}, {"image": "INT64"}, "takes FP32"),
             ({"image": np.zeros((3, 64), np.float32)}, {"image": "FP32"}, "takes [-1, 8, 8]"),
             ({"image": np.zeros((0, 8, 8), np.float32)}, {"image": "FP32"}, "no rows"),
             ({}, {}, "missing input(s) ['image']"),
             ({"image": np.zeros((1, 8, 8)), "x": np.zeros(1)}, {"image": "FP32", "x": "FP32"}, "no input(s) ['x']")]
    for arrays, types, fragment in cases:
        with pytest.raises(RequestError) as exc:
            oip.validate_inputs(arrays, types, IMAGE_SIG, "m")
        assert fragment in exc.value.message and exc.value.status == 400
    assert oip.select_outputs(["class"], IMAGE_SIG, "m") == ["class"]
    with pytest.raises(RequestError, match="no output"):
        oip.select_outputs(["logits"], IMAGE_SIG, "m")


def test_every_task_declares_a_signature_whose_inputs_its_transform_takes():
    sigs = {
        "text_classification": {"vocab_size": 10, "max_length": 4, "num_classes": 2, "class_names": ["a", "b"]},
        "recommendation": {"num_users": 3, "num_items": 3, "global_mean": 3.0, "rating_range": [0.5, 5]},
        "tabular_classification": {"numeric": ["x"], "categorical": ["c"], "cardinalities": [2], "num_classes": 2},
        "speech_classification": {"sample_rate": 8000, "n_mels": 40, "max_frames": 101, "num_classes": 10},
    }
    for task, features in sigs.items():
        sig = get_task(task).tensor_signature(features)
        assert sig["inputs"] and sig["outputs"]
        assert all(t["shape"][0] == -1 for t in sig["inputs"] + sig["outputs"])
    tab = get_task("tabular_classification").tensor_signature(sigs["tabular_classification"])
    assert [(t["name"], t["datatype"]) for t in tab["inputs"]] == [("x", "FP32"), ("c", "BYTES")]


def test_responses_encode_json_or_binary_as_asked():
    req = oip.InferenceRequest.model_validate({"id": "7", "inputs": [{"name": "a", "shape": [1], "datatype": "FP32",
                                                                       "data": [1]}],
                                               "outputs": [{"name": "p", "parameters": {"binary_data": True}},
                                                           {"name": "l"}]})
    outs = {"p": np.array([[0.25, 0.75]], np.float32), "l": np.array(["spam"], dtype=object)}
    body, headers = oip.encode_rest_response(req, "m", "3", outs, {"p": "FP32", "l": "BYTES"})
    n = int(headers[oip.HEADER_LENGTH])
    head = json.loads(body[:n])
    assert head["id"] == "7" and head["model_version"] == "3"
    assert head["outputs"][1]["data"] == ["spam"] and head["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.frombuffer(body[n:], "<f4").tolist() == [0.25, 0.75]
    plain, headers = oip.encode_rest_response(req.model_copy(update={"outputs": None}), "m", "3", outs,
                                              {"p": "FP32", "l": "BYTES"})
    assert oip.HEADER_LENGTH not in headers and json.loads(plain)["outputs"][0]["data"] == [0.25, 0.75]


def test_grpc_requests_decode_from_raw_and_typed_contents():
    from aidc.serving.oip.grpc_codec import decode_infer_request, encode_infer_response, pb
    from aidc.serving.oip.plane import InferResult

    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"a", b"bc"])
    req.parameters["sample_rate"].int64_param = 8000
    req.inputs[0].parameters["lang"].string_param = "en"
    arrays, types, outputs, params = decode_infer_request(req)
    assert list(arrays["text"]) == [b"a", b"bc"] and types == {"text": "BYTES"} and outputs == []
    assert params == {"sample_rate": 8000, "lang": "en"}  # request and input parameters, typed
    req.parameters["rate"].double_param = 8000.0  # tritonclient sends Python floats as double_param
    assert decode_infer_request(req)[3]["rate"] == 8000.0
    req.parameters["empty"].SetInParent()  # no value set: refused, not silently dropped
    with pytest.raises(RequestError, match="parameter 'empty' has no value"):
        decode_infer_request(req)
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[np.ones((1, 2), "<f4").tobytes()])
    raw.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    assert decode_infer_request(raw)[0]["x"].tolist() == [[1.0, 1.0]]
    bad = pb.ModelInferRequest(model_name="m")
    bad.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0])
    with pytest.raises(RequestError, match="needs 3"):
        decode_infer_request(bad)
    resp = encode_infer_response(InferResult("m", "1", {"c": np.array([4, 5], np.int64)}, {"c": "INT64"}), "id")
    assert np.frombuffer(resp.raw_output_contents[0], "<i8").tolist() == [4, 5] and resp.outputs[0].shape == [2]


class _Handle:
    def __init__(self, version):
        self.version = version
        self.describe, self.infer = self, self

    def remote(self, *args):
        async def done():
            if args:
                return {"probabilities": np.zeros((len(args[0]["image"]), 10), np.float32),
                        "class": np.zeros(len(args[0]["image"]), np.int64)}
            return {"task": "image_classification", "signature": IMAGE_SIG,
                    "features": {"image_shape": [8, 8], "num_classes": 10, "raw_range": [0, 16]}}
        return done()


def test_routes_pin_versions_and_split_canary_traffic():
    route = ModelRoute("m", "1", {"1": _Handle("1"), "2": _Handle("2")}, canary="2", canary_percent=20)
    rng = random.Random(0)
    picks = [route.pick(None, rng) for _ in range(5000)]
    assert 0.18 < picks.count("2") / 5000 < 0.22
    assert route.pick("1", rng) == "1"
    with pytest.raises(RequestError, match="not served") as exc:
        route.pick("9", rng)
    assert exc.value.status == 404
    plane = DataPlane({"m": route}, seed=0)
    res = asyncio.run(plane.infer("m", "2", {"image": np.ones((2, 8, 8), np.float32)}, {"image": "FP32"},
                                  ["class"]))
    assert res.version == "2" and list(res.outputs) == ["class"] and res.datatypes == {"class": "INT64"}
    with pytest.raises(RequestError, match="outside the trained range"):
        asyncio.run(plane.infer("m", None, {"image": np.full((1, 8, 8), 99, np.float32)}, {"image": "FP32"}, None))
    with pytest.raises(RequestError, match="not served here"):
        asyncio.run(plane.infer("x", None, {}, {}, None))


def test_dynamic_batches_split_back_per_request():
    class Echo:
        def infer_tensors(self, inputs):
            return {"double": inputs["a"] * 2}

    parts = run_batch(Echo(), [{"a": np.array([1, 2])}, {"a": np.array([3])}, {"a": np.array([4, 5, 6])}])
    assert [p["double"].tolist() for p in parts] == [[2, 4], [6], [8, 10, 12]]


def test_shipped_serve_config_tensors_args_validate_and_bad_ones_name_the_field():
    import yaml
    from pydantic import ValidationError

    from serve_apps.tensors import TensorsArgs
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    app = next(a for a in cfg["applications"] if a["name"] == "tensors")
    assert app["route_prefix"] == "/v2" and "oip_grpc" in cfg["grpc_options"]["grpc_servicer_functions"][0]
    args = TensorsArgs.model_validate(app["args"])
    assert args.models[0].name == "digits-cnn"
    with pytest.raises(ValidationError, match="percent"):
        TensorsArgs.model_validate({"models": [{"name": "m", "canary": {"version": "2", "percent": 150}}]})
    with pytest.raises(ValidationError, match="unique"):
        TensorsArgs.model_validate({"models": [{"name": "m"}, {"name": "m"}]})
    with pytest.raises(ValidationError, match="max_batchsize"):
        TensorsArgs.model_validate({"models": [{"name": "m", "batching": {"max_batchsize": 4}}]})
    with pytest.raises(ValidationError, match=r"placement: ingress.*num_cpus.*ingress"):
        TensorsArgs.model_validate({"models": [{"name": "m", "placement": "ingress", "deployment": {"num_cpus": 1}}]})
    inline = TensorsArgs.model_validate({"models": [{"name": "m", "placement": "ingress",
                                                      "deployment": {"max_queued_requests": 4}}],
                                         "ingress": {"num_cpus": 1, "num_replicas": 2}})
    assert inline.models[0].placement == "ingress" and inline.ingress.num_replicas == 2


def test_a_model_in_the_ingress_answers_like_a_deployment_and_bounds_its_queue():
    """placement: ingress: the version runs in the ingress process behind a handle-shaped LocalHandle; more than
    max_ongoing + max_queued requests in flight get a 503 naming the model, and the count drains after."""
    from serve_apps.tensors import LocalHandle

    class Served:  # the ServedVersion interface: a sync and an async method, and `loaded`
        loaded = type("Loaded", (), {"name": "m", "version": "3"})()

        def __init__(self):
            self.gate = asyncio.Event()

        def describe(self):
            return {"name": "m"}

        async def infer(self, inputs):
            await self.gate.wait()
            return {"y": inputs["x"] + 1}

    async def run():
        served = Served()
        handle = LocalHandle(served, limit=2)
        assert await handle.describe.remote() == {"name": "m"}
        first = [asyncio.ensure_future(handle.infer.remote({"x": np.array([i])})) for i in range(2)]
        await asyncio.sleep(0)
        assert handle.in_flight == 2
        with pytest.raises(RequestError, match="'m' version 3 is at capacity") as exc:
            await handle.infer.remote({"x": np.array([9])})
        assert exc.value.status == 503
        served.gate.set()
        assert [r["y"].tolist() for r in await asyncio.gather(*first)] == [[1], [2]]
        assert handle.in_flight == 0
        assert (await LocalHandle(served, None).infer.remote({"x": np.array([5])}))["y"].tolist() == [6]

    asyncio.run(run())
