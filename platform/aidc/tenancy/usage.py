"""Usage accounting from the gateway's job records: CPU-hours and GPU-hours per team and per job (what each job
was admitted for, times how long each of its attempts ran) and the GPU energy its processes drew (kWh, from
NVML where GPUs exist: aidc.tenancy.energy), over a window."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aidc.tenancy.energy import energy_since
from aidc.tenancy.model import JobRecord


@dataclass
class Row:
    team: str
    job: str | None  # None: the team's total
    cpu_h: float
    gpu_h: float
    jobs: int
    preemptions: int
    state: str = ""
    gpu_kwh: float = 0.0


def usage(jobs: list[JobRecord], since: float = 0.0, now: float | None = None) -> list[Row]:
    """One row per job that held resources after `since`, then one total row per team (job None)."""
    now = now or time.time()
    rows, totals = [], {}
    for j in sorted(jobs, key=lambda j: (j.team, j.submitted_at)):
        cpu_s, gpu_s = j.usage(now, since)
        kwh = energy_since(j.gpu_kwh, since)
        if cpu_s == 0 and gpu_s == 0 and kwh == 0:
            continue
        preempted = sum(1 for r in j.runs if r.get("why", "").startswith("preempted"))
        rows.append(Row(j.team, j.id, cpu_s / 3600, gpu_s / 3600, 1, preempted, j.state, kwh))
        t = totals.setdefault(j.team, Row(j.team, None, 0.0, 0.0, 0, 0))
        t.cpu_h += cpu_s / 3600
        t.gpu_h += gpu_s / 3600
        t.gpu_kwh += kwh
        t.jobs += 1
        t.preemptions += preempted
    return rows + list(totals.values())


def format_usage(rows: list[Row]) -> str:
    lines = [f"{'team':<16} {'job':<32} {'state':<10} {'CPU-h':>9} {'GPU-h':>9} {'GPU-kWh':>9} {'preempted':>9}"]
    for r in rows:
        lines.append(f"{r.team:<16} {(r.job or f'TOTAL ({r.jobs} jobs)'):<32} {r.state:<10} {r.cpu_h:9.4f} "
                     f"{r.gpu_h:9.4f} {r.gpu_kwh:9.4f} {r.preemptions:9d}")
    return "\n".join(lines)


__all__ = ["Row", "format_usage", "usage"]
