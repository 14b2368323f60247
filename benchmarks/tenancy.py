"""What the tenancy gateway costs and what its queue buys.

1. A simulated week (event-driven, no real time): several teams submit a seeded trace of GPU jobs (arrivals
   with a daily cycle, lognormal run times, 1-8 GPUs) to a 32-GPU cluster. Side by side: aidc's admission
   (`aidc.tenancy.admission.plan`: quotas, borrowing, priorities, preemption; a preempted job loses the work
   since its last checkpoint, every 10 simulated minutes) against first-come first-served with no quotas.
   Reported: GPU utilisation, wait time per team (p50 / p90 / mean), preemptions and GPU-hours lost to them.
   No public cluster trace can be downloaded here (no internet); the trace is synthetic and seeded, shaped
   like the Philly/Helios traces (many small short jobs, a few large long ones), and is printed so the
   figures can be reproduced. Third, `aidc-autoscaled`: the same admission on a cluster that starts with no GPU
   node and grows to the same 32 GPUs (4 nodes of 8) as the gateway asks Ray's autoscaler for them (a node ready
   `--boot-min` after the ask; one with no job for `--idle-min` ended, as Ray's idle timeout does): GPU-hours
   provisioned (what is paid for) against the fixed cluster's, and the wait that costs.
2. Real overhead (`ray start` head, the gateway as `aidc gateway`): p50 of a job submission through the gateway
   against directly to the Jobs API (JobSubmissionClient.submit_job), and the admission latency after quota frees
   (a one-job team: time from the first job's end in Ray to the second's start in Ray).

    python -m benchmarks.tenancy [--quick] [--sim-only] [--days 7] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aidc.tenancy.admission import Capacity, plan
from aidc.tenancy.model import Demand, JobRecord, Quota, Team

CLUSTER_GPUS = 32
CKPT_S = 600.0
TEAMS = {  # name: (quota GPUs, priority, borrow, jobs per day, mean GPUs scale)
    "vision": (12, 5, True, 70, 1.0),
    "nlp": (12, 5, True, 50, 1.5),
    "research": (6, 1, True, 110, 0.6),
    "batch": (2, 0, True, 40, 1.0),
}


def trace(days: float, seed: int, load: float = 1.0) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for team, (_, _, _, per_day, scale) in TEAMS.items():
        t = 0.0
        while True:
            hour = (t / 3600) % 24
            rate = load * per_day / 86400 * (1.6 if 9 <= hour < 19 else 0.4)  # office hours
            t += rng.expovariate(rate)
            if t >= days * 86400:
                break
            gpus = min(8, max(1, int(round(rng.choice([1, 1, 1, 2, 2, 4, 8]) * scale))))
            run_s = min(48 * 3600, rng.lognormvariate(math.log(1800), 1.3))
            jobs.append({"team": team, "at": t, "gpus": gpus, "run_s": run_s})
    jobs.sort(key=lambda j: j["at"])
    for i, j in enumerate(jobs):
        j["id"] = f"{j['team']}-{i}"
    return jobs


NODE_GPUS = 8


def simulate(jobs: list[dict], policy: str, horizon_s: float, boot_s: float = 300.0, idle_s: float = 600.0) -> dict:
    """Run the trace under `aidc` (admission.plan), `fcfs` (arrival order, start when the head fits) or
    `aidc-autoscaled` (admission.plan on a cluster of 0 to CLUSTER_GPUS / NODE_GPUS nodes, grown for the jobs
    plan() says wait for nodes, each ready `boot_s` after it was asked for; the nodes beyond what running jobs
    use ended once so for `idle_s`: GPUs are a pool, as if running jobs packed onto the fewest nodes, which Ray
    does not do, so the GPU-hours it provisions are a lower bound)."""
    teams = {n: Team(name=n, quota=Quota(gpus={"*": q}), priority=p, borrow=b) for n, (q, p, b, _, _) in TEAMS.items()}
    grows = policy == "aidc-autoscaled"
    max_nodes = CLUSTER_GPUS // NODE_GPUS
    nodes, boots, spare_since, tick = (0 if grows else max_nodes), [], None, 0.0
    provisioned_gpu_s = 0.0

    def capacity() -> Capacity:
        full = Capacity(cpus=1e9, gpus={"": CLUSTER_GPUS}) if grows and nodes < max_nodes else None
        return Capacity(cpus=1e9, gpus={"": nodes * NODE_GPUS}, full=full)
    recs, todo, done_work, start_of = {}, {}, {}, {}
    pending = sorted(jobs, key=lambda j: j["at"])
    k = 0
    events: list[tuple[float, str]] = []  # (time, job id) of completions
    busy_gpu_s, lost_gpu_s, preemptions = 0.0, 0.0, 0
    waits: dict[str, list[float]] = {t: [] for t in TEAMS}
    first_start: dict[str, float] = {}
    last = 0.0
    while k < len(pending) or events or boots or any(r.state == "QUEUED" for r in recs.values()):
        nxt = min(events[0][0] if events else math.inf, pending[k]["at"] if k < len(pending) else math.inf,
                  boots[0] if boots else math.inf, tick if grows and nodes else math.inf)
        if nxt == math.inf:
            break
        running = [r for r in recs.values() if r.state == "RUNNING"]
        busy_gpu_s += sum(r.demand.gpus for r in running) * (min(nxt, horizon_s) - min(last, horizon_s))
        provisioned_gpu_s += (nodes + len(boots)) * NODE_GPUS * (min(nxt, horizon_s) - min(last, horizon_s))
        now = last = nxt
        while boots and boots[0] <= now:  # nodes launched (billed from the ask) are up
            boots.pop(0)
            nodes += 1
        if tick <= now:
            tick = now + 60.0
        while events and events[0][0] <= now:
            _, jid = events.pop(0)
            r = recs[jid]
            if r.state == "RUNNING" and abs(start_of[jid] + todo[jid] - now) < 1e-6:
                r.state = "SUCCEEDED"
        while k < len(pending) and pending[k]["at"] <= now:
            j = pending[k]
            k += 1
            recs[j["id"]] = JobRecord(id=j["id"], team=j["team"], owner="sim", priority=teams[j["team"]].priority,
                                      demand=Demand(cpus=0, gpus=j["gpus"]), request={"entrypoint": "sim"},
                                      submitted_at=j["at"])
            todo[j["id"]], done_work[j["id"]] = j["run_s"], 0.0
        for _ in range(100):  # rounds until nothing changes at this instant (preempted jobs stop at once here)
            if policy != "fcfs":
                p = plan(list(recs.values()), teams, capacity(), now=now)
                admits, preempts = p.admit, p.preempt
                for jid in p.grow:  # as the gateway keeps it: since when each waits for nodes
                    recs[jid].nodes_asked_at = recs[jid].nodes_asked_at or now
            else:
                admits, preempts, free = [], [], CLUSTER_GPUS - sum(r.demand.gpus for r in recs.values()
                                                                    if r.state == "RUNNING")
                for r in sorted((r for r in recs.values() if r.state == "QUEUED"), key=lambda r: r.submitted_at):
                    if r.demand.gpus > free:
                        break
                    free -= r.demand.gpus
                    admits.append((r.id, False))
            for jid, _ in preempts:
                r = recs[jid]
                ran = now - start_of[jid]
                kept = math.floor(ran / CKPT_S) * CKPT_S
                lost_gpu_s += (ran - kept) * r.demand.gpus
                todo[jid] -= kept
                r.state, r.preempting, r.borrowed = "QUEUED", None, False
                preemptions += 1
            for jid, borrowed in admits:
                r = recs[jid]
                r.state, r.borrowed, start_of[jid], r.nodes_asked_at = "RUNNING", borrowed, now, None
                r.started_at = now
                if jid not in first_start:
                    first_start[jid] = now
                    waits[r.team].append(now - r.submitted_at)
                events.append((now + todo[jid], jid))
            events.sort()
            if not admits and not preempts:
                break
        if grows:  # the gateway's ask, as Ray's autoscaler meets it: nodes for running and waiting jobs' GPUs
            used = sum(r.demand.gpus for r in recs.values() if r.state == "RUNNING")
            asked = sum(recs[j].demand.gpus for j in p.grow)
            want = min(max_nodes, math.ceil((used + asked) / NODE_GPUS)) if asked else 0
            boots += [now + boot_s] * max(0, want - nodes - len(boots))
            boots.sort()
            keep = max(math.ceil(used / NODE_GPUS), want)
            if nodes > keep and not boots:
                spare_since = now if spare_since is None else spare_since
                if now - spare_since >= idle_s:
                    nodes, spare_since = keep, None
            else:
                spare_since = None
    horizon = min(horizon_s, last)

    def stats(xs):
        xs = sorted(xs)
        if not xs:
            return {"n": 0}
        return {"n": len(xs), "p50_min": round(xs[len(xs) // 2] / 60, 1),
                "p90_min": round(xs[int(len(xs) * 0.9)] / 60, 1), "mean_min": round(sum(xs) / len(xs) / 60, 1)}

    out = {"policy": policy, "gpu_utilisation": round(busy_gpu_s / (CLUSTER_GPUS * horizon), 4),
           "preemptions": preemptions, "gpu_hours_lost": round(lost_gpu_s / 3600, 1),
           "gpu_hours_provisioned": round(provisioned_gpu_s / 3600, 1),  # (a fixed cluster: every GPU, always)
           "wait": {t: stats(w) for t, w in waits.items()}}
    if grows:
        out["gpu_utilisation_of_provisioned"] = round(busy_gpu_s / max(provisioned_gpu_s, 1e-9), 4)
    return out


# ---- real overhead ------------------------------------------------------------------------------------------

def _free_port() -> int:
    from aidc.testing import free_port

    return free_port()


def overhead(n: int) -> dict:
    from ray.job_submission import JobSubmissionClient

    from aidc.runtime import apply_ray_env, stop_local_ray

    bin_dir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="aidc-bench-gw-"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = apply_ray_env({**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                         "RAY_AUTH_TOKEN_PATH": str(token), "AIDC_TENANCY_DIR": str(tmp / "tenancy"),
                         "AIDC_SECURITY_DIR": str(tmp / "security"), "AIDC_STORAGE": str(tmp / "storage")})
    env.pop("RAY_ADDRESS", None)
    dash, gcs, port = _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="aidc-bgw-", dir="/tmp")
    run = lambda *a: subprocess.run([str(x) for x in a], env=env, check=True, capture_output=True, text=True)  # noqa
    run(bin_dir / "ray", "start", "--head", f"--port={gcs}", "--num-cpus=4", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--metrics-export-port={_free_port()}", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}")
    gw = None
    try:
        run(bin_dir / "aidc", "teams", "set", "t", "--jobs", "1")
        run(bin_dir / "aidc", "teams", "set", "free")
        key = run(bin_dir / "aidc", "keys", "create", "--owner", "bench", "--scope", "developer", "--team", "t",
                  "--quiet").stdout.split()[0]
        free_key = run(bin_dir / "aidc", "keys", "create", "--owner", "bench", "--scope", "developer", "--team",
                       "free", "--quiet").stdout.split()[0]
        gw = subprocess.Popen([bin_dir / "aidc", "gateway", "--ray-address", f"http://127.0.0.1:{dash}", "--host",
                               "127.0.0.1", "--port", str(port), "--interval", "0.2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from aidc.serving.retry import wait_ready

        wait_ready(f"http://127.0.0.1:{port}/healthz", timeout_s=60, poll_s=0.2)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        direct = JobSubmissionClient(f"http://127.0.0.1:{dash}", headers={"Authorization": f"Bearer {token.read_text()}"})
        via = JobSubmissionClient(f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
        via_free = JobSubmissionClient(f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {free_key}"})
        for _ in range(30):  # the job agent may not be up yet
            try:
                direct.submit_job(entrypoint="true")
                break
            except RuntimeError:
                time.sleep(1)
        times = {"direct": [], "gateway": []}
        in_ray = {"direct": [], "gateway": []}  # from the client's call to the job's submission in Ray
        for i in range(n):
            for name, client in (("direct", direct), ("gateway", via_free)):
                wall, t = time.time(), time.perf_counter()
                # declared whole demand 0: the figure is the path's cost, not a wait for earlier jobs' CPUs
                client.submit_job(entrypoint="true", submission_id=f"{name}-{i}", metadata={"cpus": "0"})
                times[name].append(time.perf_counter() - t)
                info = None
                while info is None:
                    try:
                        info = direct.get_job_info(f"{name}-{i}")
                    except RuntimeError:
                        time.sleep(0.005)
                in_ray[name].append(info.start_time / 1000 - wall)
        # admission after quota frees: job k+1 waits for job k (the team may run one job)
        ids = [f"chain-{i}" for i in range(max(2, n // 2))]
        for jid in ids:
            via.submit_job(entrypoint="python -c 'import time; time.sleep(1)'", submission_id=jid)
        deadline = time.time() + 300
        while time.time() < deadline and via.get_job_status(ids[-1]).is_terminal() is False:
            time.sleep(0.5)
        infos = [direct.get_job_info(j) for j in ids]
        gaps = [(b.start_time - a.end_time) / 1000 for a, b in zip(infos, infos[1:]) if a.end_time and b.start_time]
        med = lambda xs: sorted(xs)[len(xs) // 2] * 1000  # noqa: E731
        return {"submit_p50_ms": {"direct": round(med(times["direct"]), 1), "gateway": round(med(times["gateway"]), 1)},
                "submit_ratio": round(med(times["gateway"]) / med(times["direct"]), 2),
                "in_ray_p50_ms": {"direct": round(med(in_ray["direct"]), 1), "gateway": round(med(in_ray["gateway"]), 1)},
                "admission_after_free_p50_ms": round(med(gaps), 1) if gaps else None, "chain": len(ids)}
    finally:
        if gw:
            gw.terminate()
            gw.wait(30)
        stop_local_ray(gcs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="one simulated day and 3 submissions (smoke test)")
    p.add_argument("--sim-only", action="store_true", help="only the simulated week (no Ray)")
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", type=float, default=1.0, help="scales every team's submissions per day")
    p.add_argument("--boot-min", type=float, default=5.0, help="minutes from the ask to a GPU node's being up")
    p.add_argument("--idle-min", type=float, default=10.0, help="Ray's idle timeout (cluster.yaml: 10 minutes)")
    a = p.parse_args(argv)
    if a.load <= 0:
        p.error("--load must be > 0")
    days = 1.0 if a.quick else a.days
    jobs = trace(days, a.seed, a.load)
    out = {"trace": {"days": days, "seed": a.seed, "load": a.load, "jobs": len(jobs),
                     "gpu_hours_asked": round(sum(j["gpus"] * j["run_s"] for j in jobs) / 3600, 1),
                     "per_team": {t: sum(1 for j in jobs if j["team"] == t) for t in TEAMS}}}
    print("trace", json.dumps(out["trace"]), flush=True)
    for policy in ("fcfs", "aidc", "aidc-autoscaled"):
        out[policy] = simulate(jobs, policy, days * 86400, a.boot_min * 60, a.idle_min * 60)
        print(policy, json.dumps(out[policy]), flush=True)
    if not a.sim_only:
        out["overhead"] = overhead(3 if a.quick else 30)
        print("overhead", json.dumps(out["overhead"]), flush=True)
    return out


if __name__ == "__main__":
    main()
