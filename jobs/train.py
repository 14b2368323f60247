"""Train a model on Ray Train and register it in the MLflow Model Registry.

    python -m jobs.train --config jobs/configs/digits.yaml [--set train.epochs=3]
"""

import sys

from aidc.entry import run_job
from aidc.ops.training import LIVE_MLFLOW
from aidc.registry import register
from aidc.train.trainer import describe_model, run_training


def _run(cfg, args) -> None:
    outcome = run_training(cfg, loop_extras=LIVE_MLFLOW)  # rank 0 logs every epoch to MLflow as it ends
    version = register(cfg, outcome)
    m = outcome.metrics
    scores = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith(("test_", "val_")))
    print(f"run {outcome.run_name}: {scores}")
    print(f"registered {version.name} version {version.version} as {version.ref} (tracking: {version.tracking_uri})")


def main(argv=None) -> int:
    return run_job("python -m jobs.train", __doc__.splitlines()[0], _run, dry_run=describe_model, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
