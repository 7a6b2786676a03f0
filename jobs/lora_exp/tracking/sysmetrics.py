"""System metrics of a run (CPU, memory, disk, network; GPU utilisation, memory and power where NVML gives
them), sampled by MLflow's own monitors and logged as ``system/...`` metrics through the run's spool; and
the energy the GPUs used over the run (``energy_joules``, from NVML's energy counter where it has one).

MLflow's ``SystemMetricsMonitor`` only starts for runs begun with ``mlflow.start_run`` and logs straight to
the server from its thread; lora-exp opens runs with ``MlflowClient.create_run`` and lets nothing reach the
server except through the spool (an outage must never cost the run, nor lose what was measured during it).
So this uses MLflow's collectors and aggregation and only replaces the loop that logs them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Protocol

from lora_exp.core.tags import ENERGY


class MetricSink(Protocol):
    """Where samples go: the run's tracker (``lora_exp.tracking.spool.Tracker``), which starts and stops these."""

    @property
    def active(self) -> bool: ...

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def logged_steps(self) -> dict[str, int]: ...

log = logging.getLogger(__name__)
PREFIX = "system/"


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):  # NVML (utilisation, memory, power), else ROCm; neither on CPU
        try:
            monitors.append(gpu())
            break
        except Exception as e:  # no library or no device: no GPU figures
            log.debug("no %s: %s", gpu.__name__, e)
    return monitors





def energy_counters() -> list[int] | None:
    """NVML's energy counter of each GPU this machine shows (millijoules since the driver loaded), or None
    where there is no NVML or a GPU without the counter (pre-Volta). In a pod, the GPUs the device plugin
    gave it; on a shared machine, every GPU of the machine."""
    try:
        import pynvml  # type: ignore[import-untyped]

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(i)))
                for i in range(count)] or None
    except Exception:  # no library, no driver, no counter: no energy figure
        return None


def metric_prefix() -> str:
    """``system/``, or ``system/rank<r>/`` in a multi-process run. Only rank 0 holds the MLflow run, so only
    its machine's figures are logged; the rank in the name says whose they are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{PREFIX}rank{os.environ.get('RANK', '0')}/" if world > 1 else PREFIX


class SystemMetrics:
    """A daemon thread: sample every ``interval`` seconds, log the aggregate through ``tracker``."""

    def __init__(self, tracker: MetricSink, interval: float) -> None:
        self.tracker = tracker
        self.interval = interval
        self.prefix = metric_prefix()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitors: list[Any] = []
        self._step = 0
        self._energy: list[int] | None = None

    def start(self) -> SystemMetrics:
        if not self.tracker.active:
            return self
        try:
            self._monitors = _monitors()
        except Exception as e:  # psutil missing or a collector failing: the run goes on without them
            log.warning("system metrics off: %s", e)
            return self
        # A resumed attempt continues the step count of the one before.
        self._step = 1 + max((s for k, s in self.tracker.logged_steps().items() if k.startswith(self.prefix)),
                             default=-1)
        self._energy = energy_counters()
        self._thread = threading.Thread(target=self._run, name="lora-exp-system-metrics", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> dict[str, float]:
        """One aggregate of what the monitors collected since the last one."""
        out: dict[str, float] = {}
        for m in self._monitors:
            m.collect_metrics()
            out.update({f"{self.prefix}{k}": float(v) for k, v in m.aggregate_metrics().items()})
            m.clear_metrics()
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tracker.log_metrics(self.sample(), step=self._step)
                self._step += 1
            except Exception as e:  # a collector failing mid-run: stop measuring, never the run
                log.warning("system metrics stopped: %s", e)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            try:  # a last sample, so that even a run shorter than the interval has one
                self.tracker.log_metrics(self.sample(), step=self._step)
            except Exception as e:
                log.warning("system metrics: last sample failed: %s", e)
            end = energy_counters() if self._energy else None
            if self._energy and end and len(end) == len(self._energy):
                # The GPUs' energy over this attempt (rank 0's machine), one point per attempt: a resumed run's
                # energy is the sum of its history (what `lora-exp compare` shows).
                joules = sum(b - a for a, b in zip(self._energy, end, strict=True)) / 1000
                self.tracker.log_metrics({ENERGY: joules}, step=self._step)
