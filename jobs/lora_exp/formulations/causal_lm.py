"""``causal_lm``: next-token prediction over fixed blocks of ``model.max_length`` tokens (the remainder is
dropped), so every evaluated block predicts the same number of tokens and the Trainer's eval loss is the
mean token loss: perplexity = exp(loss). Generation quality is measured on held-out blocks: the model
continues the first ``eval.prompt_tokens`` tokens and its continuation is scored against the real one
(BLEU, SacreBLEU, ROUGE, TER, chrF, METEOR; ``lora_exp.metrics.generation``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lora_exp.core.errors import DataError
from lora_exp.formulations.base import NoTrainingMetrics, map_batches, probe_ids, register_formulation
from lora_exp.metrics.generation import generation_metrics
from lora_exp.tasks import LM
from lora_exp.tasks.wikitext import LMTask

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


@register_formulation
@dataclass
class CausalLM(NoTrainingMetrics):
    task: LMTask
    tokenizer: Any
    block_size: int
    generation_samples: int
    prompt_tokens: int
    max_new_tokens: int
    kind: ClassVar[str] = "causal_lm"
    task_kinds: ClassVar[tuple[str, ...]] = (LM,)
    has_head: ClassVar[bool] = False
    model_class: ClassVar[str] = "AutoModelForCausalLM"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"

    @classmethod
    def final_metrics(cls, task: LMTask) -> tuple[str, ...]:
        return ("loss", "perplexity", "bleu", "sacrebleu", "chrf", "ter", "rouge1", "rouge2", "rougeL", "meteor")

    @classmethod
    def memory_probe(cls, model: Any, batch: int, length: int) -> Any:
        ids = probe_ids(model, batch, length)
        return model(input_ids=ids, attention_mask=ids.new_ones(ids.shape), labels=ids).loss

    @classmethod
    def build(cls, task: LMTask, spec: RunSpec, tokenizer: Any) -> CausalLM:
        e = spec.eval
        return cls(task, tokenizer, spec.model.max_length, e.generation_samples, e.prompt_tokens, e.max_new_tokens)

    def _tokens(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"input_ids": self.tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    def _blocks(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = list(chain.from_iterable(batch["input_ids"]))
        n = len(ids) // self.block_size * self.block_size
        blocks = [ids[i : i + self.block_size] for i in range(0, n, self.block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * self.block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    def tokenize(self, ds: Any) -> Any:
        tokens = map_batches(ds, self._tokens, "tokenizing (causal_lm)")
        blocks = tokens.map(self._blocks, batched=True, batch_size=1000, remove_columns=tokens.column_names,
                            desc=f"grouping into {self.block_size}-token blocks")
        if len(blocks) == 0:
            raise DataError(f"the text yields no complete {self.block_size}-token block; lower model.max_length")
        return blocks

    def collator(self) -> Any:
        from transformers import default_data_collator

        return default_data_collator  # blocks are equal-length: no padding, labels already set

    def packing_collator(self) -> Any:
        return self.collator()  # the blocks are already padding-free: documents are concatenated into them

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        blocks = self.tokenize(raw)
        loss_only = trainer.args.prediction_loss_only
        trainer.args.prediction_loss_only = True  # only the loss: full-vocabulary logits would not fit
        pred = trainer.predict(blocks, metric_key_prefix=split)
        trainer.args.prediction_loss_only = loss_only
        if not trainer.is_world_process_zero():
            return {}
        loss = pred.metrics[f"{split}_loss"]
        metrics = {"loss": loss, "perplexity": math.exp(loss), "blocks": float(len(blocks))}
        samples = self.generate(trainer, blocks)
        if samples:
            metrics.update(generation_metrics([s[2] for s in samples], [s[1] for s in samples]))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps({"split": split, "task": self.task.name, **metrics},
                                                         indent=2))
        with (out_dir / "generations.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("prompt", "reference", "generated"), *samples])
        return metrics

    def generate(self, trainer: Any, blocks: Any) -> list[tuple[str, str, str]]:
        """Greedy continuations of the first held-out blocks: (prompt, true continuation, generated)."""
        import torch

        n = min(self.generation_samples, len(blocks))
        if n == 0:
            return []
        p, m = min(self.prompt_tokens, self.block_size - 1), self.max_new_tokens
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.eval()
        out = []
        # The Trainer's mixed-precision context, as in its own forward passes (frozen weights may be bf16).
        with torch.no_grad(), trainer.autocast_smart_context_manager():
            for i in range(n):
                ids = blocks[i]["input_ids"]
                prompt = torch.tensor([ids[:p]], device=model.device)
                gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=m,
                                     do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                decode = self.tokenizer.decode
                out.append((decode(ids[:p]), decode(ids[p : p + m]), decode(gen[0, p:], skip_special_tokens=True)))
        return out
