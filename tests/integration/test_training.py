"""The one train loop on every workload, and its guarantees: resume exactness, recovery from a killed
worker, FSDP, mixed precision, early stopping and differentially private training. Tiny configs: seconds of
training each."""

from __future__ import annotations

import pytest

from aidc.tasks import preprocess
from aidc.registry import tracking_uri
from aidc.train.register import register
from aidc.tasks.loaded import load_model
from aidc.train.trainer import run_training
from tests.integration.conftest import workload_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("training"))


def _cfg(name, root, *overrides):
    cfg = workload_config(name, root, *overrides)
    preprocess(cfg)
    return cfg


TINY = {
    "sms-spam": ["train.epochs=1", "model.d_model=32", "model.layers=1", "train.max_steps_per_epoch=20"],
    "movielens": ["train.epochs=1", "model.dim=8"],
    "shakespeare-gpt": ["train.epochs=1", "model.d_model=32", "model.layers=1", "train.max_steps_per_epoch=15",
                        "train.parallelism=fsdp"],
    "mnist": ["train.epochs=1", "model.channels=[8]", "model.hidden=16", "train.max_steps_per_epoch=20",
              "train.precision=bf16"],
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_run_per_workload_trains_registers_and_serves(name, root):
    cfg = _cfg(name, root, *TINY[name], f"run.name=tiny-{name}")
    outcome = run_training(cfg)
    m = outcome.metrics
    key = {"sms-spam": "test_macro_f1", "movielens": "test_rmse", "shakespeare-gpt": "test_perplexity",
           "mnist": "test_accuracy"}[name]
    assert key in m and m[key] == m[key]  # present and not NaN
    assert m["samples_per_s"] > 0 and m["step"] >= 1
    if name == "mnist":
        assert m["precision"] == "bf16" and m["test_accuracy"] > 0.3  # 20 steps of a tiny CNN; chance is 0.1
    if name == "shakespeare-gpt":
        assert m["test_loss"] < 4.2  # below uniform over 68 symbols (ln 68 = 4.22): it learned something
    version = register(cfg, outcome)
    loaded = load_model(version.ref, tracking_uri(None, root))
    assert loaded.metadata()["version"] == version.version
    if name == "sms-spam":
        _served_with_scrub_sees_placeholders(version, loaded, root)


def _served_with_scrub_sees_placeholders(version, loaded, root):
    """The predictor's `scrub` arg: a served text model sees its instances as its scrubbed training data was
    (placeholders for the personal data), through Serve over HTTP."""
    import numpy as np
    import requests
    from ray import serve

    from serve_apps.predictor import app_builder
    from aidc.testing import free_port, serve_shutdown, serve_start
    from tests.security_helpers import bearer, make_key

    texts = ["WIN! mail claims@prize-win.com or call +44 20 7946 0958 now", "ok see u at 5"]
    placeholders = ["WIN! mail <EMAIL> or call <PHONE> now", "ok see u at 5"]
    port = free_port()
    serve_start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"model": version.ref, "tracking_uri": tracking_uri(None, root),
                               "scrub": ["email", "phone"]}), name="sms", route_prefix="/sms")
        r = requests.post(f"http://127.0.0.1:{port}/sms/predict", json={"instances": texts},
                          headers=bearer(make_key("infer:*")), timeout=60)
        assert r.status_code == 200, r.text
        served = r.json()["predictions"]
        assert served == loaded.predict(np.array(placeholders, dtype=object))
        assert served[0] != loaded.predict(np.array(texts, dtype=object))[0]  # the raw text reads otherwise
    finally:
        serve_shutdown()


def _stopped_then_resumed(cfg, step: int, tmp_path, monkeypatch):
    """Run `cfg` until its worker dies at `step` (the fault hook), then run it again: the resumed outcome."""
    marker = tmp_path / "stop"
    marker.touch()
    monkeypatch.setenv("AIDC_FAULT_MARKER", f"{marker}:{step}")
    with pytest.raises(Exception):
        run_training(cfg)
    assert not marker.exists()
    monkeypatch.delenv("AIDC_FAULT_MARKER")
    return run_training(cfg)


def _split_coordinators() -> int:
    """Ray Data SplitCoordinator actors this Ray has started (Ray Train's, one per split it shards), dead or alive."""
    import ray

    return sum(a["ActorClassName"] == "SplitCoordinator" for a in ray._private.state.actors().values())


def test_resume_after_a_stop_matches_an_uninterrupted_run(root, tmp_path, monkeypatch):
    base = ["train.epochs=4", "resources.num_workers=1", "model.channels=[8]", "model.hidden=16",
            "model.dropout=0.2", "run.max_failures=0"]
    before = _split_coordinators()
    full = run_training(_cfg("digits", root, *base, "run.name=resume-a"))
    assert _split_coordinators() == before  # one worker reads its splits whole (trainer.splits_to_shard)

    resumed = _stopped_then_resumed(_cfg("digits", root, *base, "run.name=resume-b"), 2 * full.history[0]["step"] + 1,
                                    tmp_path, monkeypatch)  # stopped at the first step of epoch 3

    assert resumed.resumes and resumed.resumes[0]["epoch"] in (1, 2)  # continued, not restarted
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    for key in ("val_loss", "test_loss", "test_accuracy"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-4, abs=1e-6), key


def test_killed_worker_is_replaced_and_the_run_finishes_from_its_checkpoint(root, tmp_path, monkeypatch):
    marker = tmp_path / "kill"
    marker.touch()
    monkeypatch.setenv("AIDC_FAULT_MARKER", f"{marker}:27")
    cfg = _cfg("digits", root, "train.epochs=3", "train.checkpoint_every_steps=10", "run.max_failures=1",
               "model.channels=[8]", "model.hidden=16", "run.name=kill")
    out = run_training(cfg)
    assert not marker.exists()  # the fault fired
    per_epoch = out.history[0]["step"]
    assert [h["epoch"] for h in out.history] == [0, 1, 2]
    assert out.history[-1]["step"] == 3 * per_epoch  # no step lost, none repeated from scratch
    assert out.resumes and 10 <= out.resumes[0]["step"] <= 27
    assert out.metrics["test_accuracy"] > 0.5  # a tiny 3-epoch CNN; chance is 0.1


def test_early_stopping_ends_the_run_and_keeps_the_best_epoch(root):
    cfg = _cfg("digits", root, "train.epochs=6", "train.lr=1e-12", "train.early_stopping_patience=2",
               "train.early_stopping_min_delta=0.001", "model.channels=[8]", "run.name=early")
    out = run_training(cfg)
    assert [h["epoch"] for h in out.history] == [0, 1, 2]
    assert out.metrics["best_epoch"] == 0


def test_driver_mode_run_keeps_its_checkpoints_and_resumes(root):
    """num_workers: 0 (Ray Train's local mode persists nothing itself): the final checkpoint survives the run,
    older ones are pruned to train.keep_checkpoints, and the same run name resumes from the latest."""
    from pathlib import Path

    cfg = _cfg("digits", root, "resources.num_workers=0", "train.epochs=2", "model.channels=[8]", "model.hidden=16",
               "train.max_steps_per_epoch=10", "run.name=driver-mode")
    first = run_training(cfg)
    assert [h["epoch"] for h in first.history] == [0, 1] and first.metrics["test_accuracy"] > 0.3
    kept = sorted(p.name for p in (Path(root) / "runs" / "driver-mode" / "local_checkpoints").iterdir())
    assert len(kept) == cfg.train.keep_checkpoints and Path(first.checkpoint_path).name == kept[-1]
    version = register(cfg, first)
    assert load_model(version.ref, tracking_uri(None, root)).metadata()["version"] == version.version

    again = run_training(cfg)  # same name: continues from the finished state, trains nothing more
    assert len(again.resumes) == 1 and again.history == first.history
    assert again.metrics["test_accuracy"] == pytest.approx(first.metrics["test_accuracy"])


# DP-SGD (train.privacy, Opacus) on Ray Train: two DDP workers, Poisson-sampled batches, the accountant's ε per
# epoch equal to an independent recount, recorded in MLflow and with the model version; a private text transformer
# registers as the plain architecture and predicts; a stopped private run resumes with its accountant and secret.

def test_dp_sgd_on_two_workers_spends_the_target_epsilon_as_the_accountant_counts_it(root):
    from opacus.accountants import RDPAccountant

    from aidc.train.privacy import ALPHAS

    cfg = _cfg("digits", root, "train.epochs=3", "resources.num_workers=2", "model.channels=[8]",
               "model.hidden=32", "model.norm=group", "train.batch_size=16", "train.lr=0.01",
               "train.privacy.epsilon=8", "train.privacy.delta=1e-4", "run.name=dp-digits")
    before = _split_coordinators()
    out = run_training(cfg)
    assert _split_coordinators() >= before + 3  # two workers share out train, val and test
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
    import mlflow

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
    import numpy as np

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
    resumed = _stopped_then_resumed(_cfg("digits", root, *base, "run.name=dp-resume-b"), full.history[0]["step"] + 3,
                                    tmp_path, monkeypatch)  # stopped early in epoch 2
    assert resumed.resumes and resumed.resumes[0]["epoch"] == 1
    assert [h["epsilon"] for h in resumed.history] == pytest.approx([h["epsilon"] for h in full.history], rel=1e-9)

    def secrets(run):
        return [ckpt.load(d)["dp_secret"] for d in sorted(Path(root, "runs", run).glob("checkpoint_*")) if d.is_dir()]

    kept = secrets("dp-resume-b")  # every epoch, before the stop and after the resume, and the final one
    assert len(kept) >= 3 and len(set(kept)) == 1  # one secret, not drawn again at the resume
    assert set(secrets("dp-resume-a")) != set(kept)
    assert resumed.history[0]["val_loss"] != full.history[0]["val_loss"]  # same seed, other noise
