"""One local Ray for the whole integration tier (started once, stopped when the tier ends)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


@pytest.fixture(scope="package")
def ray_session(tmp_path_factory):
    import ray

    from aidc.runtime import init_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("AIDC_STORAGE", str(tmp_path_factory.mktemp("storage")))
        # data.encryption's key files, where every Ray worker of this session finds them (set before Ray starts)
        mp.setenv("AIDC_KEYS_DIR", str(tmp_path_factory.mktemp("keys")))
        # 4 logical CPUs on 2 cores: room for 2 train workers at 0.5 CPU, Ray Data reads and a Serve replica.
        init_ray(num_cpus=4)
        try:
            yield ray
        finally:
            ray.shutdown()


def workload_config(name: str, root: str, *overrides: str):
    """A shipped workload config on this tier's storage root, reading datasets from the shared mirror."""
    from aidc.config import load_config
    from tests.conftest import CONFIGS, SHARED_DATA

    return load_config(CONFIGS / f"{name}.yaml", [f"run.storage={root}", f"data.mirror={SHARED_DATA}", *overrides])


def metrics_text(ray) -> str:
    """The Prometheus exposition of this Ray's (single) node: what Ray's metrics agent exports."""
    node = next(n for n in ray.nodes() if n["Alive"])
    return requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text


def metric_samples(text: str, name: str, *fragments: str) -> list[float]:
    """The values of series `name` whose labels contain every fragment, in exposition order."""
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and all(f in line for f in fragments)]


def metric_total(text: str, name: str, *fragments: str) -> float:
    """The sum of the samples of series `name` whose labels contain every fragment (0 where none is exported)."""
    return sum(metric_samples(text, name, *fragments))


def scrape(ray, wanted: dict[str, str], tries: int = 60) -> dict[str, float]:
    """{series: value} of the last sample of each wanted series whose labels contain its fragment, once
    every one is exported (Ray exports on an interval of seconds)."""
    found: dict[str, float] = {}
    for _ in range(tries):
        text = metrics_text(ray)
        for key, fragment in wanted.items():
            values = metric_samples(text, key, fragment)
            if values:
                found[key] = values[-1]
        if set(found) == set(wanted):
            return found
        time.sleep(1)
    raise AssertionError(f"not exported: {sorted(set(wanted) - set(found))}")


def edge_venv() -> Path:
    """A venv with only numpy and onnxruntime (the versions of this environment, from the pip cache), built
    once under the git-ignored .cache/ and reused: where edge bundles prove they need no torch or Ray."""
    import numpy
    import onnxruntime

    from tests.conftest import REPO

    venv = REPO / ".cache" / "edge-venv"
    py = venv / "bin" / "python"
    pins = [f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    probe = "import numpy, onnxruntime; print(numpy.__version__, onnxruntime.__version__)"
    ok = py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True, text=True).stdout.split() == [
        numpy.__version__, onnxruntime.__version__]
    if not ok:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], check=True)
    return py
