"""WikiText-2 (Salesforce/wikitext, wikitext-2-raw-v1) or any local text: causal language modelling.

Text is tokenized, concatenated and cut into fixed blocks of ``model.max_length`` tokens (the remainder
is dropped), so every evaluated block predicts the same number of tokens and the Trainer's eval loss is
the mean token loss: perplexity = exp(loss). Generation quality is measured on held-out blocks: the model
continues the first ``eval.prompt_tokens`` tokens and its continuation is scored against the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_exp.tasks.base import LM, TaskChecks, register_task


@dataclass(frozen=True)
class LMTask(TaskChecks):
    name: str = "wikitext"
    hub_path: str | None = "Salesforce/wikitext"
    hub_config: str | None = "wikitext-2-raw-v1"
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    default_formulation: str = "causal_lm"
    kind: str = field(default=LM, init=False)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ("text",)

    def check_row(self, row: dict[str, Any]) -> None:
        if not isinstance(row["text"], str):
            raise ValueError(f"column 'text': expected text, got {row['text']!r}")

    def normalise(self, ds: Any, split: str) -> Any:
        return ds.select_columns(["text"])



WIKITEXT = register_task(LMTask())
