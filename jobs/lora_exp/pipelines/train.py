"""The train job: data (checked) -> tokenizer + formulation -> model + method -> Trainer -> artifact ->
evaluation -> MLflow, for every task, formulation and method (``lora_exp.runtime``)."""

from __future__ import annotations

from lora_exp.config.loading import Run
from lora_exp.runtime.fit import train_run
from lora_exp.runtime.prepare import prepare


def train(run: Run) -> dict[str, float]:
    return train_run(run, prepare)
