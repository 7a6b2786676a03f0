"""``span``: extractive QA for GPT-2 and Llama. A span head (``AutoModelForQuestionAnswering``) predicts
start/end logits over the context. Long contexts are split into overlapping windows (``task.doc_stride``);
a window without the answer, and an unanswerable question, point at position 0, the "no answer" slot. At
evaluation the best span over all windows competes with the no-answer score, as in the reference
implementation, and the official SQuAD v2 metrics score the answers.
"""

from __future__ import annotations

import collections
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lora_exp.core.errors import DataError, SpecError
from lora_exp.formulations.base import NoTrainingMetrics, map_batches, probe_ids, register_formulation
from lora_exp.metrics.squad import compute_exact, compute_f1, normalize_answer, squad_v2_metrics
from lora_exp.tasks import QA
from lora_exp.tasks.squad_v2 import QATask

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


NULL = 0  # the position that stands for "no answer"


@register_formulation
@dataclass
class SpanExtraction(NoTrainingMetrics):
    task: QATask
    tokenizer: Any
    max_length: int
    doc_stride: int
    max_answer_length: int
    n_best: int = 20
    kind: ClassVar[str] = "span"
    task_kinds: ClassVar[tuple[str, ...]] = (QA,)
    has_head: ClassVar[bool] = True
    model_class: ClassVar[str] = "AutoModelForQuestionAnswering"
    peft_task_type: ClassVar[str] = "QUESTION_ANS"

    @classmethod
    def final_metrics(cls, task: QATask) -> tuple[str, ...]:
        return ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1")

    @classmethod
    def check_spec(cls, spec: RunSpec, task: QATask) -> None:
        if spec.training.packing:
            raise SpecError("training.packing: the span formulation's start/end heads score each window's own "
                            "positions, which packing would merge; set packing: false for QA")
        super().check_spec(spec, task)

    def packing_collator(self) -> Any:
        raise SpecError("training.packing: not supported by the span formulation")

    @classmethod
    def memory_probe(cls, model: Any, batch: int, length: int) -> Any:
        ids = probe_ids(model, batch, length)
        return model(input_ids=ids, attention_mask=ids.new_ones(ids.shape), start_positions=ids[:, 0],
                     end_positions=ids[:, 0]).loss

    @classmethod
    def build(cls, task: QATask, spec: RunSpec, tokenizer: Any) -> SpanExtraction:
        return cls(task, tokenizer, spec.model.max_length, spec.task.doc_stride or 128,
                   spec.task.max_answer_length or 30)

    def _windows(self, batch: dict[str, list[Any]]) -> Any:
        questions = [q.strip() + "\n" for q in batch["question"]]
        longest = max(len(ids) for ids in self.tokenizer(questions)["input_ids"])
        room = self.max_length - longest  # context tokens per window, for the longest question
        if room < 8:
            raise DataError(f"a question takes {longest} tokens: model.max_length {self.max_length} leaves no room "
                            "for the context; raise model.max_length")
        return self.tokenizer(
            questions, batch["context"], truncation="only_second", max_length=self.max_length,
            stride=min(self.doc_stride, room // 2), return_overflowing_tokens=True, return_offsets_mapping=True,
        )

    def _train_features(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = self._windows(batch)
        starts, ends = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            answers = batch["answers"][enc["overflow_to_sample_mapping"][i]]
            seq = enc.sequence_ids(i)
            ctx = [j for j, s in enumerate(seq) if s == 1]
            start = end = NULL
            if answers["text"] and ctx:
                s_char = answers["answer_start"][0]
                e_char = s_char + len(answers["text"][0])
                if offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:  # answer inside this window
                    start = next(j for j in ctx if offsets[j][1] > s_char)
                    end = next(j for j in reversed(ctx) if offsets[j][0] < e_char)
            starts.append(start)
            ends.append(end)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "start_positions": starts, "end_positions": ends}

    def _eval_features(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = self._windows(batch)
        ids, offsets = [], []
        for i, offs in enumerate(enc["offset_mapping"]):
            seq = enc.sequence_ids(i)
            ids.append(batch["id"][enc["overflow_to_sample_mapping"][i]])
            offsets.append([list(o) if s == 1 else None for o, s in zip(offs, seq, strict=True)])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "example_id": ids,
                "offset_mapping": offsets}

    def tokenize(self, ds: Any) -> Any:
        return map_batches(ds, self._train_features, "windowing contexts (span)")

    def collator(self) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        features = map_batches(raw, self._eval_features, "windowing contexts (span, eval)")
        pred = trainer.predict(features.remove_columns(["example_id", "offset_mapping"]), metric_key_prefix=split)
        if not trainer.is_world_process_zero():
            return {}
        start_logits, end_logits = pred.predictions[:2]
        answers = self.postprocess(raw, features, start_logits, end_logits)
        metrics = squad_v2_metrics({r["id"]: r["answers"]["text"] for r in raw}, answers)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps({"split": split, "task": self.task.name, **metrics},
                                                         indent=2))
        with (out_dir / "predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "question", "gold_answers", "prediction", "exact", "f1"])
            for r in raw:
                golds = [a for a in r["answers"]["text"] if normalize_answer(a)] or [""]
                p = answers[r["id"]]
                w.writerow([r["id"], r["question"], json.dumps(r["answers"]["text"]), p,
                            max(compute_exact(g, p) for g in golds), round(max(compute_f1(g, p) for g in golds), 4)])
        return metrics

    def postprocess(self, raw: Any, features: Any, start_logits: np.ndarray, end_logits: np.ndarray) -> dict[str, str]:
        """Best answer text per example over all its windows, or "" when the no-answer score wins."""
        by_example = collections.defaultdict(list)
        for i, ex_id in enumerate(features["example_id"]):
            by_example[ex_id].append(i)
        offsets_all = features["offset_mapping"]
        out = {}
        for r in raw:
            best_text, best_score, null_score = "", -np.inf, np.inf
            for i in by_example[r["id"]]:
                s_log, e_log, offsets = start_logits[i], end_logits[i], offsets_all[i]
                null_score = min(null_score, float(s_log[NULL] + e_log[NULL]))
                top_s = np.argsort(s_log)[-1 : -self.n_best - 1 : -1]
                top_e = np.argsort(e_log)[-1 : -self.n_best - 1 : -1]
                for s in top_s:
                    for e in top_e:
                        if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None
                                or e < s or e - s + 1 > self.max_answer_length):
                            continue
                        score = float(s_log[s] + e_log[e])
                        if score > best_score:
                            best_score, best_text = score, r["context"][offsets[s][0] : offsets[e][1]]
            out[r["id"]] = best_text if best_score > null_score else ""
        return out


