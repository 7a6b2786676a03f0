"""SIGTERM, handled the same at every moment of a job (Kubernetes sends it on preemption, eviction, drain
and ``helm upgrade``, then SIGKILL after the grace period).

The handler installed by :func:`install` sets a flag. Inside the training loop (:func:`deferred`) that is all
it does: the Trainer callback (``lora_exp.engine.callbacks.Preemption``) sees the flag at the next optimizer
step boundary, saves a regular checkpoint there and stops, so the next attempt resumes exactly where this one
stopped. Anywhere else (loading, evaluating, uploading) there is nothing to save mid-way: the handler raises
:class:`~lora_exp.core.errors.Preempted` at once, the run is marked KILLED and the process exits 143. Only a
few steps that must not be cut in two (:func:`held`: creating the MLflow run and recording its id, starting its
tracker) finish first, so that the run they open can be ended KILLED too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from lora_exp.core.errors import Preempted

log = logging.getLogger(__name__)

_state = {"requested": False, "deferred": 0, "held": 0, "installed": False}
STOPPED = "SIGTERM before or after training: stopped; the next attempt resumes"


def _handler(signum: int, frame: FrameType | None) -> None:
    first = not _state["requested"]
    _state["requested"] = True
    if _state["held"]:
        return  # raised as the held steps end
    if _state["deferred"]:
        if first:
            log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        return
    raise Preempted(STOPPED)


def install() -> None:
    """Route SIGTERM to this module for the rest of the process (main thread only; elsewhere a no-op), with no
    request pending (a process that runs several commands, a test, starts each afresh)."""
    _state["requested"] = False
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    _state["installed"] = True


def requested() -> bool:
    return bool(_state["requested"])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While training: SIGTERM only sets the flag, the training loop stops at the next step boundary.

    A SIGTERM that arrives outside (before the loop starts, or after it ends) raises ``Preempted``."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Steps that must not be cut in two, and take a moment (one request at most): a SIGTERM meanwhile raises
    ``Preempted`` as they end, not inside them. Creating the MLflow run and recording its id is one such: cut
    in two, nobody knows the run to end it KILLED, and it stays RUNNING."""
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
    if _state["requested"] and not _state["held"] and not _state["deferred"]:
        raise Preempted(STOPPED)
