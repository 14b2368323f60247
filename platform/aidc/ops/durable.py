"""Metrics of short-lived processes (a job's driver), recorded by a long-lived actor so Prometheus sees them.

Ray's exporter serves a process's metrics only while that process lives; a preprocessing job or a
failed training driver exits seconds after counting, often before the next scrape. `durable_inc` hands
the count to one detached actor per cluster (`aidc-metrics`, 0 CPUs), whose counters live as long as the
cluster. Outside Ray it only updates this process's table (metrics.value).
"""

from __future__ import annotations

import logging

from aidc.ops import metrics

logger = logging.getLogger(__name__)
ACTOR, NAMESPACE = "aidc-metrics", "aidc"


def _holder():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class MetricsHolder:
        def record(self, kind: str, name: str, value: float, labels: dict) -> None:
            metrics.record(kind, name, value, labels)

    return MetricsHolder.options(name=ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


def durable_record(kind: str, name: str, value: float, **labels) -> None:
    """Record through the cluster's metrics actor (counter: add; gauge: set); never raises."""
    metrics.record(kind, name, value, labels, export=False)
    if not metrics.ray_on():
        return
    try:
        import ray

        ray.get(_holder().record.remote(kind, name, value, labels), timeout=60)
    except Exception as exc:  # noqa: BLE001 - metrics never fail a job
        logger.warning("metric %s not recorded: %s", name, exc)


def durable_inc(name: str, value: float = 1.0, **labels) -> None:
    durable_record("counter", name, value, **labels)


def durable_set(name: str, value: float, **labels) -> None:
    durable_record("gauge", name, value, **labels)
