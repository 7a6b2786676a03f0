"""LoftQ initialisation for QLoRA (Li et al., 2024): the adapters start as the best rank-r approximation of what
4-bit quantization took from each weight, so the quantized model plus its adapters starts close to the
full-precision model instead of to its quantized copy.

Written here rather than called from PEFT: PEFT's ``replace_lora_weights_loftq`` computes on CUDA only (its
device is hard-coded) and ignores the LoRA scaling; this is the same one-step LoftQ on the weights' own device,
with ``B`` divided by the scaling so that ``scaling * B @ A`` is the low-rank residual."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_exp.core.errors import UserError

if TYPE_CHECKING:
    from lora_exp.config.schema import ModelSpec

PREFIX = "base_model.model."  # where get_peft_model puts the base model's own module names


def checkpoint_files(model: ModelSpec) -> list[Path]:
    """The base model's safetensors files: the local directory's, or the hub snapshot from_pretrained used."""
    root = Path(model.name)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model.name, revision=model.revision, allow_patterns=["*.safetensors"]))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UserError(f"method.init loftq: {root} holds no *.safetensors: LoftQ reads the full-precision weights")
    return files


def full_precision_weights(model: ModelSpec) -> dict[str, tuple[Path, str]]:
    """Where each weight of the checkpoint is, by name (its tensors are read one at a time, when used)."""
    from safetensors import safe_open

    where: dict[str, tuple[Path, str]] = {}
    for path in checkpoint_files(model):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                where[key] = (path, key)  # a classifier's layers are named as its causal LM's checkpoint
    return where


def loftq_init(peft_model: Any, model: ModelSpec) -> int:
    """Set every 4-bit LoRA layer's A and B from its quantization residual; returns how many layers were set."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    where = full_precision_weights(model)
    done = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        key = name.removeprefix(PREFIX) + ".weight"
        if key not in where:
            raise UserError(f"method.init loftq: the checkpoint of {model.name} has no weight {key!r}")
        path, stored = where[key]
        with safe_open(str(path), framework="pt") as f:
            weight = f.get_tensor(stored).float()
        base = module.get_base_layer().weight
        quantized = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
        if weight.shape != quantized.shape:  # GPT-2's Conv1D stores (in, out)
            weight = weight.T
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)  # once: each adapter takes its rank
        with torch.no_grad():
            for adapter in module.lora_A:
                rank = module.r[adapter]
                root = s[:rank].sqrt()
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                a.copy_((root[:, None] * vh[:rank]).to(a.dtype))
                b.copy_((u[:, :rank] * root[None, :] / module.scaling[adapter]).to(b.dtype))
        done += 1
    return done

