"""Node loss on a 3-node local cluster (head + 2 worker nodes): training, tuning and serving survive it.

Each worker node carries one `slot`; trainers, trials and replicas ask for a slot, so removing a node
(ungracefully: its raylet and every process on it are killed) removes exactly one of them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from aidc.data.pipeline import preprocess
from aidc.errors import StorageError
from aidc.train import checkpoint as ckpt
from aidc.train.trainer import resizes, run_training
from tests.cluster.conftest import SLOT
from tests.integration.conftest import workload_config

pytestmark = pytest.mark.integration

TINY = ["model.channels=[8]", "model.hidden=16", "train.max_steps_per_epoch=4", "train.keep_checkpoints=100",
        f"resources.custom={{{SLOT}: 1}}"]


def _cfg(root: str, *overrides: str):
    return workload_config("digits", root, *TINY, *overrides)


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _checkpoints(run_dir: Path) -> list[dict]:
    """World size and epoch of every Ray Train checkpoint of a run written so far."""
    out = []
    for d in sorted(run_dir.glob("checkpoint_*")):
        try:
            s = ckpt.load(d)
        except Exception:  # noqa: BLE001 - being written right now
            continue
        out.append({"dir": d.name, "world_size": s.get("world_size"), "epoch": s["epoch"]})
    return out


def test_elastic_run_shrinks_on_node_loss_grows_back_and_matches_an_uninterrupted_run(cluster):
    root = cluster.storage
    epochs = 24
    common = [f"train.epochs={epochs}", "run.max_failures=null"]
    preprocess(_cfg(root))
    baseline = run_training(_cfg(root, *common, "resources.num_workers=2", "run.name=fixed"))
    assert {h["world_size"] for h in baseline.history} == {2}

    cfg = _cfg(root, *common, "resources.num_workers=[1, 2]", "resources.elastic_resize_interval_s=3",
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
    _wait(lambda: any(c["world_size"] == 2 and c["epoch"] >= 2 for c in _checkpoints(run_dir)), 180,
          "2 workers to checkpoint epoch 2")
    cluster.remove(cluster.workers[0])  # ungraceful: the node and its trainer are gone
    _wait(lambda: any(c["world_size"] == 1 for c in _checkpoints(run_dir)), 180, "the run to continue on 1 worker")
    cluster.add_worker()  # the node comes back: the run grows to 2 workers again
    thread.join(timeout=300)
    assert not thread.is_alive(), "the elastic run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    run = outcome["run"]

    # the history records each resize: 2 -> 1 after the node loss, 1 -> 2 when it returned
    assert [(r["from_world_size"], r["world_size"]) for r in resizes(run.resumes)] == [(2, 1), (1, 2)]
    sizes = [h["world_size"] for h in run.history]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    # no epoch lost or repeated: same steps as the uninterrupted run, continued from checkpoints
    assert [h["epoch"] for h in run.history] == list(range(epochs))
    assert [h["step"] for h in run.history] == [h["step"] for h in baseline.history]
    assert all(r["epoch"] >= 2 for r in run.resumes)  # resumed from a checkpoint, never restarted from zero
    # stated tolerance: a few epochs at half the global batch move the result a little, not much
    assert run.metrics["test_accuracy"] == pytest.approx(baseline.metrics["test_accuracy"], abs=0.1)
    assert run.metrics["test_loss"] == pytest.approx(baseline.metrics["test_loss"], rel=0.5)
    # every checkpoint Ray Train registered is still there and loads (none lived only on the lost node)
    snapshot = json.loads(Path(run_dir, "checkpoint_manager_snapshot.json").read_text())
    registered = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    assert len(registered) >= epochs
    for name in registered:
        assert ckpt.load(run_dir / name)["epoch"] >= 0


def test_node_local_storage_fails_at_start_with_a_clear_message(cluster):
    """A node that cannot see the storage root (simulated: AIDC_SIMULATE_NODE_LOCAL_STORAGE in its environment)
    stops a run before any training, naming the node and the fix."""
    node = cluster.add_worker(AIDC_SIMULATE_NODE_LOCAL_STORAGE="1")
    try:
        with pytest.raises(StorageError, match=r"not shared: 1 of 4 nodes.*AIDC_STORAGE"):
            run_training(_cfg(cluster.storage, "resources.num_workers=1", "run.name=blind"))
        assert not Path(cluster.storage, "runs", "blind").exists()  # nothing started
    finally:
        cluster.remove(node)
