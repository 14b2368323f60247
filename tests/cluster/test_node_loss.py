"""Node loss on a 3-node local cluster (head + 2 worker nodes): training, tuning and serving survive it.

Each worker node carries one `slot`; trainers, trials and replicas ask for a slot, so removing a node
(ungracefully: its raylet and every process on it are killed) removes exactly one of them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from aidc.tasks import preprocess
from aidc.errors import StorageError
from aidc.train import checkpoint as ckpt
from aidc.train.trainer import resizes, run_training
from tests.cluster.conftest import SLOT
from tests.integration.conftest import workload_config

pytestmark = pytest.mark.cluster
logger = logging.getLogger(__name__)

TINY = ["model.channels=[8]", "model.hidden=16", "train.max_steps_per_epoch=4", "train.keep_checkpoints=100",
        f"resources.custom={{{SLOT}: 1}}"]


def _cfg(root: str, *overrides: str):
    return workload_config("digits", root, *TINY, *overrides)


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _registered(run_dir: Path) -> list[dict]:
    """Metrics of every checkpoint Ray Train has registered so far (its controller's snapshot).

    A checkpoint on disk is registered only at the controller's next poll of the workers; a node lost
    before that resumes from the one before (see RAY-NOTES), so the tests act on registered ones.
    """
    try:
        snapshot = json.loads(Path(run_dir, "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [{**r["metrics"], "dir": r["checkpoint_dir_name"]} for r in snapshot["checkpoint_results"]]


EPOCHS = 24  # enough that the run is still going when the lost node is back (growth takes a few seconds)
COMMON = [f"train.epochs={EPOCHS}", "run.max_failures=null"]


@pytest.fixture(scope="module")
def trained(cluster):
    """The uninterrupted run (2 workers on the 2 worker nodes), registered: the baseline and the served model."""
    from aidc.train.register import register

    cfg = _cfg(cluster.storage, *COMMON, "resources.num_workers=2", "run.name=fixed")
    preprocess(cfg)
    baseline = run_training(cfg)
    assert {h["world_size"] for h in baseline.history} == {2} and not baseline.resumes
    return cfg, baseline, register(cfg, baseline)


@pytest.mark.timeout(1500)  # includes the module's cluster start and baseline run: slow on a loaded machine
def test_elastic_run_shrinks_on_node_loss_grows_back_and_matches_an_uninterrupted_run(cluster, trained):
    root, epochs = cluster.storage, EPOCHS
    _, baseline, _ = trained
    cfg = _cfg(root, *COMMON, "resources.num_workers=[1, 2]", "resources.elastic_resize_interval_s=1",
               "run.name=elastic")
    assert cfg.run.max_failures == 10  # the elastic default: a node loss is not the end of the run
    outcome: dict = {}

    def fit():
        try:
            outcome["run"] = run_training(cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            outcome["error"] = exc

    run_dir = Path(root, "runs", "elastic")
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    _wait(lambda: any(c["world_size"] == 2 and c["epoch"] >= 1 for c in _registered(run_dir)), 600,
          "2 workers to checkpoint epoch 1")
    t_loss = time.monotonic()
    cluster.remove(cluster.workers[0])  # ungraceful: the node and its trainer are gone
    _wait(lambda: any(c["world_size"] == 1 for c in _registered(run_dir)), 600, "the run to continue on 1 worker")
    t_shrunk = time.monotonic()
    cluster.add_worker()  # the node comes back: the run grows to 2 workers again
    t_back = time.monotonic()
    thread.join(timeout=900)  # hang guards only (no timing asserted): generous for a loaded machine
    assert not thread.is_alive(), "the elastic run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    run = outcome["run"]
    logger.warning("elastic run: shrunk %.0f s after the node loss; node back after %.0f s; run done %.0f s later; "
                   "test accuracy %.4f (uninterrupted %.4f), test loss %.4f (%.4f); resumes %s",
                   t_shrunk - t_loss, t_back - t_shrunk, time.monotonic() - t_back, run.metrics["test_accuracy"],
                   baseline.metrics["test_accuracy"], run.metrics["test_loss"], baseline.metrics["test_loss"],
                   run.resumes)

    # the history records each resize: 2 -> 1 after the node loss, 1 -> 2 when it returned
    assert [(r["from_world_size"], r["world_size"]) for r in resizes(run.resumes)] == [(2, 1), (1, 2)]
    sizes = [h["world_size"] for h in run.history]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    # no epoch lost or repeated: same steps as the uninterrupted run, continued from checkpoints
    assert [h["epoch"] for h in run.history] == list(range(epochs))
    assert [h["step"] for h in run.history] == [h["step"] for h in baseline.history]
    shrink, grow = resizes(run.resumes)
    assert shrink["epoch"] >= 1 and grow["epoch"] > shrink["epoch"], run.resumes  # from checkpoints, not from zero
    # stated tolerance: a few epochs at half the global batch move the result a little, not much
    assert run.metrics["test_accuracy"] == pytest.approx(baseline.metrics["test_accuracy"], abs=0.1)
    assert run.metrics["test_loss"] == pytest.approx(baseline.metrics["test_loss"], rel=0.5)
    # every checkpoint Ray Train registered is still there and loads (none lived only on the lost node)
    registered = _registered(run_dir)
    assert len(registered) >= epochs + 1  # one per epoch (+ the final report), none dropped by keep_checkpoints
    for c in registered:
        assert ckpt.load(run_dir / c["dir"])["step"] == c["step"]


def test_node_local_storage_fails_at_start_with_a_clear_message(cluster):
    """A node that cannot see the storage root (simulated: AIDC_SIMULATE_NODE_LOCAL_STORAGE in its environment)
    stops a run before any training, naming the node and the fix."""
    import ray

    from aidc.storage import check_shared

    node = cluster.add_worker(AIDC_SIMULATE_NODE_LOCAL_STORAGE="1")
    try:
        with pytest.raises(StorageError, match=r"not shared: 1 of 4 nodes.*AIDC_STORAGE"):
            run_training(_cfg(cluster.storage, "resources.num_workers=1", "run.name=blind"))
        assert not Path(cluster.storage, "runs", "blind").exists()  # nothing started
        listed = ray.nodes()  # the blind node among them, alive
    finally:
        cluster.remove(node)
    # A node lost between listing the nodes and asking them (as a run starting right after a node loss
    # does): the check leaves it out instead of failing on it (found by the sweep test: TaskUnschedulableError).
    check_shared(cluster.storage, nodes=listed)


# --- tuning ----------------------------------------------------------------------------------------------
def test_sweep_retries_the_trials_of_a_lost_node_from_their_checkpoints(cluster, trained):
    """3 one-process trials, one per worker node at a time (each asks for a slot); the node of a running
    trial is lost after the trial's first checkpoint → Tune retries it elsewhere from that checkpoint."""
    import pandas as pd
    import yaml

    from aidc.config import validate
    from aidc.tune.space import validate_sweep
    from aidc.tune.sweep import tune_job
    from tests.conftest import CONFIGS

    raw = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    # The shipped model size and 40 steps an epoch (0.3-1 s each here): with a smaller one the three trials ran
    # all their epochs within a single poll (0.3 s a trial) and no node loss could hit one mid-run; with 4 epochs
    # an idle machine (0.26-0.45 s epochs) once finished every trial before the poll caught one mid-run: 8.
    raw["train"].update({"epochs": 8, "max_steps_per_epoch": 40, "keep_checkpoints": 1})
    raw["resources"] = {"num_workers": 0, "cpus_per_worker": 0.25, "custom": {SLOT: 1}}
    raw["run"] = {"storage": cluster.storage, "name": "lost-node-sweep"}
    raw["tune"] = {"space": {"train.lr": {"type": "grid", "values": [0.003, 0.01, 0.001]}}, "search": "grid",
                   "scheduler": "fifo", "max_failures": 3}
    sweep = Path(cluster.storage, "sweeps", "lost-node-sweep")
    outcome: dict = {}

    def fit():
        try:
            outcome["sweep"] = tune_job(validate_sweep(validate(raw)))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()

    seen: dict = {}  # trial -> what the last poll saw (in the failure message if no trial qualifies)

    def node_of_a_running_trial_with_a_checkpoint():
        if not thread.is_alive():  # the sweep ended (or failed) before a node could be lost under it
            raise AssertionError("the sweep ended before the poll caught a trial mid-run with a checkpoint"
                                 f"{' (it failed: ' + repr(outcome['error']) + ')' if 'error' in outcome else ''}")
        for trial_dir in sweep.glob("run_trial_*"):
            path = trial_dir / "result.json"
            rows = path.read_text().splitlines() if path.exists() else []
            last = json.loads(rows[-1]) if rows else {}
            node = cluster.node_of_pid(last["pid"]) if last.get("pid") else None
            seen[trial_dir.name[:24]] = (last.get("epochs_done"), last.get("completed"), last.get("pid"),
                                         node is not None, any(trial_dir.glob("checkpoint_*")))
            # any epoch before the last: the trial still has work left to resume from its checkpoint
            if any(trial_dir.glob("checkpoint_*")) and last and not last.get("completed") \
                    and last.get("epochs_done", 9) < raw["train"]["epochs"] and node is not None:
                return node
        return None

    try:
        node = _wait(node_of_a_running_trial_with_a_checkpoint, 600, "a running trial with a checkpoint", 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen (epochs_done, completed, pid, on a worker node, checkpoint): "
                             f"{seen}; sweep thread alive: {thread.is_alive()}") from None
    cluster.remove(node)  # the trial running there is lost mid-sweep
    cluster.add_worker()  # a replacement node: the sweep keeps its 2 trials at once
    thread.join(timeout=900)
    assert not thread.is_alive(), "the sweep did not finish"
    if "error" in outcome:
        raise outcome["error"]
    out = outcome["sweep"]
    assert len(out.records) == 3 and {r.status for r in out.records} == {"completed"}, \
        [(r.trial_id, r.status, r.error) for r in out.records]
    epochs = list(range(1, raw["train"]["epochs"] + 1))
    assert all([e for e, _ in r.history] == epochs for r in out.records)  # every epoch, each once
    # the lost trial restarted from its own checkpoint (its first epoch after the restart says so)
    restarted = []
    for trial_dir in sweep.glob("run_trial_*"):
        rows = pd.read_json(trial_dir / "result.json", lines=True, convert_dates=False, dtype=False)
        if "init_trial" in rows and rows["init_trial"].notna().any():
            own = rows["init_trial"].dropna().iloc[0]
            assert own == rows["trial_id"].iloc[0] and rows["init_epoch"].dropna().iloc[0] >= 0
            restarted.append(own)
    assert restarted, "no trial was retried from a checkpoint"
    assert out.version is not None  # the best trial was registered


# --- serving ---------------------------------------------------------------------------------------------
REPLICA_PREFIX = "SERVE_REPLICA::digits#Predictor#"


def _replicas() -> dict[str, str]:
    """Live replicas of the digits deployment: actor name -> node id."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(REPLICA_PREFIX)]
    out = {}
    for name in names:
        try:
            handle = ray.get_actor(name, namespace="serve")
            out[name] = ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                                timeout=5)
        except Exception:  # noqa: BLE001 - a replica going away while we look
            continue
    return out


def _running() -> int:
    from ray import serve

    return serve.status().applications["digits"].deployments["Predictor"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def served(cluster, trained):
    """The platform's predictor app: 2 replicas on 2 different worker nodes (a third node spare), proxy on
    the head, API keys on; a retrying client reaches it as the README recommends."""
    from ray import serve

    from aidc.registry import tracking_uri
    from aidc.serving.retry import wait_ready
    from serve_apps.predictor import Predictor
    from aidc.testing import free_port, serve_shutdown, serve_start
    from tests.security_helpers import make_key

    _, _, version = trained
    port = free_port()
    serve_start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    spare = cluster.add_worker()
    try:
        args = {"model": version.ref, "tracking_uri": tracking_uri(None, cluster.storage)}
        app = Predictor.options(
            num_replicas=2, max_replicas_per_node=1, health_check_period_s=1, health_check_timeout_s=5,
            ray_actor_options={"num_cpus": 0.25, "resources": {SLOT: 0.5}},
        ).bind(args)
        serve.run(app, name="digits", route_prefix="/digits")
        wait_ready(f"http://127.0.0.1:{port}/digits/healthz")  # the proxy has the route: no 404 for the load
        key = make_key("infer:*", owner="node-loss-tests")
        yield {"url": f"http://127.0.0.1:{port}/digits/predict", "headers": {"Authorization": f"Bearer {key}"}}
    finally:
        serve_shutdown()
        if spare in cluster.workers and len(cluster.workers) > 2:
            cluster.remove(spare)


def _digits_body():
    from sklearn.datasets import load_digits

    return {"instances": load_digits().data[:4].tolist()}


@pytest.mark.parametrize("fault", ["node", "replica"])
def test_serving_rides_out_a_lost_node_and_a_killed_replica_with_zero_failed_requests(served, cluster, fault):
    import ray

    import numpy as np

    from aidc.serving.retry import LoadRun, run_load

    _wait(lambda: _running() == 2 and len(set(_replicas().values())) == 2, 600, "2 replicas on 2 nodes")
    before = _replicas()
    victim, node_id = sorted(before.items())[0]
    run, stop = LoadRun(), threading.Event()
    load = threading.Thread(target=run_load, args=(served["url"], _digits_body()), daemon=True,
                            kwargs={"clients": 4, "pace_s": 0.05, "stop": stop, "run": run,
                                    "headers": served["headers"]})
    load.start()
    try:
        _wait(lambda: run.done() >= 40, 300, "the load to start")
        t_fault = time.monotonic()
        if fault == "node":  # ungraceful: the node and the replica on it are gone
            node = next((n for n in cluster.workers if n.node_id == node_id), None)
            assert node is not None, f"replica {victim} is on {node_id}, not on a removable worker node"
            cluster.remove(node)
        else:  # the replica process dies on a healthy node
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        _wait(lambda: victim not in (now := _replicas()) and len(set(now.values())) == 2 and _running() == 2, 600,
              "a replacement replica on the other node")  # replaced, still on 2 different nodes
        t_back = time.monotonic()
        _wait(lambda: run.done() >= len(run.window(0, t_back)) + 40, 300, "load after recovery")
    finally:
        stop.set()
        load.join(timeout=120)
        if fault == "node" and len(cluster.workers) < 3:
            cluster.add_worker()  # keep a spare node for the next fault, also when this one failed

    failed = run.failed()
    assert not failed, (f"{len(failed)} of {run.done()} requests failed (capacity was back {t_back - t_fault:.1f} s "
                        f"after the fault): {run.failure_counts(t_fault)}")
    during = [s.end - s.start for s in run.window(t_fault, t_back)]
    logger.warning("serving, %s lost: %d requests, 0 failed, %d retried; p99 during the fault %.3f s "
                   "(p50 %.3f s); capacity back after %.1f s", fault, run.done(),
                   sum(s.retries > 0 for s in run.samples), np.percentile(during or [np.nan], 99), np.percentile(during or [np.nan], 50),
                   t_back - t_fault)
