"""Trainer callbacks: a ``kubectl logs``-friendly progress line, and metrics into MLflow."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from transformers import TrainerCallback

from lora_exp.core import preemption
from lora_exp.tracking.spool import Tracker

log = logging.getLogger("lora_exp.progress")


class ProgressLogger(TrainerCallback):
    """One line per logging interval: step, epoch, loss, lr, samples/s and ETA.

    Replaces transformers' tqdm bar (carriage returns) and its PrinterCallback (raw dicts), neither of
    which reads well in ``kubectl logs``. Rates are measured over this process's own steps, so a
    resumed job's ETA is not skewed by the steps it skipped.
    """

    def __init__(self, samples_per_step: int, tracker: Tracker | None = None) -> None:
        self.samples_per_step = samples_per_step
        self.tracker = tracker
        self._t0 = self._last_t = 0.0
        self._step0 = self._last_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = self._last_t = time.monotonic()
        self._step0 = self._last_step = state.global_step
        if state.is_world_process_zero:
            log.info("training: %d steps, %d samples/step%s", state.max_steps, self.samples_per_step,
                     f", resuming at step {state.global_step}" if state.global_step else "")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        now, step = time.monotonic(), state.global_step
        if "loss" in logs:
            dt = max(now - self._last_t, 1e-9)
            rate = (step - self._last_step) * self.samples_per_step / dt
            done = step - self._step0
            eta = (now - self._t0) / done * (state.max_steps - step) if done else 0.0
            log.info(
                "step %d/%d epoch %.2f loss %.4f lr %.2e | %.1f samples/s | eta %s",
                step, state.max_steps, state.epoch or 0.0, logs["loss"], logs.get("learning_rate", 0.0),
                rate, timedelta(seconds=round(eta)),
            )
            self._last_t, self._last_step = now, step
            if self.tracker:  # for `lora-exp status`: how far along, how fast, how long to go
                self.tracker.log_metrics({"progress": step / max(state.max_steps, 1), "max_steps": state.max_steps,
                                          "samples_per_second": rate, "eta_seconds": eta}, step=step)
        elif any(k.startswith("eval_") for k in logs):
            shown = " ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in logs.items()
                             if k.startswith("eval_") and isinstance(v, float) and "runtime" not in k
                             and "per_second" not in k)
            log.info("eval at step %d: %s", step, shown)


class MlflowMetrics(TrainerCallback):
    """Send the Trainer's logged numbers (loss, lr, grad norm, eval metrics, runtime) to MLflow by step."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics(logs, step=state.global_step)


class Preemption(TrainerCallback):
    """Stop at a step boundary with a regular checkpoint when SIGTERM arrived (``lora_exp.core.preemption``),
    and always checkpoint the final step.

    Saving only at the end of an optimizer step (never mid-step, never inside gradient accumulation) is what
    makes a resumed run bit-identical to an uninterrupted one: the checkpoint holds the weights, optimizer,
    scheduler, data position and RNG states of one consistent moment. transformers' own JIT checkpointing can
    save between the backward pass and the optimizer step, which a resume cannot reproduce. Under torchrun the
    ranks agree on the step first (a SIGTERM reaches them at slightly different times), so they save together.
    The final step's checkpoint lets an attempt preempted during the final evaluation skip training entirely.
    """

    def __init__(self) -> None:
        self.stopped_at: int | None = None

    @staticmethod
    def _agreed() -> bool:
        import torch
        import torch.distributed as dist

        flag = preemption.requested()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([1 if flag else 0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        elif state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._agreed():  # SIGTERM during an in-training evaluation: save right after it
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
