"""Prefix tuning through PEFT (Li & Liang, 2021): trained key/value vectors for a few virtual tokens in every
attention layer, seen by every real token as an earlier context; the model untouched, the artifact the
prefixes alone. The inputs keep their positions (the prefix lives in the attention cache, not in the input),
so the formulations' scored positions stay right; prompt tuning, which prepends embeddings to the input and
shifts them, is not offered for that reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError
from lora_exp.methods.base import register_method
from lora_exp.methods.tuner import PeftTuner

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class PrefixTuningSpec(MethodSpec):
    """Trained attention prefixes (PEFT prefix tuning)."""

    name: Literal["prefix_tuning"]
    virtual_tokens: int = Field(20, ge=1, le=512, description="Prefix length: key/value vectors per layer.")
    projection: int | None = Field(
        None, ge=1, description="Reparameterise the prefixes through a two-layer MLP of this hidden size, as the "
        "paper does for stability (only the prefixes are saved); default: train them directly.")


class PrefixTuning(PeftTuner):
    name: ClassVar[str] = "prefix_tuning"
    spec: ClassVar[type[MethodSpec]] = PrefixTuningSpec
    label: ClassVar[str] = "prefix tuning"
    report_order: ClassVar[int] = 29
    marker: ClassVar[str] = "prompt_encoder"
    mergeable: ClassVar[bool] = False  # nothing to merge into the weights: the prefixes are extra context

    def check_spec(self, spec: RunSpec) -> None:
        super().check_spec(spec)
        if spec.training.packing:  # measured: packed losses differ from the padded ones by 1e-2
            raise SpecError("training.packing: prefix tuning's prefixes are one cache per row, which a packed row "
                            "would share across its examples; set packing: false")

    def peft_config(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import PrefixTuningConfig

        m = cast(PrefixTuningSpec, spec.method)
        mlp = {"prefix_projection": True, "encoder_hidden_size": m.projection} if m.projection else {}
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=m.virtual_tokens, **mlp)


register_method(PrefixTuning())
