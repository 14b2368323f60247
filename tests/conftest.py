"""Shared test helpers: repository paths and a clean environment per test session."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "jobs" / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_local_ray(temp_dir: str, gcs_port: int) -> int:
    """Stop the Ray cluster started with `ray start --head --temp-dir=<temp_dir> --port=<gcs_port>`, and only it.

    `ray stop` kills every Ray process on the host (another test session's, a user's demo); this finds
    this cluster's processes by its temp dir or GCS port, plus their children (workers, agents), and ends them.
    """
    import psutil

    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    marks = (temp_dir, f":{gcs_port}")
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in mine or not any(m in " ".join(p.info["cmdline"] or []) for m in marks):
            continue
        try:
            procs.update({q.pid: q for q in (p, *p.children(recursive=True))})
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs.values(), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _no_leaking_storage(monkeypatch, tmp_path_factory):
    """No test writes to ~/.aidc: each session gets its own storage root unless a test sets one."""
    if "AIDC_STORAGE" not in __import__("os").environ:
        monkeypatch.setenv("AIDC_STORAGE", str(tmp_path_factory.getbasetemp() / "storage"))
    monkeypatch.setenv("AIDC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


sys.path.insert(0, str(REPO / "platform"))
