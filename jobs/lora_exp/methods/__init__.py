"""Method registry: a method says which parameters train and what artifact a run keeps.

Every method goes through the same training path (``lora_exp.train``); adding one is a new module with
``apply``/``save``/``load`` and a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from lora_exp.methods import full, head_only, lora, qlora
from lora_exp.spec import RunSpec


class Method(Protocol):
    def load_kwargs(self, spec: RunSpec) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for the base (e.g. QLoRA's 4-bit quantization config)."""
    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        """Freeze/wrap the base model so exactly the method's parameters train."""

    def save(self, trainer: Any, out_dir: str) -> None:
        """Write the run's artifact: only what the method trained (adapter, head, or the full model).
        Called on every rank: ``trainer.save_model`` gathers ZeRO-3 shards and writes on rank 0."""

    def load(self, load_base: Callable[[str | None], Any], artifact_dir: str) -> Any:
        """Rebuild the trained model from the artifact; ``load_base(None)`` loads the spec's base model,
        ``load_base(path)`` a model saved at ``path``."""


METHODS: dict[str, Method] = {"lora": lora, "qlora": qlora, "head_only": head_only, "full": full}  # type: ignore[dict-item]


def get_method(name: str) -> Method:
    return METHODS[name]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
