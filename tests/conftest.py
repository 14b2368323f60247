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
