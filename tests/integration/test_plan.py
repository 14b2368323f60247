"""`aidc plan` on every shipped config, and jobs.train refusing a job the plan says cannot fit - before any
worker starts (issue #27)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_aidc_plan_prints_a_plan_for_every_shipped_config(config, tmp_path, monkeypatch, capsys):
    from aidc.cli import main

    monkeypatch.setenv("AIDC_STORAGE", str(tmp_path))  # nothing preprocessed: sized from the config
    rc = main(["plan", "--config", str(CONFIGS / f"{config}.yaml"), "--cluster", str(REPO / "cluster.yaml")])
    out = capsys.readouterr().out
    assert rc == 0, out
    for node_type in ("gpu-a100x8", "gpu-l4x4"):
        assert f"  {node_type} (" in out and "fits" in out, out
    assert "parameters" in out and "optimizer" in out and "activations" in out
    assert "step " in out and "/s on 2 worker(s)" in out, out


def test_jobs_train_refuses_a_job_that_cannot_fit_before_any_worker_starts(ray_session, tmp_path):
    """A 2k-wide, 24-layer GPT (1.2 B parameters) on this machine's RAM: refused with exit 2, the breakdown and the fix; no
    training run was started (no run directory, no Train worker)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "AIDC_STORAGE": str(tmp_path), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "jobs.train", "--config", str(CONFIGS / "shakespeare-gpt.yaml"),
            "--set", "model.d_model=2048", "--set", "model.heads=16", "--set", "model.layers=24",
            "--set", "data.text.block_size=512", "--set", "resources.num_workers=1"]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "the plan does not fit" in out.stderr and "Fix: --set" in out.stderr, out.stderr[-3000:]
    assert "--set train.plan=warn" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # refused before Ray Train made anything
    plan = subprocess.run(args + ["--plan"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0 and "DOES NOT FIT" in plan.stdout and "fix: " in plan.stdout, plan.stdout
