"""The spec: shipped values files validate, typos are rejected by path, overrides and matrices resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_exp.cli import main
from lora_exp.config.jsonschema import json_schema
from lora_exp.config.loading import deep_merge, parse_set, resolve_runs
from lora_exp.config.schema import RunSpec
from lora_exp.core.errors import USER_ERROR, SpecError
from support import ROOT, experiment, write_values

VALUES = sorted((ROOT / "values").glob("*.yaml"))
ON_CLUSTER_VOLUMES = {"smoke-offline.yaml"}


def test_values_files_exist():
    names = {p.stem for p in VALUES}
    assert {"mnli", "imdb", "cola", "demo"} <= names


@pytest.mark.parametrize("path", VALUES, ids=lambda p: p.name)
def test_every_shipped_values_file_validates(path, smollm2, monkeypatch):
    monkeypatch.chdir(ROOT)  # values files name repo-relative data and model paths
    # smoke-offline's model lives on the cluster's HF cache claim (k8s/prepare-model.yaml): the same model here.
    extra = ["--set", f"model.name={smollm2}"] if path.name in ON_CLUSTER_VOLUMES else []
    assert main(["validate", "-f", str(path), *extra]) == 0
    runs = resolve_runs(path)
    assert runs and all(isinstance(r.spec, RunSpec) for r in runs)


def test_seed_000_mnli_settings():
    runs = {r.name: r.spec for r in resolve_runs(ROOT / "values/mnli.yaml")}
    lora = runs["lora"]
    assert (lora.method.r, lora.method.alpha, lora.method.dropout) == (16, 32, 0.1)
    assert lora.method.target_modules == ["c_attn", "c_proj", "c_fc"]
    assert (lora.data.max_train_samples, lora.data.validation_fraction, lora.data.seed) == (50000, 0.1, 42)
    t = lora.training
    assert (t.learning_rate, t.epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2e-4, 3, 6, 6)
    assert t.precision == "fp16" and t.gradient_checkpointing
    assert runs["baseline"].job == "eval" and runs["baseline"].formulation == lora.formulation


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["defaults"]["training"].update(learnig_rate=1e-3), "experiment.defaults.training.learnig_rate"),
        (lambda d: d["runs"]["lora"].update(methd={"name": "lora"}), "experiment.runs.lora.methd"),
        (lambda d: d["runs"]["lora"].update(method={"name": "lora", "rank": 4}), "method.rank"),
        (lambda d: d.update(nmae="x"), "experiment.nmae"),
    ],
    ids=["training-key", "section", "method-field", "top-level"],
)
def test_misspelled_key_is_rejected_naming_its_path(mutate, expected, tmp_path, caplog, toy_data, tiny_gpt2):
    doc = experiment(tiny_gpt2, toy_data, tmp_path)
    mutate(doc["experiment"])
    values = write_values(tmp_path, doc)
    assert main(["validate", "-f", str(values)]) == USER_ERROR
    err = caplog.text
    assert f"{values}: " in err and expected in err and "unknown key" in err, err


def test_set_overrides_any_field(tmp_path, toy_data, tiny_gpt2):
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path))
    (run,) = resolve_runs(values, overrides=["training.epochs=2", "method.name=lora", "method.r=2",
                                             "formulation.template=Text: {text}",
                                             "tracking.tags.owner=me"])
    assert run.spec.training.epochs == 2 and run.spec.method.r == 2
    assert run.spec.formulation.template == "Text: {text}"  # a colon in a value stays text
    assert run.spec.tracking.tags == {"owner": "me"}
    with pytest.raises(SpecError, match="training.nope"):
        resolve_runs(values, overrides=["training.nope=1"])
    with pytest.raises(SpecError, match="KEY=VALUE"):
        parse_set(["training.epochs"])


def test_matrix_runs_merge_over_defaults_and_can_be_picked(tmp_path, toy_data, tiny_gpt2):
    doc = experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "a": {"method": {"name": "lora", "r": 2}},
        "b": {"method": {"name": "head_only"}, "training": {"learning_rate": 1e-2}},
    })
    values = write_values(tmp_path, doc)
    a, b = resolve_runs(values)
    assert (a.name, b.name) == ("a", "b")
    assert b.spec.training.learning_rate == 1e-2 and b.spec.training.epochs == a.spec.training.epochs == 1
    assert [r.name for r in resolve_runs(values, run="b")] == ["b"]
    with pytest.raises(SpecError, match="no run named 'c'"):
        resolve_runs(values, run="c")
    assert a.output_dir == Path(tmp_path) / "outputs" / "toy" / "a"


def test_deep_merge_replaces_lists_and_recurses_dicts():
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_incoherent_specs_fail_early(tmp_path, toy_data, tiny_gpt2):
    doc = experiment(tiny_gpt2, toy_data, tmp_path, runs={"x": {"method": {"name": "head_only"},
                                                                "formulation": {"kind": "verbalizer"}}})
    with pytest.raises(SpecError, match="head_only"):
        resolve_runs(write_values(tmp_path, doc))
    doc = experiment(tiny_gpt2, toy_data, tmp_path, training={"early_stopping": {"metric": "accuracy"},
                                                               "save_strategy": "no"})
    with pytest.raises(SpecError, match="early_stopping"):
        resolve_runs(write_values(tmp_path, doc))


def test_json_schema_accepts_shipped_values_and_rejects_typos():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    for path in VALUES:
        jsonschema.validate(yaml.safe_load(path.read_text())["experiment"], schema)
    doc = yaml.safe_load((ROOT / "values/mnli.yaml").read_text())["experiment"]
    doc["runs"]["lora"]["method"]["rnak"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
