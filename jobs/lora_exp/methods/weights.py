"""How a method's frozen weights are stored while a run trains: one place for the trainer, which stores them,
and the memory plan, which counts them."""

from __future__ import annotations

from typing import Any


def precast_frozen_weights(model: Any, dtype: Any) -> int:
    """Store frozen matmul weights in the autocast dtype: the same numbers, without the cast per call.

    Under bf16 autocast every Linear casts its fp32 weight to bf16 on each call, and autocast caches casts
    only for weights that train; for LoRA and head-only runs, whose base is frozen, that is a copy of the
    whole model per forward (about a fifth of a CPU training step for SmolLM2). Casting once gives the
    matmuls bit-identical inputs. Only Linear/Conv1D weights: embeddings, norms and the residual stream keep
    their precision (a weight tied to an embedding is left alone), so nothing outside the matmuls changes.
    Returns the number of weights cast."""
    import torch
    from transformers.pytorch_utils import Conv1D

    tied = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    cast = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad and param.dtype == torch.float32 and id(param) not in tied:
                param.data = param.data.to(dtype)
                cast += name == "weight"
    return cast
