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
