"""LLM serving over HTTP at rising concurrency: continuous batching (the `llm` app) vs one request at a
time (the same app with one batch slot) vs static batching of whole requests (`@serve.batch`).

Mixed prompt (8-64 chars) and output (16-128 tokens) lengths, greedy-free sampling with ignore_eos so
every request generates exactly its max_tokens. Reports output tokens/s, time to first token p50/p99
and inter-token latency p50/p99 (streamed; the static variant cannot stream, so its TTFT is the whole
latency). Targets at concurrency 16: continuous >= 4x sequential, >= 1.5x static.

    python -m benchmarks.llm_serving [--quick] [--concurrency 1 4 16 64] [--d-model 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import api_key_header, gpu_split, local_ray

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n"


def register_random_gpt(root: str, d_model: int, layers: int, block: int) -> str:
    """A GPT of the given shape with random weights (speed does not depend on training), registered."""
    import torch

    from aidc.data.text import SPECIALS
    from aidc.models.gpt import GPT
    from aidc.registry import export_model_dir, register_model_dir

    vocab = SPECIALS + sorted(set(CHARS))
    tok = {"kind": "char", "vocab": vocab, "vocab_size": len(vocab), "lowercase": False,
           "pad_id": 0, "unk_id": 1, "eos_id": 2}
    torch.manual_seed(0)
    model = GPT(len(vocab), block, d_model=d_model, heads=4, layers=layers, dropout=0.0)
    spec = {"task": "language_model", "model": {"arch": "gpt", "d_model": d_model, "heads": 4, "layers": layers,
                                                "dropout": 0.0},
            "features": {"vocab_size": len(vocab), "block_size": block, "tokenizer": "char"},
            "transform": {"tokenizer": tok, "block_size": block}, "metrics": {}}
    with tempfile.TemporaryDirectory() as tmp:
        export_model_dir(Path(tmp, "m"), state_dict=model.state_dict(), spec=spec, config_yaml="bench: true\n")
        return register_model_dir(Path(tmp, "m"), "bench-gpt", "bench", root=root).ref


def static_app(args: dict, pad: bool = True, process: bool = False):
    """Static batching: @serve.batch hands over whole requests; a batch runs until its last request ends,
    and new requests wait for the next batch. With `pad` (static batching as in HF `generate` over a padded
    batch, the baseline of the Orca/vLLM comparisons) every row is computed for as many steps as the
    batch's longest request and the surplus tokens are dropped; without it a row that is done leaves the
    batch early (request-level batching over our engine), a stronger baseline reported as `static-early-exit`.
    With `process` the batches run in an engine process as the llm app's do (`static-process`), so the
    comparison isolates batching from the process split."""
    from fastapi import FastAPI
    from ray import serve

    from aidc.serving import openai as oa
    from aidc.serving.lm_server import LMService, ServedLM
    from aidc.serving.model import load_model

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=512)
    @serve.ingress(api)
    class StaticLLM:
        def __init__(self):
            import torch

            torch.set_num_threads(1)
            loaded = load_model(args["model"], args["tracking_uri"])
            extra = {"process": True, "threads": 1} if process else {}
            self.service = LMService({loaded.name: ServedLM.from_loaded(loaded, max_seqs=args["batch"], **extra)})

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def run(self, reqs: list[dict]) -> list[dict]:
            longest = max(r.get("max_tokens") or 16 for r in reqs)
            outs = await asyncio.gather(*(self.service.completion(oa.CompletionRequest(
                **{**r, "max_tokens": longest if pad else r.get("max_tokens")})) for r in reqs))
            results = []
            for r, o in zip(reqs, outs):
                o = o.model_dump()
                o["usage"]["completion_tokens"] = min(o["usage"]["completion_tokens"], r.get("max_tokens") or 16)
                results.append(o)
            return results

        @api.post("/v1/completions")  # where the llm app has it
        async def completions(self, body: dict) -> dict:
            return await self.run(body)

    return StaticLLM.options(ray_actor_options={"num_cpus": 1, "num_gpus": args.get("num_gpus", 0)}).bind()


def workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice(CHARS) for _ in range(rng.randint(8, 64))),
             "max_tokens": rng.randint(16, 128), "seed": i} for i in range(n)]


async def drive(url: str, model: str, reqs: list[dict], concurrency: int, stream: bool) -> dict:
    import aiohttp

    todo = list(reqs)
    ttft, itl, tokens = [], [], 0

    async def worker(session):
        nonlocal tokens
        while todo:
            r = todo.pop()
            body = {"model": model, **r, "ignore_eos": True, "stream": stream,
                    **({"stream_options": {"include_usage": True}} if stream else {})}
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                if not stream:
                    out = await resp.json()
                    ttft.append(time.perf_counter() - t0)
                    tokens += out["usage"]["completion_tokens"]
                    continue
                last = None
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if not chunk["choices"]:  # the usage chunk: exact token count (some tokens print nothing)
                        tokens += chunk["usage"]["completion_tokens"]
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append(now - last)
                    last = now
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800), headers=api_key_header()) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - start

    def pct(xs, q):
        return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None

    return {"tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "requests": len(reqs), "tokens": tokens}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=0, help="per level (default max(64, 4 x concurrency): long enough "
                   "that the batch draining at the end of a run is a small share of it)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=["continuous", "sequential", "static"],
                   help="continuous, continuous-thread, sequential, static (padded), static-process (padded, "
                   "batches in an engine process), static-early-exit")
    p.add_argument("--no-stream", action="store_true", help="every variant non-streamed (throughput only)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs the variants' replicas share (a GPU machine: 1)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.d_model, args.layers = [1, 4], 4, 32, 1
    share = {"num_cpus": 1, "num_gpus": gpu_split(args.num_gpus, len(args.variants))}

    from ray import serve

    from aidc.registry import tracking_uri
    from serve_apps.llm import LLMServer

    results: dict = {"concurrency": args.concurrency, "d_model": args.d_model, "layers": args.layers}
    with tempfile.TemporaryDirectory() as root, local_ray(num_cpus=4):
        ref = register_random_gpt(root, args.d_model, args.layers, block=256)
        uri = tracking_uri(None, root)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for variant in args.variants:  # all deployed first, then interleaved per level: a fair share of noise
                if variant.startswith("static"):
                    app = static_app({"model": ref, "tracking_uri": uri, "batch": 16, "num_gpus": share["num_gpus"]},
                                     pad=variant != "static-early-exit", process=variant == "static-process")
                else:  # continuous-thread: the engine in a thread of the replica, not its own process
                    app = LLMServer.options(ray_actor_options=share).bind({
                        "models": [ref], "tracking_uri": uri, "metrics": False, "torch_threads": 1,
                        "max_num_seqs": 1 if variant == "sequential" else 32,
                        "engine_process": variant != "continuous-thread"})
                serve.run(app, name=variant, route_prefix=f"/{variant}")
            stream = {v: not v.startswith("static") and not args.no_stream for v in args.variants}
            url = {v: f"http://127.0.0.1:{port}/{v}" for v in args.variants}
            for v in args.variants:
                asyncio.run(drive(url[v], "bench-gpt", workload(2, 99), 1, stream[v]))  # warm up
            for c in args.concurrency:
                reqs = workload(args.requests or max(64, 4 * c), seed=c)
                for v in args.variants:
                    r = asyncio.run(drive(url[v], "bench-gpt", reqs, c, stream[v]))
                    results[f"{v}_c{c}"] = r
                    print(json.dumps({"variant": v, "concurrency": c, **r}), flush=True)
        finally:
            serve.shutdown()
    for c in args.concurrency:
        cont = results.get(f"continuous_c{c}", {}).get("tokens_per_s")
        for other in ("continuous-thread", "sequential", "static", "static-process", "static-early-exit"):
            o = results.get(f"{other}_c{c}", {}).get("tokens_per_s")
            if cont and o:
                results[f"continuous_vs_{other}_c{c}"] = round(cont / o, 2)
    print(json.dumps({k: v for k, v in results.items() if k.startswith("continuous_vs")}))
    return results


if __name__ == "__main__":
    main()
