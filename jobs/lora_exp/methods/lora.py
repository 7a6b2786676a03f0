"""LoRA through PEFT: low-rank adapters on the projections; the artifact is the adapter alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError
from lora_exp.methods.base import LoadBase, Method, TrainableRule, register_method

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

# Default targets: PEFT's "all-linear", every Linear/Conv1D layer of the model but its output layer (the LM head,
# a classification head): GPT-2's c_attn, c_proj, c_fc; Llama's q, k, v, o, gate, up, down projections; any
# other architecture's own layers, with no table here to keep up to date.
ALL_LINEAR = "all-linear"
# all-linear spares the LM head but not a task head (a classifier's score, QA's qa_outputs): PEFT trains those
# whole (modules_to_save), so they are kept out of the adapted layers.
TASK_HEADS = ["score", "classifier", "qa_outputs"]
# The Trainer also saves the tokenizer; the artifact reuses the base model's, so only the adapter is kept.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "training_args.bin")


class LoraFields(MethodSpec):
    """The adapter settings LoRA and QLoRA share."""

    r: int = Field(8, ge=1, description="Adapter rank: higher = more capacity, more memory.")
    alpha: int = Field(16, ge=1, description="Scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Default: every linear layer but the output layer (PEFT's "
        "'all-linear'): GPT-2 c_attn, c_proj, c_fc; Llama q, k, v, o, gate, up, down _proj; any architecture.",
    )


class LoraSpec(LoraFields):
    """LoRA adapters (PEFT) on the attention/MLP projections; the base stays frozen."""

    name: Literal["lora"]


def target_modules(m: LoraFields) -> list[str] | str:
    """The spec's modules, else PEFT's ``all-linear``."""
    return list(m.target_modules) if m.target_modules else ALL_LINEAR


class Lora(Method):
    name: ClassVar[str] = "lora"
    spec: ClassVar[type[MethodSpec]] = LoraSpec
    label: ClassVar[str] = "LoRA"
    report_order: ClassVar[int] = 20

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import LoraConfig, get_peft_model

        m = cast(LoraFields, spec.method)
        model_type = model.config.model_type
        config = LoraConfig(
            task_type=task_type,
            r=m.r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=target_modules(m),
            exclude_modules=TASK_HEADS if target_modules(m) == ALL_LINEAR else None,
            fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (transposed)
        )
        try:
            return get_peft_model(model, config)
        except ValueError as e:  # e.g. a target module that does not exist in this model
            raise SpecError(f"method.target_modules: {e}") from None

    def save(self, trainer: Any, out_dir: str) -> None:
        # For a PeftModel, save_model writes adapter_model.safetensors + adapter_config.json only (plus a
        # SEQ_CLS head, which is trained too); the frozen base weights are never copied.
        trainer.save_model(out_dir)
        for name in TOKENIZER_FILES:
            (Path(out_dir) / name).unlink(missing_ok=True)

    def load(self, load_base: LoadBase, artifact_dir: str) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(None), artifact_dir)

    def trainable_rule(self, model: Any) -> TrainableRule:
        # PEFT keeps a task head (SEQ_CLS, QA) trainable as modules_to_save; the base weights stay frozen.
        head = any("modules_to_save" in n for n, _ in model.named_parameters())
        return TrainableRule("LoRA adapters" + (" and the task head" if head else ""), lambda n: "lora_" in n,
                             lambda n: "lora_" in n or "modules_to_save" in n)


register_method(Lora())
