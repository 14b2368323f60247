"""GPU energy of this process's visible GPUs from NVML's energy counter (`nvidia-ml-py`), absent on CPU.

`nvmlDeviceGetTotalEnergyConsumption` counts millijoules since the driver loaded; a run's energy is the
difference from its start. No NVML (no GPU, no driver, no package): `kwh()` returns None.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
MJ_PER_KWH = 3.6e9


def _visible_indices(count: int) -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    return [int(v) for v in visible.split(",") if v.strip().isdigit() and int(v) < count]


class GpuEnergy:
    """Energy used by the visible GPUs since this object was made (kWh)."""

    def __init__(self):
        self._nvml = self._handles = self._start = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                       for i in _visible_indices(pynvml.nvmlDeviceGetCount())]
            if handles:
                self._nvml, self._handles = pynvml, handles
                self._start = self._total_mj()
        except Exception as exc:  # noqa: BLE001 - no GPU/driver/package, or a GPU without the counter
            logger.debug("GPU energy not available: %s", exc)
            self._nvml = None

    def _total_mj(self) -> float:
        return float(sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles))

    def kwh(self) -> float | None:
        if self._nvml is None:
            return None
        try:
            return (self._total_mj() - self._start) / MJ_PER_KWH
        except Exception:  # noqa: BLE001
            return None
