"""``custom``: a classification task defined by the spec alone (text fields, labels, local files): no code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_exp.core.errors import SpecError
from lora_exp.tasks.base import ClassificationTask, check_formulation, register_task, with_eval_splits

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class CustomTask:
    name = "custom"
    kind = "classification"

    def for_run(self, spec: RunSpec) -> ClassificationTask:
        t = spec.task
        fields = tuple(t.text_fields or ())
        task = ClassificationTask(
            name=self.name,
            text_fields=fields,
            labels=tuple(t.labels or ()),
            label_field=t.label_field or "label",
            template="\n".join(f"{f}: {{{f}}}" for f in fields) if len(fields) > 1 else f"{{{fields[0]}}}",
            prompt_suffix="\nLabel:",
            eval_splits=("validation",),
        )
        return with_eval_splits(task, spec)  # type: ignore[no-any-return]

    def check_spec(self, spec: RunSpec) -> None:
        if not (spec.task.text_fields and spec.task.labels):
            raise SpecError("task 'custom' needs task.text_fields and task.labels")
        if not spec.data.data_files and not spec.data.hub_path:
            raise SpecError("task 'custom' needs data.data_files (or data.hub_path)")
        check_formulation(spec, self.for_run(spec))


register_task(CustomTask())
