"""The C allocator a CPU job's process runs on: tcmalloc where it is installed, glibc's malloc otherwise.

Why it matters: a CPU training step allocates and frees activations of a few to a few tens of MiB, in the
same order every step. glibc's malloc serves them from its heap once its dynamic mmap threshold has risen
(it does after the first such block is freed), and a freed block there is rarely reused for the next one of
the same size (PyTorch asks for 64-byte-aligned memory, which needs slightly more than the block); the heap
grows instead. The resident set then ran 1.1x-2.0x the live tensor bytes depending on the order of
allocations: two runs with the same live tensors measured 721 and 1166 MiB (docs/planning.md). tcmalloc (gperftools'
``libtcmalloc_minimal``, Debian's ``libtcmalloc-minimal4``; what PyTorch's own CPU launcher
``torch.backends.xeon.run_cpu --enable-tcmalloc`` preloads) reuses freed spans of a size: the resident set
is the live bytes plus a fixed runtime, repeatable to a few MiB, and 13-27% lower on SmolLM2 at the same
speed. That is what makes a CPU memory limit, and the plan's estimate of it, dependable.

A process cannot change its allocator once started, so :func:`reexec` starts the CLI again with tcmalloc
preloaded (``os.execve``: same PID, same arguments and environment, before anything heavy is imported).
Only the program itself restarts (``python -m lora_exp``, the ``lora-exp`` script), never another program
calling ``cli.main()``. ``LORA_EXP_ALLOCATOR``: ``auto`` (default: tcmalloc where installed, no NVIDIA device
is present, since GPU jobs keep their tensors on the device and their images are not changed, and no other
allocator is preloaded), ``tcmalloc`` (required: an error if missing), ``system`` (glibc). Linux only.
"""

from __future__ import annotations

import ctypes.util
import functools
import glob
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from lora_exp.core.errors import UserError

log = logging.getLogger(__name__)

ENV = "LORA_EXP_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
TCMALLOC, SYSTEM = "tcmalloc", "system"
# gperftools prints "tcmalloc: large alloc ..." for every allocation above 1 GiB by default: log spam
# under `kubectl logs` for any model whose embedding is that large. A threshold the user set is kept.
QUIET = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**60))
# Set in the restarted process's environment only: holds the LD_PRELOAD from before the restart, which the
# restarted process puts back (its children, git or a replay's jobs, start as they would have), and says that
# the restart happened (never a second: where the dynamic linker drops LD_PRELOAD, in secure mode, another
# restart would find tcmalloc missing again, forever).
_RESTARTED = "LORA_EXP_ALLOCATOR_RESTARTED"


@functools.lru_cache(maxsize=1)
def library() -> str | None:
    """tcmalloc's shared library as the dynamic linker finds it (``libtcmalloc_minimal.so.4``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def in_use() -> str:
    """The allocator of this process: ``tcmalloc`` when its library is mapped and was preloaded when the process
    started (``/proc/self/environ``: the environment at exec), so the ``malloc`` every library calls is its;
    else ``system`` (also for a tcmalloc merely loaded later, by ctypes). Why not compare ``malloc``'s address
    with ``tc_malloc``'s: in a non-PIE interpreter (Debian's python3.11) ``malloc`` resolves to the
    executable's PLT stub whatever it jumps to."""
    try:
        maps = Path("/proc/self/maps").read_text()
        environ = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return SYSTEM
    preload = next((e[len(b"LD_PRELOAD="):] for e in environ if e.startswith(b"LD_PRELOAD=")), b"")
    return TCMALLOC if "libtcmalloc" in maps and b"libtcmalloc" in preload else SYSTEM


def _gpu_present() -> bool:
    """An NVIDIA GPU given to this container (its device node; /proc/driver/nvidia shows the node's GPUs even
    to a CPU-only container on a GPU node)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def wanted() -> str:
    """The allocator a job started here gets (``LORA_EXP_ALLOCATOR``, see the module docstring)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == SYSTEM or not sys.platform.startswith("linux"):
        return SYSTEM
    if choice == TCMALLOC:
        if library() is None:
            raise UserError(f"{ENV}=tcmalloc, but tcmalloc is not installed: apt-get install libtcmalloc-minimal4 "
                            f"(or unset {ENV})")
        return TCMALLOC
    if any("malloc" in Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()):
        return SYSTEM  # the user preloaded an allocator of their own (jemalloc, mimalloc): theirs stays
    return TCMALLOC if library() is not None and not _gpu_present() else SYSTEM


def of_cpu_jobs() -> str:
    """The allocator ``lora-exp plan`` assumes for a CPU profile's pod, wherever the plan itself runs: the CPU
    job image's, tcmalloc, unless ``LORA_EXP_ALLOCATOR=system`` says the jobs are run without it."""
    return SYSTEM if os.environ.get(ENV, "").strip().lower() == SYSTEM else TCMALLOC


def is_program() -> bool:
    """Whether this process is the lora-exp program itself (``python -m lora_exp``, the ``lora-exp`` script,
    torchrun's workers): only then may it be restarted. Another program calling ``cli.main()`` is not."""
    argv = list(sys.orig_argv)
    if "-m" in argv[1:-1]:
        return argv[argv.index("-m", 1) + 1] == "lora_exp"
    return len(argv) > 1 and Path(argv[1]).name == "lora-exp"


def preloading(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process to start on tcmalloc: its library first in LD_PRELOAD, its large-allocation
    reports quiet (unless set). Also for a process lora-exp starts that is not its CLI (the benchmark's side)."""
    lib = library()
    if lib is None:
        raise UserError("tcmalloc is not installed: apt-get install libtcmalloc-minimal4")
    out = {**env, "LD_PRELOAD": f"{lib} {env.get('LD_PRELOAD', '')}".strip()}
    out.setdefault(*QUIET)
    return out


def reexec() -> None:
    """Start this program again with tcmalloc preloaded when :func:`wanted` says so and it is not loaded yet;
    returns where nothing needs doing (or the restart cannot be made: then glibc, and the log says why)."""
    if _RESTARTED in os.environ:  # the restarted process: the environment back as it was, for its children
        before = os.environ.pop(_RESTARTED)
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if not is_program() or wanted() != TCMALLOC or in_use() == TCMALLOC:
        return
    env = {**preloading(os.environ), _RESTARTED: os.environ.get("LD_PRELOAD", "")}
    # sys.orig_argv keeps the interpreter's own options (-X, -W) and how it was started (-m or the script);
    # argv[0] is the interpreter's path, from which Python finds its prefix (the venv).
    args = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError as e:
        log.warning("could not restart on tcmalloc (%s): running on glibc malloc", e)


def describe() -> str:
    """One line for the job's log: what this process runs on, and what to do where tcmalloc was wanted."""
    if in_use() == TCMALLOC:
        return "CPU allocator: tcmalloc"
    if library() is None and sys.platform.startswith("linux"):
        return ("CPU allocator: glibc malloc (tcmalloc not installed: apt-get install libtcmalloc-minimal4 for a "
                "resident set that follows the live tensors; docs/planning.md)")
    return "CPU allocator: glibc malloc"
