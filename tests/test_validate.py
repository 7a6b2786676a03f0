"""`lora-exp validate`: bad input is rejected fast, before any model library loads, with one clear message."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lora_exp.core.errors import USER_ERROR
from support import experiment, toy_rows, write_jsonl, write_values

# Runs validate in a fresh interpreter and proves no model code was imported (so no weights were loaded).
PROBE = """
import sys
from lora_exp.cli import main
code = main(["validate", "-f", sys.argv[1]])
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print("HEAVY_MODULES", heavy)
sys.exit(code)
"""


def validate(values) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(values)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert "HEAVY_MODULES []" in proc.stdout, proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, elapsed


def _case(tmp_path, tiny_gpt2, toy_data, name):
    data = dict(toy_data)
    doc = experiment(tiny_gpt2, data, tmp_path)
    if name == "misspelled key":
        doc["experiment"]["defaults"]["training"]["epochz"] = 1
        return doc, ["training.epochz", "unknown key"]
    if name == "no label column":
        bad = [{"text": r["text"], "sentiment": r["label"]} for r in toy_rows(8)]
        data["train"] = str(write_jsonl(tmp_path / "nolabel.jsonl", bad))
        return doc, ["nolabel.jsonl", "row 1", "missing column", "label"]
    if name == "label outside set":
        rows = toy_rows(8)
        rows[5]["label"] = "neutral"
        data["validation"] = str(write_jsonl(tmp_path / "badlabel.jsonl", rows))
        return doc, ["badlabel.jsonl", "row 6", "'neutral'", "not in the label set"]
    if name == "empty split":
        data["validation"] = str(write_jsonl(tmp_path / "empty.jsonl", []))
        return doc, ["validation", "empty"]
    if name == "unreadable row":
        path = write_jsonl(tmp_path / "broken.jsonl", toy_rows(4))
        path.write_text(path.read_text() + '{"text": "cut off\n')
        data["train"] = str(path)
        return doc, ["broken.jsonl", "line 5", "not valid JSON"]
    if name == "missing split":
        del data["validation"]
        return doc, ["data.data_files", "validation"]
    if name == "csv wrong columns":
        path = tmp_path / "rows.csv"
        path.write_text("text,label\nthe film was great,pos\nonly one column\n")
        data["train"] = str(path)
        return doc, ["rows.csv", "line 3", "expected 2 columns"]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["misspelled key", "no label column", "label outside set", "empty split",
                                  "unreadable row", "missing split", "csv wrong columns"])
def test_validate_rejects_bad_input_fast_and_clearly(name, tmp_path, tiny_gpt2, toy_data):
    doc, expected = _case(tmp_path, tiny_gpt2, toy_data, name)
    code, out, elapsed = validate(write_values(tmp_path, doc))
    assert code == USER_ERROR, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out  # one clear message
    for fragment in expected:
        assert fragment in errors[0], (fragment, errors[0])
    assert elapsed < 10, f"validate took {elapsed:.1f}s"


def test_validate_accepts_good_data_and_reports_it(tmp_path, tiny_gpt2, toy_data):
    code, out, _ = validate(write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path)))
    assert code == 0, out
    assert "train: 64 rows (neg=32, pos=32)" in out and "validation: 16 rows" in out


def test_labels_may_be_indices_and_template_fields_are_checked(tmp_path, tiny_gpt2, toy_data):
    rows = [{**r, "label": ["neg", "pos"].index(r["label"])} for r in toy_rows(8)]
    data = {**toy_data, "train": str(write_jsonl(tmp_path / "idx.jsonl", rows))}
    code, out, _ = validate(write_values(tmp_path, experiment(tiny_gpt2, data, tmp_path)))
    assert code == 0, out
    doc = experiment(tiny_gpt2, toy_data, tmp_path, formulation={"template": "Text: {txt}"})
    code, out, _ = validate(write_values(tmp_path, doc))
    assert code == USER_ERROR and "formulation.template" in out and "txt" in out


def test_bad_input_leaves_nothing_written(tmp_path, tiny_gpt2, toy_data):
    """A data error stops `train` before it creates an output dir or an MLflow run."""
    from support import run_cli

    rows = toy_rows(8)
    rows[2]["label"] = "maybe"
    data = {**toy_data, "train": str(write_jsonl(tmp_path / "bad.jsonl", rows))}
    proc = run_cli("train", "-f", str(write_values(tmp_path, experiment(tiny_gpt2, data, tmp_path))), cwd=tmp_path)
    assert proc.returncode == USER_ERROR, proc.stdout + proc.stderr
    assert "bad.jsonl: row 3" in proc.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()
