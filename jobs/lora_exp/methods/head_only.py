"""Head-only: train just the task head; the artifact is the head's tensors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError
from lora_exp.methods.base import LoadBase, Method, TrainableRule, register_method

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

HEAD_NAMES = ("score", "classifier", "qa_outputs")  # what transformers calls the task heads
HEAD_FILE = "head.safetensors"


class HeadOnlySpec(MethodSpec):
    """Train only the task head; every pretrained weight stays frozen."""

    name: Literal["head_only"]


def head_parameters(model: Any) -> dict[str, Any]:
    params = {n: p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_NAMES}
    if not params:
        raise SpecError(f"method head_only: {type(model).__name__} has no task head named {HEAD_NAMES}")
    return params


class HeadOnly(Method):
    name: ClassVar[str] = "head_only"
    spec: ClassVar[type[MethodSpec]] = HeadOnlySpec
    label: ClassVar[str] = "head only"
    report_order: ClassVar[int] = 10
    needs_head: ClassVar[bool] = True

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        head = head_parameters(model)
        for name, p in model.named_parameters():
            p.requires_grad = name in head
        return model

    def save(self, trainer: Any, out_dir: str) -> None:
        from safetensors.torch import save_file

        if trainer.is_world_process_zero():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            model = trainer.accelerator.unwrap_model(trainer.model)
            save_file({n: p.detach().cpu().contiguous() for n, p in head_parameters(model).items()},
                      str(Path(out_dir) / HEAD_FILE))

    def load(self, load_base: LoadBase, artifact_dir: str) -> Any:
        from safetensors.torch import load_file

        base = load_base(None)
        state = load_file(str(Path(artifact_dir) / HEAD_FILE))
        names = {n for n, _ in base.named_parameters()}
        unexpected = sorted(set(state) - names)
        if unexpected:
            raise SpecError(f"{artifact_dir}: head tensors {unexpected} do not fit the base model")
        base.load_state_dict(state, strict=False)
        return base

    def trainable_rule(self, model: Any) -> TrainableRule:
        head = set(head_parameters(model))
        return TrainableRule("the task head", head.__contains__, head.__contains__)


register_method(HeadOnly())
