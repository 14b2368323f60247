"""Tokens/s generating 256 tokens with the key/value cache (the serving engine's `GPT.step` path) vs
recomputing the whole sequence every step. Same model (shakespeare-gpt shape, random weights: speed
does not depend on training), same greedy tokens. Target: KV cache >= 5x.

    python -m benchmarks.llm_kv_cache [--quick] [--new-tokens 256] [--d-model 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import time

import benchmarks.common  # noqa: F401  (puts platform/ on sys.path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 32, 1

    import torch

    from aidc.models.gpt import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = args.prompt + args.new_tokens
    model = GPT(68, block, d_model=args.d_model, heads=4, layers=args.layers, dropout=0.0).eval()
    prompt = torch.randint(0, 68, (1, args.prompt))

    @torch.inference_mode()
    def cached():
        cache, slot = model.new_cache(1), torch.tensor([0])
        logits = model.step(prompt, torch.arange(args.prompt)[None], cache, slot)
        out = [int(logits[0, -1].argmax())]
        for i in range(args.new_tokens - 1):
            logits = model.step(torch.tensor([[out[-1]]]), torch.tensor([[args.prompt + i]]), cache, slot)
            out.append(int(logits[0, -1].argmax()))
        return out

    @torch.inference_mode()
    def recompute():
        seq = prompt
        out = []
        for _ in range(args.new_tokens):
            out.append(int(model(seq)[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
        return out

    def best(fn):
        times, tokens = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - t)
        return args.new_tokens / min(times), tokens

    kv_tps, kv_tokens = best(cached)
    re_tps, re_tokens = best(recompute)
    result = {"new_tokens": args.new_tokens, "d_model": args.d_model, "layers": args.layers,
              "kv_cache_tokens_per_s": round(kv_tps, 1), "recompute_tokens_per_s": round(re_tps, 1),
              "speedup": round(kv_tps / re_tps, 2), "same_tokens": kv_tokens == re_tokens,
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
