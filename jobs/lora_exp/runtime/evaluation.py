"""The final evaluation every job ends with: each eval split predicted, written and logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_exp.formulations import Formulation
from lora_exp.runtime.tracking import Tracker
from lora_exp.runtime.trainer import ready_for_inference

log = logging.getLogger(__name__)


def import_reporting_libraries() -> None:
    """Import what the final evaluation's outputs need (scikit-learn's metrics, matplotlib) while the job
    starts, beside the model libraries: imported at the first evaluation instead, they were most of a short
    evaluation's time on the GPU machine (seconds of a cold import against a forward pass in milliseconds)."""
    import matplotlib.figure  # noqa: F401
    import sklearn.metrics  # noqa: F401


def evaluate_splits(trainer: Any, form: Formulation, evals_raw: dict[str, Any], out_dir: Path,
                    tracker: Tracker) -> dict[str, float]:
    """Evaluate every eval split; log metrics and the split's output files.

    Metric names are ``<split>_<metric>`` in every job, so baseline, trained and re-evaluated runs line
    up column by column in the MLflow UI.
    """
    flat: dict[str, float] = {}
    done = ready_for_inference(trainer)
    if done and trainer.is_world_process_zero():
        log.info("final evaluation: %s", "; ".join(done))
    trainer.args.prediction_loss_only = False  # in-training evaluation may be loss-only; this one is not
    # Predictions come back in the rows' order (LoraExpTrainer's evaluation sampler is sequential), so each
    # is matched to its row (predictions.csv, SQuAD answers per question id).
    for split, raw in evals_raw.items():
        if trainer.is_world_process_zero():
            log.info("final evaluation: %s (%d rows)", split, len(raw))
        metrics = form.evaluate(trainer, raw, split, out_dir / split)
        if not trainer.is_world_process_zero():
            continue
        log.info("%s: %s", split, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                           if isinstance(v, float) and not k.endswith("samples")))
        named = {f"{split}_{k}": v for k, v in metrics.items()}
        tracker.log_metrics(named)
        tracker.log_artifacts(out_dir / split, f"eval/{split}")
        flat.update(named)
    return flat
