"""Formulations: how a labelled row meets the model, and how the model's output becomes per-label scores.

Both formulations reduce the model's output to a ``(batch, num_labels)`` score matrix in
``preprocess_logits``, so metrics, predictions, reports and plots are one code path for every
formulation and method:

- ``Classifier``: a sequence-classification head on the last token; scores are its logits.
- ``Verbalizer``: the causal LM reads ``template + prompt_suffix`` and is trained (causal-LM loss) to
  produce the label's word; scores are the log-probabilities of each label word's first token at the
  answer position. First-token scoring is exact when label words start with distinct tokens, which is
  checked when the tokenizer loads. The untrained model scored this way is the zero-shot baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lora_exp.errors import SpecError
from lora_exp.spec import RunSpec
from lora_exp.tasks import ClassificationTask


class Formulation(Protocol):
    """What the one training path needs from a task's formulation."""

    kind: str
    model_class: str  # the transformers Auto class that loads the base model
    peft_task_type: str  # PEFT's TaskType for LoRA
    prediction_loss_only: bool  # in-training evaluation reports only the loss (QA, LM)

    def tokenize(self, ds: Any) -> Any:
        """Model inputs (with ``labels``) for training and in-training evaluation."""

    def collator(self) -> Any: ...

    def preprocess_logits(self, logits: Any, labels: Any) -> Any: ...

    def compute_metrics(self, p: Any) -> dict[str, float]: ...

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        """Final evaluation of one split: predict (on every rank), write outputs (rank 0), return metrics."""


def map_batches(ds: Any, fn: Any, desc: str) -> Any:
    """Tokenize once; ``datasets`` caches the result on disk, keyed by the data's and the function's fingerprints."""
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc)


class _Classification:
    """Shared by the classification formulations: both produce (batch, num_labels) scores."""

    task: ClassificationTask
    kind: str
    peft_task_type: str
    prediction_loss_only = False

    def tokenize(self, ds: Any) -> Any:
        return map_batches(ds, self.encode, f"tokenizing ({self.kind})")  # type: ignore[attr-defined]

    def compute_metrics(self, p: Any) -> dict[str, float]:
        from lora_exp.metrics import classification_metrics

        return classification_metrics(self.task, self.gold(p.label_ids), p.predictions.argmax(axis=1))

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        from lora_exp.metrics import write_split_outputs

        pred = trainer.predict(self.tokenize(raw), metric_key_prefix=split)
        if not trainer.is_world_process_zero():
            return {}
        metrics = write_split_outputs(out_dir, split, self.task, raw, pred.predictions, self.gold(pred.label_ids))
        metrics["loss"] = pred.metrics.get(f"{split}_loss", float("nan"))
        return metrics

    def gold(self, label_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def render(template: str, batch: dict[str, list[Any]], fields: tuple[str, ...]) -> list[str]:
    n = len(batch[fields[0]])
    return [template.format(**{f: batch[f][i] for f in fields}) for i in range(n)]


@dataclass
class Classifier(_Classification):
    task: ClassificationTask
    tokenizer: Any
    template: str
    max_length: int
    kind: str = "classifier"
    model_class: str = "AutoModelForSequenceClassification"
    peft_task_type: str = "SEQ_CLS"

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


@dataclass
class Verbalizer(_Classification):
    task: ClassificationTask
    tokenizer: Any
    template: str
    max_length: int
    words: dict[str, str]
    suffix: str
    kind: str = "verbalizer"
    model_class: str = "AutoModelForCausalLM"
    peft_task_type: str = "CAUSAL_LM"
    word_ids: list[list[int]] = field(init=False)
    first_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.word_ids = [
            self.tokenizer(self.words[label], add_special_tokens=False)["input_ids"] for label in self.task.labels
        ]
        if any(not ids for ids in self.word_ids):
            raise SpecError("formulation.verbalizers: a label word tokenizes to nothing")
        self.first_ids = [ids[0] for ids in self.word_ids]
        if len(set(self.first_ids)) != len(self.first_ids):
            pairs = zip(self.task.labels, self.first_ids, strict=True)
            clash = [self.words[lab] for lab, t in pairs if self.first_ids.count(t) > 1]
            raise SpecError(
                f"formulation.verbalizers: label words {clash} start with the same token; choose words whose "
                "first tokens differ (scoring reads the first token)"
            )

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [p + self.suffix for p in render(self.template, batch, self.task.text_fields)]
        enc = self.tokenizer(prompts)
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt_ids, label in zip(enc["input_ids"], batch["label"], strict=True):
            target = self.word_ids[label]
            keep = self.max_length - len(target)
            if len(prompt_ids) > keep:  # keep the end: the question sits there; the text's start is dropped
                prompt_ids = prompt_ids[len(prompt_ids) - keep :]
            ids = list(prompt_ids) + target
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([-100] * len(prompt_ids) + target)
        return out

    def collator(self) -> Any:
        from transformers import DataCollatorForSeq2Seq

        # Works for decoder-only models too: pads input_ids with the pad token and labels with -100.
        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        import torch

        logits = logits[0] if isinstance(logits, tuple) else logits
        answer = (labels != -100).int().argmax(dim=1)  # first label-word position
        rows = torch.arange(logits.shape[0], device=logits.device)
        at = logits[rows, answer - 1].float().log_softmax(dim=-1)  # the distribution that predicts it
        return at[:, torch.tensor(self.first_ids, device=logits.device)]

    def gold(self, label_ids: np.ndarray) -> np.ndarray:
        label_ids = np.asarray(label_ids)
        first = label_ids[np.arange(len(label_ids)), (label_ids != -100).argmax(axis=1)]
        lookup = {t: i for i, t in enumerate(self.first_ids)}
        return np.array([lookup[int(t)] for t in first])


def build_formulation(spec: RunSpec, task: Any, tokenizer: Any) -> Formulation:
    """The task decides which formulations it supports; the spec picks one (``auto``: the task's own)."""
    return task.formulation(spec, tokenizer)
