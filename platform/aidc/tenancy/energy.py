"""GPU energy per job, from the NVML readings Ray already takes on every node.

Ray's dashboard agent reads each GPU with NVML every few seconds — its power draw and the processes on it — and the
dashboard serves them (`GET /nodes?view=summary`: per node `raylet.nodeId` and `gpus[]` with `powerMw` and
`processesPids[].pid`). The gateway knows each running job's processes (its actors' `(node_id, pid)` from the
state API, its running tasks' workers, and its driver), so every check it splits each GPU's power evenly among
the owners of the processes on it and adds power x time to those jobs. Why not NVML's energy counter, as training
runs use (`aidc.ops.energy`): the gateway is one process on the head, the counter is per GPU on each node, Ray does
not export it, and a GPU shared by two jobs could not be split by it anyway. A GPU no job holds (idle, a Serve
replica) is nobody's here. On a cluster without GPUs nothing is asked or counted. NVML names processes by the
host's pids: where Ray runs in containers without the host's pid namespace (KubeRay, docker without --pid=host)
the pids differ from Ray's and nothing is attributed.
"""

from __future__ import annotations

HOUR_S = 3600


def gpu_watts_by_job(nodes: list[dict], processes: dict[str, set[tuple[str, int]]]) -> dict[str, float]:
    """Watts each job draws now: each GPU's power split evenly among the owners of the processes on it — the
    jobs given, and every other process (a Serve replica, a job sent to Ray directly) an owner of its own, whose
    share is nobody's here.

    `nodes`: the dashboard's node summary (`/nodes?view=summary` → data.summary); `processes`: job id → its
    (node id, pid) pairs."""
    owner = {proc: job for job, procs in processes.items() for proc in procs}
    watts: dict[str, float] = {}
    for node in nodes:
        node_id = (node.get("raylet") or {}).get("nodeId")
        for gpu in node.get("gpus") or []:
            mw = gpu.get("powerMw")
            if mw is None:  # NVML without a power reading (MIG slices, some boards)
                continue
            owners = {owner.get((node_id, int(p["pid"])), ("pid", int(p["pid"])))
                      for p in gpu.get("processesPids") or [] if p.get("pid") is not None}
            for job in owners:
                if isinstance(job, str):
                    watts[job] = watts.get(job, 0.0) + mw / 1000.0 / len(owners)
    return watts


def add_energy(by_hour: dict[str, float], watts: float, start: float, end: float) -> None:
    """Add `watts` held from `start` to `end` (epoch s) to an hourly kWh ledger {hour start: kWh}, split at hours."""
    t = start
    while t < end:
        hour = int(t // HOUR_S) * HOUR_S
        stop = min(end, hour + HOUR_S)
        key = str(hour)
        by_hour[key] = by_hour.get(key, 0.0) + watts * (stop - t) / 3.6e6
        t = stop


def energy_since(by_hour: dict[str, float], since: float) -> float:
    """kWh in the ledger from `since` on; the hour that holds `since` counts in part (evenly spread over it)."""
    total = 0.0
    for key, kwh in by_hour.items():
        hour = int(key)
        if hour + HOUR_S <= since:
            continue
        total += kwh * min(1.0, (hour + HOUR_S - since) / HOUR_S) if hour < since else kwh
    return total


__all__ = ["add_energy", "energy_since", "gpu_watts_by_job"]
