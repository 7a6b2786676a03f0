"""The training engine every job runs on: data loading and checks (``data``, ``preflight``), tokenizers and
models (``models``), the Trainer set-up (``trainer``, ``callbacks``, ``process``, ``memory``), the one training
path (``prepare`` -> ``fit``), the final evaluation (``evaluation``), artifacts and distillation students.
Imports planning, tracking and the plugin layers below it; pipelines compose it."""
