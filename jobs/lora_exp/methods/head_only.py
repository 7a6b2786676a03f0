"""Head-only: train just the classification head; the artifact is the head's tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEAD_NAMES = ("score", "classifier")  # what transformers calls the sequence-classification head
HEAD_FILE = "head.safetensors"


def head_parameters(model: Any) -> dict[str, Any]:
    params = {n: p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_NAMES}
    if not params:
        raise ValueError(f"{type(model).__name__} has no classification head named {HEAD_NAMES}")
    return params


def load_kwargs(spec: Any) -> dict[str, Any]:
    return {}  # the base loads as it is


def apply(model: Any, spec: Any, task_type: str) -> Any:
    head = head_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad = name in head
    return model


def save(trainer: Any, out_dir: str) -> None:
    from safetensors.torch import save_file

    if trainer.is_world_process_zero():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_file({n: p.detach().cpu().contiguous() for n, p in head_parameters(model).items()},
                  str(Path(out_dir) / HEAD_FILE))


def load(load_base: Any, artifact_dir: str) -> Any:
    from safetensors.torch import load_file

    base = load_base(None)
    state = load_file(str(Path(artifact_dir) / HEAD_FILE))
    missing, unexpected = base.load_state_dict(state, strict=False)
    if unexpected or set(state) - {n for n, _ in base.named_parameters()}:
        raise ValueError(f"{artifact_dir}: head tensors {unexpected} do not fit the base model")
    return base
