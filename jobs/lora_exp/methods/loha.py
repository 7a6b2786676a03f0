"""LoHa through PEFT (LyCORIS; Hyeon-Woo et al., 2022): the weight update as the Hadamard product of two
low-rank products, a higher effective rank for LoRA's parameter count; the artifact is the adapter alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.methods.base import register_method
from lora_exp.methods.tuner import PeftTuner, TargetedSpec, targets

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class LoHaSpec(TargetedSpec):
    """LoHa adapters (PEFT): a Hadamard product of two low-rank updates per adapted layer."""

    name: Literal["loha"]
    r: int = Field(8, ge=1, description="Rank of each of the two low-rank products.")
    alpha: int = Field(8, ge=1, description="Scaling numerator; the update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the update's rank dimension.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Probability of skipping a layer's update.")


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
        return LoHaConfig(task_type=task_type, r=m.r, alpha=m.alpha, rank_dropout=m.rank_dropout,
                          module_dropout=m.module_dropout, **targets(model, m.target_modules))


register_method(LoHa())
