"""What both sides of a benchmark measure the same way: the steady-state training rate, and optionally an
operator profile of a few steps.

The whole ``train()`` call (``train_seconds``) includes one-time costs: the first steps' kernel selection and,
where lora-exp compiles its blocks, the compile. The steady-state rate is timed from the end of a warm-up
step to the end of the last step, with the device synchronised at both ends, so it is what a long run gets.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

PROFILE_ENV = "LORA_EXP_BENCH_PROFILE"  # a directory: write an operator profile of 3 steady steps there


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Times the steps after ``warm`` (a Trainer callback; the same one on both sides)."""

    def __init__(self, warm: int, name: str = "") -> None:
        self.warm, self.name = warm, name
        self.t0: float | None = None
        self.seconds: float | None = None
        self.steps = 0
        self.profiler: Any = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if step == self.warm:
            _sync()
            self.t0 = time.perf_counter()
            if step + 3 <= state.max_steps:
                self._start_profile()
        elif self.profiler is not None and step == self.warm + 3:
            self._stop_profile()
        if step == state.max_steps and self.t0 is not None:
            _sync()
            self.seconds = time.perf_counter() - self.t0
            self.steps = step - self.warm

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is not None:
            self._stop_profile()

    def _start_profile(self) -> None:
        if not os.environ.get(PROFILE_ENV):
            return
        import torch.profiler as tp

        acts = [tp.ProfilerActivity.CPU]
        if __import__("torch").cuda.is_available():
            acts.append(tp.ProfilerActivity.CUDA)
        self.profiler = tp.profile(activities=acts)
        self.profiler.__enter__()
        self.p0 = time.perf_counter()

    def _stop_profile(self) -> None:
        _sync()
        wall = time.perf_counter() - self.p0
        self.profiler.__exit__(None, None, None)
        out = Path(os.environ[PROFILE_ENV])
        out.mkdir(parents=True, exist_ok=True)
        ka = self.profiler.key_averages()
        lines = [f"3 steps, {wall * 1000:.1f} ms wall ({wall / 3 * 1000:.1f} ms/step)"]
        for key in ("self_cpu_time_total", "self_device_time_total"):
            try:
                lines += [f"\n## by {key}", ka.table(sort_by=key, row_limit=30, max_name_column_width=60)]
            except Exception as e:  # noqa: BLE001 - a profile is a diagnostic; never fail the measurement
                lines.append(f"({key}: {e})")
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in self.name or "profile")
        (out / f"{name}.txt").write_text("\n".join(lines))
        self.profiler = None

    def result(self, samples_per_step: int) -> dict[str, Any]:
        if not self.seconds:
            return {}
        return {"steady_seconds": self.seconds, "steady_samples": self.steps * samples_per_step}


def warm_steps(steps: int) -> int:
    """The steps left out of the steady-state rate: a fifth of the run, 1 to 10."""
    return max(1, min(10, steps // 5))
