"""LoHa through PEFT (LyCORIS; Hyeon-Woo et al., 2022): the weight update as the Hadamard product of two
low-rank products, a higher effective rank for LoRA's parameter count; the artifact is the adapter alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from lora_exp.config.schema import MethodSpec
from lora_exp.methods.base import register_method
from lora_exp.methods.tuner import LycorisSpec, PeftTuner, lycoris_kwargs

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class LoHaSpec(LycorisSpec):
    """LoHa adapters (PEFT): a Hadamard product of two low-rank updates per adapted layer."""

    name: Literal["loha"]


class LoHa(PeftTuner):
    name: ClassVar[str] = "loha"
    spec: ClassVar[type[MethodSpec]] = LoHaSpec
    label: ClassVar[str] = "LoHa"
    report_order: ClassVar[int] = 27
    adapts_conv1d: ClassVar[bool] = False
    marker: ClassVar[str] = "hada_"

    def peft_config(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import LoHaConfig

        m = cast(LoHaSpec, spec.method)
        return LoHaConfig(task_type=task_type, **lycoris_kwargs(model, m))


register_method(LoHa())
