"""Seed replays (`lora-exp replay`, `make seeds`): every seed values file runs as written on random-weight
models and hub-format local data, and every output its seed promises is there. CI runs the tiny shapes, so a
broken seed file or a pipeline that stops writing a promised output fails here."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import ROOT as REPO
from support import run_cli


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay")
    proc = run_cli("replay", "--shape", "tiny", "--steps", "1", "--out", str(out), "--values-dir",
                   str(REPO / "values"), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_every_seed_writes_every_promised_output(replay):
    from lora_exp.replay.seeds import SEEDS

    report = {r["seed"]: r for r in json.loads((replay / "report.json").read_text())}
    assert sorted(report) == [s.id for s in SEEDS]
    for seed in SEEDS:
        r = report[seed.id]
        assert all(c["exit"] == 0 or c["exit"] in c["accept"] for c in r["commands"]), r["commands"]
        assert len(r["outputs"]) >= len(seed.promises)
        for o in r["outputs"]:
            assert not o["problem"] and o["files"], o
            assert all(Path(f).is_file() for f in o["files"])
        assert all("tiny" in shape for shape in r["shapes"].values())
    # Seed 000's two MNLI validation splits are evaluated and reported separately.
    metrics = json.loads(next((replay / "000" / "outputs").glob("*/lora/metrics.json")).read_text())
    assert {"validation_matched_accuracy", "validation_mismatched_accuracy"} <= set(metrics)
    md = (replay / "report.md").read_text()
    assert all(f"Seed {s.id}" in md for s in SEEDS)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """The leaf paths where two documents differ (a section one lacks counts as empty)."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    return [] if a == b else [path]


def test_the_derived_values_files_change_only_the_documented_overrides(replay):
    """Model source, data source and the step cap's logging interval: nothing else of the seed file moves."""
    from lora_exp.replay.seeds import SEEDS

    for seed in SEEDS:
        for v in seed.values:
            original = yaml.safe_load((REPO / "values" / v).read_text())
            derived = yaml.safe_load((replay / seed.id / v).read_text())
            changed = _diff(original, derived)
            assert changed, v
            for path in changed:
                assert re.search(r"\.(model\.name|data\.data_files(\.\w+)?|training\.logging_steps)$", path), (v, path)
            for path in (p for p in changed if p.endswith("model.name")):
                assert Path(_get(derived, path)).is_dir() and (Path(_get(derived, path)) / "replica.json").is_file()


def _get(doc: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        doc = doc[part]
    return doc


def test_a_missing_output_fails_the_replay_naming_seed_and_file(replay, tmp_path, caplog):
    from lora_exp.cli import main

    shutil.copytree(replay / "000", tmp_path / "000")
    args = ["replay", "--check-only", "--seeds", "000", "--out", str(tmp_path), "--values-dir", str(REPO / "values")]
    assert main(args) == 0
    (matrix,) = (tmp_path / "000" / "outputs").glob("*/lora/eval/validation_mismatched/confusion_matrix.png")
    matrix.unlink()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("seed 000" in e and "validation_mismatched confusion matrix" in e and "confusion_matrix.png" in e
               for e in errors), errors
    report = json.loads((tmp_path / "report.json").read_text())
    assert [o["what"] for o in report[0]["outputs"] if o["problem"]] == ["lora: validation_mismatched confusion matrix"]


def test_a_promised_column_left_empty_is_missing(tmp_path, monkeypatch):
    """A promise on a CSV column holds only where some row fills it (an empty BLEU column is not a BLEU); on a
    GPU, seed 003's table must also have its GPU memory."""
    from lora_exp.replay import seeds as replay
    from lora_exp.replay.seeds import Promise, check

    (tmp_path / "t.csv").write_text("run,validation_bleu,size_mb,peak_gpu_memory_mb\nfull,,1.5,\nlora,,0.1,\n")
    assert check(Promise("table", "t.csv", ("size_mb",)), tmp_path, "")["problem"] == ""
    assert "*_bleu" in check(Promise("table", "t.csv", ("size_mb", "*_bleu")), tmp_path, "")["problem"]
    assert check(Promise("two", "t*.csv", count=2), tmp_path, "")["problem"] == "missing (1 of 2 files)"
    # The generation check wants text after the prompt, not the header line that names the prompt.
    gen = Promise("generation", "g.txt", pattern=replay.GENERATED)
    (tmp_path / "g.txt").write_text(f"--- prompt: {replay.GENERATION_PROMPT!r}\n{replay.GENERATION_PROMPT}\n\n")
    assert check(gen, tmp_path, "")["problem"]
    (tmp_path / "g.txt").write_text(f"--- prompt: {replay.GENERATION_PROMPT!r}\n{replay.GENERATION_PROMPT} kalo mi\n")
    assert check(gen, tmp_path, "")["problem"] == ""
    gpu = Promise("table", "t.csv", ("size_mb",), gpu_keys=("peak_gpu_memory_mb",))
    monkeypatch.setattr(replay, "_cuda", lambda: False)
    assert check(gpu, tmp_path, "")["problem"] == ""
    monkeypatch.setattr(replay, "_cuda", lambda: True)
    assert "peak_gpu_memory_mb" in check(gpu, tmp_path, "")["problem"]


def test_replicas_keep_the_architecture_and_a_vocabulary_the_verbalizer_can_score(tmp_path):
    """Full shape: the published numbers; every tokenizer id is an embedding row; each MNLI label word starts
    with its own token (the verbalizer scores the first token: a replica tokenizer that split ' entailment'
    and ' contradiction' alike stopped seed 000 before it ran)."""
    from transformers import AutoConfig, AutoTokenizer

    from lora_exp.core import registry
    from lora_exp.planning.architectures import KNOWN_CONFIGS
    from lora_exp.replay import replicas

    full = replicas.replica_config("gpt2-large", "full")
    assert (full.n_layer, full.n_embd, full.n_head, full.vocab_size) == (36, 1280, 20, 50257)
    mnli = registry.TASKS.get("mnli")
    files = replicas.write_data(mnli, tmp_path / "data", {"train": 8, "eval": 4, "test": 2})
    assert sorted(files) == ["test_matched", "test_mismatched", "train", "validation_matched", "validation_mismatched"]
    test_row = json.loads(Path(files["test_matched"]).read_text().splitlines()[0])
    assert test_row["label"] == -1 and {"premise", "hypothesis", "idx"} <= set(test_row)
    name = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    out = replicas.write_model(name, tmp_path / "m", "tiny", replicas.corpus_of(files.values(), [mnli]))
    config, tok = AutoConfig.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert config.vocab_size == KNOWN_CONFIGS[name]["vocab_size"] and len(tok) <= config.vocab_size
    assert (config.num_attention_heads // config.num_key_value_heads) == 4 and config.hidden_size == 64
    assert tok.eos_token_id == config.eos_token_id
    firsts = [tok(" " + label).input_ids[0] for label in mnli.labels]
    assert len(set(firsts)) == len(firsts)
    # Made once: the same replica is reused, a different corpus makes a new one.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    replicas.write_model(name, out, "tiny", replicas.corpus_of(files.values(), [mnli]))
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
