"""Full fine-tuning: every weight trains; the artifact is the whole model (safetensors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lora_exp.config.schema import MethodSpec
from lora_exp.methods.base import LoadBase, Method, TrainableRule, register_method

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class FullSpec(MethodSpec):
    """Update every weight."""

    name: Literal["full"]


class Full(Method):
    name: ClassVar[str] = "full"
    spec: ClassVar[type[MethodSpec]] = FullSpec
    label: ClassVar[str] = "full"
    report_order: ClassVar[int] = 40
    fsdp: ClassVar[bool] = True

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        for p in model.parameters():
            p.requires_grad = True
        return model

    def save(self, trainer: Any, out_dir: str) -> None:
        # save_model consolidates ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save) and writes
        # safetensors plus the tokenizer: a standalone model.
        trainer.save_model(out_dir)

    def load(self, load_base: LoadBase, artifact_dir: str) -> Any:
        return load_base(artifact_dir)  # the artifact is a complete model: it replaces the base

    def trainable_rule(self, model: Any) -> TrainableRule:
        return TrainableRule("every weight", lambda n: True, lambda n: True)


register_method(Full())
