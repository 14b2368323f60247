"""Calibrate the capacity planner (aidc.plan) against real training steps, and compare its predictions.

    python -m benchmarks.plan_calibrate [--quick] [--steps 6] [--no-record]

Each case - a shipped job config, some with overrides (activation checkpointing, a wider GPT) - runs in a
fresh process: the job's own model (built as training builds it), AdamW, the precision the job resolves on
this device, random inputs of the dataset's shapes, a few optimizer steps. Measured: peak memory (CUDA max
allocated on a GPU; on CPU the process's peak RSS rise over its RSS just before the model was built) and the
median step time. The planner's prediction for the same job on this device goes beside it.

Memory is also checked for 2 workers on this host (gloo), DDP and FSDP2, with and without activation
checkpointing: each rank measures itself, the largest peak is set beside the planner's per-worker figure.

The step-time model's three coefficients (per-operator cost, efficiency (MFU) against the device's peak
FLOP/s, effective bandwidth of activation traffic) are fitted to the single-worker cases by least squares
on relative error, and recorded with the framework's own memory in `<storage root>/plan/calibration.json`
under the device's kind; `aidc plan` and `jobs.train` use them from then on instead of the defaults.
Prints one JSON object: every case, predicted beside measured, and what was recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT

CASES = [
    ("digits", []),
    ("mnist", []),
    ("sms-spam", []),
    ("shakespeare-gpt", []),
    ("shakespeare-gpt", ["model.activation_checkpointing=true"]),
    ("shakespeare-gpt", ["model.d_model=512", "model.heads=8", "model.layers=6", "data.text.block_size=256",
                         "train.batch_size=16"]),
    ("shakespeare-gpt", ["model.d_model=512", "model.heads=8", "model.layers=6", "data.text.block_size=256",
                         "train.batch_size=16", "model.activation_checkpointing=true"]),
]
# Fine-tuning (task causal_lm): a random Llama-architecture base made here (benchmarks.finetune.make_base, hidden
# 512, 8 layers, 21M parameters), fully and with LoRA, with and without activation checkpointing
_FT = ["model.init_from={base}", "data.chat.max_length=256", "train.batch_size=8", "model.lora.dropout=0.0"]
FINETUNE_CASES = [("chat-sft", _FT + extra) for extra in (
    [], ["train.method=lora"], ["model.activation_checkpointing=true"],
    ["train.method=lora", "model.activation_checkpointing=true"])]
CASES += FINETUNE_CASES
QUICK = [CASES[0], CASES[3]]
# Memory only (gloo's communication on one host says nothing of a cluster's): 2 workers, DDP and FSDP2.
_MID = ["model.d_model=256", "model.heads=4", "model.layers=8", "data.text.block_size=256", "train.batch_size=16",
        "model.dropout=0.0", "resources.num_workers=2"]
DIST_CASES = [("shakespeare-gpt", _MID + [f"train.parallelism={p}"] + ckpt) for p in ("ddp", "fsdp")
              for ckpt in ([], ["model.activation_checkpointing=true"])]
DIST_CASES += [("chat-sft", _FT + ["resources.num_workers=2", f"train.parallelism={p}"] + m)
               for p in ("ddp", "fsdp") for m in ([], ["train.method=lora"])]


def _inputs(shape_inputs, features: dict, device, vocab: int | None = None):
    import torch

    if isinstance(shape_inputs, dict):  # a transformers model's keywords (Task.planning_inputs: causal_lm)
        ids = shape_inputs["input_ids"]
        n, t = ids.shape
        return {"input_ids": torch.randint(0, vocab, (n, t), device=device),
                "attention_mask": torch.ones(n, 1, t, t, dtype=torch.bool, device=device).tril(),
                "position_ids": torch.arange(t, device=device).expand(n, t)}
    out = []
    for t in shape_inputs:
        if t is None:
            out.append(None)
        elif t.dtype == torch.long:
            high = features.get("vocab_size") or features.get("num_users") or 2
            out.append(torch.randint(0, high, tuple(t.shape), device=device))
        else:
            out.append(torch.randn(tuple(t.shape), device=device))
    return tuple(out)


def _reset_peak() -> None:
    """Linux: reset the process's peak RSS (VmHWM) to its current RSS, so imports' peaks do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _train(cfg, features: dict, device, precision: str, steps: int) -> list[float]:
    """The job's model, AdamW, random inputs of the dataset's shapes: `steps` optimizer steps; their times."""
    import torch

    from aidc import plan
    from aidc.tasks import get_task
    from aidc.train.parallel import autocast, blocks_of

    task = get_task(cfg.task)
    model = task.adapt(task.build_model(cfg.model.model_dump(mode="json"), features), cfg.model_dump(mode="json"))
    model = model.to(device).train()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if torch.distributed.is_initialized():  # as aidc.train.parallel wraps it: DDP, or FSDP2 per block then root
        if cfg.train.parallelism == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in blocks_of(model):
                fully_shard(block)
            fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sample = task.planning_inputs(features, cfg.train.batch_size)
    times = []
    for _ in range(steps):
        inputs = _inputs(sample, features, device, vocab)
        t = time.perf_counter()
        with autocast(precision, device):
            out = plan.call_model(model, inputs)
            loss = out.float().logsumexp(-1).mean() if out.dim() > 1 else out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def _spawn_ranks(config: str, overrides: list[str], steps: int, world: int) -> dict:
    """A distributed case: `world` processes on this host (gloo), each measuring itself; the largest peak."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.plan_calibrate", "--steps", str(steps), "--one",
                               json.dumps([config, overrides])], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(world)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{config} {overrides}: a rank failed: {err[-2000:]}")
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    top = max(ranks, key=lambda r: r["measured_peak_gib"])
    return {**top, "workers": world, "measured_peak_gib_per_rank": [r["measured_peak_gib"] for r in ranks],
            "memory_ratio": round(top["predicted_peak_gib"] / top["measured_peak_gib"], 3)}


_OOM_MESSAGES = ("memory", "could not create a primitive")


def _vm_data() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))


def run_one(config: str, overrides: list[str], steps: int, cap_gib: float | None = None) -> dict:
    """In this (fresh) process: train `steps` optimizer steps; measured and predicted figures.

    cap_gib (CPU): first cap this process's data memory (RLIMIT_DATA: heap and private mappings, where
    PyTorch's CPU tensors live) at what it uses now plus cap_gib - a worker on a device of that size - and
    report whether training ran out of memory (`oom`) instead of measuring it."""
    import psutil
    import torch

    from aidc import plan
    from aidc.config import load_config
    from aidc.train.parallel import resolve_precision

    cfg = load_config(str(ROOT / "jobs" / "configs" / f"{config}.yaml"), overrides)
    world = plan.planned_workers(cfg)
    if world > 1 and "RANK" not in os.environ:
        return _spawn_ranks(config, overrides, steps, world)
    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        torch.distributed.init_process_group("gloo")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    features = plan.planning_features(cfg, plan.read_manifest(cfg))
    dev = plan.local_device(world, cfg.resources.cpus_per_worker)
    shape = plan.model_shape(cfg, dev.kind)
    predicted = plan.plan_for(cfg, shape, dev, mfu=1.0)
    precision = resolve_precision(cfg.train.precision, device)
    if cap_gib is not None:
        import resource

        limit = _vm_data() + int(cap_gib * plan.GIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        result = {"predicted_peak_gib": round(predicted.memory.total / plan.GIB, 4), "cap_gib": cap_gib}
        try:
            _train(cfg, features, device, precision, steps)
        except (MemoryError, RuntimeError) as exc:
            # oneDNN reports a failed allocation (its JIT kernels and scratchpads are private mappings under
            # the cap) as "could not create a primitive" - seen on a CPU whose matmuls go through oneDNN
            if not (isinstance(exc, MemoryError) or any(s in str(exc).lower() for s in _OOM_MESSAGES)):
                raise
            return {**result, "oom": True, "error": str(exc).splitlines()[0][:200]}
        return {**result, "oom": False}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = psutil.Process().memory_info().rss
    times = _train(cfg, features, device, precision, steps)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base + plan.GPU_FRAMEWORK_GIB * plan.GIB
    else:
        peak = _peak_rss() - base
    step_s = statistics.median(times[2:] or times)
    ckpt = getattr(cfg.model, "activation_checkpointing", False)
    flops, ops = (shape.flops_ckpt, shape.ops_ckpt) if ckpt else (shape.flops, shape.ops)
    peak_flops = (dev.tflops.get(plan.planned_precision(cfg, dev)) or dev.tflops["fp32"]) * 1e12
    return {"config": config, "overrides": overrides, "device": plan.calibration_key(dev), "precision": precision,
            "params": shape.params, "measured_peak_gib": round(peak / plan.GIB, 4),
            "predicted_peak_gib": round(predicted.memory.total / plan.GIB, 4),
            "memory_ratio": round(predicted.memory.total / peak, 3) if peak > 0 else None,
            "measured_step_ms": round(step_s * 1000, 2), "flops_per_step": flops, "ops_per_step": ops,
            "traffic_bytes": shape.saved_fp32 * (2 if ckpt else 1), "peak_flops": peak_flops}


def framework_rise(steps: int) -> float:
    """GiB a training step of a trivial model raises this process's memory by: the framework's own share."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return 0.0  # the CUDA context is outside torch's allocator statistics: the planner's default stands
    _reset_peak()
    base = psutil.Process().memory_info().rss
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(steps):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (_peak_rss() - base) / 2**30


def fit_step_time(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares on relative error of step = ops x per_op + FLOPs / (peak x mfu) + traffic / bandwidth:
    (per_op_us, mfu, memory_gbps)."""
    import numpy as np

    t = np.array([r["measured_step_ms"] / 1000 for r in rows])
    a = np.array([[r["ops_per_step"], r["flops_per_step"] / r["peak_flops"], r["traffic_bytes"]] for r in rows])
    coef, *_ = np.linalg.lstsq(a / t[:, None], np.ones(len(rows)), rcond=None)
    per_op, inv_mfu, inv_bw = (max(float(c), 1e-12) for c in coef)
    return per_op * 1e6, min(1.0, 1.0 / inv_mfu), 1.0 / inv_bw / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two cases, two steps after warm-up (a smoke run; "
                   "records nothing: two cases cannot fit three coefficients)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--no-record", action="store_true", help="do not write the measured efficiency")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case in this process
    args = p.parse_args(argv)
    if args.one:
        config, overrides, *cap = json.loads(args.one)
        out = {"framework_gib": framework_rise(args.steps)} if config == "framework" else run_one(
            config, overrides, args.steps, *cap)
        print(json.dumps(out))
        return 0
    cases = QUICK if args.quick else CASES
    steps = 4 if args.quick else args.steps
    import tempfile

    from benchmarks.finetune import make_base

    tmp = tempfile.TemporaryDirectory(prefix="aidc-calibrate-")
    if any("{base}" in o for _, overrides in cases + ([] if args.quick else DIST_CASES) for o in overrides):
        base = str(make_base(Path(tmp.name, "llama"), hidden=512, layers=8))
        cases = [(c, [o.replace("{base}", base) for o in ov]) for c, ov in cases]
        dist_cases = [(c, [o.replace("{base}", base) for o in ov]) for c, ov in DIST_CASES]
    else:
        dist_cases = DIST_CASES
    rows = []
    for config, overrides in [("framework", []), *cases]:  # one worker each: the step-time fit's cases
        proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_calibrate", "--steps", str(steps), "--one",
                               json.dumps([config, ["resources.num_workers=1", *overrides]])], cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{config} {overrides}: {proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    dist = []
    for config, overrides in ([] if args.quick else dist_cases):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_calibrate", "--steps", str(steps), "--one",
                               json.dumps([config, overrides])], cwd=ROOT, capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{config} {overrides}: {proc.stderr[-2000:]}")
        dist.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    framework = rows.pop(0)["framework_gib"]
    per_op_us, mfu, gbps = fit_step_time(rows)
    for r in rows:
        r["predicted_step_ms"] = round((r["ops_per_step"] * per_op_us / 1e6 + r["flops_per_step"] / (
            r["peak_flops"] * mfu) + r["traffic_bytes"] / (gbps * 1e9)) * 1000, 2)
        r["step_ratio"] = round(r["predicted_step_ms"] / r["measured_step_ms"], 3)
    device = rows[0]["device"]
    out = {"cases": rows, "distributed_memory": [{k: r[k] for k in ("overrides", "workers", "measured_peak_gib",
                                                                    "measured_peak_gib_per_rank",
                                                                    "predicted_peak_gib", "memory_ratio")}
                                                  for r in dist], "device": device, "mfu": round(mfu, 4), "per_op_us": round(per_op_us, 3),
           "memory_gbps": round(gbps, 3),
           "framework_gib": round(framework, 4)}
    if not (args.no_record or args.quick):
        from aidc.plan import record_calibration

        record = {"mfu": out["mfu"], "per_op_us": out["per_op_us"], "memory_gbps": out["memory_gbps"]}
        if device == "cpu":
            record["framework_gib"] = out["framework_gib"]
        out["recorded_in"] = record_calibration(device, **record)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
