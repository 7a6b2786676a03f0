"""The train job: data (checked) -> tokenizer + formulation -> model + method -> Trainer -> artifact ->
evaluation -> MLflow, for every task, formulation and method (``lora_exp.runtime``)."""

from __future__ import annotations

from lora_exp.config.loading import Run
from lora_exp.runtime.fit import finished_metrics, fit
from lora_exp.runtime.prepare import prepare
from lora_exp.runtime.tracking import probe, run_tracking_uri


def train(run: Run) -> dict[str, float]:
    done = finished_metrics(run)
    if done is not None:
        return done
    probe(run_tracking_uri(run))  # an absent tracking server is known now, not after the model loaded
    return fit(run, prepare(run))
