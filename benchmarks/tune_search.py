"""Ray Tune sweeps on digits, side by side: ASHA vs the exhaustive grid over the same grid (compute each
spends, and whether ASHA's best is within 0.5 accuracy points of the grid's best), and Optuna TPE vs random
search (trials needed to reach a target validation accuracy). Trials are the platform's own training runs.

    python -m benchmarks.tune_search [--quick] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from benchmarks.common import ROOT

# The grid a user would write for a new model: learning rates over three decades x head widths.
GRID_LR = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]
GRID_HIDDEN = [16, 64, 128]
RANGE = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
         "model.hidden": {"type": "choice", "values": [16, 32, 64, 128]},
         "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5}}


# A larger validation split than digits.yaml's 10% (~180 images, where one image is 0.55 points): 0.5 points
# must be more than one image for "within 0.5 points" to mean anything.
SPLIT = {"train": 0.6, "val": 0.3, "test": 0.1, "seed": 0}


def _sweep(root: str, name: str, space: dict, epochs: int, steps: int, metric: str = "val_accuracy", **tune):
    import yaml

    from aidc.config import validate
    from aidc.tune.space import validate_sweep
    from aidc.tune.sweep import tune_job

    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "digits.yaml").read_text())
    raw["model"].update(channels=[16, 32])
    raw["data"]["split"] = SPLIT
    raw["train"].update(epochs=epochs, max_steps_per_epoch=steps, keep_checkpoints=1)
    raw["resources"] = {"num_workers": 0, "cpus_per_worker": 0.5}
    raw["run"] = {"storage": root, "name": name}
    raw["tune"] = {"space": space, "metric": metric, "mode": "min" if metric.endswith("loss") else "max", **tune}
    t0, wall0 = time.perf_counter(), time.time()
    out = tune_job(validate_sweep(validate(raw)))
    out.started = wall0
    return out, time.perf_counter() - t0


def _best(out) -> float:
    """Best validation accuracy any trial reached at any epoch."""
    return max(row["val_accuracy"] for r in out.records for row in r.epoch_rows)


def _to_reach(out, target: float, t0: float) -> tuple[int | None, float | None]:
    """Trial-epochs spent (all trials, in time order) and seconds until some trial first reached the target."""
    rows = sorted((row["timestamp"], row["val_accuracy"]) for r in out.records for row in r.epoch_rows)
    for n, (ts, acc) in enumerate(rows, start=1):
        if acc >= target:
            return n, ts - t0
    return None, None


def _trials_to_target(out, target: float) -> int | None:
    """1-based index (in the order the searcher proposed them) of the first trial reaching the target."""
    def started(r):  # trials run one at a time here: first report time = proposal order
        return min((row["timestamp"] for row in r.epoch_rows), default=float("inf"))

    for i, r in enumerate(sorted(out.records, key=started), start=1):
        if r.history and max(v for _, v in r.history) >= target:
            return i
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sweeps: proves the script runs, not the figures")
    p.add_argument("--seeds", type=int, default=1, help="searcher seeds for TPE vs random")
    p.add_argument("--samples", type=int, default=12, help="trials per TPE/random sweep")
    p.add_argument("--part", choices=["all", "asha", "tpe"], default="all",
                   help="asha: only ASHA vs grid; tpe: only TPE vs random")
    p.add_argument("--target", type=float, default=0.97, help="validation accuracy TPE/random must reach")
    p.add_argument("--tpe-epochs", type=int, default=2, help="epochs per TPE/random trial (short: a real search)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per grid/ASHA trial")
    p.add_argument("--steps", type=int, default=12, help="steps per epoch (all sweeps)")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep 1/rf of trials at each rung")
    p.add_argument("--asha-seed", type=int, default=0, help="seed of the order ASHA tries the grid in")
    p.add_argument("--asha-metric", default="val_loss", help="metric ASHA ranks trials by at each rung (val_loss: "
                   "continuous, so no ties; accuracy on a few hundred images ties at the top and stops nothing)")
    p.add_argument("--lrs", type=float, nargs="+", default=GRID_LR, help="grid: learning rates")
    p.add_argument("--hidden", type=int, nargs="+", default=GRID_HIDDEN, help="grid: head widths")
    args = p.parse_args(argv)

    from aidc.config import load_config
    from aidc.tasks import preprocess
    from aidc.runtime import init_ray
    from aidc.telemetry import setup_logging

    setup_logging("WARNING")
    epochs, steps, samples = (2, 3, 2) if args.quick else (args.epochs, args.steps, args.samples)
    lrs, hidden = ([1e-3, 1e-2], [32]) if args.quick else (args.lrs, args.hidden)
    grid = {"train.lr": {"type": "grid", "values": lrs}, "model.hidden": {"type": "grid", "values": hidden}}
    root = tempfile.mkdtemp(prefix="aidc-bench-tune-")
    init_ray(num_cpus=4)
    out: dict = {"machine": "shared, loaded 2-core machine (ratios only)", "epochs": epochs,
                 "steps_per_epoch": steps}
    try:
        preprocess(load_config(ROOT / "jobs" / "configs" / "digits.yaml",
                               [f"run.storage={root}", *(f"data.split.{k}={v}" for k, v in SPLIT.items())]))
        if args.part in ("all", "asha"):
            full, full_s = _sweep(root, "grid-fifo", grid, epochs, steps, args.asha_metric, search="grid",
                                  scheduler="fifo", max_concurrent_trials=2)
            asha, asha_s = _sweep(root, "grid-asha", grid, epochs, steps, args.asha_metric, search="grid",
                                  scheduler="asha", seed=args.asha_seed,
                                  max_concurrent_trials=2, grace_period=1,
                                  reduction_factor=args.reduction_factor)
            te = {n: sum(len(r.history) for r in o.records) for n, o in (("grid", full), ("asha", asha))}
            reach_epochs, reach_s = _to_reach(asha, _best(full) - 0.005, asha.started)
            out["asha_vs_grid"] = {
                "asha_trial_epochs_to_reach_grid_best": reach_epochs, "asha_s_to_reach_grid_best": reach_s,
                "reach_ratio_trial_epochs": reach_epochs and round(reach_epochs / te["grid"], 3),
                "reach_ratio_wall": reach_s and round(reach_s / full_s, 3),
                "trials": len(full.records), "reduction_factor": args.reduction_factor,
                "ranked_by": args.asha_metric, "asha_seed": args.asha_seed, "grid_best_val_accuracy": round(_best(full), 4),
                "asha_best_val_accuracy": round(_best(asha), 4),
                "asha_within_half_point": _best(asha) >= _best(full) - 0.005,
                "grid_trial_epochs": te["grid"], "asha_trial_epochs": te["asha"],
                "trial_epochs_ratio": round(te["asha"] / te["grid"], 3),
                "grid_wall_s": round(full_s, 1), "asha_wall_s": round(asha_s, 1),
                "wall_ratio": round(asha_s / full_s, 3),
            }
            print(json.dumps({"asha_vs_grid": out["asha_vs_grid"]}), flush=True)
        rows = []
        for seed in range(0 if args.part == "asha" else 1 if args.quick else args.seeds):
            row = {"seed": seed}
            for search in ("random", "optuna"):
                o, secs = _sweep(root, f"{search}-{seed}", RANGE, 2 if args.quick else args.tpe_epochs, steps,
                                 search=search, scheduler="fifo",
                                 num_samples=samples, max_concurrent_trials=1, seed=seed)
                row[f"{search}_trials_to_target"] = _trials_to_target(o, args.target)
                row[f"{search}_best"] = round(_best(o), 4)
                row[f"{search}_wall_s"] = round(secs, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        out["tpe_vs_random"] = {"target_val_accuracy": args.target, "samples": samples,
                                "epochs": args.tpe_epochs, "runs": rows}
    finally:
        import shutil

        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
