"""IA³ through PEFT (Liu et al., 2022): learned vectors that rescale the keys, values and the feed-forward
activations; far fewer trainable parameters than LoRA (one per channel). The artifact is the adapter alone,
saved and reloaded as LoRA's is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError
from lora_exp.methods.base import register_method
from lora_exp.methods.tuner import PeftTuner

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class IA3Spec(MethodSpec):
    """IA³ vectors (PEFT) on the attention's keys and values and the feed-forward output."""

    name: Literal["ia3"]
    target_modules: list[str] | None = Field(
        None, description="Modules rescaled. Default: PEFT's per architecture (GPT-2 c_attn and mlp.c_proj; Llama "
        "k_proj, v_proj, down_proj).")
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward (their input is rescaled, not their output). "
        "Default: PEFT's per architecture.")


class IA3(PeftTuner):
    """Learned rescaling vectors; PEFT's own targets per architecture unless the spec names them."""

    name: ClassVar[str] = "ia3"
    spec: ClassVar[type[MethodSpec]] = IA3Spec
    label: ClassVar[str] = "IA³"
    report_order: ClassVar[int] = 25
    marker: ClassVar[str] = "ia3_l"

    def check_spec(self, spec: RunSpec) -> None:
        super().check_spec(spec)
        m = cast(IA3Spec, spec.method)
        if m.feedforward_modules and not m.target_modules:
            raise SpecError("method.feedforward_modules: give target_modules too (they must include these)")
        if m.feedforward_modules and not set(m.feedforward_modules) <= set(m.target_modules or ()):
            raise SpecError("method.feedforward_modules: every one must be among method.target_modules")

    def peft_config(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import IA3Config

        m = cast(IA3Spec, spec.method)
        return IA3Config(task_type=task_type, target_modules=m.target_modules,
                         feedforward_modules=m.feedforward_modules, fan_in_fan_out=model.config.model_type == "gpt2")


register_method(IA3())
