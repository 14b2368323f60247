import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from aidc.cli import main as aidc_main
from aidc.cluster import inspect_cluster, load_cluster_yaml, prepare_and_validate, summarize
from aidc.errors import ConfigError
from tests.conftest import REPO

CLOUD = REPO / "cluster.yaml"
ONPREM = REPO / "platform" / "clusters" / "onprem.yaml"


def test_cloud_cluster_passes_rays_validation_and_has_gpu_workers():
    summary = inspect_cluster(CLOUD)
    heads = [t for t in summary.node_types if t.is_head]
    gpu_workers = [t for t in summary.node_types if not t.is_head and t.gpus]
    assert len(heads) == 1 and heads[0].gpus == 0
    assert gpu_workers and all(t.cpus and t.memory_gib for t in gpu_workers)
    assert summary.gpus_at_full_scale == sum(t.gpus * t.max_workers for t in gpu_workers)
    assert summary.warnings == []  # dashboard on loopback, token auth, pinned metrics port


def test_onprem_cluster_passes_validation_with_detected_resources():
    summary = inspect_cluster(ONPREM)
    assert summary.provider == "local"
    assert summary.gpus_at_full_scale is None
    workers = [t for t in summary.node_types if not t.is_head]
    assert workers[0].max_workers == len(load_cluster_yaml(ONPREM)["provider"]["worker_ips"])


def test_every_bad_field_is_named():
    raw = load_cluster_yaml(CLOUD)
    raw["available_node_types"]["head"]["bogus"] = 1
    raw["max_workers"] = "ten"
    with pytest.raises(ConfigError) as err:
        prepare_and_validate(raw, "broken.yaml")
    msg = str(err.value)
    assert "available_node_types.head: Additional properties are not allowed ('bogus'" in msg
    assert "max_workers: 'ten' is not of type 'integer'" in msg


def test_min_workers_over_global_max_is_rejected_by_ray():
    raw = load_cluster_yaml(CLOUD)
    raw["available_node_types"]["gpu-l4x4"]["min_workers"] = 50
    with pytest.raises(ConfigError, match="max_workers"):
        prepare_and_validate(raw)


def test_local_provider_rejects_node_types():
    raw = load_cluster_yaml(ONPREM)
    raw["available_node_types"] = copy.deepcopy(load_cluster_yaml(CLOUD)["available_node_types"])
    with pytest.raises(ConfigError, match="rejected by Ray"):
        prepare_and_validate(raw)


def test_insecure_start_commands_are_flagged():
    raw = load_cluster_yaml(CLOUD)
    raw["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    summary = summarize(raw, prepare_and_validate(raw))
    text = " ".join(summary.warnings)
    assert "--dashboard-host=127.0.0.1" in text and "RAY_AUTH_MODE=token" in text and "metrics-export-port" in text


def test_cli_rejects_stray_arguments_and_parses_every_subcommand(capsys):
    from aidc.cli import build_parser

    with pytest.raises(SystemExit):
        aidc_main(["cluster", "describe", str(CLOUD), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    args = build_parser().parse_args(["predict", "--url", "http://x/predict", "--limit", "5"])
    assert args.limit == 5 and args.fn.__name__ == "_predict"


def test_cli_describe_and_validate(tmp_path, capsys):
    assert aidc_main(["cluster", "describe", str(CLOUD)]) == 0
    out = capsys.readouterr().out
    assert "gpu-a100x8" in out and "total GPUs at full scale: 56" in out
    assert aidc_main(["cluster", "describe", str(ONPREM)]) == 0
    assert "detected at start" in capsys.readouterr().out

    raw = yaml.safe_load(CLOUD.read_text())
    raw["provider"]["type"] = 7
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert aidc_main(["cluster", "validate", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_every_ray_start_carries_the_platform_environment():
    """aidc.runtime.RAY_ENV (Serve's gRPC request path and HAProxy, Ray Data's Parquet reader) is read by each
    Ray process at start: the cluster configs' `ray start` commands and the Makefile's must set it, as init_ray
    does for an embedded Ray."""
    from aidc.runtime import RAY_ENV

    wanted = [f"{k}={v}" for k, v in RAY_ENV.items()]
    for path in (CLOUD, ONPREM):
        raw = load_cluster_yaml(path)
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in raw[key] if "ray start" in c]
            assert starts and all(w in c for c in starts for w in wanted), (path.name, key)
    make_env = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("RAY_ENV :="))
    assert all(w in make_env for w in wanted)


def test_stopping_a_local_ray_ends_only_the_processes_of_its_gcs_port():
    """`make stop` and the tests' heads end one cluster by its GCS port (never `ray stop`, which kills every Ray
    on the host). Real processes carrying Ray's command-line shapes: only those of one port, with their children,
    are ended; a neighbour on 1<port> or <port>0 lives on. The port is a free one: another Ray may run on this
    host (a fixed one could be its GCS port)."""
    import subprocess
    import sys

    from aidc.runtime import stop_local_ray
    from aidc.testing import free_port

    port = free_port()

    sleep = "import subprocess, sys, time; {} time.sleep(120)"
    child = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
    procs = {
        "gcs": [sys.executable, "-c", sleep.format(""), f"--gcs_server_port={port}"],
        "raylet with a worker": [sys.executable, "-c", sleep.format(child), f"--gcs-address=10.0.0.1:{port}"],
        "other port": [sys.executable, "-c", sleep.format(""), f"--gcs-address=10.0.0.1:1{port}"],
        "longer port": [sys.executable, "-c", sleep.format(""), f"--gcs_server_port={port}0"],
    }
    started = {name: subprocess.Popen(cmd) for name, cmd in procs.items()}
    try:
        import time

        import psutil

        deadline = time.time() + 10
        while not psutil.Process(started["raylet with a worker"].pid).children() and time.time() < deadline:
            time.sleep(0.05)
        assert stop_local_ray(port) == 3  # gcs, raylet and the raylet's child
        for name in ("gcs", "raylet with a worker"):
            assert started[name].wait(timeout=20) is not None
        assert started["other port"].poll() is None and started["longer port"].poll() is None
    finally:
        for p in started.values():
            p.kill()
            p.wait()


MALLOC_PROBE = """
import ctypes, json
import aidc
from aidc.malloc import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
before = libc.mallinfo2().hblks
block = libc.malloc(24 << 20)  # a 24 MiB tensor's worth
mmapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"applied": tune_malloc(), "mmapped": mmapped, "heap_kept_mb": libc.mallinfo2().arena >> 20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
@pytest.mark.parametrize("env, tuned", [({}, True), ({"AIDC_MALLOC_TUNING": "0"}, False),
                                        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, False)],
                         ids=["default", "opted-out", "user-set"])
def test_importing_aidc_keeps_large_blocks_in_the_heap_unless_told_not_to(env, tuned):
    """Importing aidc raises glibc's mmap and trim thresholds (aidc/malloc.py): a 24 MiB block comes from the
    heap and stays there after free, instead of a fresh mmap each time; an opt-out or the user's own
    MALLOC_* setting leaves glibc's defaults alone."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "AIDC_MALLOC_TUNING"}
    env = {**clean, "PYTHONPATH": str(REPO / "platform"), **env}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    assert probe["applied"] is tuned
    if tuned:
        assert probe["mmapped"] == 0 and probe["heap_kept_mb"] >= 24, probe
    else:
        assert probe["mmapped"] == 1, probe
