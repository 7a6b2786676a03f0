"""The experiment spec: the one definition of what an experiment is.

A values file (``values/*.yaml``) holds an ``experiment`` section::

    experiment:
      name: mnli-gpt2-large          # MLflow experiment
      defaults: {...}                # fields shared by every run
      runs:                          # a matrix: one entry per run
        baseline: {job: eval, ...}   # deep-merged over ``defaults``
        lora: {...}

Each run is ``defaults`` deep-merged with the run's own fields, then ``--set`` overrides, then validated
as a :class:`RunSpec`. Every model uses ``extra="forbid"`` so a typo fails here, before any model loads,
naming the key and the file. The CLI, the Helm chart's ``values.schema.json`` (``lora-exp schema``) and
the docs all derive from these classes; nothing else defines a field.

This module imports no ML library, so ``lora-exp validate`` stays fast.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lora_exp.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(_Strict):
    """The pretrained model to adapt."""

    name: str = Field(description="Hub id (e.g. gpt2-large) or a local directory holding a saved model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Dtype the base weights load in; 'auto' keeps the checkpoint's dtype."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off: it executes remote code.")
    max_length: int = Field(512, ge=8, description="Tokens per example after truncation.")


class TaskSpec(_Strict):
    """Which task: a registered one (mnli, mrpc, sst2, rte, cola, imdb) or ``custom``."""

    name: str = Field(description="Registered task name, or 'custom' for a task defined by the fields below.")
    text_fields: list[str] | None = Field(
        None, description="custom: the input column(s), in order. Registered tasks know theirs."
    )
    label_field: str | None = Field(None, description="custom: the label column (default 'label').")
    labels: list[str] | None = Field(
        None, description="custom: the label names; data labels may be these names or their 0-based indices."
    )
    eval_splits: list[str] | None = Field(
        None, description="Splits evaluated at the end, reported separately (default: the task's own)."
    )
    doc_stride: int | None = Field(None, ge=1, description="qa: tokens shared by overlapping context windows (128).")
    max_answer_length: int | None = Field(None, ge=1, description="qa: longest answer span in tokens (30).")


class DataSpec(_Strict):
    """Where the rows come from and how many are used."""

    hub_path: str | None = Field(None, description="Override the task's hub data set id.")
    hub_config: str | None = Field(None, description="Override the task's hub data set config.")
    data_files: dict[str, str | list[str]] | None = Field(
        None,
        description="Local files per split (JSONL, JSON, CSV or parquet), e.g. {train: a.jsonl, validation: b.jsonl}."
        " When set, the hub is not used.",
    )
    max_train_samples: int | None = Field(None, ge=1, description="Random subset of the training split (seeded).")
    max_eval_samples: int | None = Field(None, ge=1, description="First N rows of each eval split.")
    data_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Use this share of the (shuffled) training split (seed 003 used 0.1)."
    )
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this share of the training subset as an internal validation split."
    )
    seed: int = Field(42, description="Seed for subsetting and the internal split.")


class LoraSpec(_Strict):
    """LoRA adapters (PEFT) on the attention/MLP projections; the base stays frozen."""

    name: Literal["lora"]
    r: int = Field(8, ge=1, description="Adapter rank: higher = more capacity, more memory.")
    alpha: int = Field(16, ge=1, description="Scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Default per architecture: GPT-2 c_attn,c_proj,c_fc; "
        "Llama q,k,v,o,gate,up,down _proj.",
    )


class QLoraSpec(LoraSpec):
    """QLoRA: LoRA over a 4-bit (nf4, double-quantized) frozen base; LoRA weights stay fp32."""

    name: Literal["qlora"]  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantized to for each matmul."
    )


class HeadOnlySpec(_Strict):
    """Train only the classification head; every pretrained weight stays frozen."""

    name: Literal["head_only"]


class FullSpec(_Strict):
    """Update every weight."""

    name: Literal["full"]


MethodSpec = Annotated[LoraSpec | QLoraSpec | HeadOnlySpec | FullSpec, Field(discriminator="name")]


class FormulationSpec(_Strict):
    """How a labelled example meets the model.

    ``classifier``: a classification head over the last token of the rendered template.
    ``verbalizer``: the LM scores each label word after the prompt (seed 000's
    ``Premise: … Hypothesis: … Relationship: {label}``); training is causal-LM loss on the label word.
    ``span``: extractive QA, start/end logits over the context (SQuAD v2).
    ``causal_lm``: next-token prediction over fixed-size blocks (WikiText).
    """

    kind: Literal["auto", "classifier", "verbalizer", "span", "causal_lm"] = Field(
        "auto",
        description="auto: the task's natural one (classifier for classification, span for QA, causal_lm for "
        "language modelling).",
    )
    template: str | None = Field(
        None, description="Python format string over the task's text fields; default: the task's own."
    )
    prompt_suffix: str | None = Field(
        None, description="verbalizer: text after the template that asks for the label; default the task's "
        "(e.g. '\\nRelationship:')."
    )
    verbalizers: dict[str, str] | None = Field(
        None, description="verbalizer: label name -> the word the LM should produce (default ' <label name>')."
    )


class EarlyStoppingSpec(_Strict):
    metric: str = Field("accuracy", description="Eval metric watched (without the eval_ prefix).")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    greater_is_better: bool = True


class TrainingSpec(_Strict):
    """Optimisation and cadence; maps onto transformers' TrainingArguments."""

    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Mixed precision; 'auto' = bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    group_by_length: bool = Field(True, description="Batch similar lengths together: less padding.")
    eval_strategy: Literal["steps", "epoch", "no"] = "epoch"
    eval_steps: int | None = Field(None, ge=1)
    save_strategy: Literal["steps", "epoch", "no"] = "epoch"
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    early_stopping: EarlyStoppingSpec | None = None
    zero_stage: Literal[0, 2, 3] = Field(
        0, description="DeepSpeed ZeRO stage (0 = off). Shards optimizer state (2) and parameters (3) across GPUs."
    )
    zero_offload: bool = Field(False, description="ZeRO: keep optimizer state (and stage-3 parameters) in CPU memory.")
    seed: int = 42

    @model_validator(mode="after")
    def _cadence(self) -> TrainingSpec:
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy 'steps' needs eval_steps")
        if self.save_strategy == "steps" and self.save_steps is None:
            raise ValueError("save_strategy 'steps' needs save_steps")
        if self.early_stopping and self.eval_strategy == "no":
            raise ValueError("early_stopping needs an eval_strategy other than 'no'")
        if self.early_stopping and (self.save_strategy, self.save_steps) != (self.eval_strategy, self.eval_steps):
            raise ValueError("early_stopping keeps the best checkpoint: save_strategy/save_steps must equal "
                             "eval_strategy/eval_steps")
        return self


class TrackingSpec(_Strict):
    """Where the run is recorded in MLflow."""

    experiment_name: str | None = Field(None, description="MLflow experiment (default: the values file's name).")
    run_name: str | None = Field(None, description="MLflow run name (default: the run's key).")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else a local store "
        "(sqlite:///mlflow.db plus ./mlartifacts) in the working directory.",
    )
    tags: dict[str, str] = Field(default_factory=dict)


class EvalSpec(_Strict):
    """What an eval job evaluates (neither source set: the base model as is, the baseline), and how
    language-model generations are sampled for BLEU/ROUGE/etc."""

    model_path: str | None = Field(None, description="A trained artifact directory (adapter, head or full model).")
    mlflow_run_id: str | None = Field(None, description="Evaluate the model artifact logged by this MLflow run.")
    generation_samples: int = Field(32, ge=0, description="lm: held-out blocks continued by the model (0: skip).")
    prompt_tokens: int = Field(32, ge=1, description="lm: tokens of each held-out block given as the prompt.")
    max_new_tokens: int = Field(32, ge=1, description="lm: tokens generated and compared with the true continuation.")

    @model_validator(mode="after")
    def _one_source(self) -> EvalSpec:
        if self.model_path and self.mlflow_run_id:
            raise ValueError("give model_path or mlflow_run_id, not both")
        return self


class TeacherSpec(_Strict):
    """The fine-tuned teacher: one of a run of this values file, an artifact path, or an MLflow run."""

    run: str | None = Field(None, description="A train run of this experiment: <output_root>/<experiment>/<run>/final.")
    model_path: str | None = Field(None, description="A lora-exp artifact directory (adapter, head or full model).")
    mlflow_run_id: str | None = Field(None, description="The MLflow run whose 'model' artifact is the teacher.")

    @model_validator(mode="after")
    def _one(self) -> TeacherSpec:
        if sum(x is not None for x in (self.run, self.model_path, self.mlflow_run_id)) != 1:
            raise ValueError("give exactly one of run, model_path, mlflow_run_id")
        return self


class StudentSpec(_Strict):
    """The small model trained from the teacher's outputs; it uses the teacher's tokenizer."""

    kind: Literal["rnn", "transformer"] = Field("rnn", description="rnn: seed 004's DistilRNN; transformer: GPT-2.")
    embedding_dim: int = Field(768, ge=1, description="rnn: token embedding size.")
    hidden_size: int = Field(768, ge=1, description="rnn: recurrent state size; transformer: model width.")
    num_layers: int = Field(1, ge=1, description="Recurrent or transformer layers.")
    num_heads: int = Field(4, ge=1, description="transformer: attention heads (must divide hidden_size).")


class DistillSpec(_Strict):
    """Knowledge distillation: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the distillation term; 0 = no KD (plain CE).")
    temperature: float = Field(2.0, gt=0.0, description="Softens both distributions (seed 004: 2).")


class RunSpec(_Strict):
    """One fully resolved run: what a single Kubernetes Job or local command executes."""

    job: Literal["train", "eval", "distill"] = Field(
        "train", description="train: fine-tune then evaluate; eval: evaluate only; distill: train a student."
    )
    model: ModelSpec
    task: TaskSpec
    data: DataSpec = Field(default_factory=DataSpec)
    method: MethodSpec = Field(default_factory=lambda: LoraSpec(name="lora"))
    formulation: FormulationSpec = Field(default_factory=FormulationSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    distill: DistillSpec | None = Field(None, description="distill jobs: teacher, student and loss weights.")
    output_root: str = Field("outputs", description="Checkpoints and results go to <output_root>/<experiment>/<run>.")

    @model_validator(mode="after")
    def _coherent(self) -> RunSpec:
        if self.method.name == "head_only" and self.formulation.kind in ("verbalizer", "causal_lm"):
            raise ValueError("method head_only trains a task head: formulation.kind 'verbalizer'/'causal_lm' has none")
        if (self.job == "distill") != (self.distill is not None):
            raise ValueError("job 'distill' and the distill section go together")
        if self.task.name == "custom" and not (self.task.text_fields and self.task.labels):
            raise ValueError("task 'custom' needs task.text_fields and task.labels")
        if self.task.name == "custom" and not self.data.data_files and not self.data.hub_path:
            raise ValueError("task 'custom' needs data.data_files (or data.hub_path)")
        return self


class ExperimentFile(_Strict):
    """The ``experiment`` section of a values file: shared defaults and a matrix of named runs."""

    name: str = Field(description="Experiment name: MLflow experiment and output folder.")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Fields shared by every run (a RunSpec, partial)."
    )
    runs: dict[str, dict[str, Any]] = Field(description="Run name -> its fields (a RunSpec, partial), over defaults.")


# --------------------------------------------------------------------------------------------------
# Loading: values file -> named, fully resolved RunSpecs


class Run(BaseModel):
    """A resolved run and where it came from (for messages and MLflow tags)."""

    model_config = ConfigDict(frozen=True)
    experiment: str
    name: str
    spec: RunSpec
    source: str

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.output_root) / self.experiment / self.name

    @property
    def experiment_name(self) -> str:
        return self.spec.tracking.experiment_name or self.experiment

    @property
    def run_name(self) -> str:
        return self.spec.tracking.run_name or self.name


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``over``, recursing into mappings (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """Turn ``["training.epochs=1", "method.r=4"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=1")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {part} is both a value and a section")
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "a: b" is text here, not a mapping (templates contain colons)
        node[parts[-1]] = value
    return out


def _format_errors(err: ValidationError, where: str, origins: list[tuple[str, dict[str, Any]]] | None = None) -> str:
    """One line per problem, ``<file>: <path>: <message>``, the path as the user wrote it.

    ``origins`` are the layers a run was merged from (label, dict), last wins; a path is reported under
    the last layer that holds it, so a typo in ``defaults`` is not blamed on a run.
    """
    lines = []
    for e in err.errors():
        # Drop discriminator tags (e.g. 'lora' in method.lora.r) so the path is what the user wrote.
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and p in _METHOD_TAGS)]
        path = ".".join(loc) or "(top level)"
        prefix = where
        for label, layer in reversed(origins or []):
            if _has_path(layer, loc):
                prefix = label
                break
        msg = "unknown key (misspelled?)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{prefix}{path}: {msg}")
    return "\n".join(lines)


def _has_path(d: Any, loc: list[str]) -> bool:
    for part in loc:
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return bool(loc)


_METHOD_TAGS = {"lora", "qlora", "head_only", "full"}


def load_values(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{p}: cannot read values file ({e.strerror})") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or "experiment" not in doc:
        raise SpecError(f"{p}: no 'experiment' section (a values file holds the spec under 'experiment:')")
    return doc


def load_experiment(path: str | os.PathLike[str]) -> ExperimentFile:
    doc = load_values(path)
    try:
        return ExperimentFile.model_validate(doc["experiment"])
    except ValidationError as e:
        raise SpecError(_format_errors(e, f"{path}: experiment.")) from None


def resolve_runs(
    path: str | os.PathLike[str],
    run: str | None = None,
    overrides: list[str] | None = None,
) -> list[Run]:
    """Resolve the values file's runs (or the one named) into validated specs, in file order."""
    exp = load_experiment(path)
    if run is not None and run not in exp.runs:
        raise SpecError(f"{path}: no run named {run!r}; runs are: {', '.join(exp.runs)}")
    names = [run] if run is not None else list(exp.runs)
    sets = parse_set(overrides or [])
    resolved = []
    for name in names:
        own = exp.runs[name] or {}
        merged = deep_merge(deep_merge(exp.defaults, own), sets)
        try:
            spec = RunSpec.model_validate(merged)
        except ValidationError as e:
            origins = [(f"{path}: experiment.defaults.", exp.defaults), (f"{path}: experiment.runs.{name}.", own),
                       ("--set ", sets)]
            raise SpecError(_format_errors(e, f"{path}: run {name!r}: ", origins)) from None
        resolved.append(Run(experiment=exp.name, name=name, spec=spec, source=str(path)))
    return resolved


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def json_schema() -> dict[str, Any]:
    """JSON Schema of the values file's ``experiment`` section (for the Helm chart's values.schema.json).

    ``defaults`` and each run are partial RunSpecs (a run may override one field of a section), so
    ``required`` is dropped throughout and the method union becomes ``anyOf``; unknown keys stay
    forbidden. The complete check happens when the runs are merged, in :func:`resolve_runs`.
    """
    run = RunSpec.model_json_schema(ref_template="#/$defs/{model}")
    defs = run.pop("$defs", {})
    defs["PartialRunSpec"] = run
    defs = _partial(defs)
    exp = ExperimentFile.model_json_schema()
    exp["properties"]["defaults"] = {"$ref": "#/$defs/PartialRunSpec"}
    exp["properties"]["runs"] = {"type": "object", "additionalProperties": {"$ref": "#/$defs/PartialRunSpec"}}
    exp["additionalProperties"] = False
    exp["$defs"] = defs
    return exp


def _partial(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("required", "discriminator"):
                continue
            out["anyOf" if k == "oneOf" else k] = _partial(v)
        return out
    if isinstance(node, list):
        return [_partial(v) for v in node]
    return node
