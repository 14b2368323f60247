"""Admission: which queued jobs start now, which running jobs make room, and why the rest wait. Pure: no Ray, no
I/O, so every rule is unit-tested on plain records.

Rules (Kueue's ClusterQueue ideas, on plain Ray):
- Jobs are considered by priority (higher first), then submission time.
- A job starts when its team's quota has room for it and the cluster has the resources free.
- Over its quota, a job of a team whose policy says `borrow` starts on idle capacity (another team's unused
  share); it is marked borrowed and is the first to be preempted when that share is wanted back.
- A job within its quota that the cluster cannot fit preempts running jobs that are borrowed or of lower
  priority (borrowed first, then lowest priority, then the most recently started: least work lost), but only
  if stopping them makes it fit. A job over its own quota may preempt only its own team's lower-priority jobs.
  While its victims stop, the job keeps its place: later, lower-priority jobs cannot take the room it waits for.
- On a cluster that autoscales (the gateway knows its full scale from the autoscaling config), a job within its
  quota that the nodes alive cannot hold but the grown cluster can waits for new nodes (the gateway asks Ray's
  autoscaler for them) instead of preempting anyone, for up to `node_wait_s` (then it preempts as on a cluster that
  does not grow: the cloud may be out of such nodes).
- Otherwise the job waits, with a message that names the limit ("team vision: 4 of 4 GPUs in use; 2 jobs
  ahead").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aidc.tenancy.model import Demand, JobRecord, Quota, Team

EPS = 1e-9


@dataclass
class Held:
    """Resources held by a set of running jobs."""

    cpus: float = 0.0
    gpus: dict[str, float] = field(default_factory=dict)
    memory_gb: float = 0.0
    jobs: int = 0
    per_node: list[dict] = field(default_factory=list)  # work outside the gateway: its resources on each node

    def add(self, d: Demand, sign: int = 1) -> None:
        self.cpus += sign * d.cpus
        if d.gpus:
            key = d.gpu_type or ""
            self.gpus[key] = self.gpus.get(key, 0.0) + sign * d.gpus
        self.memory_gb += sign * d.memory_gb
        self.jobs += sign

    def gpu_total(self) -> float:
        return sum(self.gpus.values())

    def copy(self) -> "Held":
        return Held(self.cpus, dict(self.gpus), self.memory_gb, self.jobs)


@dataclass
class Capacity:
    """What the cluster has for jobs: CPUs, GPUs per accelerator type ('' for GPUs of no known type), memory;
    `outside`: what work the gateway did not admit holds now (Serve replicas, detached actors, jobs sent to Ray
    directly), not free for the queue while held."""

    cpus: float
    gpus: dict[str, float] = field(default_factory=dict)
    memory_gb: float = 0.0
    outside: Held = field(default_factory=lambda: Held())
    full: "Capacity | None" = None  # at full scale, by the autoscaling config; None: it does not grow (or unknown)

    def gpu_total(self) -> float:
        return sum(self.gpus.values())

    def at_full_scale(self) -> "Capacity":
        """The cluster grown as far as its autoscaler may: each resource the larger of now and full scale (an upper
        bound). GPUs of node types that declare no accelerator type could be of any: kept as `*`, which a job of
        any type may count; memory not declared by every node type is not checked."""
        f = self.full
        if f is None:
            return self
        now, full = ({("*" if k == "" else k): v for k, v in g.items()} for g in (self.gpus, f.gpus))
        gpus = {k: max(now.get(k, 0.0), full.get(k, 0.0)) for k in {*now, *full}}
        return Capacity(max(self.cpus, f.cpus), gpus, max(self.memory_gb, f.memory_gb) if f.memory_gb else 0.0,
                        self.outside)


@dataclass
class Plan:
    admit: list[tuple[str, bool]] = field(default_factory=list)  # (job id, borrowed)
    preempt: list[tuple[str, str]] = field(default_factory=list)  # (job id, why)
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why it waits
    grow: list[str] = field(default_factory=list)  # waiting jobs the cluster can hold once its autoscaler grows it


def quota_problem(team: str, quota: Quota, held: Held, d: Demand) -> str | None:
    """Why `d` does not fit in the team's quota next to what it holds, or None."""
    if quota.jobs is not None and held.jobs + 1 > quota.jobs:
        return f"team {team}: {held.jobs} of {quota.jobs} jobs running"
    if quota.cpus is not None and held.cpus + d.cpus > quota.cpus + EPS:
        return f"team {team}: {held.cpus:g} of {quota.cpus:g} CPUs in use, this job needs {d.cpus:g}"
    if quota.memory_gb is not None and held.memory_gb + d.memory_gb > quota.memory_gb + EPS:
        return f"team {team}: {held.memory_gb:g} of {quota.memory_gb:g} GiB memory in use, this job needs " \
               f"{d.memory_gb:g}"
    if d.gpus and quota.gpus:
        kind = d.gpu_type or ""
        if kind in quota.gpus:
            used, limit, name = held.gpus.get(kind, 0.0), quota.gpus[kind], f"{kind} GPUs"
        elif "*" in quota.gpus:
            used, limit, name = held.gpu_total(), quota.gpus["*"], "GPUs"
        elif not kind:
            used, limit, name = held.gpu_total(), sum(quota.gpus.values()), "GPUs"
        else:
            return f"team {team}: no quota for {kind} GPUs (quota: {quota.gpus})"
        if used + d.gpus > limit + EPS:
            return f"team {team}: {used:g} of {limit:g} {name} in use, this job needs {d.gpus:g}"
        if "*" in quota.gpus and held.gpu_total() + d.gpus > quota.gpus["*"] + EPS:
            return f"team {team}: {held.gpu_total():g} of {quota.gpus['*']:g} GPUs in use, this job needs {d.gpus:g}"
    return None


def cluster_problem(cap: Capacity, held: Held, d: Demand) -> str | None:
    """Why `d` does not fit on the cluster next to what all running jobs (and work outside the gateway) hold."""
    out = cap.outside

    def note(x: float) -> str:
        return f" ({x:g} by work outside the gateway: Serve replicas, detached actors, jobs sent to Ray directly)" \
            if x > EPS else ""

    if held.cpus + out.cpus + d.cpus > cap.cpus + EPS:
        return f"cluster: {held.cpus + out.cpus:g} of {cap.cpus:g} CPUs in use{note(out.cpus)}, this job needs " \
               f"{d.cpus:g}"
    if d.memory_gb and cap.memory_gb and held.memory_gb + out.memory_gb + d.memory_gb > cap.memory_gb + EPS:
        return f"cluster: {held.memory_gb + out.memory_gb:g} of {cap.memory_gb:g} GiB in use{note(out.memory_gb)}, " \
               f"this job needs {d.memory_gb:g}"
    if d.gpus:
        if d.gpu_type:  # `*`: GPUs a grown cluster may add of a type its config does not name
            have = cap.gpus.get(d.gpu_type, 0.0) + cap.gpus.get("*", 0.0)
            used, other = held.gpus.get(d.gpu_type, 0.0), out.gpus.get(d.gpu_type, 0.0)
        else:
            have, used, other = cap.gpu_total(), held.gpu_total(), out.gpu_total()
        if used + other + d.gpus > have + EPS:
            return f"cluster: {used + other:g} of {have:g} {d.gpu_type or ''} GPUs in use{note(other)}, this job " \
                   f"needs {d.gpus:g}".replace("  ", " ")
    return None


def never_fits(team: Team, d: Demand, cap: Capacity | None) -> str | None:
    """Why a job can never run (bigger than its team's whole quota without borrowing, or than the cluster)."""
    if not team.borrow:
        problem = quota_problem(team.name, team.quota, Held(), d)
        if problem:
            return problem.replace(" 0 of ", " quota ").replace(" in use", "")
    if cap is not None:  # against the whole cluster: what outside work holds now may be freed later
        problem = cluster_problem(Capacity(cap.cpus, cap.gpus, cap.memory_gb), Held(), d)
        if problem:
            return problem.replace(" 0 of ", " has ").replace(" in use", "")
    return None


def order(jobs: list[JobRecord]) -> list[JobRecord]:
    return sorted(jobs, key=lambda j: (-j.priority, j.submitted_at, j.id))


def plan(jobs: list[JobRecord], teams: dict[str, Team], cap: Capacity, node_wait_s: float = 600.0,
         now: float | None = None) -> Plan:
    """Decide one scheduling round over every job the gateway holds (`node_wait_s`: how long a job waits for nodes
    asked of the autoscaler before it may preempt)."""
    out = Plan()
    now = time.time() if now is None else now
    running = [j for j in jobs if j.state == "RUNNING"]
    queued = order([j for j in jobs if j.state == "QUEUED"])
    total, by_team = Held(), {}
    for j in running:
        total.add(j.demand)
        by_team.setdefault(j.team, Held()).add(j.demand)
    # what victims already being stopped will free: their room is promised to the jobs they were stopped for
    freeing, freeing_team = Held(), {}
    for j in running:
        if j.preempting:
            freeing.add(j.demand)
            freeing_team.setdefault(j.team, Held()).add(j.demand)
    ahead: dict[str, int] = {}
    asked = Held()  # what the jobs waiting for new nodes need
    deferred: list[JobRecord] = []  # over quota, may borrow: after every job within its quota had its turn
    for job in queued:
        team = teams.get(job.team)
        n_ahead = ahead.get(job.team, 0)  # the team's jobs still waiting before this one
        ahead[job.team] = n_ahead + 1
        if team is None:
            out.waiting[job.id] = f"team {job.team} no longer exists; ask an admin (aidc teams set {job.team})"
            continue
        held = by_team.setdefault(job.team, Held())
        over_quota = quota_problem(job.team, team.quota, held, job.demand)
        if over_quota and team.borrow and not _victims(job, True, running, out, teams, cap, total, held):
            deferred.append(job)
            continue
        no_room = cluster_problem(cap, total, job.demand)
        if not no_room and (not over_quota or team.borrow):
            ahead[job.team] = n_ahead
            out.admit.append((job.id, bool(over_quota)))
            total.add(job.demand)
            held.add(job.demand)
            continue
        why = over_quota if over_quota and not team.borrow else no_room
        mine = freeing_team.get(job.team, Held())
        if freeing.jobs and not cluster_problem(cap, _minus(total, freeing), job.demand) \
                and not quota_problem(job.team, team.quota, _minus(held, mine), job.demand):
            # room is being made (victims stopping): hold it for this job, preempt nothing more
            total.add(job.demand)
            held.add(job.demand)
            freeing, freeing_team = Held(), {}
            out.waiting[job.id] = "waiting for preempted jobs to stop"
            continue
        waited = now - job.nodes_asked_at if job.nodes_asked_at else 0.0
        grows = bool(no_room) and not over_quota and cap.full is not None \
            and not cluster_problem(cap.at_full_scale(), _plus(total, asked), job.demand)

        def grow() -> None:
            asked.add(job.demand)
            out.grow.append(job.id)
            out.waiting[job.id] = f"{no_room}; more nodes asked of the autoscaler" + \
                (f"; {n_ahead} job{'s' * (n_ahead != 1)} ahead" if n_ahead else "")

        if grows and waited < node_wait_s:
            # the cluster can grow to hold it: ask the autoscaler rather than stop anyone (nothing is reserved of
            # the nodes alive: smaller jobs behind it may start there meanwhile); past node_wait_s without the
            # nodes (a cloud out of capacity) it preempts as on a cluster that does not grow, if anything can go
            grow()
            continue
        victims = _victims(job, over_quota is not None, running, out, teams, cap, total, held)
        if victims:
            for v in victims:
                out.preempt.append((v.id, f"preempted for {job.id} (team {job.team}, priority {job.priority})"))
            total.add(job.demand)  # reserve: nothing of lower priority starts in the room being made
            held.add(job.demand)
            out.waiting[job.id] = f"preempting {', '.join(v.id for v in victims)} to make room"
            continue
        if grows:  # nothing to preempt: the nodes are still the way in
            grow()
            continue
        out.waiting[job.id] = why + (f"; {n_ahead} job{'s' * (n_ahead != 1)} ahead" if n_ahead else "")
    waiting_borrowers: dict[str, int] = {}
    for job in deferred:  # second pass: borrowers take what the jobs within their quotas left idle
        _borrow(job, teams[job.team], by_team[job.team], total, cap, out, waiting_borrowers)
    return out


def _borrow(job: JobRecord, team: Team, held: Held, total: Held, cap: Capacity, out: Plan,
            ahead: dict[str, int]) -> None:
    """Second pass: a job over its team's quota starts on idle capacity (borrowed), or waits."""
    n_ahead = ahead.get(job.team, 0)
    over_quota = quota_problem(job.team, team.quota, held, job.demand)
    no_room = cluster_problem(cap, total, job.demand)
    if not no_room:
        out.admit.append((job.id, bool(over_quota)))
        total.add(job.demand)
        held.add(job.demand)
        return
    ahead[job.team] = n_ahead + 1
    out.waiting[job.id] = f"{over_quota}; no idle capacity to borrow" + \
        (f"; {n_ahead} job{'s' * (n_ahead != 1)} ahead" if n_ahead else "")


def _shift(a: Held, b: Held, sign: int) -> Held:
    """`a` plus `sign` times `b` (a new Held)."""
    out = a.copy()
    out.cpus, out.memory_gb, out.jobs = a.cpus + sign * b.cpus, a.memory_gb + sign * b.memory_gb, a.jobs + sign * b.jobs
    for k, v in b.gpus.items():
        out.gpus[k] = out.gpus.get(k, 0.0) + sign * v
    return out


def _minus(a: Held, b: Held) -> Held:
    return _shift(a, b, -1)


def _plus(a: Held, b: Held) -> Held:
    return _shift(a, b, 1)


def _victims(job: JobRecord, over_quota: bool, running: list[JobRecord], out: Plan, teams: dict[str, Team],
             cap: Capacity, total: Held, held: Held) -> list[JobRecord]:
    """The fewest running jobs (borrowed first, then lowest priority, newest first) whose stopping lets `job` in."""
    taken = {v for v, _ in out.preempt}
    team = teams[job.team]

    def borrowed(r: JobRecord) -> bool:
        """Still over its team's quota (a job admitted as borrowed may be within it now that others ended)."""
        if not r.borrowed or r.team not in teams:
            return r.borrowed
        others = Held()
        for o in running:
            if o.team == r.team and o is not r:
                others.add(o.demand)
        return quota_problem(r.team, teams[r.team].quota, others, r.demand) is not None

    cands = [r for r in running if not r.preempting and r.id not in taken
             and (r.priority < job.priority or (not over_quota and r.team != job.team and borrowed(r)))
             and (not over_quota or r.team == job.team)]
    cands.sort(key=lambda r: (not borrowed(r), r.priority, -(r.started_at or 0)))
    def fits(victims) -> bool:
        t, h = total.copy(), held.copy()
        for r in victims:
            t.add(r.demand, -1)
            if r.team == job.team:
                h.add(r.demand, -1)
        return not cluster_problem(cap, t, job.demand) and not quota_problem(job.team, team.quota, h, job.demand)

    chosen = []
    for r in cands:
        chosen.append(r)
        if fits(chosen):
            for v in reversed(list(chosen)):  # drop victims the job does not need (e.g. CPU jobs for a GPU job)
                rest = [c for c in chosen if c is not v]
                if fits(rest):
                    chosen = rest
            return chosen
    return []


__all__ = ["Capacity", "Held", "Plan", "cluster_problem", "never_fits", "order", "plan", "quota_problem"]
