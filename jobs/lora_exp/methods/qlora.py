"""QLoRA: the base loads in 4 bits (bitsandbytes nf4, double quantization, bf16 compute), is prepared for
k-bit training, and LoRA adapters train on top in fp32. The artifact is the adapter alone, as for LoRA."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field

from lora_exp.config.schema import MethodSpec
from lora_exp.core.errors import SpecError, UserError
from lora_exp.methods.base import register_method
from lora_exp.methods.lora import Lora, LoraFields

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec

log = logging.getLogger(__name__)


class QLoraSpec(LoraFields):
    """QLoRA: LoRA over a 4-bit (nf4, double-quantized) frozen base; LoRA weights stay fp32."""

    name: Literal["qlora"]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantized to for each matmul."
    )
    init: Literal["default", "gaussian", "loftq"] = Field(  # type: ignore[assignment]
        "default", description="How the adapter starts. default: B = 0 (the quantized model unchanged at step 0); "
        "gaussian; loftq (Li et al., 2024): each adapter starts as the rank-r approximation of what quantization "
        "took from its weight, read from the full-precision checkpoint, so training starts nearer the unquantized "
        "model.")


class QLora(Lora):
    name: ClassVar[str] = "qlora"
    spec: ClassVar[type[MethodSpec]] = QLoraSpec
    label: ClassVar[str] = "QLoRA"
    report_order: ClassVar[int] = 30
    packages: ClassVar[tuple[str, ...]] = ("bitsandbytes",)

    def check_spec(self, spec: RunSpec) -> None:
        super().check_spec(spec)
        if cast(QLoraSpec, spec.method).init == "loftq" and spec.training.zero_stage == 3:
            raise SpecError("method.init: loftq sets each adapter from its whole weight, which ZeRO-3 partitions; "
                            "use zero_stage 0 or 2")

    def load_kwargs(self, spec: RunSpec) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("method qlora needs bitsandbytes: pip install 'lora-exp[qlora]'") from None
        m = cast(QLoraSpec, spec.method)
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=m.quant_type,
                bnb_4bit_use_double_quant=m.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, m.compute_dtype),
            )
        }

    def apply(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        from peft import prepare_model_for_kbit_training

        # Freezes the 4-bit base, casts norms (and the head) to fp32 for stable training, and enables
        # gradient checkpointing with inputs that require grad, as the seed's model_nf4_with_chkpoint.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        init = cast(QLoraSpec, spec.method).init
        peft_model = self._apply(model, spec, task_type, "default" if init == "loftq" else init)
        if init == "loftq":
            from lora_exp.methods.loftq import loftq_init

            log.info("LoftQ: %d adapters set from the quantization residual of %s", loftq_init(peft_model, spec.model),
                     spec.model.name)
        return peft_model


    def plan_model(self, model: Any, spec: RunSpec, task_type: str) -> Any:
        # The adapters as LoRA adds them; the 4-bit storage of the base is counted by weight_bytes.
        return self._apply(model, spec, task_type, "default")

    def weight_bytes(self, model: Any, spec: RunSpec) -> float:
        """bitsandbytes stores each frozen Linear (and GPT-2 Conv1D) weight, the LM head and task heads excepted,
        in 4 bits plus an absmax per 64 values: fp32, or 8-bit with one fp32 per 256 blocks (double quant)."""
        import torch
        from transformers.pytorch_utils import Conv1D

        m = cast(QLoraSpec, spec.method)
        per_value = 0.5 + (1 / 64 + 4 / (64 * 256) if m.double_quant else 4 / 64)
        heads = {"lm_head", "score", "classifier", "qa_outputs"}
        quantized: set[int] = set()
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not heads & set(name.split(".")):
                w = module.weight
                if not w.requires_grad:
                    quantized.add(id(w))
        return float(sum(p.numel() * per_value if id(p) in quantized else p.numel() * p.element_size()
                         for p in model.parameters()))


register_method(QLora())
