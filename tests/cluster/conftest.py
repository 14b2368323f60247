"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster) for node-loss tests.

Its own package, so it never overlaps the integration tier's embedded single-node Ray (`ray_session`,
package-scoped in tests/integration): pytest tears that down when the integration package ends, before
this package's cluster starts. One module-scoped cluster is shared by all fault tests of a module; every
node process it starts is stopped at the end, also when a test fails.

Node layout: a head (the driver's Ray, Serve's controller and proxy, Tune's trial drivers) and worker
"nodes" that each carry one `slot` custom resource: work that asks for a slot lands on a worker node,
one per node, so removing a node removes exactly one trainer / replica / trial.
"""

from __future__ import annotations

import logging
import os

import pytest

SLOT = "slot"
HEAD_CPUS = 2
WORKER_CPUS = 1


class LocalCluster:
    """A head plus removable worker nodes; `remove` is an ungraceful node loss (its processes are killed)."""

    def __init__(self, cluster, env_vars: dict | None = None):
        self.cluster = cluster
        self.workers: list = []
        self._env = env_vars or {}

    def add_worker(self, **env):
        node = self.cluster.add_node(num_cpus=WORKER_CPUS, resources={SLOT: 1},
                                     env_vars={**self._env, **env} or None, wait=True)
        self.workers.append(node)
        return node

    def remove(self, node) -> None:
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def node_id(self, node) -> str:
        return node.node_id

    def alive_slots(self) -> float:
        import ray

        return sum(n["Resources"].get(SLOT, 0) for n in ray.nodes() if n["Alive"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + 2 worker nodes, the driver connected, AIDC_STORAGE on a path every (local) node shares."""
    import ray
    from ray.cluster_utils import Cluster

    from aidc.runtime import aidc_package_dir

    storage = str(tmp_path_factory.mktemp("cluster-storage"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("AIDC_STORAGE", storage)
        # fast node-loss detection (defaults: 10 s health-check period x 5 misses)
        system_config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False,
                                                          "_system_config": system_config})
        local = LocalCluster(c)
        try:
            for _ in range(2):
                local.add_worker()
            ray.init(address=c.address, runtime_env={"py_modules": [aidc_package_dir()]},
                     logging_level=logging.WARNING)
            local.storage = storage
            yield local
        finally:
            try:
                ray.shutdown()
            finally:
                c.shutdown()
