"""Run one side of one workload in this process and print its result as one JSON line.

The harness starts a fresh process per measurement, so neither side inherits the other's allocator state,
compiled kernels or warm caches, and the peak memory it reports is that side's alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import time

    started = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ours", "reference"], required=True)
    ap.add_argument("--workload", required=True, help="a Workload as JSON")
    ap.add_argument("--data", required=True, help="directory holding the workload's data files")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)

    import torch
    from workloads import Workload, write_data

    w = Workload(**json.loads(args.workload))
    files = write_data(Path(args.data), w.model, w)
    if args.side == "ours":
        import ours as side
    else:
        import reference as side  # type: ignore[no-redef]
    ready = time.perf_counter()
    result = side.run(w, files)
    result["startup_seconds"] = ready - started  # imports and data, before the side's own clock
    result["process_seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from lora_exp.core.allocator import in_use

    result["allocator"] = in_use()
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
