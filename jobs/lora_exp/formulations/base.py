"""What a formulation is: how a task's rows meet the model, and how the model's output becomes metrics.

A formulation module defines a class and registers it (:func:`register_formulation`); the class says which
task kinds it serves, whether the model it trains has a task head (head-only training needs one), and
builds itself for a run (``build``). Tasks never build formulations: the training path asks
:func:`build_formulation` for the run's, which reads ``formulation.kind`` (``auto``: the task's natural one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

from lora_exp.core import registry
from lora_exp.core.errors import SpecError
from lora_exp.tasks import Task, formulation_kind

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

_F = TypeVar("_F", bound=type)


# (model, inputs, num_items_in_batch) -> (loss, per-example scores): a formulation's own forward and loss, used by the
# Trainer in place of ``model(**inputs).loss`` where the plain forward would compute more than is scored.
Scorer = Callable[[Any, dict[str, Any], Any], tuple[Any, Any]]


class Formulation(Protocol):
    """What the one training path needs from a run's formulation."""

    kind: ClassVar[str]
    model_class: ClassVar[str]  # the transformers Auto class that loads the base model
    peft_task_type: ClassVar[str]  # PEFT's TaskType for LoRA
    prediction_loss_only: ClassVar[bool]  # in-training evaluation reports only the loss (QA, LM)
    # The training loss is normalised by the Trainer's item count (num_items_in_batch) across processes and
    # accumulation steps. False where it is a mean of its own batch whatever it is given (transformers'
    # sequence-classification heads): the Trainer then must neither scale it by the process count nor skip
    # dividing it by the accumulation steps, or losses and gradients grow with both.
    loss_counts_items: ClassVar[bool]

    def tokenize(self, ds: Any) -> Any:
        """Model inputs (with ``labels``) for training and in-training evaluation."""

    def collator(self) -> Any: ...

    def preprocess_logits(self, logits: Any, labels: Any) -> Any: ...

    def scorer(self, packed: bool) -> Scorer | None:
        """The formulation's own loss-and-scores forward for a batch (``packed``: padding-free, one row), or
        None where the model's own forward and loss are right."""

    def packing_collator(self) -> Any:
        """The training collator for padding-free batches (``training.packing``)."""

    def compute_metrics(self, p: Any) -> dict[str, float]: ...

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        """Final evaluation of one split: predict (on every rank), write outputs (rank 0), return metrics."""


class FormulationType(Protocol):
    """A registered formulation class."""

    kind: ClassVar[str]
    task_kinds: ClassVar[tuple[str, ...]]
    has_head: ClassVar[bool]  # the model has a task head of its own (head-only training needs one)
    model_class: ClassVar[str]  # the transformers Auto class that loads the base model
    peft_task_type: ClassVar[str]  # PEFT's TaskType for LoRA

    @classmethod
    def build(cls, task: Any, spec: RunSpec, tokenizer: Any) -> Formulation: ...

    @classmethod
    def check_spec(cls, spec: RunSpec, task: Any) -> None:
        """Raise SpecError when the spec's formulation settings do not fit the task (run at spec resolution)."""

    @classmethod
    def training_metrics(cls, task: Any) -> tuple[str, ...]:
        """The metrics in-training evaluation reports (``eval_<name>``): what early stopping may watch."""

    @classmethod
    def final_metrics(cls, task: Any) -> tuple[str, ...]:
        """The metrics the final evaluation reports per split (``<split>_<name>``): what a sweep may optimise."""

    @classmethod
    def memory_probe(cls, model: Any, batch: int, length: int) -> Any:
        """The training loss of a full batch (``batch`` rows of ``length`` tokens) computed as training computes
        it, on whatever device ``model`` is (the memory plan runs it on the meta device to see what autograd
        keeps)."""


def check_early_stopping(spec: RunSpec, kind: str, metrics: tuple[str, ...]) -> None:
    es = spec.training.early_stopping
    if es is not None and es.metric not in metrics:
        raise SpecError(f"training.early_stopping.metric: {es.metric!r} is not computed during training by "
                        f"formulation {kind!r}; choose one of {list(metrics)}")
    if es is not None and es.metric == "loss" and es.greater_is_better:
        raise SpecError("training.early_stopping.greater_is_better: the loss improves as it falls; set it to false")


def check_sweep_metric(spec: RunSpec, task: Any, kind: str, metrics: tuple[str, ...]) -> None:
    """A sweep optimises a metric the final evaluation reports: ``<eval split>_<metric>``."""
    if spec.sweep is None:
        return
    name = spec.sweep.metric
    splits = sorted(task.eval_splits, key=len, reverse=True)
    split = next((s for s in splits if name.startswith(s + "_")), None)
    if split is None or name[len(split) + 1:] not in metrics:
        choices = [f"{s}_{m}" for s in task.eval_splits for m in metrics]
        raise SpecError(f"sweep.metric: {name!r} is not reported by formulation {kind!r} on this task; choose one of "
                        f"{choices[:12]}")


def register_formulation(cls: _F) -> _F:
    """Class decorator: make a formulation known by its ``kind``."""
    registry.FORMULATIONS.register(cls.kind, cls)  # type: ignore[attr-defined]
    return cls


def formulation_type(spec: RunSpec, task: Task) -> FormulationType:
    return cast(FormulationType, registry.FORMULATIONS.get(formulation_kind(spec, task)))


def build_formulation(spec: RunSpec, task: Task, tokenizer: Any) -> Formulation:
    """The run's formulation: ``formulation.kind``, or the task's natural one for ``auto``."""
    return formulation_type(spec, task).build(task, spec, tokenizer)


def probe_ids(model: Any, batch: int, length: int) -> Any:
    """Token ids of a memory probe's batch, on the model's device (values do not matter on the meta device)."""
    import torch

    return torch.zeros(batch, length, dtype=torch.long, device=model.device)


def flattening_collator() -> Any:
    """Padding-free batches: a batch's examples concatenated into one row, ``position_ids`` restarting at each
    (attention stays within an example: transformers derives the block mask from them for sdpa and eager, and
    the sequence boundaries for flash attention); the first label of each example is masked, so no example
    predicts from its predecessor."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=False)


def map_batches(ds: Any, fn: Callable[[dict[str, list[Any]]], dict[str, list[Any]]], desc: str) -> Any:
    """Tokenize once; ``datasets`` caches the result on disk, keyed by the data's and the function's fingerprints."""
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc)


class NoTrainingMetrics:
    """For formulations whose metrics need whole examples (QA spans, LM generations): in-training evaluation
    reports the loss only; the metrics come from ``evaluate`` at the end."""

    kind: ClassVar[str]
    prediction_loss_only: ClassVar[bool] = True
    loss_counts_items: ClassVar[bool] = True

    @classmethod
    def training_metrics(cls, task: Any) -> tuple[str, ...]:
        return ("loss",)

    @classmethod
    def final_metrics(cls, task: Any) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def check_spec(cls, spec: RunSpec, task: Any) -> None:
        check_early_stopping(spec, cls.kind, cls.training_metrics(task))
        check_sweep_metric(spec, task, cls.kind, cls.final_metrics(task))

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        return logits

    def scorer(self, packed: bool) -> Scorer | None:
        return None

    def packing_collator(self) -> Any:
        return flattening_collator()

    def compute_metrics(self, p: Any) -> dict[str, float]:
        return {}
