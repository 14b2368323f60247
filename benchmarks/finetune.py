"""Full fine-tuning vs LoRA on the same model and data, side by side (task causal_lm's own steps: tokenize with the
base's chat template, answer-only loss, AdamW), one process, no Ray: tokens/s of training, parameters that train,
optimizer state and checkpoint bytes (what aidc's checkpoint of each holds). Then FSDP2 on 2 gloo ranks: checkpoint
save time and bytes per rank, the full state gathered on rank 0 vs torch.distributed.checkpoint shards.

    python -m benchmarks.finetune [--quick] [--hidden 512] [--layers 8] [--steps 20] [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT  # noqa: F401 - puts platform/ on sys.path


def make_base(directory: Path, hidden: int, layers: int) -> Path:
    """A random Llama-architecture folder (heads of 64) with the tests' byte-level tokenizer."""
    sys.path.insert(0, str(ROOT))
    from aidc.testing import make_tiny_llama

    return make_tiny_llama(directory, max_positions=512, hidden=hidden, layers=layers, heads=max(1, hidden // 64))


def measure(folder: Path, method: str, steps: int, batch_size: int, device: str) -> dict:
    import numpy as np
    import torch

    from aidc.config import validate
    from aidc.data.sources import load_synthetic_instructions
    from aidc.tasks import get_task
    from aidc.train.parallel import full_state

    cfg = validate({"name": "bench", "task": "causal_lm", "model": {"arch": "hf", "init_from": str(folder)},
                    "data": {"source": "synthetic-instructions", "chat": {"max_length": 64, "examples": 2000}},
                    "train": {"method": method}, "registry": {"model_name": "bench"}})
    task, job = get_task("causal_lm"), cfg.model_dump(mode="json")
    raw = load_synthetic_instructions(cfg)
    state = task.fit(raw.columns, cfg, {})
    encoded = task.encode_batch(raw.columns, state)
    torch.manual_seed(0)
    model = task.adapt(task.build_model(job["model"], task.features({}, state)), job).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = len(encoded["input_ids"])

    def batch(i):
        rows = {k: encoded[k][np.arange(i * batch_size, (i + 1) * batch_size) % n] for k in ("input_ids", "labels")}
        return {k: torch.from_numpy(v).to(device) for k, v in task.transform_batch(rows, state).items()}

    def step(i):
        b = batch(i)
        task.loss(task.forward(model, b), b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["mask"].sum())

    for i in range(2):  # warm-up: allocator, optimizer state
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t, tokens = time.perf_counter(), 0
    for i in range(steps):
        tokens += step(i + 2)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    model_sd, optim_sd = full_state(model, opt, "ddp")
    buf = io.BytesIO()
    torch.save({"model": model_sd, "optimizer": optim_sd}, buf)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "tokens_per_s": round(tokens / elapsed, 1), "step_s": round(elapsed / steps, 4),
            "params": params, "trained_params": trained, "checkpoint_mb": round(len(buf.getvalue()) / 2**20, 2),
            **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if device == "cuda" else {})}


def _checkpoint_rank(rank: int, world: int, folder: str, out: str, port: int, queue) -> None:
    """One of `world` gloo ranks: FSDP2 over the decoder layers, then both checkpoint kinds, timed and sized."""
    import os
    import shutil

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from aidc.tasks.causal_lm import load_base_model
    from aidc.train.parallel import full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = load_base_model(Path(folder))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits.sum().backward()
    opt.step()  # the optimizer's moments exist, as in any checkpoint after a step

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0

    figures = {}
    for kind in ("gathered", "sharded"):
        d = Path(out, f"{kind}-rank{rank}")  # each rank its own folder, as each Ray Train worker reports one
        dist.barrier()
        t = time.perf_counter()
        if kind == "gathered":  # aidc before: full state gathered on rank 0, written there
            model_sd, optim_sd = full_state(model, opt, "fsdp")
            if rank == 0:
                d.mkdir(parents=True)
                torch.save({"model": model_sd, "optimizer": optim_sd}, d / "state.pt")
        else:
            dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=str(d))
        dist.barrier()
        figures[kind] = {"save_s": round(time.perf_counter() - t, 3), "mb": round(size(d) / 2**20, 2)}
        shutil.rmtree(d, ignore_errors=True)
    queue.put((rank, figures))
    dist.destroy_process_group()


def checkpoint_figures(folder: Path, world: int = 2) -> dict:
    """Save time and bytes written per rank: the full state gathered on rank 0 vs DCP shards from every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_checkpoint_rank, args=(r, world, str(folder), out, port, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    return {kind: {f"rank{r}": got[r][kind] for r in sorted(got)} for kind in ("gathered", "sharded")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (the suite's smoke run)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args, _ = p.parse_known_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.batch = 64, 2, 3, 4
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_base(Path(tmp, "base"), args.hidden, args.layers)
        full, lora = (measure(folder, m, args.steps, args.batch, args.device) for m in ("full", "lora"))
        ckpt = checkpoint_figures(folder)
    result = {"benchmark": "finetune", "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
              "device": args.device, "full": full, "lora": lora,
              "lora_vs_full_tokens_per_s": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
              "lora_vs_full_checkpoint": round(lora["checkpoint_mb"] / full["checkpoint_mb"], 5),
              "fsdp_checkpoint_2_ranks": ckpt}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
