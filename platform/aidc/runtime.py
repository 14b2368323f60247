"""Connecting to Ray the same way from every entrypoint, so the `aidc` package reaches all workers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def aidc_package_dir() -> str:
    import aidc

    return str(Path(aidc.__file__).resolve().parent)


def init_ray(num_cpus: float | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start an embedded local Ray.

    Either way the running `aidc` package is shipped with `py_modules`, so Ray Train / Data / Serve
    workers import exactly the code of the driver, whether or not aidc is installed on the nodes.
    Inside a submitted job Ray merges this with the job's own runtime env (its working_dir).
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"py_modules": [aidc_package_dir()]}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        logger.info("RAY_ADDRESS is not set: starting an embedded local Ray")
        # address="local": a new Ray even when another one runs on this host (ray start, a test cluster);
        # without it ray.init joins that one through /tmp/ray/ray_current_cluster and rejects num_cpus.
        # No dashboard, so no State API: Ray Train's PlacementGroupCleaner would log a warning every few seconds.
        runtime_env["worker_process_setup_hook"] = "aidc.ops.logs.quiet_ray_workers"
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 logging_level=logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
