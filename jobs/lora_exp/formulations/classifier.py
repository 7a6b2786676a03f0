"""``classifier``: a sequence-classification head on the last token of the rendered template; the
scores are its logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lora_exp.formulations.base import register_formulation
from lora_exp.formulations.classification import ClassificationFormulation, render
from lora_exp.tasks import ClassificationTask

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


@register_formulation
@dataclass
class Classifier(ClassificationFormulation):
    task: ClassificationTask
    tokenizer: Any
    template: str
    max_length: int
    kind: ClassVar[str] = "classifier"
    has_head: ClassVar[bool] = True
    model_class: ClassVar[str] = "AutoModelForSequenceClassification"
    peft_task_type: ClassVar[str] = "SEQ_CLS"

    @classmethod
    def build(cls, task: ClassificationTask, spec: RunSpec, tokenizer: Any) -> Classifier:
        return cls(task, tokenizer, spec.formulation.template or task.template, spec.model.max_length)

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = self.tokenizer(
            render(self.template, batch, self.task.text_fields), truncation=True, max_length=self.max_length
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}

    def collator(self) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        return logits[0] if isinstance(logits, tuple) else logits

    def gold(self, label_ids: np.ndarray) -> np.ndarray:
        return np.asarray(label_ids).reshape(-1)
