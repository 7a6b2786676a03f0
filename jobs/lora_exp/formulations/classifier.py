"""``classifier``: a sequence-classification head on the last token of the rendered template; the
scores are its logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lora_exp.core.errors import SpecError
from lora_exp.formulations.base import Scorer, flattening_collator, probe_ids, register_formulation
from lora_exp.formulations.class_scores import ClassificationFormulation, render
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
    loss_counts_items: ClassVar[bool] = False  # the head's loss is its batch's mean (transformers ignores the count)

    @classmethod
    def memory_probe(cls, model: Any, batch: int, length: int) -> Any:
        ids = probe_ids(model, batch, length)
        return model(input_ids=ids, attention_mask=ids.new_ones(ids.shape), labels=ids[:, 0]).loss

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

    def scorer(self, packed: bool) -> Scorer | None:
        return self.packed_forward if packed else None  # padded: the model pools the last real token itself

    def packing_collator(self) -> Any:
        return PackedClassification(flattening_collator())

    def packed_forward(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
        """Loss and scores of a packed batch: the head's logits at each example's last token.

        The model's own pooling looks for the last non-pad token of each row, and a packed batch is one row;
        so the head's per-position output is read by a forward hook (the forward still runs through the
        wrapped model, as DDP and DeepSpeed need) and gathered where each example ends (the token before
        the next ``position_ids == 0``). The loss is the model's: mean cross-entropy over the examples."""
        import torch
        import torch.nn.functional as F

        positions = inputs["position_ids"][0]
        starts = (positions == 0).nonzero().squeeze(1)
        ends = torch.cat([starts[1:] - 1, starts.new_tensor([positions.numel() - 1])])
        captured: list[Any] = []
        handle = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
        finally:
            handle.remove()
        scores = captured[-1][0, ends].float()  # (examples, labels)
        return F.cross_entropy(scores, inputs["labels"].view(-1)), scores

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        return logits[0] if isinstance(logits, tuple) else logits

    def gold(self, label_ids: np.ndarray) -> np.ndarray:
        return np.asarray(label_ids).reshape(-1)


def score_head(model: Any) -> Any:
    """The sequence-classification head (``score`` in GPT-2 and Llama; PEFT wraps it, DDP wraps the model)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "score":
            return module
    raise SpecError("training.packing: the classifier reads a head named 'score' (GPT-2, Llama families); this "
                    "model has none. Set packing: false")


@dataclass
class PackedClassification:
    """Flatten a batch's examples into one row; the class labels stay one per example."""

    flatten: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.flatten([{"input_ids": f["input_ids"]} for f in features])
        batch["labels"] = torch.tensor([int(f["labels"]) for f in features])
        return dict(batch)
