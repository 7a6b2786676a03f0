"""SQuAD v2 (rajpurkar/squad_v2): extractive QA with unanswerable questions, for GPT-2 and Llama.

Metrics follow the official SQuAD v2 evaluation script (``lora_exp.metrics.squad``); the span formulation
(``lora_exp.formulations.span``) turns windows and logits into answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_exp.tasks.base import QA, TaskChecks, register_task


@dataclass(frozen=True)
class QATask(TaskChecks):
    name: str = "squad_v2"
    hub_path: str | None = "rajpurkar/squad_v2"
    hub_config: str | None = None
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    default_formulation: str = "span"
    kind: str = field(default=QA, init=False)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ("question", "context", "answers")

    def check_row(self, row: dict[str, Any]) -> str:
        for f in ("question", "context"):
            if not isinstance(row[f], str) or not row[f].strip():
                raise ValueError(f"column {f!r}: expected non-empty text")
        answers = row["answers"]
        if not isinstance(answers, dict) or set(answers) != {"text", "answer_start"}:
            raise ValueError("column 'answers': expected {\"text\": [...], \"answer_start\": [...]}")
        if len(answers["text"]) != len(answers["answer_start"]):
            raise ValueError("column 'answers': text and answer_start differ in length")
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            if not isinstance(start, int) or row["context"][start : start + len(text)] != text:
                raise ValueError(f"column 'answers': {text!r} is not at character {start} of the context")
        return "answerable" if answers["text"] else "unanswerable"

    def normalise(self, ds: Any, split: str) -> Any:
        if "id" not in ds.column_names:
            ds = ds.add_column("id", [str(i) for i in range(len(ds))])
        return ds.select_columns(["id", "question", "context", "answers"])



SQUAD_V2 = register_task(QATask())
