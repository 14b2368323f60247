"""Adversarial robustness of the shipped image classifiers (eval.robustness): accuracy under ART's FGSM and PGD
per eps for the digits and MNIST CNNs, trained by the platform as their configs say, in the driver.

    python -m benchmarks.robustness [--quick] [--samples N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from benchmarks.common import SHARED_DATA, local_ray

EPS = [0.02, 0.05, 0.1, 0.2, 0.3]


def run(config: str, root: str, samples: int, extra: list[str]) -> dict:
    from aidc.config import load_config
    from aidc.tasks import preprocess
    from aidc.train.register import register
    from aidc.train.trainer import run_training
    from benchmarks.common import ROOT

    cfg = load_config(ROOT / "jobs" / "configs" / config, [
        f"run.storage={root}", "resources.num_workers=0", f"eval.robustness.eps={EPS}",
        f"eval.robustness.samples={samples}", *extra])
    preprocess(cfg)
    outcome = run_training(cfg)
    register(cfg, outcome)
    m = outcome.metrics
    return {"test_accuracy": round(m["test_accuracy"], 4), "samples": int(m["robust_samples"]),
            "clean": round(m["robust_clean_accuracy"], 4),
            **{f"{a}@{e:g}": round(m[f"robust_accuracy_{a}_eps{e:g}"], 4) for e in EPS for a in ("fgsm", "pgd")}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits only, 2 epochs, 100 rows attacked")
    p.add_argument("--samples", type=int, default=1000)
    a = p.parse_args(argv)
    os.environ.setdefault("AIDC_DATA_MIRROR", str(SHARED_DATA))
    out = {}
    with tempfile.TemporaryDirectory(prefix="aidc-robust-") as root, local_ray(2):
        out["digits"] = run("digits.yaml", root, 100 if a.quick else a.samples,
                            ["train.epochs=2"] if a.quick else [])
        if not a.quick:
            out["mnist"] = run("mnist.yaml", root, a.samples, ["train.epochs=2"])
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
