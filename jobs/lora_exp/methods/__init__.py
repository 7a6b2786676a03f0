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
