"""The experiment spec: its schema (``schema``), how values files become runs (``loading``) and its JSON
Schema for the chart (``jsonschema``). Imports only ``lora_exp.core`` and no ML library."""
