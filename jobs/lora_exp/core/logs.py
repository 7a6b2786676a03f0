"""Logging set-up for ``kubectl logs``: one plain line per event, no carriage-return progress bars off a TTY."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

TERMINATION_LOG = Path(os.environ.get("LORA_EXP_TERMINATION_LOG", "/dev/termination-log"))


def is_tty() -> bool:
    return sys.stdout.isatty()


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once; quiet the libraries' own progress bars when stdout is a pipe."""
    if getattr(setup_logging, "_done", False):
        return
    # Under torchrun every process writes to the pod log: tag lines with the global rank.
    rank = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s{rank} %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("urllib3", "httpx", "filelock", "fsspec", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not is_tty():
        # tqdm bars redraw with '\r'; in `kubectl logs` that is one ever-growing line.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    setup_logging._done = True  # type: ignore[attr-defined]


def write_termination_message(message: str) -> None:
    """Kubernetes shows this file's content as the pod's termination reason (`kubectl describe pod`)."""
    try:
        if TERMINATION_LOG.exists():  # the kubelet creates it; never create it elsewhere
            TERMINATION_LOG.write_text(message[:4000])
    except OSError:
        pass
