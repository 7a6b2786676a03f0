"""The benchmark harness runs end to end (CI smoke: a tiny random model, two steps a side). Its figures are
measurements for docs/benchmarks.md, never asserted here: speed belongs in benchmarks, not in timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lora_exp.core import allocator

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_harness_smoke(smollm2, tmp_path):
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/harness.py"), "--smoke", "--model", str(smollm2),
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    names = [r["workload"]["name"] for r in report["results"]]
    assert names == ["classification-lora", "verbalizer-lora", "causal-lm-lora", "classification-full"]
    for r in report["results"]:
        for side in ("ours", "reference"):
            assert r[side]["train_samples_per_s"] > 0 and r[side]["eval_samples_per_s"] > 0, (r["workload"], side)
        if r["workload"]["formulation"] != "causal_lm":  # both sides score the same rows
            assert 0.0 <= r["ours"]["accuracy"] <= 1.0 and 0.0 <= r["reference"]["accuracy"] <= 1.0
        # Each side on the allocator it would have: lora-exp's as its CPU jobs (tcmalloc where installed).
        assert {x["allocator"] for x in r["raw"]["ours"]} == {allocator.wanted()}
        assert {x["allocator"] for x in r["raw"]["reference"]} == {allocator.SYSTEM}
    text = out.read_text()
    assert "python benchmarks/harness.py --smoke" in text and "lora-exp / reference" in text
