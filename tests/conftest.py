"""Shared test helpers: repository paths and a clean environment per test session."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import aidc.tasks  # noqa: F401 - registers the workloads job configs are checked against (as every entry point does)
from aidc.testing import free_port  # noqa: F401 - tests import it from here too

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "jobs" / "configs"

# Ray 2.60 keeps a stopping ingress replica reachable for this long before it refuses connections (the window
# for a load balancer to deregister it; Ray's default 30 s), so every `serve.shutdown`, `serve.delete` and
# rolling update of an app that served traffic waited 30 s (eleven times in this suite). Serve's HAProxy,
# the only balancer in front of replicas here, deregisters within a second and retries a refused
# connection on another replica, so the tests run with a shorter window: a stricter setting than
# production's for the rolling-update and node-loss tests (no failed requests either way). Every Ray the
# tests start inherits it (embedded, `ray start`, local multi-node clusters, benchmarks run in process).
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s), and a
# worker's ray.train.report waits for that poll (its result queue holds one report), so every epoch of every
# Ray Train run here took at least 2 s whatever the model: an 8-epoch tiny digits run on 2 workers spent
# 2.0 s an epoch, 0.35 s at 0.25 s. A poll that takes longer is not a failure (Ray waits for it at the next one;
# a worker is dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). The node-loss tier keeps Ray's
# default (tests/cluster/conftest.py).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Ray Train starts a PreemptionWatcher actor with every worker group (a process of its own, ~2.5 CPU-s, then a
# GCS poll every 5 s) that logs node drains (spot reclaims) for ray.train.get_preemption_info, which aidc does
# not read: its node-loss handling is Ray Train's worker-group restart from the last checkpoint. Off here
# (Ray's documented switch), the suite starts ~70 fewer processes; the node-loss tier keeps Ray's default
# (tests/cluster/conftest.py), where nodes do go away.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

def _session_temp_dir(prefix: str, under: str | None = None) -> str:
    """A temp dir for this test session, removed when the session's process exits (each run left two behind in
    /tmp: 119 caches of up to 3 MB and 106 token dirs after a few weeks of runs on one machine)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=under)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# The suite never reads or writes the user's ~/.ray: every embedded Ray of this session (aidc.runtime.init_ray
# creates the token 0600 where it is missing) and every client uses a token of its own. A token left in
# ~/.ray by test runs is how `make demo` came to fail for new users while the suite passed (issue #23).
if not os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.environ.get("RAY_AUTH_TOKEN"):
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(_session_temp_dir("aidc-test-token-")) / "auth_token")

# Nor ~/.cache/aidc: the per-test fixture below sets AIDC_CACHE for each test, but a Ray started by a
# session- or package-scoped fixture keeps the environment it started with, and its Ray Data workers made
# ~/.cache/aidc/datasets/<name> folders in the real home (found after a full run on a fresh machine).
if not os.environ.get("AIDC_CACHE"):
    os.environ["AIDC_CACHE"] = _session_temp_dir("aidc-test-cache-")

# vLLM's engine processes talk over ZMQ IPC sockets it names /tmp/<uuid4>; one that is killed (a replica shut
# down, the dead-engine tests) leaves its sockets behind: ~600 in /tmp after a few weeks of runs. This session's
# sockets go in its own dir (inherited by every Ray it starts), removed with it; under /tmp whatever TMPDIR says,
# as a socket path must stay under 108 bytes (this one: 64).
if not os.environ.get("VLLM_RPC_BASE_PATH"):
    os.environ["VLLM_RPC_BASE_PATH"] = _session_temp_dir("aidc-test-ipc-", under="/tmp")


BIN = Path(sys.executable).parent


def run_cli(args, env, timeout=600) -> str:
    """Run a command from the repository root; its output, or a failed assertion showing it."""
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


class Head(tuple):
    """(env for CLI calls, dashboard URL, the cluster's temp dir), and `restart()`: the head stopped (every process
    of it) and started again on the same ports with the same token: a new cluster that knows no job."""

    restart = None
    config = gcs_address = None  # an autoscaling head's config file and GCS address


FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # Ray's fake multi-node provider names the head so


def fake_autoscaling_config(gcs_address: str, head_cpus: int, workers: dict, idle_timeout_minutes: float) -> dict:
    """An autoscaling config for Ray's own autoscaler (v2) on its fake multi-node provider: worker nodes are raylets
    on this host that the autoscaler launches and terminates as on a cloud (`workers`: available_node_types)."""
    return {"cluster_name": "aidc-test", "max_workers": sum(w["max_workers"] for w in workers.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            # `type: external`: the fake_multinode type needs an example.yaml the wheel does not ship
            "provider": {"type": "external", "launch_multiple": True, "gcs_address": gcs_address,
                         "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                         "head_node_id": FAKE_HEAD_NODE_ID},
            "auth": {"ssh_user": "ubuntu"}, "head_node_type": "ray.head.default",
            "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                          "max_workers": 0},
                                     **{k: {"node_config": {}, "min_workers": 0, **v} for k, v in workers.items()}},
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


@contextlib.contextmanager
def ray_head(tmp_path: Path, num_cpus: int, prefix: str, timeout: int = 600, ray_env: dict | None = None,
             autoscale: dict | None = None):
    """A head started with `ray start` like `make demo` (token auth on), on free ports; always stopped.

    Yields a Head: (env for CLI calls, dashboard URL, the cluster's temp dir). The cluster has its own 0600 token,
    never the user's ~/.ray/auth_token (absent on a fresh machine), and a short temp dir of its own (socket
    paths must stay under 108 bytes): stopping it ends only this cluster. `autoscale` (worker node types): the head
    runs Ray's autoscaler v2 on the fake multi-node provider (`fake_autoscaling_config`; its path is head.config).
    """
    from aidc.runtime import apply_ray_env, stop_local_ray

    env = apply_ray_env({**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                         "AIDC_STORAGE": str(tmp_path / "storage"), **(ray_env or {})})
    env.pop("RAY_ADDRESS", None)
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    dash, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    start = [BIN / "ray", "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--metrics-export-port={free_port()}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}",  # the job agent's port (52365 may be another head's)
             f"--temp-dir={temp_dir}"]
    start_env, config, gcs_address = env, None, None
    if autoscale is not None:
        from ray._private.services import get_node_ip_address

        config, gcs_address = Path(temp_dir) / "autoscaling.json", f"{get_node_ip_address()}:{gcs}"
        config.write_text(json.dumps(fake_autoscaling_config(gcs_address, num_cpus, **autoscale)))
        start.append(f"--autoscaling-config={config}")
        start_env = {**env, "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                     "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    run_cli(start, start_env, timeout)
    head = Head((env, f"http://127.0.0.1:{dash}", Path(temp_dir)))
    head.config, head.gcs_address = config, gcs_address

    def restart():
        stop_local_ray(gcs, temp_dir)
        run_cli(start, start_env, timeout)

    head.restart = restart
    try:
        yield head
    finally:
        stop_local_ray(gcs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


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


# ---- where the suite's time goes: busy CPU-seconds (the whole host, from /proc/stat) and wall seconds per test
# module, printed after the run (issue #29: `make test` is CPU-bound on 2 cores, so CPU-seconds are what to cut;
# package- and module-scoped fixtures count in the module whose test set them up or tore them down)

_SPENT: dict[str, list[float]] = {}  # module -> [tests, wall s, busy CPU-s]


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import time

    t0, c0 = time.monotonic(), _busy_seconds()
    yield
    c1 = _busy_seconds()
    row = _SPENT.setdefault(item.nodeid.split("::")[0], [0, 0.0, 0.0])
    row[0] += 1
    row[1] += time.monotonic() - t0
    row[2] += (c1 - c0) if c0 is not None and c1 is not None else 0.0


def pytest_terminal_summary(terminalreporter):
    if len(_SPENT) < 2:
        return
    wall, busy = sum(r[1] for r in _SPENT.values()), sum(r[2] for r in _SPENT.values())
    cores = os.cpu_count() or 1
    tr = terminalreporter
    tr.write_sep("=", f"time per module: {wall:.0f} s wall, {busy:.0f} busy CPU-s of {wall * cores:.0f} ({cores} cores)")
    tr.write_line(f"{'module':<48} {'tests':>5} {'wall s':>7} {'CPU-s':>7} {'busy':>5}")
    for mod, (n, w, c) in sorted(_SPENT.items(), key=lambda kv: -kv[1][2]):
        tr.write_line(f"{mod:<48} {n:>5} {w:>7.0f} {c:>7.0f} {c / max(w * cores, 1e-9):>5.0%}")
