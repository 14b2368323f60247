"""DP-SGD (train.privacy, Opacus) on Ray Train: two DDP workers, Poisson-sampled batches, the accountant's ε per
epoch equal to an independent recount, recorded in MLflow and with the model version; a private text transformer
registers as the plain architecture and serves."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from aidc.registry import tracking_uri
from aidc.tasks import preprocess
from aidc.tasks.loaded import load_model
from aidc.train.register import register
from aidc.train.trainer import run_training
from tests.integration.conftest import workload_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("private"))


def _cfg(name, root, *overrides):
    cfg = workload_config(name, root, *overrides)
    preprocess(cfg)
    return cfg


def test_dp_sgd_on_two_workers_spends_the_target_epsilon_as_the_accountant_counts_it(root):
    from opacus.accountants import RDPAccountant

    from aidc.train.privacy import ALPHAS

    cfg = _cfg("digits", root, "train.epochs=3", "resources.num_workers=2", "model.channels=[8]",
               "model.hidden=32", "model.norm=group", "train.batch_size=16", "train.lr=0.01",
               "train.privacy.epsilon=8", "train.privacy.delta=1e-4", "run.name=dp-digits")
    out = run_training(cfg)
    eps = [h["epsilon"] for h in out.history]
    assert eps == sorted(eps) and eps[0] > 0  # spent as it trains, never given back
    sigma = out.history[-1]["noise_multiplier"]
    # An independent count: the whole run's steps at the planned sample rate and noise.
    rows = out.dataset.manifest()["counts"]["splits"]["train"]
    q, steps = 16 * 2 / rows, (rows // 32) * 3
    recount = RDPAccountant()
    recount.history = [(sigma, q, steps)]
    assert out.history[-1]["step"] == steps
    assert eps[-1] == pytest.approx(recount.get_epsilon(1e-4, alphas=ALPHAS), rel=1e-6)
    assert 8 - 0.05 <= eps[-1] <= 8  # the plan spends the target, not more
    assert out.metrics["test_accuracy"] > 0.3  # noisy, but learning (chance is 0.1)

    version = register(cfg, out)
    uri = tracking_uri(None, root)
    run = mlflow.MlflowClient(uri).get_run(version.run_id)
    assert run.data.metrics["epsilon"] == pytest.approx(eps[-1], rel=1e-9)
    loaded = load_model(version.ref, uri)
    assert loaded.metadata()["metrics"]["epsilon"] == pytest.approx(eps[-1], rel=1e-9)


def test_private_text_transformer_registers_as_the_plain_model_and_predicts(root):
    cfg = _cfg("sms-spam", root, "train.epochs=1", "model.d_model=32", "model.layers=1", "resources.num_workers=1",
               "train.max_steps_per_epoch=15", "train.privacy.epsilon=3", "run.name=dp-sms")
    out = run_training(cfg)
    assert 0 < out.metrics["epsilon"] <= 3
    version = register(cfg, out)
    loaded = load_model(version.ref, tracking_uri(None, root))
    preds = loaded.predict(np.array(["WINNER! claim your prize now", "see you at lunch"], dtype=object))
    assert len(preds) == 2


def test_a_stopped_private_run_resumes_with_its_accountant_and_secret(root, tmp_path, monkeypatch):
    """A private run stopped mid-epoch continues from its checkpoint with the accountant's history (an ε that
    forgot the steps before the stop would under-report what was spent) and the run's secret (the same noise
    and Poisson batches it would have drawn); two runs with the same train.seed draw different noise (a seed in
    the config must not let anyone recompute it)."""
    from pathlib import Path

    from aidc.train import checkpoint as ckpt

    base = ["train.epochs=3", "resources.num_workers=1", "model.channels=[8]", "model.hidden=16",
            "model.norm=group", "train.privacy.epsilon=4", "train.privacy.delta=1e-4", "run.max_failures=0",
            "train.keep_checkpoints=5"]
    full = run_training(_cfg("digits", root, *base, "run.name=dp-resume-a"))
    marker = tmp_path / "stop"
    marker.touch()
    monkeypatch.setenv("AIDC_FAULT_MARKER", f"{marker}:{full.history[0]['step'] + 3}")  # early in epoch 2
    cfg = _cfg("digits", root, *base, "run.name=dp-resume-b")
    with pytest.raises(Exception):
        run_training(cfg)
    assert not marker.exists()
    monkeypatch.delenv("AIDC_FAULT_MARKER")
    resumed = run_training(cfg)
    assert resumed.resumes and resumed.resumes[0]["epoch"] == 1
    assert [h["epsilon"] for h in resumed.history] == pytest.approx([h["epsilon"] for h in full.history], rel=1e-9)

    def secrets(run):
        return [ckpt.load(d)["dp_secret"] for d in sorted(Path(root, "runs", run).glob("checkpoint_*")) if d.is_dir()]

    kept = secrets("dp-resume-b")  # every epoch, before the stop and after the resume, and the final one
    assert len(kept) >= 3 and len(set(kept)) == 1  # one secret, not drawn again at the resume
    assert set(secrets("dp-resume-a")) != set(kept)
    assert resumed.history[0]["val_loss"] != full.history[0]["val_loss"]  # same seed, other noise
