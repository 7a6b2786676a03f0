"""Whether the Hugging Face hub is switched off, as the libraries that would reach it decide.

huggingface_hub reads ``HF_HUB_OFFLINE``, else ``TRANSFORMERS_OFFLINE`` (``constants.HF_HUB_OFFLINE``), and
``datasets`` reads ``HF_DATASETS_OFFLINE`` first, else the hub's (``datasets.config.HF_HUB_OFFLINE``), each with
the true values in its ``ENV_VARS_TRUE_VALUES``. The libraries freeze the answer when first imported; these
read the environment as it is now, with the libraries' own variables, order and true values (so a process
whose environment changed after the import, a test or a notebook, is judged as a fresh one would be), and
``tests/test_hub_offline.py`` holds them equal to the libraries' constants in fresh processes.
"""

from __future__ import annotations

import os

HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASETS_VARIABLES = ("HF_DATASETS_OFFLINE", *HUB_VARIABLES)


def hub_offline() -> bool:
    """transformers and huggingface_hub will not reach the hub for models and tokenizers."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in constants.ENV_VARS_TRUE_VALUES


def datasets_offline() -> bool:
    """``datasets`` will not reach the hub."""
    from huggingface_hub import constants  # datasets uses the same true values

    value = os.environ.get("HF_DATASETS_OFFLINE")
    return hub_offline() if value is None else value.upper() in constants.ENV_VARS_TRUE_VALUES


def which(names: tuple[str, ...]) -> str:
    """The variables of ``names`` that are set, for a message: ``HF_HUB_OFFLINE=1``."""
    return ", ".join(f"{n}={os.environ[n]}" for n in names if os.environ.get(n)) or "no variable set"
