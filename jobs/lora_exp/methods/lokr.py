"""LoKr through PEFT (LyCORIS; Yeh et al., 2024): the weight update as a Kronecker product of two small
factors, one of them low-rank; the artifact is the adapter alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.methods.base import register_method
from lora_exp.methods.tuner import LycorisSpec, PeftTuner, lycoris_kwargs

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class LoKrSpec(LycorisSpec):
    """LoKr adapters (PEFT): a Kronecker-product update per adapted layer."""

    name: Literal["lokr"]
    decompose_both: bool = Field(False, description="Make the left Kronecker factor low-rank too.")
    decompose_factor: int = Field(-1, ge=-1, description="How the dimensions factor (-1: as square as possible).")


class LoKr(PeftTuner):
    name: ClassVar[str] = "lokr"
    spec: ClassVar[type[MethodSpec]] = LoKrSpec
    label: ClassVar[str] = "LoKr"
    report_order: ClassVar[int] = 26
    adapts_conv1d: ClassVar[bool] = False
    marker: ClassVar[str] = "lokr_"

    def peft_config(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import LoKrConfig

        m = cast(LoKrSpec, spec.method)
        return LoKrConfig(task_type=task_type, decompose_both=m.decompose_both, decompose_factor=m.decompose_factor,
                          **lycoris_kwargs(model, m))


register_method(LoKr())
