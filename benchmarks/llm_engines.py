"""Engine choice on evidence: aidc's continuous-batching engine (aidc.serving.engine over aidc.models.gpt)
vs Hugging Face transformers' continuous batching (`generate_batch`) on the same GPT-2 weights, same
requests (mixed prompt lengths, fixed new tokens, greedy, no early stop), one CPU thread each.

    python -m benchmarks.llm_engines [--quick] [--requests 32] [--new-tokens 64] [--d-model 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import benchmarks.common  # noqa: F401  (puts platform/ on sys.path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens, args.d_model, args.layers = 4, 8, 32, 1

    import torch
    from transformers import GenerationConfig, GPT2LMHeadModel

    from aidc.hf import convert_gpt2
    from aidc.serving.engine import Engine, SamplingParams
    from aidc.tasks import get_task
    from tests.integration.hf_tiny import make_tiny_gpt2

    torch.set_num_threads(1)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_gpt2(Path(tmp, "gpt2"), n_positions=256, n_embd=args.d_model, n_layer=args.layers)
        state, spec = convert_gpt2(folder)
        ours = get_task("language_model").build_model(spec["model"], spec["features"])
        ours.load_state_dict(state)
        ours.eval()
        hf = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    vocab = spec["features"]["vocab_size"]
    prompts = [[rng.randrange(vocab - 1) for _ in range(rng.randint(8, 64))] for _ in range(args.requests)]
    total = args.requests * args.new_tokens

    async def run_ours():
        engine = Engine(ours, eos_id=None, max_seqs=args.requests)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0)

        async def one(prompt):
            return [e.token async for e in engine.generate(prompt, params)]
        return await asyncio.gather(*(one(x) for x in prompts))

    t = time.perf_counter()
    ours_out = asyncio.run(run_ours())
    ours_s = time.perf_counter() - t
    result = {"requests": args.requests, "new_tokens": args.new_tokens, "d_model": args.d_model,
              "layers": args.layers, "aidc_engine_tokens_per_s": round(total / ours_s, 1)}
    try:
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        if args.quick:  # its manager waits on timeouts here (a minute of wall time for a few tokens): skip
            raise RuntimeError("skipped in --quick mode")
        hf.generate_batch(inputs=prompts[:2], generation_config=cfg)  # warm-up: steady-state figures
        t = time.perf_counter()
        hf_out = hf.generate_batch(inputs=prompts, generation_config=cfg)
        hf_s = time.perf_counter() - t
        hf_tokens = [list(o.generated_tokens) for o in hf_out.values()]
        result.update({"transformers_cb_tokens_per_s": round(total / hf_s, 1),
                       "aidc_vs_transformers": round(hf_s / ours_s, 2),
                       "transformers_tokens_generated": sum(len(x) for x in hf_tokens),
                       "same_greedy_tokens": sorted(map(tuple, hf_tokens)) == sorted(map(tuple, ours_out))})
    except Exception as exc:  # report the library's failure on this machine rather than hide it
        result["transformers_cb_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
