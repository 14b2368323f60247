"""OIP gRPC checks with tritonclient[grpc], run by the integration tests from the test-clients venv.

tritonclient[grpc] pins protobuf<7 (older than the project venv's), so it lives in .venv-clients
(`make clients`). Usage: oip_grpc_client.py HOST:PORT PINNED_VERSION [FSDD_RECORDINGS_DIR]; prints one JSON line.
Serve's gRPC proxy routes by the `application` metadata when several apps run: send it on every call.
"""

import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

# The API key (auth is on by default) comes from $AIDC_API_KEY, as gRPC metadata `authorization: Bearer <key>`.
HEADERS = {"application": "tensors",
           **({"authorization": f"Bearer {os.environ['AIDC_API_KEY']}"} if os.environ.get("AIDC_API_KEY") else {})}


def infer(client, model, name, array, datatype, version=""):
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return client.infer(model, [inp], model_version=version, headers=HEADERS, request_id="g1")


def status_of(fn):
    try:
        fn()
    except InferenceServerException as exc:
        return exc.status().replace("StatusCode.", ""), exc.message()
    return "OK", ""


def speech(client, folder: str) -> dict:
    """wav files as BYTES (raw contents) and a float waveform with its sample rate in the request parameters."""
    import wave

    files = [open(f"{folder}/{d}_theo_30.wav", "rb").read() for d in (1, 7)]
    wav = infer(client, "speech-gru", "audio", np.array(files, dtype=object), "BYTES")
    with wave.open(f"{folder}/7_theo_30.wav") as w:  # 16-bit PCM -> float samples in [-1, 1]
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32)[None, :] / 32768
    inp = grpcclient.InferInput("waveform", list(samples.shape), "FP32")
    inp.set_data_from_numpy(samples)
    by_wave = client.infer("speech-gru", [inp], headers=HEADERS, parameters={"sample_rate": 8000.0})  # double
    wrong, msg = status_of(lambda: client.infer("speech-gru", [inp], headers=HEADERS,
                                                parameters={"sample_rate": 16000}))
    return {"wav_probabilities": wav.as_numpy("probabilities").tolist(),
            "waveform_probabilities": by_wave.as_numpy("probabilities").tolist(),
            "wrong_rate": [wrong, msg]}


def main(url: str, pinned: str, recordings: str | None = None) -> None:
    client = grpcclient.InferenceServerClient(url)
    images = np.random.default_rng(0).uniform(0, 16, size=(4, 8, 8)).astype(np.float32)
    meta = client.get_model_metadata("digits-cnn", headers=HEADERS)
    res = infer(client, "digits-cnn", "image", images, "FP32")
    text = infer(client, "sms-spam-transformer", "text", np.array([b"win a free prize now"], dtype=object), "BYTES")
    pinned_res = infer(client, "digits-cnn", "image", images[:1], "FP32", version=pinned)
    errors, wrong_msg = {}, ""
    errors["unknown_model"], _ = status_of(lambda: infer(client, "nope", "image", images, "FP32"))
    errors["wrong_datatype"], wrong_msg = status_of(
        lambda: infer(client, "digits-cnn", "image", images.astype(np.int64), "INT64"))
    errors["bad_shape"], _ = status_of(
        lambda: infer(client, "digits-cnn", "image", images.reshape(4, 64), "FP32"))
    print(json.dumps({
        "live": client.is_server_live(headers=HEADERS), "ready": client.is_server_ready(headers=HEADERS),
        "model_ready": client.is_model_ready("digits-cnn", headers=HEADERS),
        "metadata_inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
        "classes": res.as_numpy("class").tolist(), "id": res.get_response().id,
        "text_labels": [v.decode() for v in text.as_numpy("label")],
        "pinned_version": pinned_res.get_response().model_version,
        "errors": errors, "wrong_datatype_message": wrong_msg,
        **({"speech": speech(client, recordings)} if recordings else {}),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
