"""Methods: lora, qlora, head_only, full, one module each, registered by name (``register_method``)."""

from lora_exp.methods.base import (
    LoadBase,
    Method,
    TrainableRule,
    count_parameters,
    get_method,
    method_names,
    register_method,
)

__all__ = ["LoadBase", "Method", "TrainableRule", "count_parameters", "get_method", "method_names",
           "register_method"]


def _import_modules() -> None:
    """Every module of this package, each of which registers its plugins (adding one edits nothing else)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
        importlib.import_module(module.name)


_import_modules()
