"""What a task is. Every task answers the same few questions, so data checks, loading, training and
evaluation are one code path for classification, extractive QA and language modelling:

- where its rows come from (hub id/config, split names) and which columns a row needs;
- ``check_row``: is one row usable (raises ``ValueError`` with the reason; returns a category to count);
- ``normalise``: the loaded split in the shape its formulations expect (e.g. integer labels);
- ``check_spec``: does the spec fit the task (fields, template, formulation kind);
- ``for_run``: the task with a run's overrides applied (eval splits; a custom task's fields).

A task module builds its task object(s) and calls :func:`register_task`. Which formulations serve a task
is the formulations' business (each declares the task kinds it serves, ``lora_exp.formulations``); a task
only names its natural one (``default_formulation``), used when ``formulation.kind`` is ``auto``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from lora_exp.core import registry
from lora_exp.core.errors import DataError, SpecError
from lora_exp.metrics.classification import classification_scores

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

_T = TypeVar("_T")
CLASSIFICATION, QA, LM = "classification", "qa", "lm"  # task kinds


class Task(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str:
        """CLASSIFICATION, QA or LM: which formulations can serve it."""

    @property
    def default_formulation(self) -> str: ...

    @property
    def hub_path(self) -> str | None: ...

    @property
    def hub_config(self) -> str | None: ...

    @property
    def train_split(self) -> str: ...

    @property
    def eval_splits(self) -> tuple[str, ...]: ...

    @property
    def required_columns(self) -> tuple[str, ...]: ...

    def check_row(self, row: dict[str, Any]) -> str | None: ...

    def normalise(self, ds: Any, split: str) -> Any: ...

    def check_spec(self, spec: RunSpec) -> None: ...

    def for_run(self, spec: RunSpec) -> Task: ...


class _ServesKinds(Protocol):
    task_kinds: tuple[str, ...]

    def check_spec(self, spec: RunSpec, task: Any) -> None: ...


def register_task(task: _T) -> _T:
    """Make ``task`` known by its name (to the spec's ``task.name`` enum, validate and every job)."""
    registry.TASKS.register(task.name, task)  # type: ignore[attr-defined]
    return task


def get_task(spec: RunSpec) -> Task:
    """The task of a run, with the run's overrides (eval splits, custom fields) applied."""
    return cast(Task, registry.TASKS.get(spec.task.name)).for_run(spec)


def task_names() -> list[str]:
    return registry.TASKS.names()


def formulations_for(kind: str) -> list[str]:
    """The registered formulations that serve tasks of ``kind``."""
    return [n for n, f in registry.FORMULATIONS.items() if kind in cast(_ServesKinds, f).task_kinds]


def formulation_kind(spec: RunSpec, task: Task) -> str:
    """The formulation a run uses ('auto': the task's natural one), or a SpecError naming the choices."""
    kind = spec.formulation.kind
    if kind == "auto":
        return task.default_formulation
    allowed = formulations_for(task.kind)
    if kind not in allowed:
        raise SpecError(f"formulation.kind: task {task.name!r} supports {allowed}, not {kind!r}")
    return kind


def check_formulation(spec: RunSpec, task: Task) -> str:
    """The run's formulation serves the task, and the formulation's own settings fit it; returns its kind."""
    kind = formulation_kind(spec, task)
    cast(_ServesKinds, registry.FORMULATIONS.get(kind)).check_spec(spec, task)
    return kind


def check_template(template: str, fields: tuple[str, ...]) -> None:
    """A template must name at least one of the text fields, only those, and format cleanly."""
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise SpecError(f"formulation.template: not a valid format string ({e})") from None
    if any(not f or f.isdigit() for f in used):
        raise SpecError("formulation.template: positional fields ({} or {0}) have nothing to fill them; name the "
                        f"text fields, e.g. {{{fields[0]}}}")
    unknown = sorted({f.split(".")[0].split("[")[0] for f in used} - set(fields))
    if unknown:
        raise SpecError(f"formulation.template: unknown field(s) {unknown}; the task's text fields are {list(fields)}")
    if not used:
        raise SpecError(f"formulation.template: {template!r} uses no text field, so every row would read the same; "
                        f"include at least one of {['{' + f + '}' for f in fields]}")
    try:
        template.format(**dict.fromkeys(fields, "text"))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise SpecError(f"formulation.template: {template!r} does not format ({type(e).__name__}: {e})") from None


def reject_custom_fields(spec: RunSpec) -> None:
    """text_fields / labels / label_field define a custom task; a registered task has its own."""
    t = spec.task
    given = [k for k in ("text_fields", "labels", "label_field") if getattr(t, k) is not None]
    if given:
        raise SpecError(f"task.{given[0]}: only task 'custom' takes these; '{t.name}' defines its own")


def with_eval_splits(task: Any, spec: RunSpec) -> Any:
    return replace(task, eval_splits=tuple(spec.task.eval_splits)) if spec.task.eval_splits else task


class TaskChecks:
    """What a registered task checks and binds for a run: no custom-task fields, a fitting formulation, the
    run's eval splits. (A dataclass task mixes it in; ``custom`` builds its task from the spec instead.)"""

    def for_run(self, spec: RunSpec) -> Any:
        return with_eval_splits(self, spec)

    def check_spec(self, spec: RunSpec) -> None:
        reject_custom_fields(spec)
        check_formulation(spec, self.for_run(spec))


@dataclass(frozen=True)
class ClassificationTask(TaskChecks):
    """A sentence(-pair) classification task.

    ``template`` renders a row's text fields into the model's input. The classifier formulation reads
    the rendered text; the verbalizer formulation appends ``prompt_suffix`` and scores each label word.
    """

    name: str
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]
    template: str
    prompt_suffix: str
    label_field: str = "label"
    hub_path: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    metrics: tuple[str, ...] = ("accuracy", "f1_macro")
    # Binary tasks whose papers report F1 of the positive class (MRPC) name it here.
    positive_label: str | None = None
    default_formulation: str = "classifier"
    kind: str = field(default=CLASSIFICATION, init=False)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (*self.text_fields, self.label_field)

    def label_to_id(self, value: Any) -> int | None:
        """A label given as its name or as its 0-based index; None if it is neither."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int) and 0 <= value < self.num_labels:
            return value
        if isinstance(value, str):
            if value in self.labels:
                return self.labels.index(value)
            if value.strip().lstrip("-").isdigit():
                return self.label_to_id(int(value))
        return None

    def check_row(self, row: dict[str, Any]) -> str:
        label = self.label_to_id(row[self.label_field])
        if label is None:
            raise ValueError(f"column {self.label_field!r}: label {row[self.label_field]!r} is not in the label set "
                             f"{list(self.labels)} (names or 0-based indices)")
        for f in self.text_fields:
            if not isinstance(row[f], str):
                raise ValueError(f"column {f!r}: expected text, got {row[f]!r}")
        return self.labels[label]

    def normalise(self, ds: Any, split: str) -> Any:
        import datasets

        values = ds[self.label_field]
        ids = [self.label_to_id(v) for v in values]
        if None in ids:
            row = ids.index(None)
            raise DataError(f"split {split!r}: row {row}: label {values[row]!r} is not in the label set "
                            f"{list(self.labels)}")
        ds = ds.select_columns(list(self.text_fields)).add_column("label", ids)
        return ds.cast_column("label", datasets.Value("int64"))

    def score(self, gold: Any, pred: Any) -> dict[str, float]:
        """The task's metrics of predicted against gold label ids."""
        positive = self.labels.index(self.positive_label) if self.positive_label else 1
        return classification_scores(self.metrics, self.num_labels, positive, gold, pred)

    def for_run(self, spec: RunSpec) -> ClassificationTask:
        return cast(ClassificationTask, with_eval_splits(self, spec))
