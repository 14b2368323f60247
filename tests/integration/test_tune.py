"""Ray Tune sweeps over the platform's own training on digits: each searcher and scheduler once (combined),
2-worker trials, PBT's exploit, a SIGKILLed driver resumed with ASHA's rungs intact, the best model
registered, served from the registry and logged to MLflow. Tiny trials: a few steps per epoch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from aidc.config import validate
from aidc.tasks import preprocess
from aidc.train import checkpoint as ckpt
from aidc.tune.space import validate_sweep
from aidc.tune.sweep import tune_job
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.integration

TINY = {"model": {"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.0},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.003, "max_steps_per_epoch": 8, "keep_checkpoints": 1},
        "resources": {"num_workers": 0, "cpus_per_worker": 0.5}}


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tune"))
    preprocess(validate(_raw(root, "prep", {"train.lr": {"type": "grid", "values": [0.01]}}, search="grid")))
    return root


def _raw(root: str, name: str, space: dict, **tune) -> dict:
    raw = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    raw.update({k: {**raw.get(k, {}), **v} for k, v in TINY.items()})
    raw["run"] = {"storage": root, "name": name}
    raw["tune"] = {"space": space, "num_samples": 1, **tune}
    return raw


def _sweep(root: str, name: str, space: dict, train: dict | None = None, resources: dict | None = None, **tune):
    raw = _raw(root, name, space, **tune)
    raw["train"].update(train or {})
    raw["resources"].update(resources or {})
    return tune_job(validate_sweep(validate(raw)))


def _rows(out, trial_id: str) -> pd.DataFrame:
    path = next(Path(out.directory).glob(f"*{trial_id}*/result.json"))
    return pd.read_json(path, lines=True, convert_dates=False, dtype=False)


@pytest.fixture(scope="module")
def optuna_asha(root):
    space = {"train.lr": {"type": "loguniform", "low": 1.0e-5, "high": 3.0e-2},
             "model.hidden": {"type": "choice", "values": [16, 32]}}
    return _sweep(root, "optuna-asha", space, search="optuna", scheduler="asha", num_samples=5,
                  max_concurrent_trials=2, seed=3)


def test_optuna_asha_stops_weak_trials_and_writes_results(optuna_asha):
    out = optuna_asha
    df = pd.read_csv(Path(out.directory, "results.csv"))
    assert len(df) == 5 == len(pd.read_parquet(Path(out.directory, "results.parquet")))
    assert set(df["status"]) <= {"completed", "stopped early"}
    done, stopped = df[df.status == "completed"], df[df.status == "stopped early"]
    assert len(done) >= 1 and (done["epochs"] == 3).all() and done["test_accuracy"].notna().all()
    assert len(stopped) >= 1 and (stopped["epochs"] < 3).all()
    from aidc.ops import metrics  # the sweep's trials by state, as aidc.ops.tuning exports them to Prometheus

    counted = {s: metrics.value("aidc_tune_trials", sweep="optuna-asha", state=s) for s in ("completed", "stopped")}
    assert counted == {"completed": len(done), "stopped": len(stopped)}
    # ASHA's decisions: every stopped trial was worse at its last rung than the best trial there
    best_at_1 = df["best_val_loss"].min()
    assert (stopped["last_val_loss"] > best_at_1).all()
    assert df["best_val_loss"].is_monotonic_increasing  # the leaderboard order
    for png in ("curves.png", "params.png"):
        assert Path(out.directory, png).stat().st_size > 5000
    assert {"param:train.lr", "param:model.hidden"} <= set(df.columns)


def test_best_trial_is_registered_served_and_tracked(optuna_asha, root):
    from mlflow import MlflowClient

    from aidc.data.dataset import open_dataset
    from aidc.registry import tracking_uri
    from aidc.tasks.loaded import load_model

    out = optuna_asha
    assert out.version.ref == "digits-cnn@tuned" and out.best.status == "completed"
    uri = tracking_uri(None, root)
    loaded = load_model("digits-cnn@tuned", uri)
    test = open_dataset(root, "digits").read_numpy("test")
    preds = loaded.predict({"image": test["image"][:100]})
    acc = float(np.mean(np.array([p["class"] for p in preds]) == test["label"][:100]))
    assert acc == pytest.approx(out.best.final["test_accuracy"], abs=0.1)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("aidc")
    parent = client.search_runs([exp.experiment_id], "tags.`aidc.kind` = 'sweep' and tags.`aidc.sweep` = 'optuna-asha'")
    assert len(parent) == 1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    trials = [c for c in children if "aidc.trial_status" in c.data.tags]
    assert len(trials) == 5 and any(c.info.run_id == out.version.run_id for c in children)
    history = client.get_metric_history(trials[0].info.run_id, "val_loss")
    assert len(history) >= 1 and all(h.step >= 1 for h in history)


def test_aidc_sweeps_list_and_show_print_the_leaderboard(optuna_asha, root, capsys):
    from aidc.cli import main

    assert main(["sweeps", "list", "--storage", root]) == 0
    assert "optuna-asha" in capsys.readouterr().out
    assert main(["sweeps", "show", "optuna-asha", "--storage", root]) == 0
    shown = capsys.readouterr().out
    assert optuna_asha.best.trial_id in shown and "best_val_loss" in shown and "digits-cnn@tuned" in shown
    assert main(["sweeps", "show", "nope", "--storage", root]) == 1


def test_grid_fifo_runs_every_grid_point_to_the_end(root):
    out = _sweep(root, "grid-fifo", {"train.lr": {"type": "grid", "values": [0.01, 0.003]},
                                     "train.weight_decay": {"type": "grid", "values": [0.0, 0.01]}},
                 search="grid", scheduler="fifo", train={"epochs": 2})
    df = out.table
    assert len(df) == 4 and (df["status"] == "completed").all() and (df["epochs"] == 2).all()
    combos = {(r["param:train.lr"], r["param:train.weight_decay"]) for _, r in df.iterrows()}
    assert combos == {(0.01, 0.0), (0.01, 0.01), (0.003, 0.0), (0.003, 0.01)}


def test_random_median_trials_are_two_worker_train_runs(root):
    out = _sweep(root, "two-workers", {"train.lr": {"type": "uniform", "low": 0.003, "high": 0.01}},
                 search="random", scheduler="median", num_samples=2, train={"epochs": 2},
                 resources={"num_workers": 2})
    assert len(out.records) == 2 and all(r.status == "completed" for r in out.records)
    for r in out.records:
        assert all(row["world_size"] == 2 for row in r.epoch_rows)
        assert len(r.history) == 2
    assert any(Path(out.directory, "train-runs").iterdir())  # each trial's own Ray Train run


def test_pbt_exploit_continues_from_the_donors_checkpoint(root):
    out = _sweep(root, "pbt", {"train.lr": {"type": "choice", "values": [1.0e-5, 0.01]}},
                 search="random", scheduler="pbt", num_samples=2, seed=1, train={"epochs": 6})
    ids = [r.trial_id for r in out.records]
    exploits = []
    for tid in ids:
        rows = _rows(out, tid)
        if "init_trial" not in rows:
            continue
        for _, row in rows[rows["init_trial"].notna()].iterrows():
            if row["init_trial"] != tid:
                exploits.append((tid, row))
    assert exploits, "PBT never exploited: no trial continued from another trial's checkpoint"
    for tid, row in exploits:
        # the copied weights, evaluated before any training under the new lr, score exactly what the donor
        # reported at that epoch
        assert row["start_val_loss"] == pytest.approx(row["init_val_loss"], rel=1e-6)
        donor_dir = next(Path(out.directory).glob(f"*{row['init_trial']}*"))
        donor_states = {json.loads((c / "origin.json").read_text())["epoch"]: c for c in donor_dir.glob("checkpoint_*")
                        if json.loads((c / "origin.json").read_text())["trial_id"] == row["init_trial"]}
        if int(row["init_epoch"]) in donor_states:  # the donor's own checkpoint of that epoch (kept under PBT)
            state = ckpt.load(donor_states[int(row["init_epoch"])])
            assert state["history"][-1]["val_loss"] == pytest.approx(row["init_val_loss"], rel=1e-9)


def _wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the sweep")


def test_driver_sigkill_then_resume_keeps_progress_and_asha_rungs(root, ray_session, tmp_path):
    """Issue #24: what the killed driver's trials reserved must not outlive it - the resumed sweep ends Ray
    Train's detached cleaners whose controller died, and leaves no placement group behind."""
    from aidc.tune.cleanup import orphan_cleaners, reserved

    before = reserved()
    raw = _raw(root, "killed", {"train.lr": {"type": "grid", "values": [0.01, 1.0e-5, 2.0e-5]}},
               search="grid", scheduler="asha", max_concurrent_trials=1)
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    # The driver joins this tier's Ray (the test owns it): killing it leaves no processes of its own behind.
    marker = tmp_path / "fault"
    marker.write_text("")
    # the first trial's process dies once in its second epoch (step 12): Tune retries it from its checkpoint
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "AIDC_STORAGE": root,
           "PYTHONPATH": str(REPO), "AIDC_FAULT_MARKER": f"{marker}:12"}
    cmd = [sys.executable, "-m", "jobs.tune", "--config", str(cfg_file)]
    sweep = Path(root, "sweeps", "killed")

    def first_trial_epochs() -> int:
        files = list(sweep.glob("*_00000_*/result.json"))
        return sum(1 for _ in files[0].open()) if files else 0

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: first_trial_epochs() >= 2, 240, proc)
        proc.send_signal(signal.SIGKILL)  # not a graceful stop
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not marker.exists()  # the injected trial failure happened (and the trial carried on)
    rungs_before = json.loads((sweep / "asha_rungs.json").read_text())
    assert any(rec for bracket in rungs_before for _, rec in bracket)
    # what pruning between two experiment snapshots leaves: only the first trial's newest checkpoint (the one
    # the killed driver's last snapshot names may be gone; CI once lost the trial and registered a missing file)
    kept = sorted(p for p in next(sweep.glob("*_00000_*")).glob("checkpoint_*") if (p / "state.pt").is_file())
    for old in kept[:-1]:
        shutil.rmtree(old)

    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    df = pd.read_csv(sweep / "results.csv")
    by_lr = {r["param:train.lr"]: r for _, r in df.iterrows()}
    first = by_lr[0.01]
    assert first["status"] == "completed" and first["epochs"] == 3
    rows = pd.read_json(next(sweep.glob("*_00000_*/result.json")), lines=True, convert_dates=False, dtype=False)
    # continued from its checkpoint: epoch 1 ran at most once (Tune rewrites a restored trial's result file from
    # its experiment snapshot, which in a slow run predated the epoch-1 row: rows [2, 3, 3] in one full run);
    # the first result after the kill says where it started
    assert (rows["epochs_done"] == 1).sum() <= 1 and rows["epochs_done"].max() == 3
    resumed = rows[rows["init_trial"].notna()] if "init_trial" in rows else rows.iloc[0:0]
    assert len(resumed) >= 1 and resumed["init_trial"].iloc[0] == first["trial_id"]
    # ASHA after the restore still knows the first trial's rung records: the weak trials stop at the first rung
    for lr in (1.0e-5, 2.0e-5):
        assert by_lr[lr]["status"] == "stopped early" and by_lr[lr]["epochs"] == 1, df.to_string()
    rungs = json.loads((sweep / "asha_rungs.json").read_text())
    assert first["trial_id"] in {tid for bracket in rungs for _, rec in bracket for tid in rec}
    assert "digits-cnn@tuned" in done.stdout
    assert "WorkerGroupStartupTimeoutError" not in done.stdout + done.stderr
    assert orphan_cleaners() == []  # the killed sweep's cleaners (detached: they outlive their job) are ended
    assert reserved() == before

    # finished sweeps are not run again: a second resume changes no trial's results
    before = {p: p.stat().st_size for p in sweep.glob("*/result.json")}
    again = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_size for p in sweep.glob("*/result.json")} == before


def test_trials_that_cannot_place_workers_error_and_nothing_stays_reserved(root, ray_session):
    """Issue #24: every trial's Train workers ask a placement group of their own; a trial ASHA stops, or one
    whose workers can never be placed, must not keep it, and such a trial errors at once with what it asked
    for while the others finish. Ray's placement-group table after the sweep is what it was before."""
    from aidc.tune.cleanup import orphan_cleaners, reserved

    before = reserved()
    out = _sweep(root, "cannot-place", {"train.lr": {"type": "grid", "values": [0.01, 1.0e-5, 2.0e-5]},
                                        "resources.custom": {"type": "grid", "values": [{}, {"nowhere": 1}]}},
                 search="grid", scheduler="asha", resources={"num_workers": 1}, max_failures=0)
    df = pd.read_csv(Path(out.directory, "results.csv"))
    assert len(df) == 6, df.to_string()
    nowhere = df[df["param:resources.custom"].astype(str).str.contains("nowhere")]
    placed = df[~df.index.isin(nowhere.index)]
    assert (nowhere["status"] == "errored").all() and len(nowhere) == 3, df.to_string()
    for msg in nowhere["error"]:
        assert "1 worker(s) x {CPU 0.5, nowhere 1} can never start" in msg and "no node has 'nowhere'" in msg, msg
    assert set(placed["status"]) <= {"completed", "stopped early"} and (placed["status"] == "completed").any()
    assert (placed["status"] == "stopped early").any(), df.to_string()  # ASHA killed a trial with live workers
    assert reserved() == before
    # Ray Train's detached cleaner of each ended trial is ended too (detached: it would outlive the sweep)
    assert orphan_cleaners() == []


def test_worker_group_that_waits_past_the_bound_fails_naming_what_is_free(root, ray_session):
    """A run whose workers fit the cluster but not what is free now fails at resources.start_timeout_s, naming
    what it asked for and what is free, instead of Ray Train retrying the start for ever."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from aidc.errors import ResourcesUnavailable
    from aidc.train.trainer import run_training
    from aidc.tune.cleanup import reserved

    free = ray_session.available_resources()["CPU"]
    hold = placement_group([{"CPU": free - 1}])  # all but the one CPU Ray Data's reads need

    ray_session.get(hold.ready(), timeout=60)
    try:
        raw = _raw(root, "prep", {})
        raw.pop("tune")
        raw["resources"].update(num_workers=1, cpus_per_worker=1.5, start_timeout_s=8)
        raw["run"]["name"] = "held-cpus"
        with pytest.raises(ResourcesUnavailable) as err:
            run_training(validate(raw))
    finally:
        remove_placement_group(hold)
    msg = str(err.value)
    assert "1 worker(s) x {CPU 1.5} could not start within 8 s (resources.start_timeout_s)" in msg, msg
    assert "CPU 1 free of CPU 4" in msg and "held by other work" in msg, msg
    assert all(g["state"] == "REMOVED" or g["id"] != hold.id.hex() for g in reserved())

