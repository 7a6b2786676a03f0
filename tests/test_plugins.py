"""Methods and tasks register themselves: a method defined in this file alone validates, trains, passes
sanity and appears in the comparison report, with no edit anywhere else; so does a task."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest

from lora_exp import cli
from lora_exp.config.jsonschema import json_schema
from lora_exp.config.schema import MethodSpec
from lora_exp.core import errors, registry
from lora_exp.methods import LoadBase, Method, TrainableRule, register_method
from lora_exp.tasks import ClassificationTask, register_task
from support import experiment, mlflow_client, write_values


class BitFitSpec(MethodSpec):
    """BitFit (Ben Zaken et al., 2022): train the bias terms (and the task head) only."""

    name: Literal["bitfit"]
    train_head: bool = True


class BitFit(Method):
    name: ClassVar[str] = "bitfit"
    spec: ClassVar[type[MethodSpec]] = BitFitSpec
    label: ClassVar[str] = "BitFit"
    report_order: ClassVar[int] = 35  # after LoRA and QLoRA, before full (not alphabetical)

    @staticmethod
    def _trains(name: str, head: bool) -> bool:
        return name.endswith(".bias") or (head and name.startswith("score."))

    def apply(self, model: Any, spec: Any, task_type: str) -> Any:
        for name, p in model.named_parameters():
            p.requires_grad = self._trains(name, spec.method.train_head)
        return model

    def save(self, trainer: Any, out_dir: str) -> None:
        trainer.save_model(out_dir)  # small models only: the whole model

    def load(self, load_base: LoadBase, artifact_dir: str) -> Any:
        return load_base(artifact_dir)

    def trainable_rule(self, model: Any) -> TrainableRule:
        return TrainableRule("bias terms", lambda n: n.endswith(".bias"), lambda n: self._trains(n, True))


@pytest.fixture
def bitfit() -> Iterator[BitFit]:
    method = register_method(BitFit())
    yield method
    registry.METHODS.unregister("bitfit")


@pytest.fixture
def toy_task() -> Iterator[ClassificationTask]:
    task = register_task(ClassificationTask(name="toy_sentiment", text_fields=("text",), labels=("neg", "pos"),
                                            template="{text}", prompt_suffix="\nSentiment:"))
    yield task
    registry.TASKS.unregister("toy_sentiment")


def test_registration_refuses_a_clash(bitfit):
    with pytest.raises(ValueError, match="already registered"):
        register_method(BitFit())
    with pytest.raises(TypeError, match="Literal"):
        class Loose(BitFit):
            name: ClassVar[str] = "loose"
            spec: ClassVar[type[MethodSpec]] = MethodSpec  # its name is any string: not a tag
        register_method(Loose())


def test_a_method_from_this_file_validates_trains_passes_sanity_and_is_compared(bitfit, tiny_gpt2, toy_data,
                                                                                 tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    schema = json_schema()
    method_choices = schema["$defs"]["PartialRunSpec"]["properties"]["method"]["anyOf"]
    assert any(c.get("$ref", "").endswith("BitFitSpec") for c in method_choices)  # the chart knows it too

    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "bitfit": {"method": {"name": "bitfit"}, "training": {"learning_rate": 2e-2}},
        "lora": {"method": {"name": "lora", "r": 4}},
    }))
    assert cli.main(["validate", "-f", str(values)]) == errors.OK
    bad = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "bitfit": {"method": {"name": "bitfit", "train_hed": False}}}), name="bad.yaml")
    assert cli.main(["validate", "-f", str(bad)]) == errors.USER_ERROR  # its own fields are strict too

    profiles = tmp_path / "profiles.yaml"  # and lora-exp plan estimates it, from the method's own apply
    profiles.write_text("profiles:\n  big: {gpus: 1, gpuMemoryGiB: 16, nodes: 1}\n")
    capsys.readouterr()
    assert cli.main(["plan", "-f", str(values), "--profiles", str(profiles), "--profile", "big"]) == errors.OK
    planned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bitfit ")]
    assert planned and "fits" in planned[0]

    assert cli.main(["train", "-f", str(values)]) == errors.OK
    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])}
    run = runs["bitfit"]
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "bitfit"
    assert run.data.params["method.train_head"] == "True"
    assert 0 < run.data.metrics["trainable_params"] < run.data.metrics["total_params"]

    assert cli.main(["sanity", "-f", str(values), "--run", "bitfit", "--skip", "overfit", "--skip", "reproducible",
                     "--no-log"]) == errors.OK

    out = tmp_path / "report"
    assert cli.main(["compare", "-f", str(values), "--out", str(out), "--no-log"]) == errors.OK
    with (out / "method_table.csv").open() as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert rows["bitfit"]["method"] == "bitfit"
    report = (out / "report.md").read_text()
    section = report.split("### Head-only vs LoRA vs QLoRA", 1)[1]
    assert section.index("| lora |") < section.index("| bitfit |")  # the registered report order
    assert (out / "methods.png").is_file()


def test_sanity_fails_a_method_that_trains_what_its_rule_forbids(bitfit, tiny_gpt2, toy_data, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    def buggy_apply(self: BitFit, model: Any, spec: Any, task_type: str) -> Any:  # trains every weight
        for p in model.parameters():
            p.requires_grad = True
        return model

    monkeypatch.setattr(BitFit, "apply", buggy_apply)
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "bitfit": {"method": {"name": "bitfit"}}}))
    assert cli.main(["sanity", "-f", str(values), "--skip", "overfit", "--skip", "reproducible", "--skip", "mlflow",
                     "--no-log"]) == errors.SANITY_FAILED


def test_a_task_from_this_file_is_a_spec_choice(toy_task, tiny_gpt2, toy_data, tmp_path):
    doc = experiment(tiny_gpt2, toy_data, tmp_path, task={"name": "toy_sentiment"})
    doc["experiment"]["defaults"]["task"] = {"name": "toy_sentiment"}
    values = write_values(tmp_path, doc)
    assert cli.main(["validate", "-f", str(values)]) == errors.OK
    assert "toy_sentiment" in json_schema()["$defs"]["TaskSpec"]["properties"]["name"]["enum"]
    registry.TASKS.unregister("toy_sentiment")
    assert cli.main(["validate", "-f", str(values)]) == errors.USER_ERROR  # gone from the enum again
