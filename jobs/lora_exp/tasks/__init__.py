"""Task registry: a task is a small module (load, format, metrics); adding one is a new file and one line here.

``custom`` tasks are built from the spec alone (local files, text fields, labels): no code change.
"""

from __future__ import annotations

from lora_exp.errors import SpecError
from lora_exp.spec import RunSpec
from lora_exp.tasks.base import ClassificationTask, Task
from lora_exp.tasks.glue import COLA, MNLI, MRPC, RTE, SST2
from lora_exp.tasks.imdb import IMDB
from lora_exp.tasks.squad_v2 import SQUAD_V2
from lora_exp.tasks.wikitext import WIKITEXT

REGISTRY: dict[str, Task] = {t.name: t for t in (MNLI, MRPC, SST2, RTE, COLA, IMDB, SQUAD_V2, WIKITEXT)}


def _custom(spec: RunSpec) -> ClassificationTask:
    t = spec.task
    fields = tuple(t.text_fields or ())
    return ClassificationTask(
        name="custom",
        text_fields=fields,
        labels=tuple(t.labels or ()),
        label_field=t.label_field or "label",
        template="\n".join(f"{f}: {{{f}}}" for f in fields) if len(fields) > 1 else f"{{{fields[0]}}}",
        prompt_suffix="\nLabel:",
        eval_splits=("validation",),
    )


def get_task(spec: RunSpec) -> Task:
    """The task of a run, with the spec's overrides (eval splits, custom fields) applied."""
    name = spec.task.name
    if name == "custom":
        task = _custom(spec)
    elif name in REGISTRY:
        task = REGISTRY[name]
        if spec.task.text_fields or spec.task.labels or spec.task.label_field is not None:
            raise SpecError(
                f"task.{'text_fields' if spec.task.text_fields else 'labels'}: only task 'custom' takes these; "
                f"'{name}' defines its own"
            )
    else:
        raise SpecError(f"task.name: unknown task {name!r}; known: {', '.join([*REGISTRY, 'custom'])}")
    if spec.task.eval_splits:
        from dataclasses import replace

        task = replace(task, eval_splits=tuple(spec.task.eval_splits))
    return task
