"""The `llm` app (vLLM through Ray Serve LLM) over HTTP: throughput and latency at rising concurrency, prefix
caching on vs off, and the cost of structured (JSON-schema) output.

- Throughput: a random aidc GPT (d_model 128, 4 heads, 4 layers, char tokenizer, context 256 - the model the
  retired hand-written engine was benchmarked on, exported to a Hugging Face folder for vLLM), mixed prompt
  (8-64 chars) and output (16-128 tokens) lengths, ignore_eos so every request generates its max_tokens.
  Output tokens/s, time to first token p50/p99 and inter-token latency p50/p99 (per request: the time from
  the first to the last token over the tokens between, as vLLM's benchmarks define TPOT; Ray Serve LLM
  sends several tokens per server-sent event under load, so a per-event gap would overstate it).
- Prefix caching: 64 requests sharing a 512-token system prompt, each with a short question, cache on vs
  off (two apps of the same model, context 1024): TTFT p50 and tokens/s.
- Structured output: chat completions with and without a JSON schema, tokens/s.

    python -m benchmarks.llm_serving [--quick] [--concurrency 1 16 64] [--parts throughput prefix json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path


from benchmarks.common import api_key_header, closed_loop, local_ray, percentile_ms

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n"  # prompts are drawn from these
JSON_CHARS = '{}[]"0123456789-'  # in the vocabulary too: a model whose vocabulary lacks them cannot write JSON
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}}},
          "required": ["name", "age", "tags"]}


def register_random_gpt(root: str, d_model: int, layers: int, block: int, heads: int = 4,
                        name: str = "bench-gpt") -> str:
    """A GPT of the given shape with random weights (speed does not depend on training), registered."""
    import torch

    from aidc.data.tokenizer import SPECIALS
    from aidc.models.gpt import GPT
    from aidc.registry import export_model_dir, register_model_dir

    vocab = SPECIALS + sorted(set(CHARS + JSON_CHARS))
    tok = {"kind": "char", "vocab": vocab, "vocab_size": len(vocab), "lowercase": False,
           "pad_id": 0, "unk_id": 1, "eos_id": 2}
    torch.manual_seed(0)
    model = GPT(len(vocab), block, d_model=d_model, heads=heads, layers=layers, dropout=0.0)
    spec = {"task": "language_model", "model": {"arch": "gpt", "d_model": d_model, "heads": heads, "layers": layers,
                                                "dropout": 0.0},
            "features": {"vocab_size": len(vocab), "block_size": block, "tokenizer": "char"},
            "transform": {"tokenizer": tok, "block_size": block}, "metrics": {}}
    with tempfile.TemporaryDirectory() as tmp:
        export_model_dir(Path(tmp, "m"), state_dict=model.state_dict(), spec=spec, config_yaml="bench: true\n")
        return register_model_dir(Path(tmp, "m"), name, "bench", root=root).ref


def workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice(CHARS) for _ in range(rng.randint(8, 64))),
             "max_tokens": rng.randint(16, 128), "seed": i} for i in range(n)]


async def drive(url: str, model: str, reqs: list[dict], concurrency: int, stream: bool, route: str = "completions",
                extra: dict | None = None) -> dict:
    """`concurrency` closed-loop clients over `reqs`; tokens/s, TTFT and per-request inter-token latency."""
    import aiohttp

    ttft, itl, tokens = [], [], 0

    async def send(session, r):
        nonlocal tokens
        r = dict(r)
        if route == "chat/completions":
            r["messages"] = [{"role": "user", "content": r.pop("prompt")}]
        body = {"model": model, **r, "ignore_eos": True, "stream": stream, **(extra or {}),
                **({"stream_options": {"include_usage": True}} if stream else {})}
        t0 = time.perf_counter()
        async with session.post(f"{url}/v1/{route}", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {await resp.text()}")
            if not stream:
                out = await resp.json()
                ttft.append(time.perf_counter() - t0)
                tokens += out["usage"]["completion_tokens"]
                return
            first = last = None
            n = 0
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if not chunk["choices"]:  # the usage chunk: exact token count
                    n = chunk["usage"]["completion_tokens"]
                    continue
                now = time.perf_counter()
                first = first or now
                last = now
            tokens += n
            if first is not None:
                ttft.append(first - t0)
                if n > 1:
                    itl.append((last - first) / (n - 1))

    wall = await closed_loop(concurrency, send, todo=list(reqs), timeout=aiohttp.ClientTimeout(total=1800),
                             headers=api_key_header())
    return {"tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": percentile_ms(ttft, 50), "ttft_p99_ms": percentile_ms(ttft, 99),
            "itl_p50_ms": percentile_ms(itl, 50), "itl_p99_ms": percentile_ms(itl, 99), "requests": len(reqs), "tokens": tokens}


def deploy(name: str, ref: str, uri: str, **settings) -> str:
    from ray import serve

    from serve_apps.llm import app_builder

    model = {"ref": ref, "num_cpus": 1, "max_num_seqs": 64, "max_waiting": 1024, **settings}
    serve.run(app_builder({"models": [model], "tracking_uri": uri, "auth": {"enabled": False}, "metrics": False}),
              name=name, route_prefix=f"/{name}")
    return name


def prefix_workload(n: int, system_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    system = "".join(rng.choice(CHARS) for _ in range(system_tokens))  # char tokenizer: a char is a token
    return [{"prompt": system + "Q: " + "".join(rng.choice(CHARS) for _ in range(rng.randint(8, 24))) + "\nA:",
             "max_tokens": 16, "seed": i} for i in range(n)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests", type=int, default=0, help="per level (default max(64, 4 x concurrency))")
    p.add_argument("--parts", nargs="+", default=["throughput", "prefix", "json"])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=0, help="attention heads (default d_model / 32; vLLM's CPU "
                   "attention takes head sizes 32, 64, 80, ..., 128, ...)")
    p.add_argument("--no-stream", action="store_true", help="throughput non-streamed (tokens/s only)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (a GPU machine: 1)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.d_model, args.layers, args.parts = [1, 4], 8, 64, 1, ["throughput"]
    from ray import serve

    from aidc.registry import tracking_uri
    from aidc.testing import free_port, serve_shutdown, serve_start

    results: dict = {"concurrency": args.concurrency, "d_model": args.d_model, "layers": args.layers}
    gpu = {"num_gpus": args.num_gpus} if args.num_gpus else {}
    with tempfile.TemporaryDirectory() as root, local_ray(num_cpus=4):
        uri = tracking_uri(None, root)
        port = free_port()
        serve_start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        try:
            if "throughput" in args.parts or "json" in args.parts:
                ref = register_random_gpt(root, args.d_model, args.layers, block=256,
                                          heads=args.heads or args.d_model // 32)
                t0 = time.perf_counter()
                url = f"{base}/{deploy('vllm', ref, uri, **gpu)}"
                results["app_start_s"] = round(time.perf_counter() - t0, 1)
                asyncio.run(drive(url, "bench-gpt", workload(4, 99), 1, True))  # warm up
                if "throughput" in args.parts:
                    for c in args.concurrency:
                        r = asyncio.run(drive(url, "bench-gpt", workload(args.requests or max(64, 4 * c), seed=c),
                                              c, not args.no_stream))
                        results[f"c{c}"] = r
                        print(json.dumps({"part": "throughput", "concurrency": c, **r}), flush=True)
                if "json" in args.parts:
                    reqs = [{**r, "max_tokens": 48} for r in workload(64, seed=5)]
                    for label, extra in (("plain", {}), ("json_schema", {"response_format": {
                            "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}})):
                        r = asyncio.run(drive(url, "bench-gpt", reqs, 16, False, "chat/completions",
                                              {**extra, "ignore_eos": False}))
                        results[f"chat_{label}"] = r
                        print(json.dumps({"part": "json", "variant": label, **r}), flush=True)
                    results["json_schema_vs_plain_tokens_per_s"] = round(
                        results["chat_json_schema"]["tokens_per_s"] / results["chat_plain"]["tokens_per_s"], 2)
                serve.delete("vllm")
            if "prefix" in args.parts:
                ref = register_random_gpt(root, args.d_model, args.layers, block=1024,
                                          heads=args.heads or args.d_model // 32, name="bench-gpt-long")
                reqs = prefix_workload(64, 512)
                for label, on in (("cache_on", True), ("cache_off", False)):
                    url = f"{base}/{deploy(label.replace('_', '-'), ref, uri, enable_prefix_caching=on, **gpu)}"
                    asyncio.run(drive(url, "bench-gpt-long", prefix_workload(2, 512, seed=99), 1, True))  # warm up
                    r = asyncio.run(drive(url, "bench-gpt-long", reqs, 16, True))
                    results[f"prefix_{label}"] = r
                    print(json.dumps({"part": "prefix", "variant": label, **r}), flush=True)
                    serve.delete(label.replace("_", "-"))
                on, off = results["prefix_cache_on"], results["prefix_cache_off"]
                results["prefix_ttft_p50_off_over_on"] = round(off["ttft_p50_ms"] / on["ttft_p50_ms"], 2)
                results["prefix_tokens_per_s_on_over_off"] = round(on["tokens_per_s"] / off["tokens_per_s"], 2)
        finally:
            serve_shutdown()
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
    return results


if __name__ == "__main__":
    main()
