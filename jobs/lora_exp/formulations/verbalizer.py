"""``verbalizer``: the causal LM reads ``template + prompt_suffix`` and is trained (causal-LM loss) to
produce the label's word; the scores are the log-probabilities of each label word's first token at the
answer position. First-token scoring is exact when label words start with distinct tokens, which is
checked when the tokenizer loads. The untrained model scored this way is the zero-shot baseline
(seed 000's ``Premise: ... Hypothesis: ... Relationship: {label}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class Verbalizer(ClassificationFormulation):
    task: ClassificationTask
    tokenizer: Any
    template: str
    max_length: int
    words: dict[str, str]
    suffix: str
    kind: ClassVar[str] = "verbalizer"
    has_head: ClassVar[bool] = False
    model_class: ClassVar[str] = "AutoModelForCausalLM"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    word_ids: list[list[int]] = field(init=False)
    first_ids: list[int] = field(init=False)
    longest_word: int = field(init=False)  # tokens of the longest label word
    _first_ids_by_device: dict[Any, Any] = field(init=False, default_factory=dict, repr=False)

    @classmethod
    def memory_probe(cls, model: Any, batch: int, length: int) -> Any:
        # One scored token per row, as scored_forward computes (logits only where a label word is predicted).
        import torch.nn.functional as F

        ids = probe_ids(model, batch, length)
        logits = model(input_ids=ids, attention_mask=ids.new_ones(ids.shape), logits_to_keep=1).logits.float()
        return F.cross_entropy(logits[:, -1], ids[:, -1])

    @classmethod
    def build(cls, task: ClassificationTask, spec: RunSpec, tokenizer: Any) -> Verbalizer:
        words = spec.formulation.verbalizers or {label: " " + label for label in task.labels}
        suffix = task.prompt_suffix if spec.formulation.prompt_suffix is None else spec.formulation.prompt_suffix
        return cls(task, tokenizer, spec.formulation.template or task.template, spec.model.max_length, words, suffix)

    def __post_init__(self) -> None:
        self.word_ids = [
            self.tokenizer(self.words[label], add_special_tokens=False)["input_ids"] for label in self.task.labels
        ]
        if any(not ids for ids in self.word_ids):
            raise SpecError("formulation.verbalizers: a label word tokenizes to nothing")
        self.first_ids = [ids[0] for ids in self.word_ids]
        self.longest_word = max(len(ids) for ids in self.word_ids)
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

    def packing_collator(self) -> Any:
        return flattening_collator()  # prompt tokens carry no labels: masking each example's first one is free

    def scorer(self, packed: bool) -> Scorer:
        return self.scored_forward

    def scored_forward(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
        """The causal-LM loss and the label scores from logits at the scored positions only.

        A plain forward projects every position onto the vocabulary ((batch x length x 49K) floats for SmolLM2,
        most of the LM head's work) to score one or two tokens per row. Here the model computes logits only
        where the next token is a label token (``logits_to_keep``); the loss is the one the model would compute
        (summed cross-entropy over label tokens / ``num_items_in_batch``, else the mean).

        Padded batches (every row holds one label word) gather a fixed number of positions per row, the
        longest label word's, so no shape depends on the data: a boolean mask would make the host wait for the
        GPU at every step (its count decides the output's shape), which on a GPU costs more than the LM head it
        saves. Packed batches (one row, sequences told apart by ``labels == -100``) take the masked path."""
        import torch
        import torch.nn.functional as F

        labels = inputs["labels"]
        targets = labels[:, 1:]
        scored = targets != -100  # position p predicts token p + 1
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        count = num_items_in_batch if num_items_in_batch is not None else scored.sum()
        if "attention_mask" not in inputs:  # packed: one row of many examples
            keep = F.pad(scored, (0, 1), value=False)
            logits = model(**rest, logits_to_keep=keep).logits.float()  # (number of scored tokens, vocab)
            loss = F.cross_entropy(logits, targets[scored], reduction="sum") / count
            # The first label token of each example: scored, and the position before it is not.
            first = scored & ~F.pad(scored[:, :-1], (1, 0), value=False)
            return loss, logits[first[scored]].log_softmax(dim=-1)[:, self.first_ids_on(logits.device)]
        steps = torch.arange(self.longest_word, device=labels.device)
        start = scored.int().argmax(dim=1, keepdim=True)  # where each row's label word is predicted from
        positions = (start + steps).clamp(max=targets.shape[1] - 1)  # (batch, longest word)
        wanted = torch.where(steps < scored.sum(dim=1, keepdim=True), targets.gather(1, positions), -100)
        logits = model(**rest, logits_to_keep=positions).logits.float()  # (batch, longest word, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), ignore_index=-100, reduction="sum") / count
        return loss, logits[:, 0].log_softmax(dim=-1)[:, self.first_ids_on(logits.device)]

    def first_ids_on(self, device: Any) -> Any:
        """The label words' first token ids as a tensor on ``device``, made once (not copied every step)."""
        import torch

        cached = self._first_ids_by_device.get(device)
        if cached is None:
            cached = self._first_ids_by_device[device] = torch.tensor(self.first_ids, device=device)
        return cached

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        return logits  # already (batch, labels) scores: scored_forward computed them

    def gold(self, label_ids: np.ndarray) -> np.ndarray:
        label_ids = np.asarray(label_ids)
        first = label_ids[np.arange(len(label_ids)), (label_ids != -100).argmax(axis=1)]
        lookup = {t: i for i, t in enumerate(self.first_ids)}
        return np.array([lookup[int(t)] for t in first])
