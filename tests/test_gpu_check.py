"""The GPU check's rehearsal (issue 21): ``scripts/gpu-check.sh`` with ``DRY=1`` runs the same steps on this CPU
with tiny shapes (every benchmark workload of the check, both sides through the harness, then a seed replay),
so the script cannot rot between the rare runs on a lent GPU. Its figures are never asserted: speed belongs in
benchmarks, not in timed tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from lora_exp.core import allocator

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ["llama-1b classification-lora", "llama-1b verbalizer-lora", "llama-1b causal-lm-lora",
             "gpt2-large classification-lora", "gpt2-large verbalizer-lora", "gpt2-large causal-lm-lora",
             "gpt2 classification-full", "gpt2-large seed-000-shape"]


def test_gpu_check_rehearses_on_cpu(smollm2, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "W": str(work), "TOK": str(smollm2)}
    proc = subprocess.run(["scripts/gpu-check.sh", "all"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    steps = (out / "steps.txt").read_text()
    assert proc.returncode == 0, steps + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bench rc=0" in steps and "seeds rc=0" in steps, steps
    # What comes back from a lent machine: few files, the logs and profiles packed.
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "results.tgz", "seeds.md",
                                                     "steps.txt"]

    report = json.loads((out / "bench.json").read_text())
    assert [r["workload"]["label"] for r in report["results"]] == WORKLOADS
    for r in report["results"]:
        w = r["workload"]
        for side in ("ours", "reference"):
            (run,) = r["raw"][side]
            assert "error" not in run, (w["label"], side, run)
            assert run["train_samples"] == w["steps"] * w["batch_size"] * w["gradient_accumulation_steps"]
            assert r[side]["train_samples_per_s"] > 0 and r[side]["eval_samples_per_s"] > 0, (w["label"], side)
            assert r[side]["steady_samples_per_s"] > 0, (w["label"], side)
        if w["formulation"] != "causal_lm":  # both sides score the same rows
            assert 0.0 <= r["ours"]["accuracy"] <= 1.0 and 0.0 <= r["reference"]["accuracy"] <= 1.0
        # Each side on the allocator it would have: lora-exp's as its CPU jobs (tcmalloc where installed).
        assert r["raw"]["ours"][0]["allocator"] == allocator.wanted()
        assert r["raw"]["reference"][0]["allocator"] == allocator.SYSTEM
        # lora-exp's side records what it chose and the plan's estimate for the measured peak to be judged by.
        assert r["raw"]["ours"][0]["settings"]["precision"] in ("bf16", "fp32")
        assert r["ours"]["plan_peak_mb"] > 0
    seed_shape = report["results"][-1]["workload"]
    assert (seed_shape["gradient_accumulation_steps"], seed_shape["precision"], seed_shape["lora_r"]) == (6, "fp16", 16)
    assert seed_shape["gradient_checkpointing"]

    assert "lora-exp / reference" in (out / "bench.md").read_text()
    assert "000" in (out / "seeds.md").read_text()
