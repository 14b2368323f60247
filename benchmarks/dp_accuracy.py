"""Accuracy vs privacy (train.privacy, DP-SGD with Opacus): the digits CNN and the SMS-spam transformer trained
by the platform on two Ray Train DDP workers at ε = ∞ (no DP: the baseline, same model and steps) and at
target ε 8, 3 and 1 (δ 1e-5), side by side; each private run's ε is its accountant's. Writes a table (JSON) and
a PNG.

    python -m benchmarks.dp_accuracy [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, local_ray

EPSILONS = [math.inf, 8.0, 3.0, 1.0]
# Per dataset: the config and what the private runs share with the baseline. DP-SGD wants larger batches and
# learning rates than plain SGD (each step's noise is averaged over the batch); the baseline takes the same.
SETTINGS = {
    "digits": ("digits.yaml", "test_accuracy", ["model.norm=group", "train.batch_size=64", "train.lr=0.01",
                                                "train.epochs=10"]),
    "sms-spam": ("sms-spam.yaml", "test_accuracy", ["train.batch_size=64", "train.lr=0.003", "train.epochs=4",
                                                    "model.dropout=0.0"]),
}


def run(name: str, root: str, eps: float, extra: list[str]) -> dict:
    from aidc.config import load_config
    from aidc.tasks import preprocess
    from aidc.train.trainer import run_training
    from benchmarks.common import ROOT

    config, metric, shared = SETTINGS[name]
    private = [] if math.isinf(eps) else [f"train.privacy.epsilon={eps}", "train.privacy.delta=1e-5"]
    cfg = load_config(ROOT / "jobs" / "configs" / config, [
        f"run.storage={root}", "resources.num_workers=2", f"run.name={name}-eps{eps:g}", *shared, *private,
        *extra])
    preprocess(cfg)
    m = run_training(cfg).metrics
    return {"target_epsilon": eps, "epsilon": m.get("epsilon", math.inf), metric: round(m[metric], 4),
            "test_macro_f1": round(m["test_macro_f1"], 4),
            "noise_multiplier": m.get("noise_multiplier", 0.0), "steps": m["step"]}


def plot(table: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, rows in table.items():
        xs = [("∞" if math.isinf(r["target_epsilon"]) else f"{r['target_epsilon']:g}") for r in rows]
        ax.plot(xs, [r["test_accuracy"] for r in rows], marker="o", label=name)
    ax.set_xlabel("target ε (δ = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_title("DP-SGD (Opacus) on 2 Ray Train workers")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits only, ε ∞ and 8, 2 epochs")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "aidc-bench"),
                   help="folder for dp_accuracy.json and dp_accuracy.png (default: <tmp>/aidc-bench)")
    p.add_argument("--datasets", nargs="+", choices=list(SETTINGS), help="default: all")
    p.add_argument("--eps", nargs="+", type=float, help="target ε values (inf = no DP); default: inf 8 3 1")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides for every run, a.b=value")
    a = p.parse_args(argv)
    os.environ.setdefault("AIDC_DATA_MIRROR", str(SHARED_DATA))
    names = ["digits"] if a.quick else (a.datasets or list(SETTINGS))
    epsilons = EPSILONS[:2] if a.quick else (a.eps or EPSILONS)
    extra = (["train.epochs=2"] if a.quick else []) + a.set
    table: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="aidc-dp-") as root, local_ray(4):
        for name in names:
            table[name] = [run(name, root, eps, extra) for eps in epsilons]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dp_accuracy.json").write_text(json.dumps(table, indent=1))
    plot(table, out / "dp_accuracy.png")
    for name, rows in table.items():
        print(name)
        for r in rows:
            print(f"  ε target {r['target_epsilon']:>4g}  spent {r['epsilon']:.3f}  σ {r['noise_multiplier']:.3f}  "
                  f"steps {r['steps']}  test accuracy {r['test_accuracy']:.4f}  macro F1 {r['test_macro_f1']:.4f}")
    return table


if __name__ == "__main__":
    main()
