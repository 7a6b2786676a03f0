"""The memory a run used, measured for the plan's estimate to be checked against: the peak resident set
(VmHWM, reset per run) and PyTorch's peak GPU allocation."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB; None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemoryWatch:
    """The memory a run adds while it loads and trains, for the plan's estimate to be checked against.

    On Linux the peak resident set (VmHWM) is reset where the run starts (``/proc/self/clear_refs``), so
    an earlier run of the same process (``lora-exp run``, a sweep) does not hide this one's; the growth is
    the peak minus the resident set at the start. GPU: PyTorch's peak allocation, reset likewise."""

    def __init__(self) -> None:
        self.base = _status_mb("VmRSS")
        if not reset_peak_rss() and self.base is not None:
            log.info("peak resident set cannot be reset here: peak_memory_growth_mb is measured from the "
                         "process's lifetime peak (an earlier, larger run in this process would overstate it)")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> dict[str, float]:
        """``peak_memory_growth_mb`` (CPU, where procfs has it) and ``peak_gpu_memory_mb`` since the start."""
        out = {}
        hwm = _status_mb("VmHWM")
        if self.base is not None and hwm is not None:
            out["peak_memory_growth_mb"] = hwm - self.base
        out.update({k: v for k, v in peak_memory().items() if k == "peak_gpu_memory_mb"})
        return out


def reset_peak_rss() -> bool:
    """Restart the peak resident set (VmHWM) from the current one (Linux); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory() -> dict[str, float]:
    """``peak_cpu_memory_mb``: the peak resident set since this run started (VmHWM, reset at each job's start by
    :func:`fresh_process_state`; elsewhere the process's lifetime peak, which in ``lora-exp run`` would give
    every run after the largest that run's figure); ``peak_gpu_memory_mb``: PyTorch's peak allocation."""
    hwm = _status_mb("VmHWM")
    rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 2**10)
    out = {"peak_cpu_memory_mb": rss}
    if torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
