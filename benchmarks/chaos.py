"""Chaos run: training, a sweep and a loaded endpoint on a multi-node local cluster while nodes come and go.

On one machine, a head and worker "nodes" (ray.cluster_utils.Cluster). Together: an elastic training run
(`resources.num_workers: [1, 2]`), a Tune sweep (one-process trials, retried from their checkpoints), and
the platform's predictor app (2 replicas on different nodes) under load from clients that retry as the
README recommends. A seeded schedule removes a random worker node (ungracefully) or adds one every few
seconds. Reported: jobs completed, requests failed, checkpoints lost (target 0, 0, 0), request latency
before vs during faults, and how long Serve took to get its capacity back after each fault.

    python -m benchmarks.chaos [--quick] [--seed N] [--seconds S] [--clients C]

--quick: the endpoint only (a model trained in the driver), one node loss and its replacement.
Figures come from a shared, loaded 2-core machine: compare the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.local_cluster import local_cluster

logger = logging.getLogger(__name__)
RES = {"trainer": 1, "replica": 1, "trial": 1}  # per worker node: one of each fits
MIN_WORKERS, MAX_WORKERS = 2, 3


def _job(root: str, name: str, *overrides: str):
    from aidc.config import load_config
    from benchmarks.common import ROOT

    return load_config(ROOT / "jobs/configs/digits.yaml", [
        f"run.storage={root}", f"run.name={name}", "model.channels=[8]", "model.hidden=16",
        "train.max_steps_per_epoch=4", "train.keep_checkpoints=100", *overrides])


def _replicas_running() -> int:
    from ray import serve

    return serve.status().applications["digits"].deployments["Predictor"].replica_states.get("RUNNING", 0)


def deploy(root: str, ref: str, port: int) -> str:
    from ray import serve

    from aidc.registry import tracking_uri
    from aidc.serving.retry import wait_ready
    from aidc.testing import serve_start
    from serve_apps.predictor import Predictor

    serve_start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    app = Predictor.options(num_replicas=2, max_replicas_per_node=1, health_check_period_s=1,
                            health_check_timeout_s=5,
                            ray_actor_options={"num_cpus": 0.25, "resources": {"replica": 0.5}}).bind(
        {"model": ref, "tracking_uri": tracking_uri(None, root)})
    serve.run(app, name="digits", route_prefix="/digits")
    wait_ready(f"http://127.0.0.1:{port}/digits/healthz")  # the proxy has the route (else 404s, never retried)
    return f"http://127.0.0.1:{port}/digits/predict"


def replica_nodes(cluster) -> list:
    """The worker nodes that host a replica of the digits deployment right now."""
    import os

    import ray

    nodes = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::digits#"):
            try:
                pid = ray.get(ray.get_actor(a["name"], namespace="serve").__ray_call__.remote(
                    lambda self: os.getpid()), timeout=10)
            except Exception:  # noqa: BLE001 - a replica going away while we look
                continue
            nodes.append(cluster.node_of_pid(pid))
    return [n for n in nodes if n is not None]


def node_event(cluster, rng: random.Random, events: list, alternate: bool) -> None:
    """Remove a random worker node (ungracefully) or add one. Alternating (--quick): lose a node that holds a
    replica, then get one back; random: keep at least one worker node. Runs in the main thread
    (Cluster.add_node installs signal handlers)."""
    n = len(cluster.workers)
    remove = n >= MAX_WORKERS if alternate else n >= MAX_WORKERS or (n >= MIN_WORKERS and rng.random() < 0.6)
    t = time.monotonic()
    if remove:
        cluster.remove(rng.choice((alternate and replica_nodes(cluster)) or cluster.workers))
    else:
        cluster.add_worker()
    events.append({"t": t, "event": "remove" if remove else "add", "workers": len(cluster.workers)})
    logger.warning("chaos: %s a node -> %d worker nodes", events[-1]["event"], len(cluster.workers))


def capacity_back_s(events: list, samples: list[tuple[float, int]]) -> list[float]:
    """For each node removal: seconds until Serve had 2 running replicas again (from the sampled states)."""
    out = []
    for e in (e for e in events if e["event"] == "remove"):
        dipped = [t for t, n in samples if t >= e["t"] and n < 2]
        if not dipped:
            continue  # the lost node held no replica
        back = [t for t, n in samples if t > dipped[0] and n >= 2]
        if back:
            out.append(round(back[0] - e["t"], 1))
    return out


def lost_checkpoints(run_dir: Path) -> int:
    """Registered Ray Train checkpoints of a run that are missing or do not load."""
    from aidc.train import checkpoint as ckpt

    snap = run_dir / "checkpoint_manager_snapshot.json"
    if not snap.exists():
        return 0
    lost = 0
    for r in json.loads(snap.read_text())["checkpoint_results"]:
        try:
            ckpt.load(run_dir / r["checkpoint_dir_name"])
        except Exception:  # noqa: BLE001 - counted
            lost += 1
    return lost


def run(a) -> dict:
    from aidc.tasks import preprocess
    from aidc.train.register import register
    from aidc.serving.retry import LoadRun, retry_policy, run_load
    from benchmarks.common import percentile_ms
    from aidc.train.trainer import resizes, run_training
    from aidc.security.keys import create

    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="aidc-chaos-") as root, \
            local_cluster(root, workers=0, head_cpus=2, worker_cpus=2, worker_resources=RES) as cluster:
        # The served model first, on the head alone (its warm workers: Ray Data reads were 12-20 s each on
        # worker nodes just started), then the worker nodes the faults act on.
        served_cfg = _job(root, "served", "resources.num_workers=0", "train.epochs=2")
        preprocess(served_cfg)
        version = register(served_cfg, run_training(served_cfg))
        for _ in range(MAX_WORKERS):
            cluster.add_worker()
        url = deploy(root, version.ref, _free_port())
        headers = {"Authorization": f"Bearer {create('chaos', ['infer:*'])[0]}"}  # in this run's storage
        from sklearn.datasets import load_digits

        body = {"instances": load_digits().data[:4].tolist()}
        while _replicas_running() < 2:
            time.sleep(0.5)

        stop, jobs, errors, events, states = threading.Event(), {}, {}, [], []
        load = LoadRun()
        policy = retry_policy(attempts=12, backoff_max_s=5.0)
        threads = [threading.Thread(target=run_load, args=(url, body), daemon=True, kwargs={
            "clients": a.clients, "stop": stop, "headers": headers, "run": load, "policy": policy,
            "pace_s": a.pace})]

        def job(name, fn):
            try:
                jobs[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]

        if not a.quick:
            train_cfg = _job(root, "elastic", "resources.num_workers=[1, 2]", "resources.cpus_per_worker=0.5",
                             "resources.custom={trainer: 1}", "resources.elastic_resize_interval_s=10",
                             f"train.epochs={a.epochs}", "run.max_failures=null")
            threads.append(threading.Thread(target=job, args=("train", lambda: run_training(train_cfg)), daemon=True))
            threads.append(threading.Thread(target=job, args=("sweep", lambda: sweep(root, a)), daemon=True))
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while load.done() < 50 and threads[0].is_alive():
            time.sleep(0.2)
        t_chaos = time.monotonic()
        deadline, next_fault = t_chaos + a.seconds, t_chaos + rng.uniform(a.gap, 2 * a.gap)
        while True:  # faults and load go on until the deadline (quick: the node is back), the jobs to their end
            now = time.monotonic()
            if not stop.is_set() and now >= next_fault and not (a.quick and len(events) >= 2):
                node_event(cluster, rng, events, alternate=a.quick)
                next_fault = time.monotonic() + rng.uniform(a.gap, 2 * a.gap)
            states.append((now, _replicas_running()))
            jobs_alive = any(t.is_alive() for t in threads[1:])
            if now > deadline or (a.quick and len(events) >= 2 and states[-1][1] >= 2) or \
                    (not a.quick and not jobs_alive and now > t_chaos + 3 * a.gap):
                stop.set()
            if stop.is_set() and not jobs_alive:
                break
            time.sleep(0.5)
        while len(cluster.workers) < MIN_WORKERS:
            cluster.add_worker()
        for t in threads:
            t.join()

        before = [s.end - s.start for s in load.samples if s.end < t_chaos]
        during = [s.end - s.start for s in load.samples if s.start >= t_chaos]
        lost = 0 if a.quick else lost_checkpoints(Path(root, "runs", "elastic"))
        trained = jobs.get("train")
        swept = jobs.get("sweep")
        result = {
            "seed": a.seed, "clients": a.clients, "seconds_total": round(time.monotonic() - t0, 1),
            "node_events": [e["event"] for e in events],
            "requests": load.done(), "requests_failed": len(load.failed()),
            "failures": load.failure_counts(events[0]["t"] if events else t_chaos),
            "retried_for": dict(Counter(s.retried_for for s in load.samples if s.retried_for)),
            "requests_retried": sum(s.retries > 0 for s in load.samples),
            "p50_ms_before": percentile_ms(before, 50), "p99_ms_before": percentile_ms(before, 99),
            "p50_ms_chaos": percentile_ms(during, 50), "p99_ms_chaos": percentile_ms(during, 99),
            "capacity_back_s": capacity_back_s(events, states),
            # 0 would mean the route was gone for a while: Serve drops an app's route from HAProxy while it has
            # no RUNNING ingress replica, and its path then answers 404 (never retried)
            "replicas_running_min": min((n for t, n in states if t >= t_chaos), default=None),
            "jobs_completed": sum(1 for k in ("train", "sweep") if k in jobs), "jobs_failed": errors,
            "checkpoints_lost": lost,
        }
        if trained:
            result["train_resizes"] = [(r["from_world_size"], r["world_size"]) for r in resizes(trained.resumes)]
            result["train_test_accuracy"] = round(trained.metrics["test_accuracy"], 4)
        if swept:
            result["sweep_trials"] = {r.trial_id: r.status for r in swept.records}
            result["checkpoints_lost"] += sweep_lost_checkpoints(swept)
        from aidc.testing import serve_shutdown

        serve_shutdown()
    p99_ratio = result["p99_ms_chaos"] / result["p99_ms_before"] if result["p99_ms_before"] else float("nan")
    result["p99_chaos_over_before"] = round(p99_ratio, 2)
    return result


def _free_port() -> int:
    from aidc.testing import free_port

    return free_port()


def sweep(root: str, a):
    from aidc.config import validate
    from aidc.tune.space import validate_sweep
    from aidc.tune.sweep import tune_job

    raw = _job(root, "chaos-sweep", "resources.num_workers=0", "resources.cpus_per_worker=0.25",
               "resources.custom={trial: 1}", f"train.epochs={max(3, a.epochs // 3)}").model_dump(mode="json")
    raw["tune"] = {"space": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}, "search": "random",
                   "scheduler": "fifo", "num_samples": a.trials, "max_failures": 10}
    return tune_job(validate_sweep(validate(raw)))


def sweep_lost_checkpoints(out) -> int:
    """Completed trials whose final checkpoint is missing."""
    return sum(1 for r in out.records if r.status == "completed" and not (r.checkpoint_path and Path(r.checkpoint_path).exists()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Endpoint only, one node loss (smoke test).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the fault schedule.")
    p.add_argument("--seconds", type=float, default=180.0, help="How long faults are injected.")
    p.add_argument("--clients", type=int, default=50, help="Concurrent HTTP clients.")
    p.add_argument("--pace", type=float, default=0.2, help="Seconds each client waits between its requests.")
    p.add_argument("--gap", type=float, default=20.0, help="Seconds between faults (uniform in [gap, 2 gap]).")
    p.add_argument("--epochs", type=int, default=40, help="Epochs of the elastic training run.")
    p.add_argument("--trials", type=int, default=4, help="Trials of the sweep.")
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.gap, a.seconds, a.pace = 4, 3.0, 60.0, 0.05
    logging.basicConfig(level=logging.WARNING)
    result = run(a)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
