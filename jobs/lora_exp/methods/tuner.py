"""What the PEFT tuners other than LoRA share (IA³, LoKr, LoHa, VeRA): one PEFT config built from the spec,
applied by ``get_peft_model``, saved and reloaded as a PEFT adapter as LoRA's is. A tuner's module says only
how its spec becomes its PEFT config and which parameter names are its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError
from lora_exp.methods.base import TrainableRule
from lora_exp.methods.lora import TASK_HEADS, Lora, targets

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


class TargetedSpec(MethodSpec):
    """A tuner that adapts a set of modules, by default every linear layer but the output layer and task heads."""

    target_modules: list[str] | None = Field(
        None, description="Module names to adapt. Default: every linear layer but the output layer (PEFT's "
        "'all-linear'), as for LoRA.")


def linear_layers(model: Any) -> list[str]:
    """all-linear spelled out, for a tuner whose PEFT config has no ``exclude_modules`` (VeRA): the names of the
    model's Linear/Conv1D layers but its output layer and task heads."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    skip = set(TASK_HEADS)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
                   and name.rsplit(".", 1)[-1] not in skip})


class LycorisSpec(TargetedSpec):
    """The settings PEFT's LyCORIS tuners (LoKr, LoHa) share."""

    r: int = Field(8, ge=1, description="Rank of the update's low-rank factors.")
    alpha: int = Field(8, ge=1, description="Scaling numerator; the update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the update's rank dimension.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Probability of skipping a layer's update.")


def lycoris_kwargs(model: Any, m: LycorisSpec) -> dict[str, Any]:
    """A LyCORIS PEFT config's shared arguments from its spec."""
    return {"r": m.r, "alpha": m.alpha, "rank_dropout": m.rank_dropout, "module_dropout": m.module_dropout,
            **targets(model, m.target_modules)}


class PeftTuner(Lora):
    """A PEFT tuner as a method: subclasses set ``marker`` (a substring of every parameter name the tuner adds)
    and implement ``peft_config``. Saved, loaded and merged through PEFT as LoRA is; no LoRA+ optimizer, and no
    initialisation to convert."""

    marker: ClassVar[str]  # e.g. "ia3_l": in the names of exactly the parameters the tuner adds
    # PEFT's LyCORIS tuners (LoKr, LoHa) adapt Linear and Conv layers only, not GPT-2's transposed Conv1D
    adapts_conv1d: ClassVar[bool] = True

    def check_spec(self, spec: RunSpec) -> None:
        super(Lora, self).check_spec(spec)  # the method base's checks; LoRA's own fields are not a tuner's

    def check_model(self, spec: RunSpec, config: dict[str, Any]) -> None:
        if not self.adapts_conv1d and config.get("model_type") == "gpt2":
            raise SpecError(f"method {self.name}: PEFT's {self.label} cannot adapt GPT-2's Conv1D projections "
                            "(Linear and Conv layers only); use a Llama-family model or method lora")

    def peft_config(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        """The PEFT config of this tuner for ``model`` (``fan_in_fan_out`` for GPT-2's transposed Conv1D)."""
        raise NotImplementedError

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config(model, spec, task_type))
        except (ValueError, TypeError) as e:  # a module it does not have, or a layer type it cannot adapt
            raise SpecError(f"method.target_modules: {self.label} cannot adapt this model's modules: {e}") from None

    def plan_model(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        return self.apply(model, spec, task_type)

    def init_from_data(self, model: Any, spec: RunSpec, batches: Any) -> None:
        return None  # no data-driven initialisation (EVA is LoRA's)

    def optimizer(self, model: Any, optimizer_cls: Any, optimizer_kwargs: dict[str, Any], spec: RunSpec) -> Any:
        return None

    def trainable_rule(self, model: Any) -> TrainableRule:
        head = any("modules_to_save" in n for n, _ in model.named_parameters())
        marker = self.marker
        return TrainableRule(f"{self.label} parameters" + (" and the task head" if head else ""),
                             lambda n: marker in n, lambda n: marker in n or "modules_to_save" in n)
