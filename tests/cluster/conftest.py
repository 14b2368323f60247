"""A 3-node Ray cluster on this machine (head + 2 worker nodes, ray.cluster_utils.Cluster) for node-loss tests.

Its own package, so it never overlaps the integration tier's embedded single-node Ray (`ray_session` is
package-scoped in tests/integration: pytest stops it when that package ends, before this one starts).
One module-scoped cluster serves every fault test of a module; `local_cluster` stops every node process
it started at the end, also when a test fails.

Each worker node carries one `slot`: trainers, trials and replicas ask for (part of) a slot, so they land
on worker nodes, one per node, and removing a node removes exactly one of them.
"""

from __future__ import annotations

import pytest

SLOT = "slot"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from benchmarks.local_cluster import local_cluster

    # Ray's default poll interval and preemption watcher (the other tiers: 0.25 s and off, tests/conftest.py):
    # the node-loss tests' run lengths (EPOCHS) are set so that a run is still going when a lost node is back,
    # at this pace.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
        mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # Ray's default, where nodes are lost
        with local_cluster(str(tmp_path_factory.mktemp("cluster-storage")), workers=2, head_cpus=2, worker_cpus=1,
                           worker_resources={SLOT: 1}) as c:
            yield c
