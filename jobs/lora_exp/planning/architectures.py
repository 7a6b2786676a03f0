"""A model's architecture (its config), without its weights: from a local directory, the hub (or its cache),
or, where neither answers, the published config of the models the seed experiments use.

The table exists because the memory plan must answer offline (an air-gapped cluster, a laptop, CI): a
config is a few numbers, and for the seeds' models they are the ones in the hub's config.json files.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lora_exp.core import hub
from lora_exp.core.errors import UserError

if TYPE_CHECKING:
    from lora_exp.config.schema import ModelSpec

log = logging.getLogger(__name__)

_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "bos_token_id": 50256,
         "eos_token_id": 50256, "dtype": "float32"}
_SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                 "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}
# The hub's config.json numbers (architecture only) of the models the seeds and values files name.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "openai-community/gpt2": {**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12},
    "openai-community/gpt2-medium": {**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "openai-community/gpt2-large": {**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "openai-community/gpt2-xl": {**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25},
    "distilbert/distilgpt2": {**_GPT2, "n_embd": 768, "n_layer": 6, "n_head": 12},
    "sshleifer/tiny-gpt2": {**_GPT2, "n_embd": 2, "n_layer": 2, "n_head": 2},
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "dtype": "float32"},
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
}
ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
           "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
           "distilgpt2": "distilbert/distilgpt2"}


def known_config(name: str) -> Any | None:
    """The published config of a model in :data:`KNOWN_CONFIGS` (None for others)."""
    from transformers import AutoConfig

    numbers = KNOWN_CONFIGS.get(ALIASES.get(name, name))
    if numbers is None:
        return None
    numbers = dict(numbers)
    return AutoConfig.for_model(numbers.pop("model_type"), **numbers)


@functools.cache
def hub_reachable() -> bool:
    """One quick TCP connect to the hub (``HF_ENDPOINT``), so an offline plan does not sit through the hub
    client's retries (half a minute per file); False when the hub is switched off."""
    if hub.hub_offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy a direct connect says nothing: the hub client finds out
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


@functools.cache
def _hub_config(name: str, revision: str | None, trust_remote_code: bool) -> Any:
    """A hub model's config: the local cache first, then the hub where it answers (None: neither has it)."""
    from transformers import AutoConfig

    for offline in (True, False):
        if not offline and not hub_reachable():
            break
        try:
            return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                              local_files_only=offline)
        except (OSError, ValueError):
            continue
    return None


def model_config(model: ModelSpec) -> tuple[Any, str]:
    """The run's model config and, when it did not come from the model itself, a note saying where from."""
    import copy

    from transformers import AutoConfig

    local = Path(model.name).expanduser()
    if local.is_dir():
        try:
            return AutoConfig.from_pretrained(str(local), trust_remote_code=model.trust_remote_code), ""
        except (OSError, ValueError) as e:
            raise UserError(f"model.name: cannot read a config from {local}: {e}") from None
    config = _hub_config(model.name, model.revision, model.trust_remote_code)
    if config is not None:
        return copy.deepcopy(config), ""
    config = known_config(model.name)
    if config is None:
        raise UserError(f"model.name: the config of {model.name!r} is neither in the hub cache nor reachable on "
                        "the hub; point model.name at a local directory holding its config.json")
    return config, f"{model.name}: not in the hub cache and the hub is unreachable; its published architecture"
