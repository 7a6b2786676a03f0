"""Full fine-tuning: every weight trains; the artifact is the whole model (safetensors)."""

from __future__ import annotations

from typing import Any


def load_kwargs(spec: Any) -> dict[str, Any]:
    return {}  # the base loads as it is


def apply(model: Any, spec: Any, task_type: str) -> Any:
    for p in model.parameters():
        p.requires_grad = True
    return model


def save(trainer: Any, out_dir: str) -> None:
    # save_model consolidates ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save) and writes
    # safetensors plus the tokenizer: a standalone model.
    trainer.save_model(out_dir)


def load(load_base: Any, artifact_dir: str) -> Any:
    return load_base(artifact_dir)  # the artifact is a complete model: it replaces the base
