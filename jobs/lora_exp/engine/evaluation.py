"""The final evaluation every job ends with: each eval split predicted, written and logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lora_exp.formulations import Formulation
from lora_exp.methods.weights import precast_frozen_weights
from lora_exp.tracking.spool import Tracker

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


def ready_for_inference(trainer: Any) -> list[str]:
    """Before the final evaluation: the model as a plain forward. LoRA adapters are merged into the weights
    they adapt (PEFT's ``merge_and_unload``; not for 4-bit bases, whose re-quantization would change them),
    so evaluation runs the base model's operations alone; every weight is frozen and the matmul weights are
    stored in the autocast dtype (:func:`precast_frozen_weights`, bit-identical to autocast's own casts).
    On a GPU the forward of a batch is bound by the host's per-operation cost, which this roughly halves for
    LoRA. Eval jobs do the same, so a train run's final evaluation and an eval job of its artifact agree.
    Not under DeepSpeed or FSDP (their weights are partitioned). Returns what was done."""
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return []
    done = []
    model = trainer.model
    if merge_lora(model):
        done.append("LoRA adapters merged")
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    for param in model.parameters():
        param.requires_grad_(False)
    if dtype is not None and precast_frozen_weights(model, dtype):
        done.append(f"matmul weights stored in {str(dtype).removeprefix('torch.')}")
    return done


def merge_lora(model: Any) -> bool:
    """Merge a PEFT LoRA model's adapters into its (unquantized) base weights, in place."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer, LoraModel
    except ImportError:
        return False
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, LoraModel):
        return False
    if not any(isinstance(m, LoraLayer) for m in model.modules()):  # merged already
        return False
    base = model.base_model.model
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return False
    model.base_model.merge_and_unload()
    return True
