"""The experiment spec: the one definition of what a run is.

A values file (``values/*.yaml``) holds an ``experiment`` section::

    experiment:
      name: mnli-gpt2-large          # MLflow experiment
      defaults: {...}                # fields shared by every run
      runs:                          # a matrix: one entry per run
        baseline: {job: eval, ...}   # deep-merged over ``defaults``
        lora: {...}

Each run is ``defaults`` deep-merged with the run's own fields, then ``--set`` overrides, then validated
as a :class:`RunSpec` (``lora_exp.config.loading``). Every model uses ``extra="forbid"`` so a typo fails
here, before any model loads, naming the key and the file. The CLI, the Helm chart's ``values.schema.json``
and the docs all derive from these classes.

The parts that plugins add come from the registries (``lora_exp.core.registry``): ``method`` is the
union of the registered methods' spec classes (each method module defines its own), ``task.name`` and
``formulation.kind`` are enums of the registered names. The models build lazily and rebuild when a plugin
registers, so a method defined anywhere (a test file included) validates like a built-in one.

This module imports no ML library, so ``lora-exp validate`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from lora_exp.config.fields import (
    MLFLOW_MAX_TAGS,
    NAME_PATTERN,
    RESERVED_SPLITS,
    ExperimentName,
    Name,
    RegisteredModelName,
    RegisteredNames,
    RegisteredSpecs,
    ShownText,
    TagKey,
    TagValue,
    Text,
    TrackingUri,
    UniqueTexts,
    _unique,
)
from lora_exp.core import registry

AUTO = "auto"  # formulation.kind: the task's natural formulation
DEFAULT_METHOD = "lora"
# transformers' SchedulerType values (a test keeps the list equal to the installed transformers'). Listed here
# because importing transformers would cost `lora-exp validate` seconds.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay")
class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, and so are inf/NaN numbers; schemas build on first
    use (see module doc)."""

    model_config = ConfigDict(extra="forbid", defer_build=True, allow_inf_nan=False)


class MethodSpec(Strict):
    """Base of a method's spec class. A method module subclasses it with ``name: Literal["<name>"]``."""

    name: str


def _default_method() -> MethodSpec:
    spec: type[MethodSpec] = registry.METHODS.get(DEFAULT_METHOD).spec  # type: ignore[attr-defined]
    return spec(name=DEFAULT_METHOD)


class ModelSpec(Strict):
    """The pretrained model to adapt."""

    name: Text = Field(description="Hub id (e.g. gpt2-large) or a local directory holding a saved model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Dtype the base weights load in; 'auto' keeps the checkpoint's dtype."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off: it executes remote code.")
    max_length: int = Field(512, ge=8, description="Tokens per example after truncation.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="Attention kernel. 'auto': on a CUDA GPU flash_attention_2 where the flash-attn package "
        "is installed, else sdpa (PyTorch's fused attention); on CPU eager, faster there than sdpa for "
        "fine-tuning lengths by measurement (docs/benchmarks.md). flash_attention_2/3 need a CUDA GPU and their "
        "package.",
    )


class TaskSpec(Strict):
    """Which task: a registered one (mnli, mrpc, sst2, rte, cola, imdb) or ``custom``."""

    name: Annotated[str, RegisteredNames(registry.TASKS)] = Field(
        description="A registered task, or 'custom' for a task defined by the fields below."
    )
    text_fields: UniqueTexts | None = Field(
        None, description="custom: the input column(s), in order. Registered tasks know theirs."
    )
    label_field: Text | None = Field(None, description="custom: the label column (default 'label').")
    labels: Annotated[UniqueTexts, Field(min_length=2)] | None = Field(
        None, description="custom: the label names (two or more, each once); data labels may be these names or "
        "their 0-based indices."
    )
    eval_splits: UniqueTexts | None = Field(
        None, description="Splits evaluated at the end, reported separately (default: the task's own)."
    )

    @field_validator("eval_splits")
    @classmethod
    def _not_reserved(cls, v: list[str] | None) -> list[str] | None:
        clash = [s for s in v or [] if s in RESERVED_SPLITS]
        if clash:
            raise ValueError(f"split name(s) {clash} clash with the trainer's metric prefixes; rename the split")
        return v

    @model_validator(mode="after")
    def _label_is_not_text(self) -> TaskSpec:
        label = self.label_field or "label"
        if label in (self.text_fields or ()):
            raise ValueError(f"text_fields: {label!r} is the label column; the model would read the answer")
        return self
    doc_stride: int | None = Field(None, ge=1, description="qa: tokens shared by overlapping context windows (128).")
    max_answer_length: int | None = Field(None, ge=1, description="qa: longest answer span in tokens (30).")


class DataSpec(Strict):
    """Where the rows come from and how many are used."""

    hub_path: Text | None = Field(None, description="Override the task's hub data set id.")
    hub_config: Text | None = Field(None, description="Override the task's hub data set config.")
    data_files: dict[Text, Text | Annotated[list[Text], Field(min_length=1)]] | None = Field(
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
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for subsetting and the internal split.")


class FormulationSpec(Strict):
    """How a labelled example meets the model.

    ``classifier``: a classification head over the last token of the rendered template.
    ``verbalizer``: the LM scores each label word after the prompt (seed 000's
    ``Premise: … Hypothesis: … Relationship: {label}``); training is causal-LM loss on the label word.
    ``span``: extractive QA, start/end logits over the context (SQuAD v2).
    ``causal_lm``: next-token prediction over fixed-size blocks (WikiText).
    """

    kind: Annotated[str, RegisteredNames(registry.FORMULATIONS, AUTO)] = Field(
        AUTO,
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
    verbalizers: dict[str, Text] | None = Field(
        None, description="verbalizer: label name -> the word the LM should produce (default ' <label name>')."
    )


class EarlyStoppingSpec(Strict):
    metric: Text = Field("accuracy", description="Eval metric watched (without the eval_ prefix); one the "
                         "formulation computes during training (classification: loss, accuracy and the task's "
                         "metrics; span and causal_lm: loss).")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    greater_is_better: bool = True


class TrainingSpec(Strict):
    """Optimisation and cadence; maps onto transformers' TrainingArguments."""

    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimiser steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Mixed precision; 'auto' = bf16 on GPUs that have it, else fp16 on GPU; on CPU bf16 "
        "autocast where the CPU has bf16 matrix units (AMX, AVX512-BF16), else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    packing: bool = Field(
        False, description="Padding-free batches: the examples of a batch are concatenated into one row, "
        "attention kept within each by position_ids (DataCollatorWithFlattening); losses equal the padded path's. "
        "Training only. Off by default: on CPU the length-grouped padded batches are as fast "
        "(docs/benchmarks.md); on GPU with flash attention it removes all padding work. Not with distill jobs.",
    )
    torch_compile: bool = Field(
        False, description="torch.compile the model's repeated blocks in place (regional compilation: one block "
        "is compiled and serves every layer, dynamic shapes; evaluation runs them eagerly). Off by default: on CPU "
        "a compile takes minutes, and on an H200 its cost was not yet won back in a measured run "
        "(docs/benchmarks.md, GPU).",
    )
    liger_kernels: bool = Field(
        False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) via "
        "transformers' use_liger_kernel, for Llama-family models on CUDA GPUs. Needs a CUDA GPU and the liger-kernel "
        "package. Off by default: not yet measured against the default path on a GPU (docs/benchmarks.md).",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("linear", description="transformers' learning-rate schedule.")  # type: ignore[valid-type]
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    group_by_length: bool = Field(True, description="Batch similar lengths together: less padding.")
    eval_strategy: Literal["steps", "epoch", "no"] = "epoch"
    eval_steps: int | None = Field(None, ge=1)
    save_strategy: Literal["steps", "epoch", "no"] = "epoch"
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    early_stopping: EarlyStoppingSpec | None = None
    zero_stage: Literal[0, 2, 3] = Field(
        0, description="What is sharded across the processes (0 = nothing): gradients and optimizer state (2), "
        "parameters too (3), by the backend `sharding` names. Under FSDP2, 3 is full sharding and 2 keeps the "
        "parameters gathered from forward to backward (reshard_after_forward false).",
    )
    sharding: Literal["zero", "fsdp"] = Field(
        "zero", description="The sharding backend for zero_stage 2/3: DeepSpeed ZeRO, or PyTorch FSDP2 "
        "(fully_shard, through accelerate; one block per shard unit, full state dict saved).",
    )
    zero_offload: bool = Field(False, description="Keep optimizer state (and stage-3 parameters) in CPU memory "
                               "(ZeRO offload; FSDP2 CPU offload).")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of weights' init and data order (NumPy's bound: < 2**32).")

    @model_validator(mode="after")
    def _cadence(self) -> TrainingSpec:
        if self.max_steps == 0:
            raise ValueError("max_steps 0 trains nothing; use -1 (train for `epochs`) or a positive count")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy 'steps' needs eval_steps")
        if self.save_strategy == "steps" and self.save_steps is None:
            raise ValueError("save_strategy 'steps' needs save_steps")
        if self.sharding == "fsdp" and not self.zero_stage:
            raise ValueError("sharding fsdp shards at zero_stage 2 (gradients, optimizer state) or 3 (parameters "
                             "too): set zero_stage")
        if self.early_stopping and self.eval_strategy == "no":
            raise ValueError("early_stopping needs an eval_strategy other than 'no'")
        if self.early_stopping and (self.save_strategy, self.save_steps) != (self.eval_strategy, self.eval_steps):
            raise ValueError("early_stopping keeps the best checkpoint: save_strategy/save_steps must equal "
                             "eval_strategy/eval_steps")
        return self


class TrackingSpec(Strict):
    """Where the run is recorded in MLflow."""

    experiment_name: ExperimentName | None = Field(None, description="MLflow experiment (default: the values file's "
                                                   "name); printable, may be a path without '.'/'..' segments.")
    run_name: ShownText | None = Field(None, description="MLflow run name (default: the run's key); printable.")
    tracking_uri: TrackingUri | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else a local store "
        "(sqlite:///mlflow.db plus ./mlartifacts) in the working directory. Credentials belong in "
        "MLFLOW_TRACKING_USERNAME/PASSWORD, not here (a URI's user:password is redacted from every log and tag).",
    )
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=MLFLOW_MAX_TAGS, description="Run tags "
                                         "within MLflow's key alphabet and lengths (values cut silently past 8,000).")
    system_metrics: bool = Field(
        True, description="Log CPU/memory/disk/network (and GPU utilisation, memory and power where NVML has "
        "them) as system/* metrics every system_metrics_interval seconds, through the run's spool like any metric.")
    system_metrics_interval: float = Field(10.0, ge=1.0, description="Seconds between system-metric samples.")
    register_model: RegisteredModelName | None = Field(
        None, description="Train runs: register the run's artifact (model/) as a new version of this MLflow "
        "registered model, tagged with the run's metrics, once the run's results reached MLflow.")


class EvalSpec(Strict):
    """What an eval job evaluates (neither source set: the base model as is, the baseline), and how
    language-model generations are sampled for BLEU/ROUGE/etc."""

    model_path: Text | None = Field(None, description="A trained artifact directory (adapter, head or full model).")
    mlflow_run_id: Text | None = Field(None, description="Evaluate the model artifact logged by this MLflow run.")
    generation_samples: int = Field(32, ge=0, description="lm: held-out blocks continued by the model (0: skip).")
    prompt_tokens: int = Field(32, ge=1, description="lm: tokens of each held-out block given as the prompt.")
    max_new_tokens: int = Field(32, ge=1, description="lm: tokens generated and compared with the true continuation.")

    @model_validator(mode="after")
    def _one_source(self) -> EvalSpec:
        if self.model_path and self.mlflow_run_id:
            raise ValueError("give model_path or mlflow_run_id, not both")
        return self


class TeacherSpec(Strict):
    """The fine-tuned teacher: one of a run of this values file, an artifact path, or an MLflow run."""

    run: Annotated[str, StringConstraints(pattern=NAME_PATTERN[:-1] + r"(/seed-\d+)?$")] | None = Field(
        None, description="A train run of this experiment (<output_root>/<experiment>/<run>/final), in this values "
        "file or another; of a repeated run, name one repeat (<run>/seed-<seed>).")
    model_path: Text | None = Field(None, description="A lora-exp artifact directory (adapter, head or full model).")
    mlflow_run_id: Text | None = Field(None, description="The MLflow run whose 'model' artifact is the teacher.")

    @model_validator(mode="after")
    def _one(self) -> TeacherSpec:
        if sum(x is not None for x in (self.run, self.model_path, self.mlflow_run_id)) != 1:
            raise ValueError("give exactly one of run, model_path, mlflow_run_id")
        return self


class StudentSpec(Strict):
    """The small model trained from the teacher's outputs; it uses the teacher's tokenizer."""

    kind: Literal["rnn", "transformer"] = Field("rnn", description="rnn: seed 004's DistilRNN; transformer: GPT-2.")
    embedding_dim: int = Field(768, ge=1, description="rnn: token embedding size.")
    hidden_size: int = Field(768, ge=1, description="rnn: recurrent state size; transformer: model width.")
    num_layers: int = Field(1, ge=1, description="Recurrent or transformer layers.")
    num_heads: int = Field(4, ge=1, description="transformer: attention heads (must divide hidden_size).")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> StudentSpec:
        if self.kind == "transformer" and self.hidden_size % self.num_heads:
            raise ValueError(f"transformer student: num_heads {self.num_heads} must divide hidden_size "
                             f"{self.hidden_size}")
        return self


class DistillSpec(Strict):
    """Knowledge distillation: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the distillation term; 0 = no KD (plain CE).")
    temperature: float = Field(2.0, gt=0.0, description="Softens both distributions (seed 004: 2).")


class SweepParam(Strict):
    """One searched field: a list of choices, or a numeric range (integers when low, high and step are)."""

    choices: Annotated[list[Any], Field(min_length=1)] | None = Field(None, description="Values to choose from.")
    low: float | None = Field(None, description="Range: smallest value.")
    high: float | None = Field(None, description="Range: largest value.")
    log: bool = Field(False, description="Range: sample on a log scale (learning rates).")
    step: float | None = Field(None, gt=0, description="Range: spacing of the values (and the grid's points).")

    @model_validator(mode="after")
    def _one_kind(self) -> SweepParam:
        ranged = self.low is not None or self.high is not None
        if (self.choices is not None) == ranged:
            raise ValueError("give choices, or low and high (a range)")
        if ranged and (self.low is None or self.high is None or not self.low < self.high):
            raise ValueError(f"empty range: low {self.low} must be below high {self.high}")
        if ranged and self.log and self.low is not None and self.low <= 0:
            raise ValueError("log: the range must be positive")
        if self.choices is not None and len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError("choices: each value once")
        return self

    @property
    def is_int(self) -> bool:
        return all(v is not None and float(v).is_integer() for v in (self.low, self.high)) and (
            self.step is not None and float(self.step).is_integer())

    def grid(self) -> list[Any] | None:
        """The values a grid search visits (None: a continuous range has no grid)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None or self.low is None or self.high is None:
            return None
        n = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in values] if self.is_int else values


class SweepSpec(Strict):
    """A hyper-parameter search over spec fields with Optuna: each trial is one run (an MLflow child run of the
    sweep's parent run); workers (processes, or the pods of the chart's Indexed Job) share one study."""

    params: Annotated[dict[Text, SweepParam], Field(min_length=1)] = Field(
        description="Spec field (dotted path, e.g. training.learning_rate, method.r) -> what to try.")
    metric: Text = Field(description="The final metric to optimise, <split>_<metric> (e.g. validation_accuracy).")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: minimize for loss/perplexity, else maximize.")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna's sampler.")
    trials: int = Field(8, ge=1, le=10_000, description="The trial budget, all workers together.")
    workers: int = Field(2, ge=1, le=64, description="Parallel workers (the chart's Indexed Job pods).")
    seed: int = Field(0, ge=0, lt=2**32, description="The sampler's seed.")
    storage: Text | None = Field(
        None, description="Optuna storage URL (e.g. postgresql://...); default a journal file beside the trials "
        "(<output_root>/<experiment>/<run>/study.journal), which workers on one shared volume use together.")

    @model_validator(mode="after")
    def _grid_fits(self) -> SweepSpec:
        if self.sampler == "grid":
            grids = {k: p.grid() for k, p in self.params.items()}
            missing = [k for k, g in grids.items() if g is None]
            if missing:
                raise ValueError(f"grid: params {missing} need choices or a step")
            size = 1
            for g in grids.values():
                size *= len(g or [])
            if self.trials > size:
                raise ValueError(f"grid: {self.trials} trials but the grid has {size} points")
        return self


class RunSpec(Strict):
    """One fully resolved run: what a single Kubernetes Job or local command executes."""

    job: Literal["train", "eval", "distill"] = Field(
        "train", description="train: fine-tune then evaluate; eval: evaluate only; distill: train a student."
    )
    model: ModelSpec
    task: TaskSpec
    data: DataSpec = Field(default_factory=DataSpec)
    method: Annotated[MethodSpec, RegisteredSpecs(registry.METHODS)] = Field(
        default_factory=_default_method,
        description="How the model is adapted: a registered method (lora, qlora, head_only, full, ...) and its "
        "settings.",
    )
    formulation: FormulationSpec = Field(default_factory=FormulationSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    distill: DistillSpec | None = Field(None, description="distill jobs: teacher, student and loss weights.")
    output_root: Text = Field("outputs", description="Checkpoints and results go to <output_root>/<experiment>/<run>.")
    repeats: int | None = Field(
        None, ge=1, le=100,
        description="Train this run N times, with seeds training.seed, training.seed+1, ...: one run per seed, named "
        "<run>/seed-<seed>, which reports aggregate (mean and 95% interval; tests between arms).",
    )
    seeds: Annotated[list[int], Field(min_length=1), AfterValidator(_unique)] | None = Field(
        None, description="Or the seeds themselves. Each repeat's seed drives the data order, subset, "
        "initialisation and dropout (training.seed and data.seed).",
    )
    sweep: SweepSpec | None = Field(None, description="Search hyper-parameters: `lora-exp sweep` runs the trials.")

    @model_validator(mode="after")
    def _coherent(self) -> RunSpec:
        if self.repeats is not None and self.seeds is not None:
            raise ValueError("give repeats or seeds, not both")
        if (self.repeats or self.seeds) and self.job == "eval":
            raise ValueError("repeats/seeds: an eval run is deterministic; repeat the runs that train")
        if self.sweep is not None and (self.repeats or self.seeds or self.job != "train"):
            raise ValueError("sweep: a sweep's trials are single train runs (no repeats/seeds, job train)")
        # Checks that need a task's or method's knowledge run in their modules (``check_spec``), called by
        # ``lora_exp.config.loading.check_run`` once the fields themselves are valid.
        if (self.job == "distill") != (self.distill is not None):
            raise ValueError("job 'distill' and the distill section go together")
        if self.job == "distill" and self.training.packing:
            raise ValueError("training.packing: distillation students read padded batches (their teacher's "
                             "logits are per example); set packing: false for distill jobs")
        return self


class ExperimentFile(Strict):
    """The ``experiment`` section of a values file: shared defaults and a matrix of named runs."""

    name: Name = Field(description="Experiment name: MLflow experiment and output folder (letters, digits, "
                       "'.', '_', '-').")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Fields shared by every run (a RunSpec, partial)."
    )
    runs: Annotated[dict[Name, dict[str, Any] | None], Field(min_length=1)] = Field(
        description="Run name -> its fields (a RunSpec, partial), over defaults. At least one run; names are "
        "letters, digits, '.', '_', '-' (they become directory names)."
    )




# Models whose schema embeds a registry, in build order (a model's schema embeds those above it).
_REGISTRY_MODELS: tuple[type[BaseModel], ...] = (TaskSpec, FormulationSpec, RunSpec)


def _rebuild() -> None:
    """A plugin registered after the models were built: rebuild them so its name and spec validate."""
    for model in _REGISTRY_MODELS:
        if model.__pydantic_complete__:
            model.model_rebuild(force=True)


registry.on_change(_rebuild)
