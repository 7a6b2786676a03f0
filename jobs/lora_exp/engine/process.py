"""A job's process as a fresh one would be, between the runs one process executes (``lora-exp run``, a sweep's
trials): the launcher's variables DeepSpeed needs when there is no launcher, and the process-wide state a run
leaves behind, released."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator

import torch

from lora_exp.engine.memory import reset_peak_rss

log = logging.getLogger(__name__)


def single_process_launch() -> None:
    """DeepSpeed and FSDP need a launcher's environment; without torchrun (a single-GPU Job, a laptop) it would look
    for MPI. One process is a world of one: say so the way torchrun would."""
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"})
    log.info("sharding without a launcher: running as a single-process world")


@contextlib.contextmanager
def fresh_process_state() -> Iterator[None]:
    """Leave the process as a fresh one would be for the next run: the environment as it was, and none of the
    process-wide state a run's Trainer leaves behind.

    Why: accelerate keeps the distributed type and the DeepSpeed plugin in process-wide singletons and sets
    ``ACCELERATE_USE_DEEPSPEED`` in the environment; transformers keeps the DeepSpeed config in a module
    global; ``single_process_launch`` writes a launcher's variables. After a ZeRO-3 run, the next run of the
    same ``lora-exp run`` loaded its model partitioned (zero-sized weights) and trained under DeepSpeed
    although its spec had no ZeRO (seed 001's glue.yaml: mrpc-full, then sst2-lora).
    """
    before = dict(os.environ)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    reset_peak_rss()  # this run's peak memory is its own, not the largest earlier run's
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        # Each step alone, and none may replace the run's own exception (its exit code drives the chart).
        for step in (lambda: _restore_environment(before), _forget_deepspeed_state,
                     lambda: _destroy_own_world(before, had_group)):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - cleaning up after a run must not fail it
                log.warning("releasing the run's process state: %s", e)


def _restore_environment(before: dict[str, str]) -> None:
    """Only the variables the run changed: the others are never unset, even for a moment (threads of a
    launcher's process group may be reading the environment)."""
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _forget_deepspeed_state() -> None:
    import gc

    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    # Private, and kept: a fresh process per run would cost every run of `lora-exp run` its imports and the
    # sweep its in-process trials; accelerate offers no public reset (its own tests call this one), and
    # tests/test_distributed.py fails if a ZeRO-3 run still leaks into the next run of the same process.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()


def _destroy_own_world(before: dict[str, str], had_group: bool) -> None:
    """The world of one a run made (``single_process_launch``), not a launcher's or the caller's; through
    DeepSpeed when it made it, which keeps references to its groups that a later ZeRO run would find stale."""
    if had_group or "WORLD_SIZE" in before or not torch.distributed.is_initialized():
        return
    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and ds.cdb is not None and ds.cdb.is_initialized():
        ds.destroy_process_group()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
