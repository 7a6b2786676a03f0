"""Full fine-tuning: every weight trains; the artifact is the whole model (safetensors)."""

from __future__ import annotations

from typing import Any


def apply(model: Any, spec: Any, task_type: str) -> Any:
    for p in model.parameters():
        p.requires_grad = True
    return model


def save(model: Any, out_dir: str) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def load(load_base: Any, artifact_dir: str) -> Any:
    return load_base(artifact_dir)  # the artifact is a complete model: it replaces the base
