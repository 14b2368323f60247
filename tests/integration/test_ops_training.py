"""Operations on a real Ray Train run (shared embedded Ray): per-epoch metrics in MLflow while the run
trains, the registered model in that same MLflow run, platform metrics on Ray's Prometheus endpoint, and a
job log free of the State API warnings an embedded run used to print every second."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aidc.tasks import preprocess
from aidc.registry import RUN_TAG
from aidc.train.telemetry import LIVE_MLFLOW
from aidc.registry import mlflow_client, tracking_uri
from aidc.train.register import register
from aidc.train.trainer import run_training
from tests.integration.conftest import scrape, workload_config

pytestmark = pytest.mark.integration


def test_live_mlflow_metrics_platform_metrics_and_a_quiet_log(ray_session, tmp_path, capfd):
    root = str(tmp_path / "storage")
    cfg = workload_config("digits", root, "train.epochs=2", "resources.num_workers=1", "model.channels=[8]",
                          "model.hidden=16", "train.max_steps_per_epoch=4", "run.name=ops-live")
    preprocess(cfg)
    outcome = run_training(cfg, loop_extras=LIVE_MLFLOW)
    time.sleep(2)  # let Ray's log monitor forward the workers' last lines
    log = capfd.readouterr()
    # Without aidc.ops.logs an embedded 3-epoch run printed ~20 of these (one a second), or on a host with
    # several Ray instances a "Found multiple active Ray instances" traceback from the cleaner's thread.
    assert "State API may be temporarily unavailable" not in log.out + log.err
    assert "Exception in thread PlacementGroupCleanerMonitor" not in log.out + log.err

    # Every epoch reached MLflow while the run trained: epoch 0's point is older than the final checkpoint,
    # which is written after the last epoch (logging the history at the end would come after it).
    uri = tracking_uri(None, root)
    client = mlflow_client(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{RUN_TAG}` = 'ops-live'")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    history = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1]
    final_checkpoint = Path(outcome.checkpoint_path) / "state.pt"
    assert history[0].timestamp <= final_checkpoint.stat().st_mtime * 1000
    assert {"val_loss", "samples_per_s", "epoch_time_s"} <= set(client.get_run(run_id).data.metrics)

    # Registering logs the model into that same run, without a second copy of the curves.
    version = register(cfg, outcome)
    assert version.run_id == run_id
    assert len(client.get_metric_history(run_id, "train_loss")) == 2
    assert any(a.path == "model" for a in client.list_artifacts(run_id))

    # What short-lived drivers counted reaches Prometheus through the cluster's metrics actor.
    found = scrape(ray_session, {
        "ray_aidc_train_runs_total": 'outcome="completed"',
        "ray_aidc_data_rows_read_total": 'dataset="digits"',
        "ray_aidc_data_rows_kept_total": 'dataset="digits"',
    })
    assert found["ray_aidc_train_runs_total"] >= 1
    # Counters are cluster-wide: other modules of this Ray session preprocess digits (all 1797 rows) too.
    read, kept = found["ray_aidc_data_rows_read_total"], found["ray_aidc_data_rows_kept_total"]
    assert read == kept and read >= 1797 and read % 1797 == 0
