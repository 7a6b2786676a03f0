"""Tasks: each module defines its task(s) and registers them (``register_task``); nothing else changes to
add one. ``custom`` tasks are built from the spec alone (local files, text fields, labels): no code."""

from lora_exp.tasks.base import (
    CLASSIFICATION,
    LM,
    QA,
    ClassificationTask,
    Task,
    formulation_kind,
    formulations_for,
    get_task,
    register_task,
    task_names,
)

__all__ = ["CLASSIFICATION", "LM", "QA", "ClassificationTask", "Task", "formulation_kind", "formulations_for",
           "get_task", "register_task", "task_names"]


def _import_modules() -> None:
    """Every module of this package, each of which registers its plugins (adding one edits nothing else)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
        importlib.import_module(module.name)


_import_modules()
