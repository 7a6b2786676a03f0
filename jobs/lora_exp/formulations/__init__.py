"""Formulations: classifier, verbalizer, span (QA) and causal_lm, one module each, registered by kind."""

from lora_exp.formulations.base import (
    Formulation,
    FormulationType,
    build_formulation,
    check_early_stopping,
    formulation_type,
    map_batches,
    register_formulation,
)

__all__ = ["Formulation", "FormulationType", "build_formulation", "check_early_stopping", "formulation_type",
           "map_batches", "register_formulation"]


def _import_modules() -> None:
    """Every module of this package, each of which registers its plugins (adding one edits nothing else)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
        importlib.import_module(module.name)


_import_modules()
