"""OIP v2 tensor serving under load: an MNIST-shaped CNN (1x28x28, channels [32, 64]) on Ray Serve.

Side by side on the same machine: dynamic batching on vs off, 1 vs 2 replicas, the model on its own
deployment (proxy -> ingress -> model) vs in the ingress (`placement: ingress`, proxy -> ingress), at
concurrency 1/8/32/64 (req/s, p50, p99), and the same model behind a plain FastAPI + uvicorn process (p50
at c=1, req/s at c=32). The client shares the machine with the server: figures are ratios, not absolutes.
The "proxy" is HAProxy where Ray ships it (aidc.runtime.RAY_ENV); `RAY_SERVE_ENABLE_HA_PROXY=0` in the
environment measures Serve's Python proxy instead (figures for both in issue #9's notes).

    python -m benchmarks.oip_serving [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, api_key_header, closed_loop, gpu_split, local_ray, percentile_ms

MODEL = "mnist-cnn"
QUIET = {"enable_access_log": False, "log_level": "WARNING"}  # per-request logs cost CPU on both sides


def register_random_cnn(root: Path) -> str:
    """A registry version of an untrained MNIST-shaped CNN (speed does not depend on the weights)."""
    import torch
    from mlflow import MlflowClient

    from aidc.registry import export_model_dir, tracking_uri
    from aidc.security.signing import sign_model_dir
    from aidc.tasks import get_task

    features = {"image_shape": [28, 28], "num_classes": 10, "raw_range": [0, 255]}
    spec = {"task": "image_classification", "model": {"arch": "cnn", "channels": [32, 64], "hidden": 128,
                                                      "dropout": 0.1},
            "features": features, "transform": {"standardize": {"mean": 33.3, "std": 78.6},
                                                "augment": {"enabled": False}}}
    torch.manual_seed(0)
    model = get_task("image_classification").build_model(spec["model"], features)
    directory = root / "model"
    export_model_dir(directory, state_dict=model.state_dict(), spec=spec, config_yaml="benchmark: true\n")
    sign_model_dir(directory)  # serving refuses unsigned versions (aidc.security.signing)
    uri = tracking_uri(None, str(root))
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("bench", artifact_location=(root / "art").as_uri()))
    client.log_artifacts(run.info.run_id, str(directory), artifact_path="model")
    client.create_registered_model(MODEL)
    mv = client.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", mv.version)
    return uri


def drive(url: str, concurrency: int, seconds: float, procs: int = 1, binary: bool = False) -> dict:
    """Closed loop: `concurrency` clients each send one 1-image request after the previous answer, from `procs`
    client processes (one Python client tops out at a few thousand requests/s: on a many-core machine the
    client, not the server, would be measured). `binary`: the tensors as raw bytes (the binary tensor data
    extension, tritonclient's default) instead of JSON numbers, both ways."""
    if procs <= 1 or concurrency < 2:
        runs = [asyncio.run(_drive(url, concurrency, seconds, binary))]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        shares = [concurrency // procs + (i < concurrency % procs) for i in range(min(procs, concurrency))]
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(len(shares), mp_context=ctx) as pool:
            start = manager.Barrier(len(shares))  # every process warmed up: the load windows start together
            runs = list(pool.map(_drive_sync, [url] * len(shares), shares, [seconds] * len(shares),
                                 [binary] * len(shares), [start] * len(shares)))
    latencies = [x for r in runs for x in r[0]]
    return {"req_per_s": round(len(latencies) / max(r[2] for r in runs), 1),
            "p50_ms": percentile_ms(latencies, 50, 2), "p99_ms": percentile_ms(latencies, 99, 2),
            "errors": sum(r[1] for r in runs)}


def _drive_sync(url: str, concurrency: int, seconds: float, binary: bool, start=None):
    return asyncio.run(_drive(url, concurrency, seconds, binary, start))


def request_body(binary: bool) -> tuple[bytes, dict]:
    """One 1x28x28 FP32 image and the headers to send it with: JSON numbers, or the binary extension."""
    image = np.random.default_rng(0).integers(0, 256, size=(1, 28, 28)).astype(np.float32)
    tensor = {"name": "image", "shape": [1, 28, 28], "datatype": "FP32"}
    if not binary:
        body = json.dumps({"inputs": [{**tensor, "data": image.ravel().tolist()}], "outputs": [{"name": "class"}]})
        return body.encode(), {"Content-Type": "application/json", **api_key_header()}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": image.nbytes}}],
                       "outputs": [{"name": "class", "parameters": {"binary_data": True}}]}).encode()
    return head + image.tobytes(), {"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(head)), **api_key_header()}


async def _drive(url: str, concurrency: int, seconds: float, binary: bool = False,
                 start=None) -> tuple[list[float], int, float]:
    import aiohttp

    body, headers = request_body(binary)
    latencies, errors = [], 0

    async def ready(client):
        for _ in range(3):  # warm up
            async with client.post(url, data=body, headers=headers) as r:
                await r.read()
        if start is not None:  # one of several client processes: wait for the others
            start.wait(timeout=300)

    async def send(client, _):
        nonlocal errors
        t = time.perf_counter()
        async with client.post(url, data=body, headers=headers) as r:
            await r.read()
            ok = r.status == 200
        if ok:
            latencies.append(time.perf_counter() - t)
        else:
            errors += 1

    elapsed = await closed_loop(concurrency, send, seconds=seconds, ready=ready,
                                connector=aiohttp.TCPConnector(limit=concurrency),
                                timeout=aiohttp.ClientTimeout(total=60))
    return latencies, errors, elapsed


def cold_start(uri: str, root: Path, port: int) -> dict:
    """min_replicas: 0 — wait until the model deployment scales to zero, then time the first request."""
    import requests
    from ray import serve

    from serve_apps.tensors import app_builder

    args = {"tracking_uri": uri, "storage": str(root), "models": [{"name": MODEL, "deployment": {
        "num_cpus": 0.5, "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1,
                                                "downscale_delay_s": 2, "upscale_delay_s": 0,
                                                "look_back_period_s": 1, "metrics_interval_s": 0.5}}}]}
    serve.run(app_builder(args), name="tensors", route_prefix="/v2", logging_config=QUIET)
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    auth = api_key_header()
    requests.post(url, json=body, headers=auth, timeout=120).raise_for_status()  # warm: loads signature in the ingress
    t = time.perf_counter()
    warm = requests.post(url, json=body, headers=auth, timeout=120)
    warm_ms = (time.perf_counter() - t) * 1000
    for _ in range(240):
        states = serve.status().applications["tensors"].deployments[f"{MODEL}-v1"].replica_states
        if not states.get("RUNNING"):
            break
        time.sleep(0.5)
    t = time.perf_counter()
    cold = requests.post(url, json=body, headers=auth, timeout=300)
    return {"warm_ms": round(warm_ms, 1), "cold_from_zero_ms": round((time.perf_counter() - t) * 1000, 1),
            "ok": warm.ok and cold.ok}


def app_args(uri: str, root: Path, batch: int, replicas: int, placement: str, gpus: float = 0) -> dict:
    """`gpus`: the GPUs the model's replicas share (split by gpu_split; the model picks CUDA when given one)."""
    model = {"name": MODEL, "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.004},
             "placement": placement}
    share = gpu_split(gpus, replicas)
    if placement == "ingress":  # the model runs in the ingress replicas: give them the model's CPU
        return {"tracking_uri": uri, "storage": str(root), "models": [model],
                "ingress": {"num_cpus": 0.5, "num_replicas": replicas, "num_gpus": share}}
    model["deployment"] = {"num_cpus": 0.5, "num_replicas": replicas, "max_ongoing_requests": 128, "num_gpus": share}
    return {"tracking_uri": uri, "storage": str(root), "models": [model]}


def serve_sweep(uri: str, root: Path, levels: list[int], seconds: float,
                setups: list[tuple[str, int, int, str]], cold: bool = False, gpus: float = 0,
                procs: int = 1, binary: bool = False) -> dict:
    from ray import serve

    from serve_apps.tensors import app_builder
    from aidc.testing import free_port, serve_shutdown, serve_start

    port = free_port()
    serve_start(http_options={"host": "127.0.0.1", "port": port})
    out = {}
    try:
        for label, batch, replicas, placement in setups:
            args = app_args(uri, root, batch, replicas, placement, gpus)
            serve.run(app_builder(args), name="tensors", route_prefix="/v2", logging_config=QUIET)
            url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
            out[label] = {f"c{c}": drive(url, c, seconds, procs, binary) for c in levels}
            print(label, json.dumps(out[label]), flush=True)
        if cold:
            out["cold_start"] = cold_start(uri, root, port)
            print("cold_start", json.dumps(out["cold_start"]), flush=True)
    finally:
        serve_shutdown()
    return out


def plain_fastapi(model_dir: Path, levels: list[int], seconds: float, procs: int = 1, binary: bool = False) -> dict:
    from aidc.testing import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.oip_plain_server", str(model_dir), str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests

        for _ in range(120):
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        return {f"c{c}": drive(url, c, seconds, procs, binary) for c in levels}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="Two levels, one setup, 1.5 s each (smoke test).")
    p.add_argument("--seconds", type=float, default=8.0, help="Load duration per concurrency level.")
    p.add_argument("--only", nargs="*", default=None, help="Run only these setups (e.g. unbatched_1r_ingress); "
                   "figures need the full set.")
    p.add_argument("--no-cold", action="store_true", help="Skip the cold start from zero replicas.")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray (2-core machine: 4, oversubscribed "
                   "on purpose so every setup fits).")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs the model's replicas share (a GPU machine: 1).")
    p.add_argument("--client-procs", type=int, default=1, help="Client processes the load comes from (many cores).")
    p.add_argument("--binary", action="store_true", help="Tensors as raw bytes (binary tensor data extension, "
                   "tritonclient's default) instead of JSON numbers.")
    a = p.parse_args(argv)
    levels = [1, 8] if a.quick else [1, 8, 32, 64]
    seconds = 1.5 if a.quick else a.seconds
    setups = [("batched_1r", 32, 1, "deployment")] if a.quick else [
        (f"{b}_{r}r{'_ingress' if p == 'ingress' else ''}", 32 if b == "batched" else 1, r, p)
        for p in ("deployment", "ingress") for r in (1, 2) for b in ("unbatched", "batched")]
    if a.only:
        setups = [s for s in setups if s[0] in a.only]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = register_random_cnn(root)
        with local_ray(a.num_cpus, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}):
            result = serve_sweep(uri, root, levels, seconds, setups, cold=not (a.quick or a.no_cold),
                                 gpus=a.num_gpus, procs=a.client_procs, binary=a.binary)
        result["plain_fastapi"] = plain_fastapi(root / "model", [1] if a.quick else [1, 32], seconds, a.client_procs,
                                                a.binary)
        print("plain_fastapi", json.dumps(result["plain_fastapi"]), flush=True)
    if a.only:
        return result
    result["figures"] = figures(result, a.quick)
    print(json.dumps(result["figures"], indent=2))
    return result


def figures(r: dict, quick: bool) -> dict:
    f = {"note": "closed-loop client on the same (shared, loaded) 2-core machine; compare ratios"}
    f["serve_minus_plain_p50_ms_c1"] = round(r["batched_1r"]["c1"]["p50_ms"] - r["plain_fastapi"]["c1"]["p50_ms"], 2)
    if quick:
        return f
    for reps in ("1r", "2r", "1r_ingress", "2r_ingress"):
        b, u = r[f"batched_{reps}"], r[f"unbatched_{reps}"]
        f[f"batched_over_unbatched_c32_{reps}"] = round(b["c32"]["req_per_s"] / max(u["c32"]["req_per_s"], 1e-9), 2)
        best = max(b[c]["req_per_s"] for c in ("c1", "c8", "c32"))
        f[f"batched_c64_over_best_{reps}"] = round(b["c64"]["req_per_s"] / best, 2)
    for where in ("1r", "1r_ingress"):
        f[f"serve_unbatched_{where}_minus_plain_p50_ms_c1"] = round(
            r[f"unbatched_{where}"]["c1"]["p50_ms"] - r["plain_fastapi"]["c1"]["p50_ms"], 2)
        f[f"serve_batched_{where}_over_plain_req_per_s_c32"] = round(
            r[f"batched_{where}"]["c32"]["req_per_s"] / max(r["plain_fastapi"]["c32"]["req_per_s"], 1e-9), 2)
    return f


if __name__ == "__main__":
    main()
