"""VeRA through PEFT (Kopiczko et al., 2024): one pair of frozen random low-rank matrices shared by every
adapted layer, and per layer only two scaling vectors trained: far fewer parameters than LoRA. The artifact is
the adapter with the shared projections (``save_projection``), so it reloads without the seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.methods.base import register_method
from lora_exp.methods.tuner import PeftTuner, TargetedSpec, linear_layers

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class VeraSpec(TargetedSpec):
    """VeRA (PEFT): shared random projections, a trained scaling vector pair per adapted layer."""

    name: Literal["vera"]
    r: int = Field(256, ge=1, description="Rank of the shared random projections (the paper: 256 and up; they "
                   "are frozen, so a high rank costs memory, not trainable parameters).")
    d_initial: float = Field(0.1, gt=0.0, description="Initial value of the d scaling vectors.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    projection_prng_key: int = Field(0, ge=0, lt=2**32, description="Seed of the shared random projections.")


class Vera(PeftTuner):
    name: ClassVar[str] = "vera"
    spec: ClassVar[type[MethodSpec]] = VeraSpec
    label: ClassVar[str] = "VeRA"
    report_order: ClassVar[int] = 28
    marker: ClassVar[str] = "vera_lambda_"

    def peft_config(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import VeraConfig

        m = cast(VeraSpec, spec.method)
        return VeraConfig(task_type=task_type, r=m.r, d_initial=m.d_initial, vera_dropout=m.dropout,
                          projection_prng_key=m.projection_prng_key, save_projection=True,
                          fan_in_fan_out=model.config.model_type == "gpt2",
                          target_modules=list(m.target_modules or linear_layers(model)))


register_method(Vera())
