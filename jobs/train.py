"""Train a model on Ray Train and register it in the MLflow Model Registry.

    python -m jobs.train --config jobs/configs/digits.yaml [--set train.epochs=3] [--plan]

A job is planned first (aidc.plan, as `aidc plan`): one predicted not to fit the devices of the cluster it
runs on is refused with exit 2, the reason and the fix, unless --set train.plan=warn.
"""

import logging
import sys

from aidc.entry import run_job
from aidc.train.telemetry import LIVE_MLFLOW
from aidc.train.register import register
from aidc.train.trainer import describe_model, run_training


def _print_plan(cfg) -> int:
    from pathlib import Path

    from aidc.cluster import default_cluster_path
    from aidc.plan import format_plans, make_plans

    cluster = default_cluster_path()
    print(format_plans(cfg, make_plans(cfg, cluster if Path(cluster).is_file() else None)))
    return 0


def _check_plan(cfg) -> None:
    """Before any worker starts: a job predicted not to fit the cluster it runs on stops (exit 2, the fix)."""
    if cfg.train.plan == "off":
        return
    from aidc.plan import format_plans, make_plans, refuse_if_unfit, running_cluster_devices

    try:
        devs = running_cluster_devices(cfg)
        plans = make_plans(cfg, devs=devs) if devs else []
    except Exception as exc:  # noqa: BLE001 - a plan that cannot be made never stops a job; training reports its own
        logging.getLogger("jobs.train").warning("capacity plan skipped: %s", exc)
        return
    if not plans:
        return
    if cfg.train.plan == "warn" and not all(p.fits for p in plans):
        print(format_plans(cfg, plans))
    refuse_if_unfit(cfg, plans)


def _run(cfg, args) -> None:
    _check_plan(cfg)
    outcome = run_training(cfg, loop_extras=LIVE_MLFLOW)  # rank 0 logs every epoch to MLflow as it ends
    version = register(cfg, outcome)
    m = outcome.metrics
    scores = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith(("test_", "val_")))
    print(f"run {outcome.run_name}: {scores}")
    print(f"registered {version.name} version {version.version} as {version.ref} (tracking: {version.tracking_uri})")


def main(argv=None) -> int:
    return run_job("python -m jobs.train", __doc__.splitlines()[0], _run, dry_run=describe_model, argv=argv,
                   plan=_print_plan)


if __name__ == "__main__":
    sys.exit(main())
