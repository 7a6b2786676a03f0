"""QLoRA: the base loads in 4 bits (bitsandbytes nf4, double quantization, bf16 compute), is prepared for
k-bit training, and LoRA adapters train on top in fp32. The artifact is the adapter alone, as for LoRA."""

from __future__ import annotations

from typing import Any

from lora_exp.methods import lora
from lora_exp.spec import RunSpec

save = lora.save
load = lora.load


def load_kwargs(spec: RunSpec) -> dict[str, Any]:
    import torch
    from transformers import BitsAndBytesConfig

    from lora_exp.errors import UserError

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("method qlora needs bitsandbytes: pip install 'lora-exp[qlora]'") from None
    m = spec.method
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=m.quant_type,
            bnb_4bit_use_double_quant=m.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, m.compute_dtype),
        )
    }


def apply(model: Any, spec: RunSpec, task_type: str) -> Any:
    from peft import prepare_model_for_kbit_training

    # Freezes the 4-bit base, casts norms (and the head) to fp32 for stable training, and enables
    # gradient checkpointing with inputs that require grad, as the seed's model_nf4_with_chkpoint.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return lora.apply(model, spec, task_type)
