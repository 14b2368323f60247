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
