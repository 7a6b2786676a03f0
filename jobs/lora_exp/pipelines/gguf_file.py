"""A merged model as one GGUF file for llama.cpp (``lora-exp export --format gguf``), written with the ``gguf``
package (llama.cpp's own writer and tensor-name map).

Written here because the converter that does this, llama.cpp's ``convert_hf_to_gguf.py``, is a script of that
repository, not an installable package. It is followed for the two families lora-exp replays (Llama, GPT-2):
the tensor names from ``gguf.TensorNameMap``, Llama's query/key rows permuted into llama.cpp's rotary layout,
GPT-2's Conv1D weights transposed, the tokenizer as a byte-level BPE (tokens, types, merges, special ids), and
the hyper-parameters llama.cpp reads. Tensors are written in float32 or float16 (no quantization: llama.cpp's
``llama-quantize`` does that from this file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_exp.core.errors import UserError

ARCHITECTURES = ("llama", "gpt2")
SKIP = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


def permute(weights: Any, heads: int) -> Any:
    """llama.cpp's rotary layout: each head's rows interleaved by pairs (convert_hf_to_gguf's ``permute``)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(model: Any, tokenizer_dir: Path, out: Path, dtype: str = "f16") -> Path:
    """Write ``model`` (a transformers causal LM, adapters merged) and the tokenizer in ``tokenizer_dir``."""
    import gguf
    import numpy as np

    config = model.config
    kind = config.model_type
    if kind not in ARCHITECTURES:
        raise UserError(f"--format gguf: model type {kind!r} is not written here (only {', '.join(ARCHITECTURES)}); "
                        "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = gguf.MODEL_ARCH.LLAMA if kind == "llama" else gguf.MODEL_ARCH.GPT2
    blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, blocks)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(str(getattr(config, "_name_or_path", "") or "lora-exp export"))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    heads = config.num_attention_heads
    if kind == "llama":
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(blocks)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
        writer.add_rope_dimension_count(config.hidden_size // heads)
    else:
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(blocks)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(heads)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    _tokenizer(writer, tokenizer_dir, config)

    state = {k: v for k, v in model.state_dict().items() if not k.endswith(SKIP)}
    if kind == "gpt2" and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: llama.cpp wants an output tensor
    for name, tensor in state.items():
        data = tensor.detach().float().cpu().numpy()
        if kind == "llama" and name.endswith("self_attn.q_proj.weight"):
            data = permute(data, heads)
        elif kind == "llama" and name.endswith("self_attn.k_proj.weight"):
            data = permute(data, kv_heads)
        elif kind == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T  # Conv1D stores (in, out)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"--format gguf: no GGUF name for tensor {name!r} ({kind})")
        # Matrices in the file's dtype; norms and biases (1-D) stay float32, as llama.cpp's converter keeps them.
        writer.add_tensor(target, np.ascontiguousarray(data.astype(np.float16 if dtype == "f16" and data.ndim > 1
                                                                     else np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _tokenizer(writer: Any, tokenizer_dir: Path, config: Any) -> None:
    """The tokenizer as llama.cpp's byte-level BPE ('gpt2' model): tokens by id, types, merges, special ids."""
    import gguf

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"--format gguf: {path} is missing (a fast tokenizer's file is needed)")
    doc = json.loads(path.read_text())
    model = doc.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"--format gguf: the tokenizer is {model.get('type')!r}; only byte-level BPE is written here")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in doc.get("added_tokens", [])}
    vocab.update(special)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = getattr(config, key, None)
        if isinstance(value, int) and value < size:
            add(value)
