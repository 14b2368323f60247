"""A multi-node Ray cluster on one machine (ray.cluster_utils.Cluster) for node-loss tests and the chaos run.

A head (the driver's Ray, Serve's controller and proxy, Tune's controller) plus worker "nodes": each its
own raylet, object store and worker processes, carrying custom resources so work can be kept on worker
nodes. `remove` is an ungraceful node loss: the node's raylet and every process on it are killed.
Never `AutoscalingCluster`: it runs `ray stop --force`, which kills every Ray on the host.
"""

from __future__ import annotations

import contextlib
import logging
import os

# Node-loss detection in seconds instead of Ray's default ~50 s (10 s health-check period x 5 misses).
FAST_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class LocalCluster:
    """A head plus removable worker nodes."""

    def __init__(self, cluster, worker_cpus: float, worker_resources: dict, storage: str):
        self.cluster = cluster
        self.worker_cpus = worker_cpus
        self.worker_resources = worker_resources
        self.storage = storage
        self.workers: list = []

    def add_worker(self, **env):
        """A new worker node; `env` goes into its processes' environment (e.g. a simulated node-local disk)."""
        node = self.cluster.add_node(num_cpus=self.worker_cpus, resources=dict(self.worker_resources),
                                     env_vars=env or None, wait=True)
        self.workers.append(node)
        return node

    def remove(self, node) -> None:
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def node_of_pid(self, pid: int):
        """The worker node whose raylet started process `pid` (a trial, a Train worker, a replica), or None."""
        import psutil
        from ray._private import ray_constants

        raylets = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n for n in self.workers}
        try:
            proc = psutil.Process(pid)
            for parent in [proc, *proc.parents()]:
                if parent.pid in raylets:
                    return raylets[parent.pid]
        except psutil.Error:
            pass
        return None


@contextlib.contextmanager
def local_cluster(storage: str, *, workers: int = 2, head_cpus: float = 2, worker_cpus: float = 1,
                  worker_resources: dict | None = None, train_start_timeout_s: int = 10):
    """Start head + `workers` nodes, connect this process as the driver, stop every node at the end.

    Every node process inherits this process's environment, so AIDC_STORAGE (a path every local node
    shares) and RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S are set before the nodes start. After a node loss
    Ray Train restarts at the size the cluster's not yet updated resources suggest and waits this long
    (default 60 s) for workers that cannot come before it shrinks.
    """
    import ray
    from ray.cluster_utils import Cluster

    from aidc.runtime import aidc_package_dir, apply_ray_env

    apply_ray_env()  # the environment every aidc Ray runs with (aidc.runtime.RAY_ENV)
    saved = {k: os.environ.get(k) for k in ("AIDC_STORAGE", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_ADDRESS")}
    os.environ.update({"AIDC_STORAGE": storage, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(train_start_timeout_s)})
    os.environ.pop("RAY_ADDRESS", None)
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
        local = LocalCluster(c, worker_cpus, worker_resources or {}, storage)
        for _ in range(workers):
            local.add_worker()
        # Ray calls from threads that outlive this block (a job still running when a test fails) must not
        # auto-connect to another Ray on the host: point them at this (soon stopped) cluster.
        os.environ["RAY_ADDRESS"] = c.address
        ray.init(address=c.address, runtime_env={"py_modules": [aidc_package_dir()]}, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield local
    finally:
        try:
            ray.shutdown()
        finally:
            if c is not None:
                c.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
