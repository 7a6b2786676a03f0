"""LoRA through PEFT: low-rank adapters on the projections; the artifact is the adapter alone."""

from __future__ import annotations

from typing import Any

from lora_exp.errors import SpecError
from lora_exp.spec import RunSpec

# Default targets per architecture (model_type): the attention and MLP projections.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def target_modules(spec: RunSpec, model_type: str) -> list[str]:
    explicit = getattr(spec.method, "target_modules", None)
    if explicit:
        return list(explicit)
    if model_type not in DEFAULT_TARGETS:
        raise SpecError(
            f"method.target_modules: no default for model type {model_type!r}; list the module names to adapt"
        )
    return DEFAULT_TARGETS[model_type]


def load_kwargs(spec: Any) -> dict[str, Any]:
    return {}  # the base loads as it is


def apply(model: Any, spec: RunSpec, task_type: str) -> Any:
    from peft import LoraConfig, get_peft_model

    m = spec.method
    model_type = model.config.model_type
    config = LoraConfig(
        task_type=task_type,
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=target_modules(spec, model_type),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (transposed)
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module that does not exist in this model
        raise SpecError(f"method.target_modules: {e}") from None


def save(trainer: Any, out_dir: str) -> None:
    # For a PeftModel, save_model writes adapter_model.safetensors + adapter_config.json only (plus a
    # SEQ_CLS head, which is trained too); the frozen base weights are never copied.
    trainer.save_model(out_dir)
    _drop_tokenizer_files(out_dir)


def _drop_tokenizer_files(out_dir: str) -> None:
    """The Trainer also saves the tokenizer; the artifact reuses the base model's, so keep only the adapter."""
    from pathlib import Path

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "chat_template.jinja", "training_args.bin"):
        (Path(out_dir) / name).unlink(missing_ok=True)


def load(load_base: Any, artifact_dir: str) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(None), artifact_dir)
