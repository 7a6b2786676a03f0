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
