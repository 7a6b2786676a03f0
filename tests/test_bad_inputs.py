"""The bad-input corpus: every case is stopped by `lora-exp validate` AND by `lora-exp train` with exit 2, one
message naming the file, field or row, and nothing written (no output dir, no MLflow store, no cache in the
working directory). Train must agree with validate: the chart's validate init container is only a guard if it
rejects what the job itself would fail on.

Each case is (id, mutations, words the message must contain). A mutation changes the valid toy experiment:
a spec field, a run, the raw values text, a data file, the model directory, an environment variable, a --set
override or a package that cannot be imported."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_exp import cli
from lora_exp.core.errors import USER_ERROR
from support import experiment, qa_rows, run_cli, text_rows, write_jsonl, write_values


@dataclass
class Env:
    tmp: Path
    model: Path
    doc: dict[str, Any]
    raw: str | bytes | None = None
    argv: list[str] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    unimportable: list[str] = field(default_factory=list)

    @property
    def defaults(self) -> dict[str, Any]:
        return self.doc["experiment"]["defaults"]

    def data(self, split: str, path: Path) -> None:
        self.defaults["data"]["data_files"][split] = str(path)


Mutation = Callable[[Env], None]


def S(path: str, value: Any) -> Mutation:
    """Set a field of experiment.defaults (dotted path)."""

    def apply(env: Env) -> None:
        node = env.defaults
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)  # cases share their values: never let one case edit another's

    return apply


def RUNS(runs: dict[str, Any]) -> Mutation:
    def apply(env: Env) -> None:
        env.doc["experiment"]["runs"] = runs

    return apply


def EXP(key: str, value: Any) -> Mutation:
    def apply(env: Env) -> None:
        env.doc["experiment"][key] = value

    return apply


def RAW(text: str | bytes) -> Mutation:
    def apply(env: Env) -> None:
        env.raw = text

    return apply


def SET(*items: str) -> Mutation:
    def apply(env: Env) -> None:
        env.argv += [arg for item in items for arg in ("--set", item)]

    return apply


def ARGS(*args: str) -> Mutation:
    def apply(env: Env) -> None:
        env.argv += list(args)

    return apply


def ENV(**values: str) -> Mutation:
    def apply(env: Env) -> None:
        env.environ.update(values)

    return apply


def UNIMPORTABLE(*modules: str) -> Mutation:
    """These packages cannot be imported (as if not installed: ``import`` raises ModuleNotFoundError)."""

    def apply(env: Env) -> None:
        env.unimportable += modules

    return apply


def ROWS(split: str, rows: list[Any], name: str = "bad.jsonl") -> Mutation:
    """A JSONL file of these rows (dicts as JSON objects, strings as raw lines) for ``split``."""

    def apply(env: Env) -> None:
        path = env.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
        env.data(split, path)

    return apply


def FILE(split: str, name: str, content: str | bytes) -> Mutation:
    def apply(env: Env) -> None:
        path = env.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        env.data(split, path)

    return apply


def _truncate(name: str) -> Callable[[Path], None]:
    """Keep the first half of the model's file ``name`` (an interrupted download)."""

    def edit(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])

    return edit


def MODEL(edit: Callable[[Path], None]) -> Mutation:
    """A copy of the tiny model, edited."""

    def apply(env: Env) -> None:
        copy = env.tmp / "model-copy"
        shutil.copytree(env.model, copy)
        edit(copy)
        env.defaults["model"]["name"] = str(copy)

    return apply


def ARTIFACT(name: str, spec_edit: Callable[[dict[str, Any]], None] | None = None, spec: bool = True) -> Mutation:
    """A fake artifact dir (a lora-exp spec file, optionally edited) at <tmp>/<name>, as eval.model_path."""

    def apply(env: Env) -> None:
        from lora_exp.config.loading import resolve_runs

        path = env.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        if spec:
            good = env.tmp / "good.yaml"
            good.write_text(yaml.safe_dump(experiment(env.model, env.defaults["data"]["data_files"], env.tmp)))
            doc = {"experiment": "toy", "run": "lora", "source": "x",
                   "spec": resolve_runs(good)[0].spec.model_dump(mode="json")}
            good.unlink()
            if spec_edit:
                spec_edit(doc["spec"])
            (path / "lora_exp_run.yaml").write_text(yaml.safe_dump(doc))
        env.defaults.setdefault("eval", {})["model_path"] = str(path)

    return apply


def _custom_task(**over: Any) -> Mutation:
    return S("task", {"name": "custom", "text_fields": ["text"], "labels": ["neg", "pos"], **over})


def _text_data(env: Env) -> None:
    for split in ("train", "validation"):
        path = write_jsonl(env.tmp / "data" / f"lm-{split}.jsonl", text_rows(8))
        env.data(split, path)


def _qa_data(env: Env) -> None:
    for split in ("train", "validation"):
        env.data(split, write_jsonl(env.tmp / "data" / f"qa-{split}.jsonl", qa_rows(6)))


def _rewrite_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text())
        edit(cfg)
        (model / "config.json").write_text(json.dumps(cfg))

    return apply


def _drop_tokenizer(model: Path) -> None:
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            f.unlink()


GOOD_ROW = {"text": "the film was great", "label": "pos"}
NO_URI = lambda e: e.defaults["tracking"].pop("tracking_uri")  # noqa: E731


def _alias_bomb(levels: int = 7, width: int = 9) -> str:
    """A valid spec under which ``width ** levels`` nodes hide in 1 kB of aliases, merged run over defaults."""
    keys = "abcdefghi"[:width]
    lines = ["bomb:", "  x0: &x0 {" + ", ".join(f"{k}: lol" for k in keys) + "}"]
    lines += [f"  x{i}: &x{i} {{" + ", ".join(f"{k}: *x{i - 1}" for k in keys) + "}" for i in range(1, levels + 1)]
    spec = ["experiment:", "  name: toy", f"  defaults: *x{levels}", f"  runs: {{a: *x{levels}}}", ""]
    return "\n".join(lines + spec)

LM_TASK = S("task", {"name": "wikitext"})
QA_TASK = S("task", {"name": "squad_v2"})

CASES: list[tuple[str, list[Mutation], tuple[str, ...]]] = [
    # --- the values file itself
    ("yaml-syntax", [RAW("experiment: [unclosed\n")], ("not valid YAML",)),
    ("no-experiment", [RAW("profile: cpu\n")], ("no 'experiment' section",)),
    ("yaml-alias-bomb", [RAW(_alias_bomb())], ("values.yaml", "line 6", "aliases expand to more than 50000 nodes")),
    ("yaml-recursive-alias", [RAW("experiment: &e\n  name: toy\n  runs: {a: {}}\n  defaults: {x: *e}\n")],
     ("values.yaml", "line 4", "alias *e refers to a node that contains it")),
    ("yaml-nested-too-deep", [RAW("experiment:\n  name: toy\n  runs: {a: {}}\n  defaults: {x: " + "[" * 200 +
                                  "]" * 200 + "}\n")], ("values.yaml", "line 4", "nested deeper than 100 levels")),
    ("experiment-is-a-list", [RAW("experiment: [1, 2]\n")], ("experiment.",)),
    ("duplicated-key", [RAW("experiment:\n  name: toy\n  name: other\n  runs: {a: {}}\n")],
     ("'name' appears twice", "line 2")),
    ("duplicated-key-in-run", [RAW("experiment:\n  name: toy\n  runs:\n    a: {}\n    a: {job: eval}\n")],
     ("'a' appears twice",)),
    ("latin-1-byte", [RAW("experiment:\n  name: caf\xe9\n  runs: {a: {}}\n".encode("latin-1"))],
     ("not UTF-8", "line 2")),
    ("runs-missing", [RAW("experiment:\n  name: toy\n")], ("experiment.runs", "Field required")),
    ("training-seed-too-big", [S("training.seed", 2**32)], ("training.seed", "4294967296")),
    ("data-seed-negative", [S("data.seed", -1)], ("data.seed", "greater than or equal to 0")),
    ("label-column-as-text", [S("task.text_fields", ["text", "label"])],
     ("text_fields", "'label' is the label column")),
    ("runs-empty", [EXP("runs", {})], ("experiment.runs", "at least 1")),
    ("run-name-escapes", [RUNS({"../../x": {}})], ("experiment.runs", "../../x")),
    ("run-name-space", [RUNS({"my run": {}})], ("experiment.runs", "my run")),
    ("experiment-name-empty", [EXP("name", "")], ("experiment.name",)),
    ("experiment-name-slash", [EXP("name", "a/b")], ("experiment.name",)),
    ("experiment-unknown-key", [EXP("defualts", {})], ("experiment.defualts", "unknown key")),
    ("run-not-a-mapping", [RUNS({"a": "lora"})], ("experiment.runs.a",)),
    ("no-such-run", [ARGS("--run", "nope")], ("no run named 'nope'",)),
    ("set-without-equals", [SET("training.epochs")], ("--set", "KEY=VALUE")),
    ("set-value-and-section", [SET("model=x", "model.name=y")], ("model is both a value and a section",)),
    # --- numbers
    ("lr-inf", [S("training.learning_rate", float("inf"))], ("training.learning_rate", "finite")),
    ("lr-nan", [S("training.learning_rate", float("nan"))], ("training.learning_rate", "finite")),
    ("lr-zero", [S("training.learning_rate", 0)], ("training.learning_rate", "greater than 0")),
    ("lr-negative", [S("training.learning_rate", -1e-4)], ("training.learning_rate",)),
    ("lr-typo", [S("training.learnig_rate", 1e-4)], ("training.learnig_rate", "unknown key")),
    ("lr-text", [S("training.learning_rate", "fast")], ("training.learning_rate",)),
    ("epochs-zero", [S("training.epochs", 0)], ("training.epochs",)),
    ("max-steps-zero", [S("training.max_steps", 0)], ("max_steps 0",)),
    ("max-steps-negative", [S("training.max_steps", -5)], ("training.max_steps",)),
    ("batch-zero", [S("training.per_device_train_batch_size", 0)], ("per_device_train_batch_size",)),
    ("accumulation-zero", [S("training.gradient_accumulation_steps", 0)], ("gradient_accumulation_steps",)),
    ("precision-fp8", [S("training.precision", "fp8")], ("training.precision",)),
    ("scheduler-typo", [S("training.lr_scheduler", "cosinee")], ("training.lr_scheduler", "cosine")),
    ("warmup-over-one", [S("training.warmup_ratio", 1.5)], ("training.warmup_ratio",)),
    ("weight-decay-negative", [S("training.weight_decay", -0.1)], ("training.weight_decay",)),
    ("grad-norm-zero", [S("training.max_grad_norm", 0)], ("training.max_grad_norm",)),
    ("eval-steps-missing", [S("training.eval_strategy", "steps")], ("eval_steps",)),
    ("save-steps-missing", [S("training.save_strategy", "steps")], ("save_steps",)),
    ("early-stopping-no-eval", [S("training.eval_strategy", "no"), S("training.early_stopping", {})],
     ("early_stopping needs an eval_strategy",)),
    ("early-stopping-cadence", [S("training.early_stopping", {}), S("training.save_strategy", "no")],
     ("early_stopping keeps the best checkpoint",)),
    ("early-stopping-metric-unknown", [S("training.early_stopping", {"metric": "bleu"})],
     ("training.early_stopping.metric", "'bleu'", "accuracy")),
    ("early-stopping-metric-qa", [QA_TASK, _qa_data, S("model.max_length", 48),
                                  S("training.early_stopping", {"metric": "f1"})],
     ("training.early_stopping.metric", "'f1'", "loss")),
    ("early-stopping-loss-up", [S("training.early_stopping", {"metric": "loss", "greater_is_better": True})],
     ("greater_is_better",)),
    ("zero-stage-one", [S("training.zero_stage", 1)], ("training.zero_stage",)),
    ("seed-text", [S("training.seed", "x")], ("training.seed",)),
    # --- model
    ("max-length-tiny", [S("model.max_length", 4)], ("model.max_length",)),
    ("dtype-unknown", [S("model.dtype", "float8")], ("model.dtype",)),
    ("model-name-empty", [S("model.name", "")], ("model.name",)),
    ("model-dir-missing", [S("model.name", "./no-such-model")], ("model.name", "does not exist")),
    ("model-dir-no-config", [MODEL(lambda m: (m / "config.json").unlink())], ("model.name", "no config.json")),
    ("model-dir-no-tokenizer", [MODEL(_drop_tokenizer)], ("model.name", "no tokenizer files")),
    ("model-config-not-json", [MODEL(lambda m: (m / "config.json").write_text("{oops"))],
     ("config.json", "not readable JSON")),
    ("model-weights-truncated", [MODEL(_truncate("model.safetensors"))],
     ("model.name", "model.safetensors", "not a whole safetensors file")),
    ("model-tokenizer-json-corrupt", [MODEL(lambda m: (m / "tokenizer.json").write_text('{"version": "1.0", "mo'))],
     ("model.name", "tokenizer.json", "not readable JSON")),
    ("max-length-over-positions", [S("model.max_length", 256)], ("model.max_length", "256", "128 positions")),
    ("offline-model-not-cached", [S("model.name", "nobody/no-such-model"), ENV(HF_HUB_OFFLINE="1")],
     ("model.name", "not in the local hub cache", "HF_HUB_OFFLINE")),
    # --- method
    ("method-unknown", [S("method", {"name": "lorra"})], ("method", "lora")),
    ("method-no-name", [S("method", {"r": 4})], ("method", "give the method's name")),
    ("lora-r-zero", [S("method", {"name": "lora", "r": 0})], ("method.r",)),
    ("lora-alpha-zero", [S("method", {"name": "lora", "alpha": 0})], ("method.alpha",)),
    ("lora-dropout-one", [S("method", {"name": "lora", "dropout": 1.0})], ("method.dropout",)),
    ("lora-typo", [S("method", {"name": "lora", "rr": 4})], ("method.rr", "unknown key")),
    ("qlora-quant-type", [S("method", {"name": "qlora", "quant_type": "nf3"})], ("method.quant_type",)),
    ("qlora-compute-dtype", [S("method", {"name": "qlora", "compute_dtype": "int8"})], ("method.compute_dtype",)),
    ("head-only-verbalizer", [S("method", {"name": "head_only"}), S("formulation.kind", "verbalizer")],
     ("head_only", "'verbalizer' has none")),
    ("head-only-lm", [LM_TASK, _text_data, S("method", {"name": "head_only"})],
     ("head_only", "'causal_lm' has none")),
    ("head-only-extra", [S("method", {"name": "head_only", "r": 4})], ("method.r", "unknown key")),
    # --- formulation
    ("formulation-span-on-classification", [S("formulation.kind", "span")], ("formulation.kind", "'span'")),
    ("formulation-unknown", [S("formulation.kind", "regression")], ("formulation.kind",)),
    ("formulation-classifier-on-lm", [LM_TASK, _text_data, S("formulation.kind", "classifier")],
     ("formulation.kind", "causal_lm")),
    ("template-no-field", [S("formulation.template", "Classify this:")], ("formulation.template", "no text field")),
    ("template-unknown-field", [S("formulation.template", "Text: {txt}")], ("formulation.template", "txt")),
    ("template-conversion", [S("formulation.template", "{text!z}")], ("formulation.template",)),
    ("template-positional", [S("formulation.template", "Text: {}")], ("formulation.template", "positional")),
    ("template-bad-spec", [S("formulation.template", "{text:Q}")], ("formulation.template", "does not format")),
    ("template-unbalanced", [S("formulation.template", "Text: {text")], ("formulation.template",)),
    ("verbalizers-missing-label", [S("formulation.kind", "verbalizer"), S("formulation.verbalizers", {"pos": " yes"})],
     ("formulation.verbalizers", "missing ['neg']")),
    ("verbalizers-unknown-label", [S("formulation.verbalizers", {"pos": " y", "neg": " n", "meh": " m"})],
     ("formulation.verbalizers", "unknown ['meh']")),
    ("verbalizers-empty-word", [S("formulation.verbalizers", {"pos": "", "neg": " n"})],
     ("formulation.verbalizers.pos",)),
    ("formulation-typo", [S("formulation.templat", "{text}")], ("formulation.templat", "unknown key")),
    # --- task
    ("task-unknown", [S("task", {"name": "sst3"})], ("task.name", "sst2")),
    ("custom-no-labels", [_custom_task(labels=None)], ("task 'custom' needs",)),
    ("custom-no-text-fields", [_custom_task(text_fields=None)], ("task 'custom' needs",)),
    ("custom-duplicated-labels", [_custom_task(labels=["neg", "pos", "neg"])], ("task.labels", "duplicated")),
    ("custom-single-label", [_custom_task(labels=["pos"])], ("task.labels", "at least 2")),
    ("custom-empty-label", [_custom_task(labels=["neg", ""])], ("task.labels",)),
    ("custom-duplicated-fields", [_custom_task(text_fields=["text", "text"])], ("task.text_fields", "duplicated")),
    ("custom-no-fields", [_custom_task(text_fields=[])], ("task.text_fields",)),
    ("registered-task-custom-fields", [S("task", {"name": "sst2", "text_fields": ["text"]})],
     ("task.text_fields", "only task 'custom'")),
    ("eval-split-train", [_custom_task(eval_splits=["train"])], ("task.eval_splits", "clash")),
    ("eval-splits-duplicated", [_custom_task(eval_splits=["validation", "validation"])],
     ("task.eval_splits", "duplicated")),
    ("eval-splits-empty", [_custom_task(eval_splits=[])], ("task.eval_splits",)),
    ("doc-stride-zero", [QA_TASK, _qa_data, S("task.doc_stride", 0)], ("task.doc_stride",)),
    # --- data spec
    ("data-fraction-zero", [S("data.data_fraction", 0)], ("data.data_fraction",)),
    ("data-fraction-over-one", [S("data.data_fraction", 1.5)], ("data.data_fraction",)),
    ("validation-fraction-one", [S("data.validation_fraction", 1)], ("data.validation_fraction",)),
    ("max-train-samples-zero", [S("data.max_train_samples", 0)], ("data.max_train_samples",)),
    ("data-files-empty-list", [S("data.data_files.train", [])], ("data.data_files.train",)),
    ("data-files-no-train", [lambda e: e.defaults["data"]["data_files"].pop("train")],
     ("data.data_files", "'train'")),
    ("data-files-no-validation", [lambda e: e.defaults["data"]["data_files"].pop("validation")],
     ("data.data_files", "'validation'")),
    ("custom-no-data", [S("data", {})], ("task 'custom' needs data.data_files",)),
    ("data-typo", [S("data.max_train_sample", 5)], ("data.max_train_sample", "unknown key")),
    # --- tracking and outputs
    ("tracking-uri-scheme", [S("tracking.tracking_uri", "ftp://host/x")], ("tracking.tracking_uri", "'ftp'")),
    ("tracking-uri-no-scheme", [S("tracking.tracking_uri", "mlflow.db")], ("tracking.tracking_uri", "scheme")),
    ("tracking-uri-env", [lambda e: e.defaults["tracking"].pop("tracking_uri"), ENV(MLFLOW_TRACKING_URI="ftp://x")],
     ("$MLFLOW_TRACKING_URI", "'ftp'")),
    ("tracking-tag-not-text", [S("tracking.tags", {"team": 7})], ("tracking.tags.team",)),
    ("tracking-experiment-traversal", [S("tracking.experiment_name", "../team/exp")],
     ("tracking.experiment_name", "'..'")),
    ("tracking-experiment-too-long", [S("tracking.experiment_name", "e" * 501)], ("tracking.experiment_name", "500")),
    ("tracking-run-name-ansi", [S("tracking.run_name", "run\x1b[31mred")], ("tracking.run_name", "U+001B")),
    ("tracking-run-name-bidi", [S("tracking.run_name", "run\u202egnp.exe")], ("tracking.run_name", "U+202E")),
    ("tracking-run-name-too-long", [S("tracking.run_name", "r" * 251)], ("tracking.run_name", "250")),
    ("tracking-tag-value-too-long", [S("tracking.tags", {"note": "x" * 8001})], ("tracking.tags.note", "8000")),
    ("tracking-tag-key-alphabet", [S("tracking.tags", {"a$b": "v"})], ("tracking.tags", "a$b")),
    ("tracking-too-many-tags", [S("tracking.tags", {f"t{i}": "v" for i in range(101)})], ("tracking.tags", "100")),
    # the store's packages (MLflow's SqlAlchemyStore and the URI's driver), checked before anything is written
    ("tracking-sqlite-no-cryptography", [UNIMPORTABLE("cryptography")],
     ("tracking.tracking_uri", "sqlite store", "cryptography", "pip install cryptography")),
    ("tracking-sqlite-no-sqlalchemy", [UNIMPORTABLE("sqlalchemy")], ("sqlalchemy", "pip install SQLAlchemy")),
    ("tracking-postgresql-no-driver", [S("tracking.tracking_uri", "postgresql://lora:pw@127.0.0.1:1/mlflow"),
                                       UNIMPORTABLE("psycopg")],
     ("tracking.tracking_uri", "postgresql://***@127.0.0.1:1/mlflow", "psycopg", "pip install 'psycopg[binary]'")),
    ("tracking-postgresql-psycopg2", [S("tracking.tracking_uri", "postgresql+psycopg2://h/mlflow"),
                                      UNIMPORTABLE("psycopg2")], ("psycopg2", "pip install psycopg2-binary")),
    ("tracking-env-mysql-no-driver", [NO_URI, ENV(MLFLOW_TRACKING_URI="mysql://h/mlflow"), UNIMPORTABLE("MySQLdb")],
     ("$MLFLOW_TRACKING_URI", "MySQLdb", "pip install mysqlclient")),
    ("tracking-unknown-driver", [S("tracking.tracking_uri", "postgresql+nodriver://h/mlflow")],
     ("tracking.tracking_uri", "nodriver")),
    ("output-root-under-file", [FILE("train", "plain.jsonl", json.dumps(GOOD_ROW) + "\n"),
                                lambda e: e.defaults.update(output_root=str(e.tmp / "data" / "plain.jsonl" / "out"))],
     ("output_root", "under a file")),
    ("output-root-is-file", [FILE("train", "plain2.jsonl", json.dumps(GOOD_ROW) + "\n"),
                             lambda e: e.defaults.update(output_root=str(e.tmp / "data" / "plain2.jsonl"))],
     ("output_root", "is a file")),
    ("output-root-empty", [S("output_root", "")], ("output_root",)),
    ("job-unknown", [S("job", "predict")], ("job",)),
    # --- eval and distillation
    ("eval-two-sources", [S("job", "eval"), S("eval", {"model_path": "x", "mlflow_run_id": "y"})],
     ("model_path or mlflow_run_id",)),
    ("eval-generation-negative", [S("eval.generation_samples", -1)], ("eval.generation_samples",)),
    ("eval-model-path-missing", [S("job", "eval"), S("eval.model_path", "/nonexistent/final")],
     ("eval.model_path", "does not exist")),
    ("eval-model-path-not-artifact", [S("job", "eval"), ARTIFACT("not-an-artifact", spec=False)],
     ("eval.model_path", "not a lora-exp artifact")),
    ("eval-artifact-other-labels", [S("job", "eval"), ARTIFACT("other", lambda s: s["task"].update(labels=["a", "b"]))],
     ("eval.model_path", "labels")),
    ("eval-artifact-other-formulation", [S("job", "eval"),
                                         ARTIFACT("verb", lambda s: s["formulation"].update(kind="verbalizer"))],
     ("eval.model_path", "'verbalizer'")),
    ("eval-artifact-stale-spec", [S("job", "eval"), ARTIFACT("stale", lambda s: s["training"].update(old_knob=1))],
     ("does not validate with this lora-exp version",)),
    ("distill-without-section", [S("job", "distill")], ("job 'distill' and the distill section go together",)),
    ("distill-section-on-train", [S("distill", {"teacher": {"run": "x"}})], ("go together",)),
    ("teacher-two-sources", [S("job", "distill"), S("distill", {"teacher": {"run": "a", "model_path": "b"}})],
     ("exactly one of run, model_path, mlflow_run_id",)),
    ("teacher-none", [S("job", "distill"), S("distill", {"teacher": {}})], ("exactly one of",)),
    ("teacher-run-is-eval", [RUNS({"base": {"job": "eval"},
                                   "kd": {"job": "distill", "distill": {"teacher": {"run": "base"}}}})],
     ("distill.teacher.run", "eval run")),
    ("teacher-path-not-artifact", [S("job", "distill"), S("distill", {"teacher": {"model_path": "/nonexistent"}})],
     ("distill.teacher.model_path", "not a lora-exp artifact")),
    ("student-heads", [S("job", "distill"), S("distill", {"teacher": {"run": "t"}, "student": {
        "kind": "transformer", "hidden_size": 30, "num_heads": 4}})], ("num_heads 4 must divide hidden_size 30",)),
    ("distill-alpha", [S("job", "distill"), S("distill", {"teacher": {"run": "t"}, "alpha": 1.5})],
     ("distill.alpha",)),
    ("distill-temperature", [S("job", "distill"), S("distill", {"teacher": {"run": "t"}, "temperature": 0})],
     ("distill.temperature",)),
    # --- data files and rows
    ("data-file-missing", [S("data.data_files.train", "data/none.jsonl")], ("none.jsonl", "file not found")),
    ("data-file-extension", [FILE("train", "rows.txt", "the film\n")], ("rows.txt", "unsupported file type")),
    ("jsonl-broken-line", [ROWS("train", [GOOD_ROW, '{"text": "cut'])], ("bad.jsonl", "line 2", "not valid JSON")),
    ("jsonl-not-object", [ROWS("train", [GOOD_ROW, [1, 2]])], ("bad.jsonl", "line 2", "expected a JSON object")),
    ("jsonl-duplicated-key", [ROWS("train", [GOOD_ROW, '{"text": "a", "label": "pos", "label": "neg"}'])],
     ("bad.jsonl", "line 2", "'label' appears twice")),
    ("jsonl-no-label", [ROWS("train", [{"text": "a"}])], ("bad.jsonl", "row 1", "missing column", "label")),
    ("jsonl-no-text", [ROWS("train", [{"label": "pos"}])], ("bad.jsonl", "row 1", "missing column", "text")),
    ("label-outside-set", [ROWS("train", [GOOD_ROW, {"text": "a", "label": "neutral"}])],
     ("bad.jsonl", "row 2", "'neutral'")),
    ("label-index-out-of-range", [ROWS("train", [{"text": "a", "label": 5}])], ("bad.jsonl", "row 1", "5")),
    ("label-boolean", [ROWS("train", [{"text": "a", "label": True}])], ("bad.jsonl", "row 1", "True")),
    ("label-null", [ROWS("train", [{"text": "a", "label": None}])], ("bad.jsonl", "row 1", "None")),
    ("text-number", [ROWS("train", [{"text": 42, "label": "pos"}])], ("bad.jsonl", "row 1", "expected text")),
    ("text-null", [ROWS("train", [{"text": None, "label": "pos"}])], ("bad.jsonl", "row 1", "expected text")),
    ("split-empty", [ROWS("validation", [], name="empty.jsonl")], ("validation", "empty")),
    ("split-blank-lines", [FILE("validation", "blank.jsonl", "\n\n  \n")], ("validation", "empty")),
    ("csv-wrong-columns", [FILE("train", "rows.csv", "text,label\nthe film,pos\nonly one\n")],
     ("rows.csv", "line 3", "expected 2 columns")),
    ("csv-duplicated-header", [FILE("train", "dup.csv", "text,text,label\na,b,pos\n")],
     ("dup.csv", "appear twice")),
    ("csv-no-label", [FILE("train", "nolabel.csv", "text,sentiment\nthe film,pos\n")],
     ("nolabel.csv", "missing column", "label")),
    ("json-array-non-object", [FILE("train", "rows.json", '[{"text": "a", "label": "pos"}, 3]')],
     ("rows.json", "item 2", "expected a JSON object")),
    ("json-invalid", [FILE("train", "bad.json", '[{"text": "a", ')], ("bad.json", "not valid JSON")),
    ("json-duplicated-key", [FILE("train", "dup.json", '[{"text": "a", "text": "b", "label": "pos"}]')],
     ("dup.json", "'text' appears twice")),
    ("parquet-not-parquet", [FILE("train", "rows.parquet", "this is not parquet")],
     ("rows.parquet", "not a readable parquet file")),
    ("jsonl-latin-1", [FILE("train", "latin.jsonl", '{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1"))],
     ("latin.jsonl", "not UTF-8")),
    ("mixed-formats-in-split", [lambda e: e.defaults["data"]["data_files"].update(train=[
        str(write_jsonl(e.tmp / "data" / "a.jsonl", [GOOD_ROW])), str(e.tmp / "data" / "b.csv")]),
        lambda e: (e.tmp / "data" / "b.csv").write_text("text,label\na,pos\n")], ("one format per split",)),
    ("squad-answer-misplaced", [QA_TASK, _qa_data, S("model.max_length", 48),
                                ROWS("train", [{**qa_rows(1)[0], "answers": {"text": ["Rome"], "answer_start": [0]}}])],
     ("bad.jsonl", "row 1", "'Rome' is not at character 0")),
    ("squad-answers-shape", [QA_TASK, _qa_data, S("model.max_length", 48),
                             ROWS("train", [{**qa_rows(1)[0], "answers": ["Paris"]}])],
     ("bad.jsonl", "row 1", "column 'answers'")),
    ("wordnet-missing", [LM_TASK, _text_data, S("model.max_length", 16), ENV(LORA_EXP_WORDNET_DIR="/nonexistent")],
     ("METEOR needs WordNet",)),
    ("offline-hub-data-not-cached", [S("task", {"name": "sst2"}), S("data", {}),
                                     ENV(HF_DATASETS_OFFLINE="1", HF_HOME="/nonexistent/hf")],
     ("nyu-mll/glue/sst2", "not in the local cache", "HF_DATASETS_OFFLINE")),
    # --- repeats and sweeps
    ("repeats-zero", [RUNS({"lora": {"repeats": 0}})], ("repeats",)),
    ("repeats-and-seeds", [RUNS({"lora": {"repeats": 2, "seeds": [1, 2]}})], ("repeats or seeds, not both",)),
    ("seeds-duplicated", [RUNS({"lora": {"seeds": [1, 1]}})], ("seeds", "duplicated")),
    ("repeats-on-eval", [RUNS({"base": {"job": "eval", "repeats": 3}})], ("an eval run is deterministic",)),
    ("no-such-repeat", [RUNS({"lora": {"repeats": 2}}), ARGS("--run", "lora/seed-7")], ("lora/seed-7", "42, 43")),
    ("sweep-unknown-field", [S("sweep", {"metric": "validation_accuracy", "params": {
        "training.lerning_rate": {"low": 1e-4, "high": 1e-2}}})], ("sweep.params.training.lerning_rate",
                                                                   "no such field")),
    ("sweep-empty-range", [S("sweep", {"metric": "validation_accuracy", "params": {
        "training.learning_rate": {"low": 1e-2, "high": 1e-4}}})], ("empty range",)),
    ("sweep-wrong-type", [S("sweep", {"metric": "validation_accuracy", "params": {
        "method.r": {"choices": ["big", 4]}}})], ("sweep.params.method.r", "'big'")),
    ("sweep-metric-unknown", [S("sweep", {"metric": "validation_bleu", "params": {
        "method.r": {"choices": [2, 4]}}})], ("sweep.metric", "validation_bleu", "validation_accuracy")),
    ("sweep-metric-split", [S("sweep", {"metric": "test_accuracy", "params": {"method.r": {"choices": [2, 4]}}})],
     ("sweep.metric", "test_accuracy")),
    ("sweep-grid-too-small", [S("sweep", {"metric": "validation_accuracy", "sampler": "grid", "trials": 5,
                                          "params": {"method.r": {"choices": [2, 4]}}})], ("grid has 2 points",)),
    ("sweep-grid-continuous", [S("sweep", {"metric": "validation_accuracy", "sampler": "grid", "params": {
        "training.learning_rate": {"low": 1e-4, "high": 1e-2}}})], ("need choices or a step",)),
    ("sweep-no-params", [S("sweep", {"metric": "validation_accuracy", "params": {}})], ("sweep.params",)),
    ("sweep-with-repeats", [RUNS({"s": {"repeats": 2, "sweep": {"metric": "validation_accuracy", "params": {
        "method.r": {"choices": [2, 4]}}}}})], ("a sweep's trials are single train runs",)),
    ("sweep-varies-job", [S("sweep", {"metric": "validation_accuracy", "params": {"job": {"choices": ["eval"]}}})],
     ("sweep.params.job", "not a field a trial can vary")),
    ("hub-task-without-hub-data", [S("task", {"name": "custom", "text_fields": ["text"], "labels": ["a", "b"]}),
                                   S("data", {"hub_path": ""})], ("data.hub_path",)),
]


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("mutations", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_validate_and_train_with_exit_2_writing_nothing(mutations, words, tmp_path, tiny_gpt2,
                                                                        toy_data, monkeypatch, caplog):
    work = tmp_path / "work"
    work.mkdir()
    data = {split: str(shutil.copy(path, work / Path(path).name)) for split, path in toy_data.items()}
    doc = experiment(tiny_gpt2, data, work)
    env = Env(work, tiny_gpt2, doc)
    for mutate in mutations:
        mutate(env)
    values = work / "values.yaml"
    raw = env.raw if env.raw is not None else yaml.safe_dump(env.doc, sort_keys=False)
    values.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    for key, value in env.environ.items():
        monkeypatch.setenv(key, value)
    for name in env.unimportable:  # the package and whatever of it this process imported already
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")] + [name]:
            monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.chdir(work)
    before = _snapshot(work)
    for command in ("validate", "train"):
        caplog.clear()
        code = cli.main([command, "-f", str(values), *env.argv])
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert code == USER_ERROR, (command, errors, caplog.text[-2000:])
        assert len(errors) == 1, (command, errors)
        for word in words:
            assert word in errors[0], (command, word, errors[0])
        assert _snapshot(work) == before, (command, _snapshot(work) - before)


def test_a_csv_with_a_byte_order_mark_is_read_by_its_header(tmp_path, tiny_gpt2, toy_data, monkeypatch):
    """Excel writes a BOM: the first column is still 'text', not '\\ufefftext'."""
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\nthe film was great,pos\nthe plot was dull,neg\n".encode("utf-8-sig"))
    doc = experiment(tiny_gpt2, {**toy_data, "train": str(path)}, tmp_path)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "-f", str(values)]) == 0


def test_a_store_package_that_cannot_be_imported_stops_a_fresh_process_with_exit_2(tmp_path, tiny_gpt2, toy_data):
    """Issue 23's environment fault as a container meets it: cryptography, which MLflow's sqlite store imports,
    cannot be imported. Not 'MLflow does not answer' (exit 75, which the chart retries against a server not at
    fault): exit 2 from validate and from train, one line naming the package and how to install it, and no store,
    lock file or output dir written."""
    shadow = tmp_path / "shadow" / "cryptography"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'cryptography'\", "
                                        "name='cryptography')\n")
    work = tmp_path / "work"
    work.mkdir()
    values = write_values(work, experiment(tiny_gpt2, toy_data, work))
    path = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH", "")) if p)
    for command in ("validate", "train"):
        proc = run_cli(command, "-f", str(values), cwd=work, env={"PYTHONPATH": path})
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if " ERROR " in line]
        assert proc.returncode == USER_ERROR, (command, proc.stdout[-3000:], proc.stderr[-3000:])
        assert len(errors) == 1 and "sqlite store needs the Python package cryptography" in errors[0], errors
        assert "pip install cryptography" in errors[0] and "does not answer" not in errors[0]
        assert sorted(p.name for p in work.iterdir()) == ["values.yaml"], command  # no mlflow.db(.lock), outputs
