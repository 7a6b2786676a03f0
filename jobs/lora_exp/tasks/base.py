"""What a task is. Every task answers the same few questions, so data checks, loading, training and
evaluation are one code path for classification, extractive QA and language modelling:

- where its rows come from (hub id/config, split names) and which columns a row needs;
- ``check_row``: is one row usable (raises ``ValueError`` with the reason; returns a category to count);
- ``normalise``: the loaded split in the shape its formulation expects (e.g. integer labels);
- ``check_spec``: does the spec fit the task (template fields, verbalizers, formulation kind);
- ``formulation``: how rows meet the model and how outputs become metrics (see ``lora_exp.formulation``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Protocol

from lora_exp.errors import SpecError


class Task(Protocol):
    name: str
    kind: str  # "classification" | "qa" | "lm"
    formulations: tuple[str, ...]  # the formulation kinds it supports; the first is the default
    hub_path: str | None
    hub_config: str | None
    train_split: str
    eval_splits: tuple[str, ...]

    @property
    def required_columns(self) -> tuple[str, ...]: ...

    def check_row(self, row: dict[str, Any]) -> str | None: ...

    def normalise(self, ds: Any, split: str) -> Any: ...

    def check_spec(self, spec: Any) -> None: ...

    def formulation(self, spec: Any, tokenizer: Any) -> Any: ...


def template_fields(template: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise SpecError(f"formulation.template: not a valid format string ({e})") from None


def require_formulation(spec: Any, task_name: str, allowed: tuple[str, ...]) -> str:
    """The formulation kind a run uses ('auto' picks the task's first), or a SpecError naming the choices."""
    kind = spec.formulation.kind
    if kind == "auto":
        return allowed[0]
    if kind not in allowed:
        raise SpecError(f"formulation.kind: task {task_name!r} supports {list(allowed)}, not {kind!r}")
    return kind


@dataclass(frozen=True)
class ClassificationTask:
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
    formulations: tuple[str, ...] = ("classifier", "verbalizer")
    kind: str = field(default="classification", init=False)

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

        from lora_exp.errors import DataError

        values = ds[self.label_field]
        ids = [self.label_to_id(v) for v in values]
        if None in ids:
            row = ids.index(None)
            raise DataError(f"split {split!r}: row {row}: label {values[row]!r} is not in the label set "
                            f"{list(self.labels)}")
        ds = ds.select_columns(list(self.text_fields)).add_column("label", ids)
        return ds.cast_column("label", datasets.Value("int64"))

    def check_spec(self, spec: Any) -> None:
        require_formulation(spec, self.name, self.formulations)
        template = spec.formulation.template or self.template
        unknown = sorted(n for n in template_fields(template) if n not in self.text_fields)
        if unknown:
            raise SpecError(f"formulation.template: unknown field(s) {unknown}; the task's text fields are "
                            f"{list(self.text_fields)}")
        if spec.formulation.verbalizers is not None:
            missing = [lab for lab in self.labels if lab not in spec.formulation.verbalizers]
            extra = [lab for lab in spec.formulation.verbalizers if lab not in self.labels]
            if missing or extra:
                raise SpecError(
                    f"formulation.verbalizers: must map exactly the labels {list(self.labels)}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unknown {extra}" if extra else "")
                )

    def formulation(self, spec: Any, tokenizer: Any) -> Any:
        from lora_exp.formulation import Classifier, Verbalizer

        template = spec.formulation.template or self.template
        kind = require_formulation(spec, self.name, self.formulations)
        if kind == "classifier":
            return Classifier(self, tokenizer, template, spec.model.max_length)
        words = spec.formulation.verbalizers or {label: " " + label for label in self.labels}
        suffix = self.prompt_suffix if spec.formulation.prompt_suffix is None else spec.formulation.prompt_suffix
        return Verbalizer(self, tokenizer, template, spec.model.max_length, words, suffix)
