"""Whether the Hugging Face hub is switched off, as the libraries that would reach it decide.

Read from the libraries themselves, never parsed again here: ``huggingface_hub.constants.HF_HUB_OFFLINE`` (its
true values, ``HF_HUB_OFFLINE`` else ``TRANSFORMERS_OFFLINE``) for models and tokenizers, and
``datasets.config.HF_HUB_OFFLINE`` (``HF_DATASETS_OFFLINE`` first) for data sets. Both are read once, when the
library is first imported, and that is what the library then does in this process.
"""

from __future__ import annotations

import os

HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASETS_VARIABLES = ("HF_DATASETS_OFFLINE", *HUB_VARIABLES)


def hub_offline() -> bool:
    """transformers and huggingface_hub will not reach the hub for models and tokenizers."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def datasets_offline() -> bool:
    """``datasets`` will not reach the hub (imports it: about half a second; only where a hub data set is used)."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def which(names: tuple[str, ...]) -> str:
    """The variables of ``names`` that are set, for a message: ``HF_HUB_OFFLINE=1``."""
    return ", ".join(f"{n}={os.environ[n]}" for n in names if os.environ.get(n)) or "no variable set"
