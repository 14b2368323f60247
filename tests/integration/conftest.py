"""One local Ray for the whole integration tier (started once, stopped when the tier ends)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_session(tmp_path_factory):
    import ray

    from aidc.runtime import init_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("AIDC_STORAGE", str(tmp_path_factory.mktemp("storage")))
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
