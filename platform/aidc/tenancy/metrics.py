"""The gateway's Prometheus metrics (served on its own `/metrics`: the gateway is not a Ray process, so Ray's
metrics agent does not export them): quota used and limit per team and resource, queue length, wait time until
admission, jobs waiting for nodes from the autoscaler, preemptions and enforcement stops, GPU energy."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
QUOTA_USED = Gauge("aidc_tenancy_quota_used", "Resources held by a team's running jobs.", ["team", "resource"],
                   registry=REGISTRY)
QUOTA_LIMIT = Gauge("aidc_tenancy_quota_limit", "A team's quota (absent: no limit).", ["team", "resource"],
                    registry=REGISTRY)
QUEUED = Gauge("aidc_tenancy_queue_length", "Jobs waiting in the queue.", ["team"], registry=REGISTRY)
NODES = Gauge("aidc_tenancy_waiting_for_nodes", "Queued jobs waiting for nodes asked of Ray's autoscaler.", ["team"],
              registry=REGISTRY)
BORROWED = Gauge("aidc_tenancy_borrowed_jobs", "Running jobs on borrowed capacity.", ["team"], registry=REGISTRY)
WAIT = Histogram("aidc_tenancy_wait_seconds", "Seconds from submission (or requeue) to admission.", ["team"],
                 buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600), registry=REGISTRY)
ENERGY = Counter("aidc_tenancy_gpu_energy_kwh", "GPU energy drawn by a team's jobs (NVML power via Ray's agent).",
                 ["team"], registry=REGISTRY)
EVENTS = Counter("aidc_tenancy_events_total", "Preemptions and enforcement stops.", ["team", "event"],
                 registry=REGISTRY)


def publish(jobs, teams: dict) -> None:
    """Set the gauges from the gateway's jobs and teams (called after every scheduling round)."""
    def zero() -> dict[str, float]:
        return {"cpus": 0.0, "gpus": 0.0, "memory_gb": 0.0, "jobs": 0.0}

    used: dict[str, dict[str, float]] = {name: zero() for name in teams}
    queued = {name: 0 for name in teams}
    borrowed = {name: 0 for name in teams}
    nodes = {name: 0 for name in teams}
    for j in jobs:
        if j.state == "RUNNING":
            u = used.setdefault(j.team, zero())
            u["cpus"] += j.demand.cpus
            u["gpus"] += j.demand.gpus
            u["memory_gb"] += j.demand.memory_gb
            u["jobs"] += 1
            borrowed[j.team] = borrowed.get(j.team, 0) + int(j.borrowed)
        elif j.state == "QUEUED":
            queued[j.team] = queued.get(j.team, 0) + 1
            nodes[j.team] = nodes.get(j.team, 0) + bool(j.nodes_asked_at)
    for team, u in used.items():
        for res, v in u.items():
            QUOTA_USED.labels(team, res).set(v)
    for name, t in teams.items():
        q = t.quota
        for res, v in (("cpus", q.cpus), ("memory_gb", q.memory_gb), ("jobs", q.jobs),
                       ("gpus", sum(q.gpus.values()) if q.gpus else None)):
            if v is not None:
                QUOTA_LIMIT.labels(name, res).set(v)
    for team, n in queued.items():
        QUEUED.labels(team).set(n)
        ENERGY.labels(team)  # a zero row for every team
    for team, n in nodes.items():
        NODES.labels(team).set(n)
    for team, n in borrowed.items():
        BORROWED.labels(team).set(n)


def observe_wait(team: str, seconds: float) -> None:
    WAIT.labels(team).observe(seconds)


def count(event: str, team: str) -> None:
    EVENTS.labels(team, event).inc()


def add_energy(team: str, kwh: float) -> None:
    ENERGY.labels(team).inc(kwh)


def render() -> bytes:
    return generate_latest(REGISTRY)


__all__ = ["add_energy", "count", "observe_wait", "publish", "render"]
