"""The tune: section (parsing, validation through the job models, Tune space), trial resources, results
tables, PNGs and the leaderboard. No Ray cluster."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from aidc.config import validate
from aidc.errors import ConfigError
from aidc.tune.results import TrialRecord, best_record, leaderboard_lines, plot_curves, plot_params, table, write
from aidc.tune.space import apply_params, candidate_values, describe_space, tune_space, validate_sweep
from aidc.tune.sweep import trial_resources
from tests.conftest import CONFIGS, REPO


def _cfg(space: dict, **tune):
    raw = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    raw["tune"] = {"space": space, **tune}
    return validate(raw)


LR = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}


def test_shipped_digits_sweep_resolves_to_a_tune_space():
    cfg = validate(yaml.safe_load((CONFIGS / "digits.yaml").read_text()))
    spec = validate_sweep(cfg)
    assert spec.metric == "val_loss" and spec.mode == "min" and spec.job.tune is None
    space = tune_space(cfg)
    assert set(space) == set(cfg.tune.space)
    assert type(space["train.lr"]).__name__ == "Float" and type(space["model.hidden"]).__name__ == "Categorical"
    assert describe_space(cfg)[0].startswith("train.lr: loguniform[")


def test_early_stopping_schedulers_try_a_grid_in_seeded_random_order():
    lrs = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
    grid = {"train.lr": {"type": "grid", "values": lrs}}

    def order(**tune):
        return tune_space(_cfg(grid, **tune))["train.lr"]["grid_search"]

    assert order(scheduler="fifo") == lrs  # every point runs to the end: the order does not matter
    asha = order(scheduler="asha", seed=0)
    assert sorted(asha) == lrs and asha != lrs  # a sorted grid would make ASHA stop nothing
    assert order(scheduler="asha", seed=0) == asha and order(scheduler="median", seed=1) != asha


@pytest.mark.parametrize("space, tune, fragment", [
    ({"train.nope": {"type": "uniform", "low": 0, "high": 1}}, {}, "train.nope: no such config field"),
    ({"model": {"type": "choice", "values": [1]}}, {}, "is a section, not a field"),
    ({"run.name": {"type": "choice", "values": ["a"]}}, {}, "run is not tunable"),
    ({"model.hidden": {"type": "randint", "low": 0, "high": 4}}, {}, "randint can produce 0"),
    ({"model.dropout": {"type": "uniform", "low": 0.5, "high": 1.0}}, {}, "uniform can produce 1.0"),
    ({"train.epochs": {"type": "uniform", "low": 1, "high": 5}}, {}, "an integer field"),
    ({"model.hidden": {"type": "choice", "values": [32, -1]}}, {}, "choice can produce -1"),
    ({"model.hidden": {"type": "choice", "values": [32]}}, {"scheduler": "pbt"}, "pbt can only perturb"),
    (LR, {"metric": "test_accuracy"}, "not a reported per-epoch metric"),
    (LR, {"grace_period": 10}, "nothing can be stopped early"),
])
def test_bad_tune_sections_name_the_path_and_the_fix(space, tune, fragment):
    with pytest.raises(ConfigError, match="invalid tune section") as err:
        validate_sweep(_cfg(space, **tune))
    assert fragment in str(err.value)


@pytest.mark.parametrize("space, tune, fragment", [
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 1}}, {}, "loguniform needs low > 0"),
    ({"train.lr": {"type": "uniform", "low": 2, "high": 1}}, {}, "must be below high"),
    ({"train.lr": {"type": "quniform", "low": 0.1, "high": 1}}, {}, "quniform needs q"),
    ({"train.lr": {"type": "choice", "low": 0.1}}, {}, "takes values"),
    ({"train.lr": {"type": "grid", "values": [0.1]}}, {"search": "optuna"}, "optuna cannot take grid"),
    (LR, {"search": "grid"}, "every space entry must be type: grid"),
    (LR, {"search": "optuna", "scheduler": "pbt"}, "pbt needs search: random"),
    ({"train.lr": {"type": "gaussian", "low": 0, "high": 1}}, {}, "tune.space.train.lr.type"),
])
def test_structural_errors_fail_at_load(space, tune, fragment):
    with pytest.raises(ConfigError, match="invalid config") as err:
        _cfg(space, **tune)
    assert fragment in str(err.value)


def test_bad_tune_section_exits_2_before_anything_starts(tmp_path):
    raw = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    raw["tune"]["space"] = {"model.channel": {"type": "choice", "values": [[8]]}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "jobs.tune", "--config", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "tune.space.model.channel: no such config field" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_prints_space_resources_and_concurrency(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AIDC_STORAGE": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "jobs.tune", "--config", str(CONFIGS / "digits.yaml"), "--dry-run",
                        "--set", "resources.num_workers=0"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train.lr: loguniform[0.0003, 0.03]" in r.stdout and "trial(s) at once" in r.stdout
    assert "the loop runs in the trial process" in r.stdout


def test_candidate_values_cover_bounds_and_every_choice():
    from aidc.config import ParamSpec

    assert candidate_values(ParamSpec(type="randint", low=1, high=5)) == [1, 2, 4]
    assert candidate_values(ParamSpec(type="choice", values=[1, 2])) == [1, 2]
    assert candidate_values(ParamSpec(type="loguniform", low=1e-4, high=1e-2))[1] == pytest.approx(1e-3)
    assert apply_params({"a": {"b": 1}}, {"a.b": 2}) == {"a": {"b": 2}}


def test_trial_resources_follow_the_cluster():
    spec = validate_sweep(_cfg(LR))  # digits: 2 workers x 0.5 CPU
    r = trial_resources(spec, {"CPU": 8})
    assert r.per_trial == {"CPU": 0.2} and r.cpus_per_trial == pytest.approx(1.2) and r.concurrency == 5
    local = validate_sweep(validate({**yaml.safe_load((CONFIGS / "digits.yaml").read_text()),
                                     "resources": {"num_workers": 0, "cpus_per_worker": 1}, "tune": {"space": LR}}))
    assert trial_resources(local, {"CPU": 4}).concurrency == 3  # one CPU stays free for Ray Data
    gpu = trial_resources(local, {"CPU": 32, "GPU": 2})
    assert gpu.per_trial == {"CPU": 1, "GPU": 1} and gpu.concurrency == 2
    capped = validate_sweep(_cfg(LR, max_concurrent_trials=1))
    assert trial_resources(capped, {"CPU": 64}).concurrency == 1


def test_trials_that_leave_data_less_than_a_cpu_get_fractional_data_tasks():
    """2 CPUs, a trial of 0.2 + 2 x 0.5: 0.8 CPU left, so a read at Ray Data's one CPU would wait for ever (the
    FSDD sweep hung so): the sweep's trials ask for 0.75 per read/transform task; with room, or where the config
    sets it, nothing changes."""
    from aidc.tune.sweep import with_data_task_cpus

    spec = validate_sweep(_cfg(LR))
    tight = with_data_task_cpus(spec, trial_resources(spec, {"CPU": 2}, data_reads=True), data_reads=True)
    assert tight.job.resources.data_task_cpus == 0.75 and spec.job.resources.data_task_cpus is None
    roomy = trial_resources(spec, {"CPU": 8}, data_reads=True)
    assert with_data_task_cpus(spec, roomy, data_reads=True) is spec  # 1.2 CPU left after 5 trials
    assert with_data_task_cpus(spec, trial_resources(spec, {"CPU": 2}), data_reads=False) is spec  # cached data
    pinned = validate_sweep(_cfg(LR)).job.resources.model_copy(update={"data_task_cpus": 0.5})
    pinned = dataclasses.replace(spec, job=spec.job.model_copy(update={"resources": pinned}))
    assert with_data_task_cpus(pinned, trial_resources(pinned, {"CPU": 2}, data_reads=True),
                               data_reads=True).job.resources.data_task_cpus == 0.5


def _records():
    return [
        TrialRecord("t1", "completed", {"train.lr": 0.01}, [(1, 1.0), (2, 0.5), (3, 0.4)],
                    final={"test_accuracy": 0.9, "test_loss": 0.3}, checkpoint_path="/c1"),
        TrialRecord("t2", "stopped early", {"train.lr": 0.0001}, [(1, 2.0)], checkpoint_path="/c2"),
        TrialRecord("t3", "errored", {"train.lr": 0.1}, [], error="boom"),
    ]


def test_results_table_leaderboard_and_pngs(tmp_path):
    import pandas as pd

    df = table(_records(), "val_loss", "min")
    assert list(df["trial_id"]) == ["t1", "t2", "t3"]
    assert df.loc[0, "best_val_loss"] == 0.4 and df.loc[0, "epochs"] == 3 and df.loc[1, "epochs"] == 1
    assert df.loc[0, "test_accuracy"] == 0.9 and df.loc[2, "error"] == "boom"
    assert best_record(_records(), "val_loss", "min").trial_id == "t1"
    lines = leaderboard_lines(df, "val_loss")
    assert lines[0].split()[:4] == ["#", "trial", "status", "epochs"]
    assert "stopped early" in lines[2] and lines[1].split()[1] == "t1"
    out = write(_records(), str(tmp_path), "val_loss", "min", {"name": "s", "trials": 3})
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 3 == len(out)
    for png in ("curves.png", "params.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert plot_curves(_records(), "val_loss", tmp_path / "c.png").stat().st_size > 5000
    assert plot_params(df, "val_loss", tmp_path / "p.png").stat().st_size > 5000


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_tune_section_validates(path):
    cfg = validate(yaml.safe_load(path.read_text()))
    if cfg.tune is not None:
        spec = validate_sweep(cfg)
        assert spec.metric.startswith("val_") and set(tune_space(cfg)) == set(cfg.tune.space)


def test_a_checkpoint_gone_from_storage_falls_back_to_the_trials_newest_whole_one(tmp_path):
    """Tune's experiment snapshot can name a checkpoint pruned after it was taken (driver killed in between):
    the restored trial continues from its newest whole checkpoint instead of erroring, or starts afresh."""
    from ray import tune

    from aidc.tune.trainable import ORIGIN, prune_checkpoints, usable_checkpoint

    trial = tmp_path / "run_trial_00000"
    for i, files in enumerate([("state.pt", ORIGIN), ("state.pt", ORIGIN), ("state.pt",)]):
        (trial / f"checkpoint_00000{i}").mkdir(parents=True)
        for f in files:
            (trial / f"checkpoint_00000{i}" / f).write_text("x")
    whole = tune.Checkpoint(str(trial / "checkpoint_000000"))
    assert usable_checkpoint(whole) is whole
    gone = usable_checkpoint(tune.Checkpoint(str(trial / "checkpoint_000007")))
    assert gone.path == str(trial / "checkpoint_000001")  # 000002 lacks its origin: a kill mid-copy
    assert usable_checkpoint(None) is None
    prune_checkpoints(str(trial), keep=2)  # the half-copied one goes first
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000000", "checkpoint_000001"]
    prune_checkpoints(str(trial), keep=1)
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000001"]
    (trial / "checkpoint_000001" / ORIGIN).unlink()
    assert usable_checkpoint(tune.Checkpoint(str(trial / "checkpoint_000001"))) is None  # nothing whole left

    # after a restore Tune's counter can name a new checkpoint below older folders: age decides, not the name
    import os

    for i, age in ((3, 100), (4, 200), (1, 300)):  # checkpoint_000001 written last
        d = trial / f"checkpoint_00000{i}"
        d.mkdir(exist_ok=True)
        for f in ("state.pt", ORIGIN):
            (d / f).write_text("x")
        os.utime(d / ORIGIN, (age, age))
    assert usable_checkpoint(tune.Checkpoint(str(trial / "checkpoint_000009"))).path == str(
        trial / "checkpoint_000001")
    prune_checkpoints(str(trial), keep=2)
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000001", "checkpoint_000004"]
