"""glibc malloc tuning (platform/aidc/malloc.py) on vs off, side by side: the same forward and training steps
in two fresh processes, one with `AIDC_MALLOC_TUNING=0` (glibc's defaults), one torch thread each.

    python -m benchmarks.allocator [--quick] [--repeats 7]

Measured: the MNIST CNN (channels [32, 64]) forward at batch 1, 8, 32 and 64; a GPT forward (d_model 128,
4 layers, 16 sequences of 190 tokens: the evaluation and `aidc model predict` path; served language models
run in vLLM, which has its own allocator settings); a CNN training step (forward, backward, AdamW) at
batch 64. Reports medians and the speedup (> 1: tuned is faster).
Runs alternate between the two settings, so drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import ROOT


def _median_ms(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1000)
    return round(statistics.median(times), 3)


def child(quick: bool, repeats: int) -> dict:
    import torch

    import aidc.malloc
    from aidc.models.gpt import GPT
    from aidc.tasks import get_task

    torch.set_num_threads(1)
    torch.manual_seed(0)
    calls = 2 if quick else 10
    cnn = get_task("image_classification").build_model(
        {"arch": "cnn", "channels": [32, 64], "hidden": 128, "dropout": 0.2},
        {"image_shape": [28, 28], "num_classes": 10})
    out = {"tuned": aidc.malloc._applied}
    with torch.inference_mode():
        cnn.eval()
        for b in (1, 8, 32, 64):
            x = torch.randn(b, 1, 28, 28)
            out[f"cnn_forward_b{b}_ms"] = _median_ms(lambda: cnn(x), calls, repeats)
        gpt = GPT(70, 256, d_model=128, heads=4, layers=4, dropout=0.0).eval()
        idx = torch.randint(3, 70, (16, 190))
        out["gpt_forward_b16_t190_ms"] = _median_ms(lambda: gpt(idx), calls, repeats)
    cnn.train()
    opt = torch.optim.AdamW(cnn.parameters())
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def train_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(cnn(x), y).backward()
        opt.step()
    out["cnn_train_step_b64_ms"] = _median_ms(train_step, calls, repeats)
    return out


def _run(tuning: str, quick: bool, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"AIDC_MALLOC_TUNING": tuning, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])})
    args = [sys.executable, "-m", "benchmarks.allocator", "--child", "--repeats", str(repeats)]
    proc = subprocess.run(args + (["--quick"] if quick else []), env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few calls (smoke test)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median reported)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        result = child(a.quick, a.repeats)
        print(json.dumps(result), flush=True)
        return result
    rounds = 1 if a.quick else 3
    runs = {"tuned": [], "default": []}
    for _ in range(rounds):  # alternate: machine drift hits both settings alike
        runs["default"].append(_run("0", a.quick, a.repeats))
        runs["tuned"].append(_run("1", a.quick, a.repeats))
    result = {"applied": {k: all(r["tuned"] for r in v) for k, v in runs.items()}}
    for key in (k for k in runs["tuned"][0] if k.endswith(("_ms", "_per_s"))):
        on = statistics.median(r[key] for r in runs["tuned"])
        off = statistics.median(r[key] for r in runs["default"])
        ratio = off / on if key.endswith("_ms") else on / off  # > 1: the tuning is faster
        result[key] = {"glibc_default": off, "tuned": on, "speedup": round(ratio, 2)}
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
