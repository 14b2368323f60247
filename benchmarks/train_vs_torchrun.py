"""Ray Train vs plain torchrun DDP: same model, data, batch size, number of workers and steps.

Reports steady-state samples/s of each (the last epoch; the first warms up) and the ratio.
Target: Ray Train >= 0.90 of torchrun.

    python -m benchmarks.train_vs_torchrun [--quick] [--workload mnist] [--workers 2] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.common import ROOT, SHARED_DATA, local_ray


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mnist")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per worker per epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.workload, args.steps, args.epochs, args.batch_size = "digits", 5, 2, 32

    from aidc.config import load_config
    from aidc.tasks import preprocess
    from aidc.train.trainer import run_training

    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(ROOT / "jobs" / "configs" / f"{args.workload}.yaml", [
            f"run.storage={root}", f"data.mirror={SHARED_DATA}", "data.augment.enabled=false",
            f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}",
            f"train.batch_size={args.batch_size}", "train.precision=fp32", "train.grad_clip=null",
            f"resources.num_workers={args.workers}", "resources.cpus_per_worker=1", "data.cache=true",
            "run.name=bench"])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        os.environ["OMP_NUM_THREADS"] = "1"
        with local_ray(args.workers + 1):  # one CPU per worker + one for Ray's own actors
            preprocess(cfg)
            history = run_training(cfg).history
            ray_rates = [h["samples_per_s"] for h in history]
            first_batch = [round(h["first_batch_s"], 2) for h in history]
        spec = json.dumps({"root": root, "name": cfg.name, "task": cfg.task, "batch_size": args.batch_size,
                           "steps": args.steps, "epochs": args.epochs, "model": cfg.model.model_dump(mode="json")})
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}",
                              str(ROOT / "benchmarks" / "torchrun_ddp.py"), spec],
                             capture_output=True, text=True, env=env, check=True)
        torch_rates = json.loads(out.stdout.split("RESULT ", 1)[1])["samples_per_s"]
    result = {
        "workload": args.workload, "workers": args.workers, "batch_size": args.batch_size, "steps": args.steps,
        "ray_train_samples_per_s": round(ray_rates[-1], 1), "torchrun_samples_per_s": round(torch_rates[-1], 1),
        "ratio_ray_over_torchrun": round(ray_rates[-1] / torch_rates[-1], 3),
        "per_epoch": {"ray": [round(r) for r in ray_rates], "torchrun": [round(r) for r in torch_rates]},
        "ray_first_batch_s": first_batch,  # per-epoch data start-up inside Ray's figure
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
