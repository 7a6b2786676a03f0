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
from lora_exp.tasks import Task, formulation_kind

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

_F = TypeVar("_F", bound=type)


class Formulation(Protocol):
    """What the one training path needs from a run's formulation."""

    kind: ClassVar[str]
    model_class: ClassVar[str]  # the transformers Auto class that loads the base model
    peft_task_type: ClassVar[str]  # PEFT's TaskType for LoRA
    prediction_loss_only: ClassVar[bool]  # in-training evaluation reports only the loss (QA, LM)

    def tokenize(self, ds: Any) -> Any:
        """Model inputs (with ``labels``) for training and in-training evaluation."""

    def collator(self) -> Any: ...

    def preprocess_logits(self, logits: Any, labels: Any) -> Any: ...

    def compute_metrics(self, p: Any) -> dict[str, float]: ...

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        """Final evaluation of one split: predict (on every rank), write outputs (rank 0), return metrics."""


class FormulationType(Protocol):
    """A registered formulation class."""

    kind: ClassVar[str]
    task_kinds: ClassVar[tuple[str, ...]]
    has_head: ClassVar[bool]  # the model has a task head of its own (head-only training needs one)

    @classmethod
    def build(cls, task: Any, spec: RunSpec, tokenizer: Any) -> Formulation: ...


def register_formulation(cls: _F) -> _F:
    """Class decorator: make a formulation known by its ``kind``."""
    registry.FORMULATIONS.register(cls.kind, cls)  # type: ignore[attr-defined]
    return cls


def formulation_type(spec: RunSpec, task: Task) -> FormulationType:
    return cast(FormulationType, registry.FORMULATIONS.get(formulation_kind(spec, task)))


def build_formulation(spec: RunSpec, task: Task, tokenizer: Any) -> Formulation:
    """The run's formulation: ``formulation.kind``, or the task's natural one for ``auto``."""
    return formulation_type(spec, task).build(task, spec, tokenizer)


def map_batches(ds: Any, fn: Callable[[dict[str, list[Any]]], dict[str, list[Any]]], desc: str) -> Any:
    """Tokenize once; ``datasets`` caches the result on disk, keyed by the data's and the function's fingerprints."""
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc)


class NoTrainingMetrics:
    """For formulations whose metrics need whole examples (QA spans, LM generations): in-training evaluation
    reports the loss only; the metrics come from ``evaluate`` at the end."""

    prediction_loss_only: ClassVar[bool] = True

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        return logits

    def compute_metrics(self, p: Any) -> dict[str, float]:
        return {}
